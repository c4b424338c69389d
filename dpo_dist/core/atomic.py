"""The one writer of every file dpo-dist writes: complete or absent, never half a file.

    atomic_write_bytes(path, payload)          # bytes
    atomic_write_text(path, text)              # UTF-8 text
    with atomic_file(path) as f: ...           # streamed (binary file object)

Each writes a temporary name beside `path` (`.NAME.tmp-PID`), fsyncs it, renames it over `path` and
fsyncs the folder: what `path` held before stays until the new bytes are all on disk. A full disk
(or quota) is a DiskFullError naming the file, and the partial temporary file is removed.
A leaf: standard library only.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import BinaryIO, Iterator

from dpo_dist.core.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError, OSError):
    """No space (or quota) left while writing: nothing was replaced."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path, size_hint: int | None = None) -> Iterator[BinaryIO]:
    """A binary file object whose bytes replace `path` when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            size = f" writing {size_hint / 2**20:.1f} MiB" if size_hint is not None else ""
            raise DiskFullError(f"{path}: {os.strerror(e.errno).lower()}{size}; nothing was replaced "
                                f"(what was there is intact): free space, then rerun") from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    with atomic_file(path, size_hint=len(payload)) as f:
        f.write(payload)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
