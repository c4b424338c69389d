"""The reference cache: Arrow IPC shards of tokenized pairs with reference log-probs, and a manifest.

Layout (a local folder or an object-store prefix, core.store):
    CACHE/manifest.json                      the current view: the shards of one config's data
    CACHE/<split>/shard-00000-<sha16>.arrow  immutable shards, named by index and checksum prefix
    CACHE/views/<hash>.json                  earlier views of the same values (data.max_samples grew, ...)

Shards are immutable and complete or absent (docs/DESIGN.md invariant 4): a local file is written to
a temporary name and renamed, an object in one PUT; names are unique, so no reader sees a name's
bytes change. Their sha256 and row count are recorded in the manifest, written after them. The
manifest is the source of truth: a shard it does not list is not part of the cache.

A cache holds one set of values (reference, tokenizer, tokenization, log-prob code) for pairs keyed
by their content hash (`id`). Scoring other data with the same values keeps the earlier manifest as a
view (runs trained on it resume) and reuses every pair already scored (stages/score/).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from dpo_dist.core.data import SPLITS
from dpo_dist.core.errors import UserError
from dpo_dist.core.store import ChecksumError, open_store

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


# What a pair's values depend on is the whole fingerprint except which pairs the data holds.
DATA_FIELDS = ("data.train", "data.eval")
VIEWS = "views"


def values_identity(fingerprint: dict) -> dict:
    """The fields a pair's cached values depend on: all but the data selection (pairs are keyed by id)."""
    return {k: v for k, v in fingerprint.items() if k not in DATA_FIELDS}


def shard_name(index: int, sha256: str) -> str:
    return f"shard-{index:05d}-{sha256[:16]}.arrow"


def shard_index(name: str) -> tuple[int, str] | None:
    """(index, checksum prefix) of a shard name written by shard_name; None for other names."""
    parts = name.removesuffix(".arrow").split("-")
    if len(parts) == 3 and parts[0] == "shard" and name.endswith(".arrow") and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def ids_hash(ids) -> str:
    """The hash of a shard's pair ids in order: which pairs a shard holds."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def shard_payload(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_entry(table: pa.Table, name: str, sha256: str) -> dict:
    """A shard's manifest entry as far as its own bytes tell it."""
    p = table.column("prompt_input_ids").combine_chunks().value_lengths()
    c = table.column("chosen_input_ids").combine_chunks().value_lengths()
    r = table.column("rejected_input_ids").combine_chunks().value_lengths()
    tokens = sum(2 * a + b + d for a, b, d in zip(p.to_pylist(), c.to_pylist(), r.to_pylist()))
    ids = table.column("id").to_pylist()
    return {"name": name, "rows": table.num_rows, "tokens": tokens, "sha256": sha256, "ids_hash": ids_hash(ids),
            "tokenize": {"pairs": table.num_rows,
                         "prompt_truncated": sum(table.column("prompt_truncated").to_pylist()),
                         "response_truncated": sum(table.column("response_truncated").to_pylist())}}


def write_shard(location, split: str, index: int, rows: list[dict]) -> dict:
    """Write rows (dicts with the SCHEMA columns) as one Arrow IPC file; return its manifest entry."""
    payload = shard_payload(rows)
    sha = hashlib.sha256(payload).hexdigest()
    name = shard_name(index, sha)
    open_store(location).write(f"{split}/{name}", payload)
    return table_entry(ipc.open_file(pa.BufferReader(payload)).read_all(), name, sha)


def listed_shard(location, split: str, index: int, ids: str, present: dict[str, int]) -> dict | None:
    """A complete shard `index` of `split` that the store holds but the manifest does not list (scoring
    stopped between writing it and the manifest): its entry when its bytes match its name's checksum
    prefix and it holds exactly the pairs whose ids_hash is `ids`. `present`: the split's listing."""
    store = open_store(location)
    for name in sorted(present):
        parsed = shard_index(name)
        if parsed is None or parsed[0] != index:
            continue
        payload = store.read(f"{split}/{name}")
        sha = hashlib.sha256(payload or b"").hexdigest()
        if payload is None or not sha.startswith(parsed[1]):
            continue
        entry = table_entry(ipc.open_file(pa.BufferReader(payload)).read_all(), name, sha)
        if entry["ids_hash"] == ids:
            return entry
    return None


def read_shard(path: Path) -> pa.Table:
    """Memory-mapped read: the OS pages the data in as it is used."""
    return ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def shard_table(location, split: str, entry: dict, check: bool = False) -> pa.Table:
    """A listed shard, memory-mapped (an object store's is fetched once per node and always checked)."""
    store = open_store(location)
    return read_shard(store.local(f"{split}/{entry['name']}", entry["sha256"] if check or store.remote else None))


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

    def save(self, location) -> None:
        open_store(location).write(MANIFEST, self.to_json().encode())

    def view_name(self) -> str:
        return f"{VIEWS}/{hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]}.json"

    def shard_entries(self, split: str) -> list[dict]:
        shards = self.splits[split]["shards"]
        return [shards[k] for k in sorted(shards, key=int)]

    def is_complete(self, split: str) -> bool:
        info = self.splits[split]
        return info["num_shards"] is not None and len(info["shards"]) == info["num_shards"]

    def complete(self) -> bool:
        return all(self.is_complete(s) for s in SPLITS)

    def rows(self, split: str) -> int:
        return sum(e["rows"] for e in self.splits[split]["shards"].values())


def _parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        data = json.loads(raw)
        return Manifest(data["fingerprint"], data["splits"], data.get("report", {}), data.get("names", {}),
                        data.get("shard_size", 0), data.get("format_version", 1))
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{where}: unreadable manifest ({e}); move the cache away or rescore with score.overwrite=true") from None


def load_manifest(location) -> Manifest | None:
    store = open_store(location)
    raw = store.read(MANIFEST)
    return None if raw is None else _parse_manifest(raw, store.path(MANIFEST))


def views(location) -> list[Manifest]:
    """The earlier views kept in a cache (other data, same values), oldest name first."""
    store = open_store(location)
    return [_parse_manifest(store.read(f"{VIEWS}/{name}") or b"", store.path(f"{VIEWS}/{name}"))
            for name in sorted(store.list(VIEWS)) if name.endswith(".json")]


def keep_view(location, manifest: Manifest) -> None:
    """Keep `manifest` as a view (its shards stay listed, so runs trained on it resume)."""
    open_store(location).write(manifest.view_name(), manifest.to_json().encode())


def find_manifest(location, wanted: dict) -> Manifest | None:
    """The current manifest or a kept view whose identity is exactly `wanted`; None when neither is."""
    current = load_manifest(location)
    if current is None:
        return None
    if not identity_diff(current, wanted):
        return current
    return next((v for v in views(location) if not identity_diff(v, wanted)), None)


def identity_diff(manifest: Manifest, wanted: dict) -> list[str]:
    """identity.diff of the cache's fingerprint against `wanted`, one "name: cache -> config" per field."""
    from dpo_dist.core.hashing import diff

    if manifest.format_version != FORMAT_VERSION:
        return [f"cache.format: {manifest.format_version} -> {FORMAT_VERSION} (written by another dpo-dist version)"]
    return diff(manifest.fingerprint, wanted)


def mismatch_message(location, lines: list[str], what_to_do: str) -> str:
    return (f"{open_store(location)}: the cache was built for other work; {what_to_do}. Differences (cache -> config):\n  "
            + "\n  ".join(lines))


def verify(location, check_hashes: bool = True, manifest: Manifest | None = None, fresh: bool = False) -> list[str]:
    """Every problem with the cache (or with one of its views), one line each: missing or incomplete
    splits, absent, resized or corrupt shards. An object store's shards are checked as this node
    reads them (its local copies, fetched and checked once); `fresh` hashes the objects in the store."""
    store = open_store(location)
    manifest = manifest or load_manifest(store)
    if manifest is None:
        return [f"{store.path(MANIFEST)}: no manifest (not a dpo-dist cache, or scoring never finished a shard)"]
    problems = []
    for split in SPLITS:
        info = manifest.splits[split]
        if not manifest.is_complete(split):
            problems.append(f"split {split}: {len(info['shards'])} of {info['num_shards'] or '?'} shards done (rerun `dpo-dist score` to finish)")
        present = store.list(split)
        for entry in manifest.shard_entries(split):
            rel = f"{split}/{entry['name']}"
            if entry["name"] not in present:
                problems.append(f"{store.path(rel)}: missing")
                continue
            if not check_hashes:
                continue
            if fresh and store.remote:
                if not store.matches(rel, entry["sha256"]):
                    problems.append(f"{store.path(rel)}: checksum mismatch (object changed or corrupt)")
                continue
            try:
                rows = read_shard(store.local(rel, entry["sha256"])).num_rows
            except ChecksumError as e:
                problems.append(str(e))
                continue
            if rows != entry["rows"]:
                problems.append(f"{store.path(rel)}: {rows} rows, manifest says {entry['rows']}")
    return problems


class CachedSplit:
    """The rows of one split, memory-mapped; `rows[i]` is a dict of python values."""

    def __init__(self, location, split: str, manifest: Manifest):
        tables = [shard_table(location, split, e) for e in manifest.shard_entries(split)]
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


def open_cache(location, wanted: dict, check_hashes: bool = True) -> Manifest:
    """Check a cache for training: complete, intact, and built for exactly this work; returns the
    manifest (or kept view) that is.

    `wanted` is identity.cache_identity of the caller's config; every field is compared.
    """
    store = open_store(location)
    current = load_manifest(store)
    if current is None:
        raise CacheError(f"{store}: no reference cache here; run `dpo-dist score --config ...` first")
    manifest = find_manifest(store, wanted)
    if manifest is None:
        raise CacheError(mismatch_message(store, identity_diff(current, wanted), "score this config into another cache_dir "
                                          "(or rescore this one with score.overwrite=true)"))
    problems = verify(store, check_hashes=check_hashes, manifest=manifest)
    if problems:
        raise CacheError(f"{store}: {problems[0]}" + (f" (+{len(problems) - 1} more; see `dpo-dist cache info --verify`)" if len(problems) > 1 else ""))
    return manifest


def info_text(location) -> str:
    """Human summary of a cache for `dpo-dist cache info`."""
    store = open_store(location)
    manifest = load_manifest(store)
    if manifest is None:
        raise CacheError(f"{store.path(MANIFEST)}: no manifest")
    fp, names = manifest.fingerprint, manifest.names
    lines = [f"cache: {store}",
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
    for view in views(store):
        lines.append(f"kept view: data train {view.fingerprint.get('data.train')}, eval {view.fingerprint.get('data.eval')} "
                     f"(created {view.names.get('created', '?')}; runs trained on it resume)")
    return "\n".join(lines)
