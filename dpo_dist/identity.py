"""What a cache and a run are, by content; and the one function that compares them.

A cache's identity (manifest.json's "fingerprint") holds everything its values depend on: the
normalized pairs of each split, the tokenizer, the tokenization parameters, the reference weights
and dtype, the log-prob code version. A run's identity holds the result-changing config it was
started with and its cache's identity. Both are flat dicts of short values, keyed by the names
users know (`data.max_length`, `loss.beta`), and `diff(old, new)` lists every differing field as
`name: old -> new`. Names (paths, hub ids) are shown, never compared (docs/DESIGN.md invariant 9).

Hashing every byte of a multi-GB model is slow, so file hashes are remembered per (real path, size,
mtime) under $DPO_DIST_CACHE (default ~/.cache/dpo-dist); a changed file is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dpo_dist.core.atomic import atomic_write_bytes
from dpo_dist.core.errors import UserError
# The leaf pieces live in core.hashing (cache and data need them too); named here for callers.
from dpo_dist.core.hashing import _recall, _remember, diff, file_sha256, short_hash, store_dir  # noqa: F401

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# config.json keys that never change what the model computes. Dropout-like fields are left out
# too: the trainer and the scorer always turn them off (models.disable_dropout).
_CONFIG_NOISE = {"transformers_version", "use_cache", "_name_or_path", "torch_dtype", "dtype",
                 "_attn_implementation_autoset", "_commit_hash", "output_attentions",
                 "output_hidden_states", "return_dict", "attn_implementation"}
_ADAPTER_NOISE = {"base_model_name_or_path", "revision", "inference_mode"}
# The tokenizer is probed with this text: catches BOS/EOS rules set outside the vocabulary files.
_PROBE = "Hello world!\n\nHuman: 1,234 caf\u00e9s?\n\nAssistant: \u4f60\u597d <|eos|></s>"
RUN_FILE = "run.json"
# Run identity fields that may grow on resume (train longer), and what is not identity at all:
# logging, eval and save cadence, keep_last, export, gradient checkpointing, num_procs and the world
# size (a run resumed on another world keeps its global batch; the accumulation adjusts: for_world).
GROWABLE = ("train.steps", "sft.steps")


class IdentityError(UserError):
    """A cache or run folder that belongs to other work, or a file that cannot be identified."""


# ----------------------------------------------------------------------------- model, tokenizer, data

def model_identity(model_dir: str | Path) -> str:
    """sha256 over every byte of every weight file (and the adapter files of a LoRA folder), plus the
    config minus keys that never change the computation. Files are hashed once per change."""
    from dpo_dist.models import random_in_training

    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                     and not p.name.startswith(("training_args", "optimizer", "scheduler", "rng_state")))
    if not weights:
        raise IdentityError(f"model {model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    parts: dict[str, Any] = {p.name: file_sha256(p) for p in weights}
    for name, noise in (("config.json", _CONFIG_NOISE), ("adapter_config.json", _ADAPTER_NOISE)):
        if (model_dir / name).is_file():
            config = json.loads((model_dir / name).read_text())
            parts[name] = {k: v for k, v in config.items() if k not in noise and not random_in_training(k)}
    return "sha256:" + short_hash(parts)


def tokenizer_identity(tokenizer) -> dict[str, str]:
    """Vocabulary and merges (the whole fast-tokenizer pipeline when there is one), added and special
    tokens, chat template, and the ids of a probe text with and without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
    else:
        pipeline = sorted(tokenizer.get_vocab().items())
    added = sorted((k, v) for k, v in tokenizer.get_added_vocab().items())
    template = getattr(tokenizer, "chat_template", None)
    probe = [tokenizer(_PROBE, add_special_tokens=flag)["input_ids"] for flag in (True, False)]
    return {
        "tokenizer.vocab": "sha256:" + short_hash([pipeline, added]),
        "tokenizer.specials": f"bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id} pad={tokenizer.pad_token_id}",
        "tokenizer.chat_template": "sha256:" + short_hash(template) if template else "none",
        "tokenizer.behaviour": "sha256:" + short_hash(probe),
    }


def data_identity(d) -> dict[str, str]:
    """Per split, the count and hash of the normalized, filtered, selected pairs in order (ids are
    content hashes), for a DataConfig `d`. Remembered per source content and options."""
    from dpo_dist.core.data import iter_dataset, source_fingerprint, source_options

    key = json.dumps([source_fingerprint(d.train, **source_options(d, "train")),
                      source_fingerprint(d.eval, **source_options(d, "eval")) if d.eval else None,
                      None if d.eval else d.eval_fraction])
    memo = _recall("data", key)
    if memo:
        return memo["identity"]
    digests = {"train": hashlib.sha256(), "eval": hashlib.sha256()}
    counts = {"train": 0, "eval": 0}
    for split, pair in iter_dataset(d):
        digests[split].update(pair.id.encode() + b"\n")
        counts[split] += 1
    identity = {f"data.{s}": f"{counts[s]} pairs sha256:{digests[s].hexdigest()[:16]}" for s in ("train", "eval")}
    _remember("data", key, {"identity": identity})
    return identity


def pair_count(identity: dict, split: str = "train", prefix: str = "") -> int:
    """The number of pairs of a split, read back from a data or cache identity."""
    return int(identity[f"{prefix}data.{split}"].split()[0])


def cache_identity(cfg, tokenizer, ref_dir: str | Path, dtype: str) -> dict[str, Any]:
    """Everything the cached values depend on (docs/DESIGN.md invariant 2). Shard size is not in it."""
    from dpo_dist.core.cache import FORMAT_VERSION
    from dpo_dist.core.logps import LOGPS_VERSION
    from dpo_dist.core.tokenize import TOKENIZE_VERSION

    d = cfg.data
    return {**data_identity(d), **tokenizer_identity(tokenizer),
            "data.max_length": d.max_length, "data.max_prompt_length": d.max_prompt_length,
            "data.truncation_mode": d.truncation_mode, "tokenize.version": TOKENIZE_VERSION,
            "reference.weights": model_identity(ref_dir), "reference.dtype": dtype,
            "logps.version": LOGPS_VERSION, "cache.format": FORMAT_VERSION}


@dataclass
class CacheSpec:
    """The cache a config asks for: its identity and names, and the resolved reference and tokenizer folders."""

    identity: dict
    names: dict
    ref_dir: Path
    tokenizer_dir: Path


def expected_cache(cfg, dtype: str) -> CacheSpec:
    """Resolve the reference and tokenizer (hub ids through the local HF cache) and compute the
    identity of the cache `cfg` needs, for a reference scored in `dtype`. The one place the scorer,
    `cache ready`, `run`, `sweep` and the trainer get it from."""
    from dpo_dist.models import load_model_config, load_tokenizer, resolve_model_dir

    trust = cfg.model.trust_remote_code
    ref_dir = resolve_model_dir(cfg.ref_model(), trust_remote_code=trust)
    load_model_config(ref_dir, trust_remote_code=trust)  # custom model code without trust fails here, not in an actor
    tokenizer_dir = resolve_model_dir(cfg.model.tokenizer, trust_remote_code=trust) if cfg.model.tokenizer else ref_dir
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust)
    return CacheSpec(cache_identity(cfg, tokenizer, ref_dir, dtype), cache_names(cfg), ref_dir, tokenizer_dir)


def training_cache(cfg) -> CacheSpec:
    """The cache `cfg` scores into or trains from. score.dtype "auto": a new cache is scored in the
    training precision (Config.reference_dtype); an existing one keeps the dtype it was scored in
    (caches scored before that rule, or on other hardware, stay usable)."""
    from dpo_dist.core.cache import load_manifest

    manifest = load_manifest(cfg.resolved_cache_dir())
    if cfg.score.dtype == "auto":
        dtype = manifest.fingerprint.get("reference.dtype", "float32") if manifest else cfg.reference_dtype()
    else:
        dtype = cfg.score.dtype
    return expected_cache(cfg, dtype)


def cache_names(cfg) -> dict[str, str]:
    """What the identity was computed from, as the user named it: shown, never compared."""
    return {"reference": cfg.ref_model(), "tokenizer": cfg.model.tokenizer or cfg.ref_model(),
            "data.train": cfg.data.train, "data.eval": cfg.data.eval or "", "created": now()}


# ----------------------------------------------------------------------------- runs

def data_parallel(cfg, world_size: int) -> int:
    """The ranks among which a global batch is divided: the world size over the sequence-parallel
    size (a group of sequence-parallel ranks runs one micro-batch together)."""
    return max(1, world_size // cfg.train.sequence_parallel_size)


def run_identity(cfg, cache_id: dict, policy_weights: str, world_size: int, ds_config: dict) -> dict[str, Any]:
    """The result-changing config of a training run, with its cache's identity (prefixed `cache.`).

    `ds_config` is the DeepSpeed JSON as written (before "auto" filling); `train.steps` is the total
    number of optimizer steps (max_steps, or epochs x steps per epoch).
    """
    t, loss, lora = cfg.train, cfg.loss, cfg.model.lora
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * data_parallel(cfg, world_size)
    steps = t.max_steps or t.epochs * (pair_count(cache_id) // global_batch)
    identity = {f"cache.{k}": v for k, v in cache_id.items()}
    identity.update({
        "policy.weights": policy_weights,
        "model.attn_implementation": cfg.model.attn_implementation,
        "model.lora": (json.dumps({"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                                   "target_modules": sorted(lora.target_modules)}, sort_keys=True)
                       if lora.enabled else "off"),
        "loss.loss_type": loss.loss_type, "loss.beta": loss.beta, "loss.label_smoothing": loss.label_smoothing,
        "loss.params": json.dumps(loss.params, sort_keys=True),
        "train.micro_batch_size": t.micro_batch_size, "train.global_batch": global_batch,
        "train.lr": t.lr, "train.weight_decay": t.weight_decay,
        "train.adam_betas": list(t.adam_betas), "train.warmup_steps": t.warmup_steps,
        "train.lr_scheduler": t.lr_scheduler, "train.max_grad_norm": t.max_grad_norm, "train.steps": steps,
        "train.seed": t.seed, "train.precision": _precision(ds_config),
        "train.zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "train.deepspeed_config": "sha256:" + short_hash(ds_config),
    })
    return identity


def sft_identity(cfg, tokenizer, base_weights: str, world_size: int, ds_config: dict) -> dict[str, Any]:
    """The result-changing config of an SFT run: base weights, data, tokenization, SFT optimisation."""
    from dpo_dist.core.tokenize import TOKENIZE_VERSION

    d, t, lora = cfg.data, cfg.sft_train(), cfg.sft.lora
    n_train = pair_count(data_identity(d))
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * data_parallel(cfg, world_size)
    return {**data_identity(d), **tokenizer_identity(tokenizer),
            "data.max_length": d.max_length, "data.max_prompt_length": d.max_prompt_length,
            "data.truncation_mode": d.truncation_mode, "tokenize.version": TOKENIZE_VERSION,
            "base.weights": base_weights, "model.attn_implementation": cfg.model.attn_implementation,
            "sft.lora": (json.dumps({"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                                     "target_modules": sorted(lora.target_modules)}, sort_keys=True) if lora.enabled else "off"),
            "sft.micro_batch_size": t.micro_batch_size, "sft.global_batch": global_batch,
            "sft.lr": t.lr, "sft.warmup_steps": t.warmup_steps,
            "sft.lr_scheduler": t.lr_scheduler, "sft.steps": t.max_steps or t.epochs * (n_train // global_batch),
            "train.weight_decay": t.weight_decay, "train.adam_betas": list(t.adam_betas),
            "train.max_grad_norm": t.max_grad_norm, "train.seed": t.seed, "train.precision": _precision(ds_config),
            "train.zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
            "train.deepspeed_config": "sha256:" + short_hash(ds_config)}


def _precision(ds_config: dict) -> str:
    return "bf16" if ds_config.get("bf16", {}).get("enabled") else (
        "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")


def read_record(out_dir: Path) -> dict | None:
    """A run folder's run.json (identity, names, the batch it started with), or None when it holds none.
    A record written before runs were elastic (world size and accumulation in the identity) reads as
    one written now: its global batch in the identity, its start in "started"."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        identity = dict(record["identity"])
    except (ValueError, KeyError, TypeError) as e:
        raise IdentityError(f"{path}: unreadable ({e}); move the run folder away or pass --overwrite") from None
    for p in ("train", "sft"):
        if f"{p}.world_size" in identity:
            world, accum = identity.pop(f"{p}.world_size"), identity.pop(f"{p}.gradient_accumulation_steps")
            identity[f"{p}.global_batch"] = identity[f"{p}.micro_batch_size"] * accum * world
            record.setdefault("started", {"world_size": world, "gradient_accumulation_steps": accum})
    return {**record, "identity": identity}


def read_run(out_dir: Path) -> dict | None:
    """The identity recorded in a run folder, or None when the folder holds no run.json."""
    record = read_record(out_dir)
    return record["identity"] if record else None


def for_world(cfg, world_size: int, stage: str = "train", overwrite: bool = False):
    """(cfg, note): `cfg` as it trains on `world_size` processes. When its run folder (output_dir, or
    the SFT folder for stage "sft") holds a run started with another world size, the accumulation is
    the one that keeps that run's global batch here (core.elastic), with a note saying so; a run
    whose global batch no whole accumulation keeps here is refused (ElasticBatchError, naming the
    world sizes that would). `overwrite`: the run there is set aside, this one starts anew."""
    import dataclasses

    from dpo_dist.core.elastic import resumed_accumulation

    section = "sft" if stage == "sft" else "train"
    record = None if overwrite else read_record(cfg.sft_dir() if section == "sft" else cfg.output_dir)
    if record is None or f"{section}.global_batch" not in record["identity"] or not record.get("started"):
        return cfg, None
    run, t = record["identity"], cfg.sft_train() if section == "sft" else cfg.train
    accum, note = resumed_accumulation(section, run_global=run[f"{section}.global_batch"], run_micro=run[f"{section}.micro_batch_size"],
                                       started_accum=record["started"]["gradient_accumulation_steps"], micro=t.micro_batch_size,
                                       accum=t.gradient_accumulation_steps, global_batch_size=t.global_batch_size,
                                       world=data_parallel(cfg, world_size))
    if accum == t.gradient_accumulation_steps:
        return cfg, note
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), gradient_accumulation_steps=accum)}), note


def has_run(out_dir: Path) -> bool:
    """True when the folder holds a run (its record, checkpoints, metrics or logs), not only a cache."""
    out_dir = Path(out_dir)
    return any((out_dir / name).exists() for name in (RUN_FILE, "checkpoints", "final_metrics.json", "tb"))


def check_run(out_dir: Path, identity: dict) -> bool:
    """Refuse a run folder that belongs to other work; True when it holds this very run.

    Raises IdentityError, one line per differing field, naming both ways forward.
    """
    out_dir = Path(out_dir)
    if not has_run(out_dir):
        return False
    recorded = read_run(out_dir)
    how = "use another output_dir (one run folder per run; the cache can be shared) or pass --overwrite to move the old run aside"
    if recorded is None:
        raise IdentityError(f"{out_dir}: holds a run that does not record its config (older dpo-dist or a foreign "
                            f"folder); {how}")
    lines = diff(recorded, identity, grow=GROWABLE)
    if lines:
        raise IdentityError(f"{out_dir}: this run folder was started with other settings; {how}. Differences "
                            f"(recorded -> now):\n  " + "\n  ".join(lines))
    return True


def write_run(out_dir: Path, identity: dict, names: dict, started: dict | None = None) -> None:
    """run.json: the identity, the names it was computed from, and `started` ({"world_size",
    "gradient_accumulation_steps"} of the run's first start; an earlier record's is kept)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = read_record(out_dir) if (out_dir / RUN_FILE).is_file() else None
    record = {"identity": identity, "names": names, "created": now(), "started": (earlier or {}).get("started", started)}
    atomic_write_bytes(out_dir / RUN_FILE, json.dumps(record, indent=2, sort_keys=True).encode())


def set_aside(out_dir: Path, keep: Iterable[Path] = (), extra: Iterable[Path] = ()) -> Path | None:
    """Move a run folder's contents to OUTPUT_DIR.replaced-<time> (never deleted). Paths in `keep`
    (a cache inside the run folder) stay; folders in `extra` (an export elsewhere) move along."""
    out_dir = Path(out_dir)
    keep = {Path(p).resolve() for p in keep}
    movers = [p for p in (sorted(out_dir.iterdir()) if out_dir.is_dir() else []) if p.resolve() not in keep]
    movers += [Path(p) for p in extra if Path(p).exists() and not Path(p).resolve().is_relative_to(out_dir.resolve())]
    if not movers:
        return None
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
        n += 1
    aside.mkdir(parents=True)
    for p in movers:
        os.replace(p, aside / p.name)
    return aside


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
