"""The reference cache: Arrow IPC shards of tokenized pairs with reference log-probs, and a manifest.

Layout:  CACHE/manifest.json, CACHE/<split>/shard-00000.arrow, ...
Shards are immutable and atomic (DESIGN.md invariant 4): written to a temporary name, fsynced,
renamed; their sha256 and row count are recorded in the manifest, which is itself replaced
atomically. The manifest is the source of truth: a shard file it does not list is not part of the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.ipc as ipc

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
# Fingerprint fields shown to users but not compared (a model may move between machines).
INFORMATIONAL = ("ref_model", "tokenizer_name", "created")

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("row", pa.int64()),
    ("prompt_input_ids", pa.list_(pa.int32())),
    ("chosen_input_ids", pa.list_(pa.int32())),
    ("rejected_input_ids", pa.list_(pa.int32())),
    ("ref_chosen_logps", pa.float32()),
    ("ref_rejected_logps", pa.float32()),
    ("chosen_num_tokens", pa.int32()),
    ("rejected_num_tokens", pa.int32()),
    ("prompt_truncated", pa.bool_()),
    ("response_truncated", pa.bool_()),
])


class CacheError(RuntimeError):
    """The cache is missing, incomplete, corrupt or built for another configuration."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary name beside `path`, fsync, rename: the file is complete or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def write_shard(path: Path, rows: list[dict]) -> dict:
    """Write rows (dicts with the SCHEMA columns) as one Arrow IPC file; return its manifest entry."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table)
    payload = sink.getvalue().to_pybytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, payload)
    tokens = sum(len(r["prompt_input_ids"]) * 2 + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    return {"name": path.name, "rows": len(rows), "tokens": tokens, "sha256": hashlib.sha256(payload).hexdigest()}


def read_shard(path: Path) -> pa.Table:
    """Memory-mapped read: the OS pages the data in as it is used."""
    return ipc.open_file(pa.memory_map(str(path), "r")).read_all()


@dataclass
class Manifest:
    fingerprint: dict
    splits: dict  # split -> {"shards": {index: entry}, "num_shards": int | None, "report": {...}}
    report: dict

    @classmethod
    def new(cls, fingerprint: dict) -> "Manifest":
        return cls(fingerprint, {s: {"shards": {}, "num_shards": None} for s in SPLITS}, {})

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                           "report": self.report, "splits": self.splits}, indent=2, sort_keys=True)

    def save(self, cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_dir / MANIFEST, self.to_json().encode())

    def shard_entries(self, split: str) -> list[dict]:
        shards = self.splits[split]["shards"]
        return [shards[k] for k in sorted(shards, key=int)]

    def is_complete(self, split: str) -> bool:
        info = self.splits[split]
        return info["num_shards"] is not None and len(info["shards"]) == info["num_shards"]

    def rows(self, split: str) -> int:
        return sum(e["rows"] for e in self.splits[split]["shards"].values())


def load_manifest(cache_dir: Path) -> Manifest | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        return Manifest(raw["fingerprint"], raw["splits"], raw.get("report", {}))
    except (json.JSONDecodeError, KeyError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e}); move the cache away or rescore with score.overwrite=true") from None


def fingerprint_diff(cached: dict, wanted: dict) -> list[str]:
    """Names of the fingerprint fields that differ, ignoring informational ones."""
    keys = (set(cached) | set(wanted)) - set(INFORMATIONAL)
    return sorted(k for k in keys if cached.get(k) != wanted.get(k))


def describe_diff(cached: dict, wanted: dict, fields: Iterable[str]) -> str:
    return "; ".join(f"{k}: cache has {cached.get(k)!r}, config gives {wanted.get(k)!r}" for k in fields)


def verify(cache_dir: Path, check_hashes: bool = True) -> list[str]:
    """Every problem with the cache, one line each: missing or incomplete splits, absent, resized or corrupt shards."""
    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    if manifest is None:
        return [f"{cache_dir / MANIFEST}: no manifest (not a dpo-dist cache, or scoring never finished a shard)"]
    problems = []
    for split in SPLITS:
        info = manifest.splits[split]
        if not manifest.is_complete(split):
            problems.append(f"split {split}: {len(info['shards'])} of {info['num_shards'] or '?'} shards done (rerun `dpo-dist score` to finish)")
        for entry in manifest.shard_entries(split):
            path = cache_dir / split / entry["name"]
            if not path.exists():
                problems.append(f"{path}: missing")
            elif check_hashes and sha256_file(path) != entry["sha256"]:
                problems.append(f"{path}: checksum mismatch (file changed or corrupt)")
            elif check_hashes and (rows := read_shard(path).num_rows) != entry["rows"]:
                problems.append(f"{path}: {rows} rows, manifest says {entry['rows']}")
    return problems


class CachedSplit:
    """The rows of one split, memory-mapped; `rows[i]` is a dict of python values."""

    def __init__(self, cache_dir: Path, split: str, manifest: Manifest):
        tables = [read_shard(Path(cache_dir) / split / e["name"]) for e in manifest.shard_entries(split)]
        self.table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        self._columns = {name: self.table.column(name) for name in SCHEMA.names}

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        return {name: col[i].as_py() for name, col in self._columns.items()}

    def lengths(self) -> list[int]:
        """Longest of prompt+chosen and prompt+rejected per pair: used for length grouping."""
        p = self.table.column("prompt_input_ids").combine_chunks().value_lengths().to_pylist()
        c = self.table.column("chosen_input_ids").combine_chunks().value_lengths().to_pylist()
        r = self.table.column("rejected_input_ids").combine_chunks().value_lengths().to_pylist()
        return [pi + max(ci, ri) for pi, ci, ri in zip(p, c, r)]


def open_cache(cache_dir: Path, wanted_fingerprint: dict | None = None, check_hashes: bool = True) -> Manifest:
    """Check a cache for training: complete, intact, and built for this configuration.

    `wanted_fingerprint` holds the fields the caller can compute (the trainer knows its model and
    tokenizer, not always the raw data); only those are compared.
    """
    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    if manifest is None:
        raise CacheError(f"{cache_dir}: no reference cache here; run `dpo-dist score --config ...` first")
    if wanted_fingerprint is not None:
        cached = {k: manifest.fingerprint.get(k) for k in wanted_fingerprint}
        diff = fingerprint_diff(cached, wanted_fingerprint)
        if diff:
            raise CacheError(f"{cache_dir}: cache was built for another configuration, differing in "
                             f"{', '.join(diff)} ({describe_diff(cached, wanted_fingerprint, diff)}); "
                             "rescore with this config or point cache_dir elsewhere")
    problems = verify(cache_dir, check_hashes=check_hashes)
    if problems:
        raise CacheError(f"{cache_dir}: {problems[0]}" + (f" (+{len(problems) - 1} more; see `dpo-dist cache info --verify`)" if len(problems) > 1 else ""))
    return manifest


def info_text(cache_dir: Path) -> str:
    """Human summary of a cache for `dpo-dist cache info`."""
    manifest = load_manifest(Path(cache_dir))
    if manifest is None:
        raise CacheError(f"{Path(cache_dir) / MANIFEST}: no manifest")
    fp = manifest.fingerprint
    lines = [f"cache: {cache_dir}",
             f"reference: {fp.get('ref_model')} (weights {fp.get('ref_weights_hash')}, dtype {fp.get('dtype')})",
             f"tokenizer: {fp.get('tokenizer_name')} (vocab {fp.get('vocab_hash')}), max_length {fp.get('max_length')}, "
             f"max_prompt_length {fp.get('max_prompt_length')}, {fp.get('truncation_mode')}",
             f"created: {fp.get('created', '?')}"]
    for split in SPLITS:
        info = manifest.splits[split]
        tokens = sum(e["tokens"] for e in info["shards"].values())
        state = "complete" if manifest.is_complete(split) else "INCOMPLETE"
        lines.append(f"{split}: {manifest.rows(split)} pairs, {tokens} tokens, {len(info['shards'])}/{info['num_shards'] or '?'} shards ({state})")
        for key, value in sorted(info.get("report", {}).items()):
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
