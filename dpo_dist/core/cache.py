"""The reference cache: Arrow IPC shards of tokenized pairs with reference log-probs, and a manifest.

Layout:  CACHE/manifest.json, CACHE/<split>/shard-00000.arrow, ...
Shards are immutable and atomic (docs/DESIGN.md invariant 4): written to a temporary name, fsynced,
renamed; their sha256 and row count are recorded in the manifest, which is itself replaced
atomically. The manifest is the source of truth: a shard file it does not list is not part of the cache.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from dpo_dist.core.atomic import atomic_write_bytes
from dpo_dist.core.data import SPLITS
from dpo_dist.core.errors import UserError

MANIFEST = "manifest.json"
# 2: the fingerprint is identity.cache_identity (content, not names); names and shard size apart.
FORMAT_VERSION = 2

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


class CacheError(UserError, RuntimeError):
    """The cache is missing, incomplete, corrupt or built for another configuration."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    fingerprint: dict  # identity.cache_identity: what the values depend on, compared on reuse
    splits: dict  # split -> {"shards": {index: entry}, "num_shards": int | None, "report": {...}}
    report: dict
    names: dict = field(default_factory=dict)  # identity.cache_names: shown, never compared
    shard_size: int = 0  # pairs per shard, fixed when the cache is created (not identity)
    format_version: int = FORMAT_VERSION

    @classmethod
    def new(cls, fingerprint: dict, names: dict, shard_size: int) -> "Manifest":
        return cls(fingerprint, {s: {"shards": {}, "num_shards": None} for s in SPLITS}, {}, names, shard_size)

    def to_json(self) -> str:
        return json.dumps({"format_version": self.format_version, "fingerprint": self.fingerprint,
                           "names": self.names, "shard_size": self.shard_size, "report": self.report,
                           "splits": self.splits}, indent=2, sort_keys=True)

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
        return Manifest(raw["fingerprint"], raw["splits"], raw.get("report", {}), raw.get("names", {}),
                        raw.get("shard_size", 0), raw.get("format_version", 1))
    except (json.JSONDecodeError, KeyError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e}); move the cache away or rescore with score.overwrite=true") from None


def identity_diff(manifest: Manifest, wanted: dict) -> list[str]:
    """identity.diff of the cache's fingerprint against `wanted`, one "name: cache -> config" per field."""
    from dpo_dist.core.hashing import diff

    if manifest.format_version != FORMAT_VERSION:
        return [f"cache.format: {manifest.format_version} -> {FORMAT_VERSION} (written by another dpo-dist version)"]
    return diff(manifest.fingerprint, wanted)


def mismatch_message(cache_dir: Path, lines: list[str], what_to_do: str) -> str:
    return (f"{cache_dir}: the cache was built for other work; {what_to_do}. Differences (cache -> config):\n  "
            + "\n  ".join(lines))


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


def open_cache(cache_dir: Path, wanted: dict, check_hashes: bool = True) -> Manifest:
    """Check a cache for training: complete, intact, and built for exactly this work.

    `wanted` is identity.cache_identity of the caller's config; every field is compared.
    """
    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    if manifest is None:
        raise CacheError(f"{cache_dir}: no reference cache here; run `dpo-dist score --config ...` first")
    lines = identity_diff(manifest, wanted)
    if lines:
        raise CacheError(mismatch_message(cache_dir, lines, "score this config into another cache_dir "
                                          "(or rescore this one with score.overwrite=true)"))
    problems = verify(cache_dir, check_hashes=check_hashes)
    if problems:
        raise CacheError(f"{cache_dir}: {problems[0]}" + (f" (+{len(problems) - 1} more; see `dpo-dist cache info --verify`)" if len(problems) > 1 else ""))
    return manifest


def info_text(cache_dir: Path) -> str:
    """Human summary of a cache for `dpo-dist cache info`."""
    manifest = load_manifest(Path(cache_dir))
    if manifest is None:
        raise CacheError(f"{Path(cache_dir) / MANIFEST}: no manifest")
    fp, names = manifest.fingerprint, manifest.names
    lines = [f"cache: {cache_dir}",
             f"reference: {names.get('reference', '?')} (weights {fp.get('reference.weights')}, dtype {fp.get('reference.dtype')})",
             f"tokenizer: {names.get('tokenizer', '?')} (vocab {fp.get('tokenizer.vocab')}, chat template "
             f"{fp.get('tokenizer.chat_template')}), max_length {fp.get('data.max_length')}, max_prompt_length "
             f"{fp.get('data.max_prompt_length')}, {fp.get('data.truncation_mode')}",
             f"data: train {names.get('data.train', '?')} ({fp.get('data.train')}); eval "
             f"{names.get('data.eval') or 'held out of train'} ({fp.get('data.eval')})",
             f"created: {names.get('created', '?')}; {manifest.shard_size or '?'} pairs per shard; format {manifest.format_version}"]
    for split in SPLITS:
        info = manifest.splits[split]
        tokens = sum(e["tokens"] for e in info["shards"].values())
        state = "complete" if manifest.is_complete(split) else "INCOMPLETE"
        lines.append(f"{split}: {manifest.rows(split)} pairs, {tokens} tokens, {len(info['shards'])}/{info['num_shards'] or '?'} shards ({state})")
        for key, value in sorted(info.get("report", {}).items()):
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


