"""The openai judge: an OpenAI-compatible chat endpoint asked about every comparison on
judge.concurrency threads, each request retried with backoff and jitter, each answer cached at once."""
from __future__ import annotations

import math
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Optional

from dpo_dist.config import Config
from dpo_dist.core.winrate import combine_orders, single_order
from dpo_dist.stages.judge.prompt import judge_messages, order_of, parse_choice, verdict_key
from dpo_dist.stages.judge.verdict_cache import VerdictCache, cache_path
from dpo_dist.stages.judge.verdicts import ORDERS, JudgeError, Usage, other_side, row_ident

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKOFF_BASE_S = 1.0      # first retry waits about this long, doubling per attempt (with jitter)
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 120.0  # a longer Retry-After is not waited for in full


class _Fatal(Exception):
    """Raised in a worker when no request can succeed (401, 403, 404): stops the run."""


# ----------------------------------------------------------------------------- one request, with retries

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

def openai_endpoint(cfg: Config, backoff_s: float) -> _Endpoint:
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


def judge_openai(cfg: Config, rows: list[dict], ep: _Endpoint) -> tuple[list[dict], Usage]:
    from tqdm import tqdm

    orders = [ORDERS if cfg.judge.both_orders else order_of(row) for row in rows]
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
            choice = None if a.choice is None else (first_side if a.choice == "A" else other_side(first_side))
            sides.append({"first": first_side, "answer": a.answer, "choice": choice, "cached": a.cached,
                          "error": a.reason})
        choices = [s["choice"] for s in sides]
        verdict = combine_orders(*choices) if len(choices) == 2 else single_order(choices[0])
        reason = "; ".join(f"{s['first']} first: {s['error']}" for s in sides if s["choice"] is None) or None
        judgments.append({**row_ident(row), "verdict": verdict, "reason": reason, "orders": sides})
    return judgments, usage
