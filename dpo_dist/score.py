"""Reference scoring on Ray: one actor per GPU (or N CPU actors) writes the cache once.

    dpo-dist score --config configs/demo.yaml                     # embedded local Ray, or RAY_ADDRESS
    ray job submit --address http://HEAD:8265 --working-dir . -- python launchers/score_ref.py --config CFG

The driver streams pairs from the source, cuts them into shards of `score.shard_size` in source
order, skips shards the manifest already lists (same ids, same checksum), and keeps at most two
shards per actor in flight, so its memory stays flat as the data grows. Actors tokenize, batch by
length under a token budget, run the reference forward and return Arrow-ready rows; the driver
writes each shard atomically and then the manifest. A dead actor is replaced and its shard retried.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dpo_dist import cache as cache_mod
from dpo_dist.config import Config
from dpo_dist.data import DataReport, Pair, iter_pairs, source_fingerprint


@dataclass
class ShardTask:
    split: str
    index: int
    pairs: list[Pair]
    ids_hash: str
    attempts: int = 0


@dataclass
class ScoreResult:
    cache_dir: Path
    scored_shards: int = 0
    skipped_shards: int = 0
    pairs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    reports: dict = field(default_factory=dict)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------- fingerprint

def resolve_model_dir(name_or_path: str) -> Path:
    """A local model directory for a path or hub id (hub ids resolve through the local HF cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") > 1 or path.suffix:
        raise FileNotFoundError(f"model {name_or_path}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, no access
        raise FileNotFoundError(f"model {name_or_path}: not a local directory and not fetchable from the hub ({type(e).__name__})") from None


def weights_hash(model_dir: Path, sample: int = 1 << 20) -> str:
    """Identity of the weights: config plus, per weight file, its size and sha256 of its first,
    middle and last MiB (every fine-tuning step changes all of them; full hashing of 100 GB is slow)."""
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise FileNotFoundError(f"model {model_dir}: no .safetensors or .bin weights")
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            for offset in sorted({0, max(size // 2 - sample // 2, 0), max(size - sample, 0)}):
                f.seek(offset)
                h.update(f.read(sample))
    return h.hexdigest()[:16]


def data_fingerprint(cfg: Config) -> str:
    d = cfg.data
    parts = [source_fingerprint(d.train, **_source_kwargs(cfg, "train"))]
    if d.eval:
        parts.append(source_fingerprint(d.eval, **_source_kwargs(cfg, "eval")))
    parts.append(f"eval_fraction={d.eval_fraction}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_fingerprint(cfg: Config, tokenizer, dtype: str, ref_dir: Path) -> dict:
    """Everything the cached values depend on (DESIGN.md invariant 2)."""
    from dpo_dist.logps import LOGPS_VERSION
    from dpo_dist.tokenize import tokenizer_fingerprint

    tok = tokenizer_fingerprint(tokenizer)
    return {
        "data_hash": data_fingerprint(cfg),
        "tokenizer_name": tok["tokenizer_name"],
        "vocab_hash": tok["vocab_hash"],
        "special_tokens": tok["special_tokens"],
        "chat_template_hash": tok["chat_template_hash"],
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "truncation_mode": cfg.data.truncation_mode,
        "ref_model": cfg.ref_model(),
        "ref_weights_hash": weights_hash(ref_dir),
        "dtype": dtype,
        "logps_version": LOGPS_VERSION,
        "cache_format": cache_mod.FORMAT_VERSION,
    }


# ----------------------------------------------------------------------------- shard plan

def _source_kwargs(cfg: Config, split: str) -> dict:
    d = cfg.data
    return dict(format=d.format, split=d.train_split if split == "train" else d.eval_split,
                max_samples=d.max_samples if split == "train" else d.eval_max_samples,
                prompt_field=d.prompt_field, chosen_field=d.chosen_field,
                rejected_field=d.rejected_field, strict=d.strict)


def in_eval_fraction(pair_id: str, fraction: float) -> bool:
    """Deterministic hold-out by id hash: survives reordering of the source."""
    return fraction > 0 and int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def _ids_hash(pairs: list[Pair]) -> str:
    return hashlib.sha256("\n".join(p.id for p in pairs).encode()).hexdigest()[:16]


def plan_shards(cfg: Config, reports: dict[str, DataReport], done: dict[str, int]) -> Iterator[ShardTask]:
    """Stream the sources and cut shards in source order; `done[split]` is set to the shard count at the end."""
    size = cfg.score.shard_size
    buffers: dict[str, list[Pair]] = {"train": [], "eval": []}
    counters = {"train": 0, "eval": 0}

    def flush(split: str) -> Iterator[ShardTask]:
        if buffers[split]:
            pairs, buffers[split] = buffers[split], []
            yield ShardTask(split, counters[split], pairs, _ids_hash(pairs))
            counters[split] += 1

    for pair in iter_pairs(cfg.data.train, report=reports["train"], **_source_kwargs(cfg, "train")):
        split = "eval" if not cfg.data.eval and in_eval_fraction(pair.id, cfg.data.eval_fraction) else "train"
        buffers[split].append(pair)
        if len(buffers[split]) >= size:
            yield from flush(split)
    if cfg.data.eval:
        for pair in iter_pairs(cfg.data.eval, report=reports["eval"], **_source_kwargs(cfg, "eval")):
            buffers["eval"].append(pair)
            if len(buffers["eval"]) >= size:
                yield from flush("eval")
    for split in ("train", "eval"):
        yield from flush(split)
        done[split] = counters[split]


def estimate_rows(source: str) -> int | None:
    """Line count of a jsonl(.gz) source for the progress bar's ETA; None for other sources."""
    path = Path(source)
    if not path.is_file() or not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        return None
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# ----------------------------------------------------------------------------- the actor

class RefScorer:
    """Holds the frozen reference model; scores one shard per call (Ray actor body)."""

    def __init__(self, model_path: str, tokenizer_path: str, dtype: str, attn_implementation: str,
                 threads: int, max_length: int, max_prompt_length: int, truncation_mode: str,
                 token_budget: int, device: str):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        if device == "cpu":
            torch.set_num_threads(threads)
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation).to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.tok_args = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode)
        self.token_budget = token_budget

    def pid(self) -> int:
        return os.getpid()

    def score(self, task: ShardTask) -> dict:
        """Tokenize, batch sequences by length, forward; rows in source order plus shard statistics.

        Each pair gives two sequences, prompt + chosen and prompt + rejected, batched by their own
        lengths rather than as a [chosen; rejected] pair: a pair padded to its longer side caps
        padding efficiency at 0.89 on HH-RLHF, sequences alone reach 0.93 (bench/bench_score.py).
        """
        import torch

        from dpo_dist.batching import length_batches
        from dpo_dist.logps import concatenated_forward, sequence_batch
        from dpo_dist.tokenize import TokenizeReport, tokenize_pair

        report = TokenizeReport()
        tokenized = [tokenize_pair(self.tokenizer, p, report=report, **self.tok_args) for p in task.pairs]
        # Sequence 2i is pair i's prompt + chosen, 2i + 1 its prompt + rejected.
        sequences = [(t.prompt_input_ids, r) for t in tokenized for r in (t.chosen_input_ids, t.rejected_input_ids)]
        logps, counts = [0.0] * len(sequences), [0] * len(sequences)
        real = padded = 0
        start = time.perf_counter()
        with torch.inference_mode():
            for batch_ids in length_batches([len(p) + len(r) for p, r in sequences], self.token_budget, rows_per_item=1):
                batch = {k: v.to(self.device) for k, v in sequence_batch([sequences[i] for i in batch_ids], self.pad_id).items()}
                batch_logps, batch_counts = concatenated_forward(self.model, batch)  # (B,), (B,)
                real += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
                for j, i in enumerate(batch_ids):
                    logps[i], counts[i] = float(batch_logps[j]), int(batch_counts[j])
        rows = [{"id": t.id, "row": task.pairs[i].row, "prompt_input_ids": t.prompt_input_ids,
                 "chosen_input_ids": t.chosen_input_ids, "rejected_input_ids": t.rejected_input_ids,
                 "ref_chosen_logps": logps[2 * i], "ref_rejected_logps": logps[2 * i + 1],
                 "chosen_num_tokens": counts[2 * i], "rejected_num_tokens": counts[2 * i + 1],
                 "prompt_truncated": t.prompt_truncated, "response_truncated": t.response_truncated}
                for i, t in enumerate(tokenized)]
        return {"rows": rows, "tokenize": report.to_dict(), "real_tokens": real, "padded_tokens": padded,
                "forward_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- driver

def resolve_dtype(name: str, has_gpu: bool) -> str:
    if name == "auto":
        return "bfloat16" if has_gpu else "float32"
    return name


def init_ray(num_cpus: int | None = None):
    """Connect to RAY_ADDRESS (as `ray job submit` sets it), or start an embedded local cluster."""
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded, loopback-only cluster
        # address="local": without it ray.init joins the last `ray start` cluster of this machine (or
        # hangs on a stale record of one) instead of starting the embedded cluster documented above.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return ray


def prepare_cache_dir(cache_dir: Path, fingerprint: dict, overwrite: bool) -> cache_mod.Manifest:
    """Reuse a matching cache; refuse (or, when asked, clear) one built for another configuration."""
    manifest = cache_mod.load_manifest(cache_dir)
    if manifest is not None:
        diff = cache_mod.fingerprint_diff(manifest.fingerprint, fingerprint)
        if not diff:
            return manifest
        if not overwrite:
            raise cache_mod.CacheError(
                f"{cache_dir}: existing cache has another fingerprint, differing in {', '.join(diff)} "
                f"({cache_mod.describe_diff(manifest.fingerprint, fingerprint, diff)}); "
                "use another cache_dir or set score.overwrite=true to replace it")
        for split in cache_mod.SPLITS:
            shutil.rmtree(cache_dir / split, ignore_errors=True)
        (cache_dir / cache_mod.MANIFEST).unlink()
    elif cache_dir.exists() and any(p.name != "tb" for p in cache_dir.iterdir()) and not overwrite:
        raise cache_mod.CacheError(f"{cache_dir}: folder exists, is not empty and holds no manifest; refusing to write into it")
    return cache_mod.Manifest.new({**fingerprint, "created": cache_mod.now()})


def run_scoring(cfg: Config) -> ScoreResult:
    """Score the reference model over the train and eval splits into cfg's cache directory."""
    from transformers import AutoTokenizer

    cache_dir = cfg.resolved_cache_dir()
    # Everything that can be checked cheaply is checked before Ray starts.
    if not cfg.data.train:
        raise ValueError("data.train is empty: name a training source")
    ref_dir = resolve_model_dir(cfg.ref_model())
    data_fingerprint(cfg)  # fails now on a missing or unreadable source
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path() if cfg.model.tokenizer else str(ref_dir))

    ray = init_ray(num_cpus=None)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    dtype = resolve_dtype(cfg.score.dtype, gpus > 0)
    fingerprint = build_fingerprint(cfg, tokenizer, dtype, ref_dir)
    manifest = prepare_cache_dir(cache_dir, fingerprint, cfg.score.overwrite)
    n_actors = cfg.score.num_actors or (gpus if gpus else cfg.score.cpu_actors)
    actor_cls = ray.remote(RefScorer).options(
        num_gpus=1 if gpus else 0, num_cpus=1 if gpus else cfg.score.threads_per_actor, max_restarts=0)
    actor_args = (str(ref_dir), cfg.tokenizer_path() if cfg.model.tokenizer else str(ref_dir), dtype,
                  cfg.model.attn_implementation, cfg.score.threads_per_actor, cfg.data.max_length,
                  cfg.data.max_prompt_length, cfg.data.truncation_mode, cfg.score.token_budget,
                  "cuda" if gpus else "cpu")
    return _dispatch(cfg, manifest, cache_dir, lambda: actor_cls.remote(*actor_args), n_actors, ray)


def _dispatch(cfg, manifest, cache_dir, new_actor, n_actors, ray) -> ScoreResult:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    result = ScoreResult(cache_dir)
    reports = {s: DataReport() for s in cache_mod.SPLITS}
    done: dict[str, int] = {}
    # Two slots per actor: its next shard is queued while the driver writes the last one.
    idle = [actor for actor in (new_actor() for _ in range(n_actors)) for _ in range(2)]
    replaced: dict = {}  # dead actor -> its replacement, which inherits both of its slots
    in_flight: dict = {}
    writer = SummaryWriter(str(cache_dir / "tb"))
    progress = tqdm(total=estimate_rows(cfg.data.train), unit="pair", desc="scoring", dynamic_ncols=True)
    started = time.perf_counter()

    def submit(actor, task: ShardTask) -> None:
        in_flight[actor.score.remote(task)] = (actor, task)

    def record(task: ShardTask, out: dict) -> None:
        entry = cache_mod.write_shard(cache_dir / task.split / cache_mod.shard_name(task.index), out["rows"])
        entry.update(ids_hash=task.ids_hash, tokenize=out["tokenize"], real_tokens=out["real_tokens"],
                     padded_tokens=out["padded_tokens"])
        manifest.splits[task.split]["shards"][str(task.index)] = entry
        manifest.save(cache_dir)
        result.scored_shards += 1
        result.tokens += out["real_tokens"]
        elapsed = time.perf_counter() - started
        writer.add_scalar("score/tokens_per_sec", result.tokens / elapsed, result.scored_shards)
        writer.add_scalar("score/padding_efficiency", out["real_tokens"] / max(out["padded_tokens"], 1), result.scored_shards)
        writer.add_scalar("score/pairs", result.pairs, result.scored_shards)
        progress.set_postfix(tok_s=f"{result.tokens / elapsed:,.0f}", shards=result.scored_shards)

    def wait_one() -> None:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor, task = in_flight.pop(ready[0])
        try:
            out = ray.get(ready[0])
        except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
            task.attempts += 1
            if task.attempts > cfg.score.max_retries:
                cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise RuntimeError(f"shard {task.split}/{task.index}: actor died {task.attempts} times; giving up ({cause})") from None
            progress.write(f"actor died on shard {task.split}/{task.index}; replacing it and retrying (attempt {task.attempts + 1})")
            if actor not in replaced:  # its other in-flight shard fails too: replace it once
                ray.kill(actor, no_restart=True)
                replaced[actor] = new_actor()
            submit(replaced[actor], task)
            return
        record(task, out)
        progress.update(len(task.pairs))
        idle.append(actor)

    try:
        for task in plan_shards(cfg, reports, done):
            result.pairs += len(task.pairs)
            entry = manifest.splits[task.split]["shards"].get(str(task.index))
            path = cache_dir / task.split / cache_mod.shard_name(task.index)
            if entry and entry.get("ids_hash") == task.ids_hash and path.exists() and cache_mod.sha256_file(path) == entry["sha256"]:
                result.skipped_shards += 1
                progress.update(len(task.pairs))
                continue
            while not idle:
                wait_one()
            submit(idle.pop(), task)
        while in_flight:
            wait_one()
    finally:
        progress.close()
        writer.close()
    result.seconds = time.perf_counter() - started
    for split in cache_mod.SPLITS:
        info = manifest.splits[split]
        info["num_shards"] = done[split]
        entries = manifest.shard_entries(split)
        tok = {k: sum(e["tokenize"][k] for e in entries) for k in ("prompt_truncated", "response_truncated", "boundary_mismatch")}
        real, padded = sum(e["real_tokens"] for e in entries), sum(e["padded_tokens"] for e in entries)
        info["report"] = {"pairs": manifest.rows(split), "source": reports[split].to_dict(), **tok, "padding_efficiency": round(real / padded, 4) if padded else 1.0}
        result.reports[split] = info["report"]
    manifest.save(cache_dir)
    return result
