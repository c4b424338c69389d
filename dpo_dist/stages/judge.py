"""`dpo-dist judge`: win rates of generated responses against the dataset's chosen ones (DPO paper, Sec. 6).

    export OPENAI_API_KEY=...                                     # read from the environment only
    dpo-dist judge --config CFG                                   # OUTPUT_DIR/generations -> OUTPUT_DIR/judge
    dpo-dist judge --config CFG judge.base_url=http://127.0.0.1:8000/v1 judge.model=my-judge
    dpo-dist judge --config CFG judge.kind=reward_model judge.reward_model=models/rm

Every generation row (see dpo_dist.core.generations) is compared with its row's `reference`.
Two judges:

  openai        an OpenAI-compatible chat endpoint asked which response is more helpful (the paper's
                GPT-4 comparison, in our own words: PROMPT_VERSION). With judge.both_orders each pair is
                asked twice, the generated response once as A and once as B; agreeing answers give a
                win or a loss, split answers a tie (core.winrate.combine_orders); without it one order is
                asked, the first side fixed per row by a hash so that each side leads about half the
                time. The endpoint is judge.base_url, else $OPENAI_BASE_URL, else OpenAI's. Requests run on
                judge.concurrency threads; 429, 5xx, timeouts, connection errors, bodies that are not a
                chat completion and answers without a "More helpful: A/B" line are retried with
                exponential backoff and jitter (honouring Retry-After) up to judge.max_retries times,
                then recorded as an error with its reason: never a crash, never a win. A refused key
                (401/403) or an unknown model or URL (404) stops the run with one line.
  reward_model  a local sequence-classification model (num_labels=1) scores prompt + response (as plain
                text, cut from the left to data.max_length tokens) for the generated and the reference
                response on Ray actors (one per GPU, else score.cpu_actors; batches under
                score.token_budget); the higher score wins, equal scores tie. Its usage counts are 0.

Each answer is written to a SQLite verdict cache (judge.cache_path, default $DPO_DIST_CACHE/judge.sqlite)
as it arrives, keyed by (endpoint + model, PROMPT_VERSION, prompt, first text, second text): a rerun,
or a run after a crash, asks only what is not paid for yet. Errors are not cached, so a rerun retries
exactly them. Identical comparisons within a run are asked once.

Outputs (OUT, written atomically):
    judgments.jsonl   one row per generation row: prompt_id, model, checkpoint_step, temperature, sample,
                      verdict (win/tie/loss/error), reason (errors only), and either "orders" (openai: per
                      order {first: generated|reference, answer: raw text, choice: generated|reference|null,
                      cached, error}) or "scores" (reward_model: {generated, reference})
    win_rates.json    {"judge": {kind, model, base_url, prompt_version, both_orders},
                       "rows": [{model, checkpoint_step, temperature, n, wins, ties, losses, errors, win_rate,
                                 ci_low, ci_high}] (core.winrate.aggregate: 95% Wilson interval),
                       "usage": {requests, retries, cached, prompt_tokens, completion_tokens, cost_usd}}
The API key is never written anywhere: not to the cache, results, logs or error messages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from dpo_dist.config import Config
from dpo_dist.core.atomic import atomic_write_text
from dpo_dist.core.errors import UserError
from dpo_dist.core.generations import read_generations, shard_paths
from dpo_dist.core.winrate import aggregate, combine_orders, score_verdict, single_order

PROMPT_VERSION = "helpful-v1"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKOFF_BASE_S = 1.0      # first retry waits about this long, doubling per attempt (with jitter)
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 120.0  # a longer Retry-After is not waited for in full
ORDERS = ("generated", "reference")  # which response is shown first (as A)

SYSTEM_PROMPT = "You are a careful and impartial judge of the responses of AI assistants."
# The tags delimit the three texts; dpo_dist.fixtures.judge_server parses them back.
USER_TEMPLATE = """Below is a query to an AI assistant (it may be the last turn of a conversation), followed by two candidate responses.

<query>
{query}
</query>

<response_a>
{first}
</response_a>

<response_b>
{second}
</response_b>

Which response is more helpful to the user: which one addresses the query better, more accurately and more usefully? Neither the order of the responses nor their length should decide. First write one sentence comparing them, then on a last line "More helpful:" followed by the single letter A or B, in this format:
Comparison: <one sentence>
More helpful: <A or B>"""
_CHOICE = re.compile(r"more\s+helpful\s*:\s*[*\"'(\[]*\s*(?:response\s+)?([ab])\b", re.IGNORECASE)


class JudgeError(UserError):
    """A judge that cannot run as configured (missing key, refused key, unknown model, bad rows)."""


class _Fatal(Exception):
    """Raised in a worker when no request can succeed (401, 403, 404): stops the run."""


# ----------------------------------------------------------------------------- prompt and answer

def judge_messages(query: str, first: str, second: str) -> list[dict]:
    """The chat messages asking which of `first` (A) and `second` (B) better answers `query`."""
    user = USER_TEMPLATE.format(query=query.strip(), first=first.strip(), second=second.strip())
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_choice(answer: Optional[str]) -> Optional[str]:
    """"A" or "B" from the last "More helpful: X" of an answer; None when there is none (malformed)."""
    matches = _CHOICE.findall(answer or "")
    return matches[-1].upper() if matches else None


def verdict_key(judge_id: str, query: str, first: str, second: str) -> str:
    """Cache key: sha256 of (endpoint + model, PROMPT_VERSION, prompt, first text, second text), the texts
    stripped as judge_messages sends them."""
    blob = json.dumps([judge_id, PROMPT_VERSION, query.strip(), first.strip(), second.strip()], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _order_of(row: dict) -> tuple[str, ...]:
    """Orders asked for a row when only one is: which side goes first is fixed by a hash of the
    row's identity, so over many rows each side is A about half the time."""
    ident = json.dumps([row["prompt_id"], row["model"], row["checkpoint_step"], row["temperature"], row["sample"]])
    return (ORDERS[hashlib.sha256(ident.encode()).digest()[0] % 2],)


# ----------------------------------------------------------------------------- verdict cache

class VerdictCache:
    """SQLite store of parsed answers, one committed row per answer (WAL: readers never block the writer).

    One connection shared by the worker threads behind a lock; another process may use the same file.
    """

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                             "prompt_version TEXT NOT NULL, answer TEXT NOT NULL, choice TEXT NOT NULL, "
                             "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL)")
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            raise JudgeError(f"judge.cache_path: cannot open the verdict cache {path} ({e}); set judge.cache_path "
                             "to a writable file") from None
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT answer, choice FROM verdicts WHERE key = ?", (key,)).fetchone()
        return {"answer": row[0], "choice": row[1]} if row else None

    def put(self, key: str, judge_id: str, answer: str, choice: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (key, judge_id, PROMPT_VERSION, answer, choice, prompt_tokens, completion_tokens, time.time()))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


def cache_path(cfg: Config) -> Path:
    """judge.cache_path, else judge.sqlite in $DPO_DIST_CACHE (default ~/.cache/dpo-dist)."""
    from dpo_dist.core.hashing import store_dir

    return Path(cfg.judge.cache_path).expanduser() if cfg.judge.cache_path else store_dir() / "judge.sqlite"


# ----------------------------------------------------------------------------- one request, with retries

@dataclass
class Usage:
    """requests: HTTP requests sent (retries included); cached: comparisons answered by the cache."""
    requests: int = 0
    retries: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self, price_per_1k_input: float, price_per_1k_output: float) -> dict:
        """Counts plus cost_usd = prompt_tokens / 1000 * price_in + completion_tokens / 1000 * price_out."""
        cost = self.prompt_tokens / 1000 * price_per_1k_input + self.completion_tokens / 1000 * price_per_1k_output
        return {**asdict(self), "cost_usd": round(cost, 6)}


@dataclass
class _Endpoint:
    client: object
    base_url: str
    model: str
    key_env: str
    api_key: str = field(repr=False)  # only for redacting; never printed
    max_retries: int = 0
    backoff_s: float = BACKOFF_BASE_S

    @property
    def judge_id(self) -> str:
        return f"{self.base_url.rstrip('/')}|{self.model}"

    def redact(self, text: str) -> str:
        """The text with the API key cut out (a server may echo it in an error body)."""
        return text.replace(self.api_key, "***") if self.api_key else text


@dataclass
class _Answer:
    choice: Optional[str]      # "A", "B", or None when the comparison failed
    answer: Optional[str]      # the raw answer text (the last one received, if any)
    reason: Optional[str] = None
    cached: bool = False


def _retry_after(error) -> Optional[float]:
    """Seconds a 429/503 asks to wait (retry-after-ms or retry-after, in seconds), when numeric."""
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name, ""))
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            return min(value * scale, RETRY_AFTER_CAP_S)
    return None


def _classify(error, ep: _Endpoint) -> tuple[str, str, Optional[float]]:
    """(action, reason, Retry-After seconds) for the exception of one request; action is "retry",
    "give_up" (this comparison fails) or "fatal" (no request can succeed: 401, 403, 404)."""
    import openai

    if isinstance(error, openai.APITimeoutError):  # a subclass of APIConnectionError: test it first
        return "retry", "timeout", None
    if isinstance(error, openai.APIConnectionError):
        return "retry", "connection error", None
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return "fatal", (f"judge endpoint {ep.base_url} refused the API key in ${ep.key_env} "
                         f"(HTTP {error.status_code}); check that variable's value"), None
    if isinstance(error, openai.NotFoundError):
        return "fatal", (f"judge endpoint {ep.base_url}: HTTP 404 for model {ep.model!r}; "
                         "check judge.base_url and judge.model"), None
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status in (408, 409, 429) or status >= 500:
            return "retry", f"HTTP {status}{' rate limited' if status == 429 else ''}", _retry_after(error)
        first_line = (ep.redact(str(error.message)).strip().splitlines() or [""])[0][:200]
        return "give_up", f"HTTP {status}: {first_line}" if first_line else f"HTTP {status}", None
    if isinstance(error, (openai.APIResponseValidationError, ValueError)):  # JSONDecodeError is a ValueError
        return "retry", "response body is not a chat completion", None
    raise error


def _ask(ep: _Endpoint, messages: list[dict], usage: Usage, lock: threading.Lock) -> tuple[Optional[str], str, int, int]:
    """One request: (answer text or None, what was wrong with it or "", prompt tokens, completion tokens).

    Counts the request and its tokens in `usage` (a malformed answer is paid for too).
    """
    with lock:
        usage.requests += 1
    completion = ep.client.chat.completions.create(model=ep.model, messages=messages, temperature=0)
    if isinstance(completion, str):  # a body that is not JSON, sent with a non-JSON content type
        return None, "response body is not a chat completion", 0, 0
    u = completion.usage
    prompt_tokens, completion_tokens = (u.prompt_tokens or 0, u.completion_tokens or 0) if u else (0, 0)
    with lock:
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
    choices = completion.choices or []
    text = choices[0].message.content if choices and choices[0].message else None
    if text is None:
        return None, "response holds no answer", prompt_tokens, completion_tokens
    problem = "" if parse_choice(text) else "malformed answer (no 'More helpful: A' or 'B' line)"
    return text, problem, prompt_tokens, completion_tokens


def _backoff(attempt: int, base_s: float, rng: random.Random) -> float:
    """Equal-jitter exponential backoff: d = min(cap, base * 2^attempt), wait d/2 + U(0, d/2)."""
    d = min(BACKOFF_CAP_S, base_s * 2 ** attempt)
    return d / 2 + rng.uniform(0, d / 2)


def _judge_with_retries(ep: _Endpoint, messages: list[dict], key: str, cache: VerdictCache, usage: Usage,
                        lock: threading.Lock, stop: threading.Event, rng: random.Random) -> _Answer:
    """Ask until a parsable answer, at most 1 + max_retries requests; the answer goes to the cache at once."""
    answer, reason = None, "not asked"
    for attempt in range(ep.max_retries + 1):
        if stop.is_set():
            return _Answer(None, answer, "cancelled")
        if attempt:
            with lock:
                usage.retries += 1
        wait_s = None
        try:
            text, reason, prompt_tokens, completion_tokens = _ask(ep, messages, usage, lock)
        except Exception as e:  # noqa: BLE001  (_classify re-raises what it does not know)
            action, reason, wait_s = _classify(e, ep)
            if action == "fatal":
                stop.set()  # the other workers stop asking at once
                raise _Fatal(reason) from None
            if action == "give_up":
                return _Answer(None, answer, reason)
            text = None
        answer = text if text is not None else answer
        if text is not None and not reason:
            choice = parse_choice(text)
            cache.put(key, ep.judge_id, text, choice, prompt_tokens, completion_tokens)
            return _Answer(choice, text)
        if attempt < ep.max_retries:
            stop.wait(max(_backoff(attempt, ep.backoff_s, rng), wait_s or 0.0))
    attempts = ep.max_retries + 1
    return _Answer(None, answer, f"{reason} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")


# ----------------------------------------------------------------------------- the openai judge

def _endpoint(cfg: Config, backoff_s: float) -> _Endpoint:
    """The client for cfg.judge, after checking the key variable and the URL (no request is made)."""
    j = cfg.judge
    api_key = os.environ.get(j.api_key_env, "")
    if not api_key:
        raise JudgeError(f"judge.api_key_env: environment variable {j.api_key_env} is not set; export {j.api_key_env}=<key> "
                         "(the key is read from the environment only, never from configs)")
    base_url = j.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    if not re.match(r"https?://[^/\s]+", base_url):
        raise JudgeError(f"judge.base_url: {base_url!r} is not an http(s) URL, e.g. https://api.openai.com/v1")
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=j.timeout_s)
    return _Endpoint(client, base_url, j.model, j.api_key_env, api_key, j.max_retries, backoff_s)


def _judge_openai(cfg: Config, rows: list[dict], ep: _Endpoint) -> tuple[list[dict], Usage]:
    from tqdm import tqdm

    orders = [ORDERS if cfg.judge.both_orders else _order_of(row) for row in rows]
    # Comparisons by cache key: identical ones (same prompt and texts in the same order) are asked once.
    asks: dict[str, list[dict]] = {}
    row_keys = []
    for row, row_orders in zip(rows, orders):
        keys = []
        for first_side in row_orders:
            first, second = ((row["response"], row["reference"]) if first_side == "generated"
                             else (row["reference"], row["response"]))
            key = verdict_key(ep.judge_id, row["prompt"], first, second)
            asks.setdefault(key, judge_messages(row["prompt"], first, second))
            keys.append(key)
        row_keys.append(keys)

    usage, lock, stop, rng = Usage(), threading.Lock(), threading.Event(), random.Random()
    cache = VerdictCache(cache_path(cfg))
    answers: dict[str, _Answer] = {}
    try:
        for key in asks:
            hit = cache.get(key)
            if hit is not None:
                answers[key] = _Answer(hit["choice"], hit["answer"], cached=True)
                usage.cached += 1
        todo = [k for k in asks if k not in answers]
        progress = tqdm(total=len(todo), unit="judgment", desc="judging", dynamic_ncols=True, disable=not todo,
                        mininterval=2)
        with ThreadPoolExecutor(max_workers=cfg.judge.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(_judge_with_retries, ep, asks[k], k, cache, usage, lock, stop, rng): k for k in todo}
            for future in as_completed(futures):
                try:
                    answers[futures[future]] = future.result()
                except _Fatal as e:  # no request can succeed: stop the others, leave with one line
                    stop.set()
                    for f in futures:
                        f.cancel()
                    raise JudgeError(ep.redact(str(e))) from None
                progress.update(1)
                progress.set_postfix(requests=usage.requests, retries=usage.retries, refresh=False)
        progress.close()
    finally:
        cache.close()
        ep.client.close()

    judgments = []
    for row, row_orders, keys in zip(rows, orders, row_keys):
        sides = []
        for first_side, key in zip(row_orders, keys):
            a = answers[key]
            choice = None if a.choice is None else (first_side if a.choice == "A" else _other(first_side))
            sides.append({"first": first_side, "answer": a.answer, "choice": choice, "cached": a.cached,
                          "error": a.reason})
        choices = [s["choice"] for s in sides]
        verdict = combine_orders(*choices) if len(choices) == 2 else single_order(choices[0])
        reason = "; ".join(f"{s['first']} first: {s['error']}" for s in sides if s["choice"] is None) or None
        judgments.append({**_row_ident(row), "verdict": verdict, "reason": reason, "orders": sides})
    return judgments, usage


def _other(side: str) -> str:
    return ORDERS[1] if side == ORDERS[0] else ORDERS[0]


def _row_ident(row: dict) -> dict:
    return {k: row[k] for k in ("prompt_id", "model", "checkpoint_step", "temperature", "sample")}


# ----------------------------------------------------------------------------- the reward-model judge

class RewardScorer:
    """Holds a sequence-classification reward model; scores texts (Ray actor body)."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, threads: int, max_length: int,
                 token_budget: int, device: str):
        from dpo_dist.quiet import silence_known_noise

        silence_known_noise()
        import torch

        from dpo_dist.models import load_sequence_classifier, load_tokenizer

        if device == "cpu":
            torch.set_num_threads(threads)
        self.device = device
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.truncation_side = "left"  # the score is read at the last token: keep the end
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_sequence_classifier(model_path, dtype=getattr(torch, dtype),
                                              trust_remote_code=trust_remote_code).to(device)
        if self.model.config.pad_token_id is None:  # the head finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.max_length, self.token_budget = max_length, token_budget

    def score(self, texts: list[str]) -> list[float]:
        """One scalar reward per text, batched by length under the token budget (right padding)."""
        import torch

        from dpo_dist.core.batching import length_batches

        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for batch_ids in length_batches([len(x) for x in ids], self.token_budget, rows_per_item=1):
                batch = self.tokenizer.pad({"input_ids": [ids[i] for i in batch_ids]}, padding=True, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits  # (B, 1)
                for j, i in enumerate(batch_ids):
                    scores[i] = float(logits[j, 0])
        return scores


def reward_text(row: dict, side: str) -> str:
    """What the reward model reads: the prompt followed by the generated or the reference response."""
    return row["prompt"] + row["response" if side == "generated" else "reference"]


def _check_reward_model(cfg: Config) -> str:
    from dpo_dist.models import load_model_config, resolve_model_dir

    if not cfg.judge.reward_model:
        raise JudgeError("judge.reward_model: not set; judge.kind=reward_model needs a sequence-classification model directory")
    path = resolve_model_dir(cfg.judge.reward_model, trust_remote_code=cfg.model.trust_remote_code)
    labels = load_model_config(path, trust_remote_code=cfg.model.trust_remote_code).num_labels
    if labels != 1:
        raise JudgeError(f"judge.reward_model: {cfg.judge.reward_model} has num_labels={labels}; a reward model has one output")
    return str(path)


def _score_on_ray(cfg: Config, model_path: str, texts: list[str]) -> list[float]:
    """Scores of `texts` from reward-model actors: chunks of at most score.shard_size texts spread over
    the actors (engines.ray_pool: a dead actor is replaced and its chunk retried)."""
    from dpo_dist.engines.ray_pool import connect_ray, progress_bar, run_actors

    cluster = connect_ray()
    kwargs = dict(model_path=model_path, dtype=cfg.inference_dtype(cluster.gpus),
                  trust_remote_code=cfg.model.trust_remote_code, threads=cfg.score.threads_per_actor,
                  max_length=cfg.data.max_length, token_budget=cfg.score.token_budget)
    size = max(1, min(cfg.score.shard_size, math.ceil(len(texts) / cluster.n_actors(cfg.score))))
    chunks = [range(i, min(i + size, len(texts))) for i in range(0, len(texts), size)]
    progress = progress_bar(len(texts), unit="text", desc="reward model", mininterval=2)
    scores = [0.0] * len(texts)

    def call(actor, chunk):
        return actor.score.remote([texts[i] for i in chunk])

    for chunk, out in run_actors(cluster, RewardScorer, kwargs, call, chunks, cfg.score, progress=progress, advance=len,
                                 name=lambda chunk: f"texts {chunk.start}-{chunk.stop - 1}"):
        for i, score in zip(chunk, out):
            scores[i] = score
    return scores


def _judge_reward_model(cfg: Config, rows: list[dict], model_path: str) -> tuple[list[dict], Usage]:
    texts = list(dict.fromkeys(reward_text(row, side) for row in rows for side in ORDERS))  # each text scored once
    scores = dict(zip(texts, _score_on_ray(cfg, model_path, texts)))
    judgments = []
    for row in rows:
        generated, reference = scores[reward_text(row, "generated")], scores[reward_text(row, "reference")]
        judgments.append({**_row_ident(row), "verdict": score_verdict(generated, reference), "reason": None,
                          "scores": {"generated": generated, "reference": reference}})
    return judgments, Usage()


# ----------------------------------------------------------------------------- driver

def read_rows(generations_dir: str | Path) -> list[dict]:
    """Every generation row, with prompt, response and reference checked to be strings (file:line on error)."""
    rows = list(read_generations(generations_dir))
    for i, row in enumerate(rows):
        for name in ("prompt", "response", "reference"):
            if not isinstance(row[name], str):
                raise JudgeError(f"{_row_location(generations_dir, i)}: field {name!r} must be a string, "
                                 f"got {type(row[name]).__name__}")
    return rows


def _row_location(folder: str | Path, index: int) -> str:
    """file:line of the index-th row of read_generations(folder) (rows come in path order)."""
    for path in shard_paths(folder):
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if index < lines:
            return f"{path}:{index + 1}"
        index -= lines
    return str(folder)


def run_judge(cfg: Config, generations_dir: str | Path, out_dir: str | Path, *,
              backoff_s: float = BACKOFF_BASE_S) -> dict:
    """Judge every generation row against its reference; write OUT/judgments.jsonl and OUT/win_rates.json.

    Everything that can be checked is checked before the first request or actor: the rows read,
    the key variable is set (openai), the reward model resolves with one output (reward_model).
    `backoff_s` is the first retry's mean wait (tests shorten it). Returns the win_rates dict.
    """
    rows = read_rows(generations_dir)
    j = cfg.judge
    if j.kind == "openai":
        ep = _endpoint(cfg, backoff_s)
        judge_info = {"kind": "openai", "model": j.model, "base_url": ep.base_url, "prompt_version": PROMPT_VERSION,
                      "both_orders": j.both_orders}
        judgments, usage = _judge_openai(cfg, rows, ep)
    else:
        model_path = _check_reward_model(cfg)
        judge_info = {"kind": "reward_model", "model": j.reward_model}
        judgments, usage = _judge_reward_model(cfg, rows, model_path)
    result = {"judge": judge_info, "rows": aggregate(judgments),
              "usage": usage.to_dict(j.price_per_1k_input, j.price_per_1k_output)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "judgments.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in judgments))
    atomic_write_text(out_dir / "win_rates.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def format_table(result: dict) -> str:
    """The win_rates dict as a plain-text table, judge and usage lines around it."""
    j, u = result["judge"], result["usage"]
    where = f" @ {j['base_url']}, prompt {j['prompt_version']}" if j["kind"] == "openai" else ""
    lines = [f"judge: {j['kind']} {j['model']}{where}",
             f"{'model':<12} {'step':>6} {'temp':>5} {'n':>5} {'win':>5} {'tie':>5} {'loss':>5} {'err':>5}  "
             f"{'win rate':>8}  95% CI"]
    for r in result["rows"]:
        step = "-" if r["checkpoint_step"] is None else str(r["checkpoint_step"])
        rate = "-" if r["win_rate"] is None else f"{r['win_rate']:.3f}"
        ci = "-" if r["ci_low"] is None else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(f"{r['model']:<12} {step:>6} {r['temperature']:>5g} {r['n']:>5} {r['wins']:>5} {r['ties']:>5} "
                     f"{r['losses']:>5} {r['errors']:>5}  {rate:>8}  {ci}")
    if j["kind"] == "openai":
        lines.append(f"usage: {u['requests']} requests ({u['retries']} retries), {u['cached']} cached, "
                     f"{u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} completion tokens, ${u['cost_usd']:.4f}")
    return "\n".join(lines)


def add_judge_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="YAML config file (see README, config reference)")
    p.add_argument("--generations", metavar="DIR", help="generations folder (default: OUTPUT_DIR/generations)")
    p.add_argument("--out", metavar="DIR", help="where judgments.jsonl and win_rates.json go (default: OUTPUT_DIR/judge)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. judge.model=gpt-4o")
    return p


def run_judge_cli(args: argparse.Namespace) -> int:
    from dpo_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    generations = Path(args.generations or Path(cfg.output_dir) / "generations")
    out = Path(args.out or Path(cfg.output_dir) / "judge")
    result = run_judge(cfg, generations, out)
    print(format_table(result))
    print(f"wrote {out / 'judgments.jsonl'} and {out / 'win_rates.json'}")
    return 0
