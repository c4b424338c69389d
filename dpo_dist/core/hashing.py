"""Hashing leaves shared by core.data, core.cache and identity: remembered file hashes, short
hashes of values, and the one field-by-field compare. No project imports: a leaf.

Hashing every byte of a multi-GB model is slow, so file hashes are remembered per (real path, size,
mtime_ns) under store_dir(); a changed file is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from dpo_dist.core.atomic import atomic_write_text


def store_dir() -> Path:
    """Where remembered hashes live: $DPO_DIST_CACHE, else $XDG_CACHE_HOME/dpo-dist, else ~/.cache/dpo-dist."""
    if os.environ.get("DPO_DIST_CACHE"):
        return Path(os.environ["DPO_DIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpo-dist"


def _memo_path(kind: str, key: str) -> Path:
    return store_dir() / kind / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _recall(kind: str, key: str) -> dict | None:
    try:
        memo = json.loads(_memo_path(kind, key).read_text())
    except (OSError, ValueError):
        return None
    return memo if memo.get("key") == key else None


def _remember(kind: str, key: str, value: dict) -> None:
    """Best effort: a read-only or full store only costs a rehash next time."""
    path = _memo_path(kind, key)
    try:
        atomic_write_text(path, json.dumps({"key": key, **value}))
    except OSError:
        pass


def sha256_file(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read now (checksums of shards and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, remembered per (real path, size, mtime_ns): model weights."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}\0{st.st_size}\0{st.st_mtime_ns}"
    memo = _recall("files", key)
    if memo:
        return memo["sha256"]
    digest = sha256_file(real)
    _remember("files", key, {"sha256": digest})
    return digest


def short_hash(value: Any) -> str:
    """First 16 hex of sha256 over a JSON rendering (or the bytes of a str)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def diff(old: dict, new: dict, grow: Iterable[str] = ()) -> list[str]:
    """Every field whose value differs, as "name: old -> new", sorted by name. A field in `grow`
    may increase without counting as a difference."""
    grow = set(grow)
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a == b or (key in grow and _number(a) and _number(b) and b >= a):
            continue
        lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    return lines


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)
