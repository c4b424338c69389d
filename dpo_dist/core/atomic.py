"""The one writer of every file dpo-dist writes: complete or absent, never half a file.

    atomic_write_bytes(path, payload)          # bytes
    atomic_write_text(path, text)              # UTF-8 text
    with atomic_file(path) as f: ...           # streamed (binary file object)
    with atomic_folder(path) as folder: ...    # a folder another tool fills (DeepSpeed's converter)

Each writes a temporary name beside `path` (`.NAME.tmp-PID`), fsyncs it, renames it over `path` and
fsyncs the folder: what `path` held before stays until the new bytes are all on disk. A full disk
(or quota) is a DiskFullError naming the file, and the partial temporary file is removed; `disk_full`
tells whether another writer's failure (DeepSpeed's, safetensors') came from a full disk.
A leaf: the standard library, core.errors and core.removal.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from dpo_dist.core.errors import UserError, causes
from dpo_dist.core.removal import remove_tree

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


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A folder that appears at `path` complete or not at all. The block fills the folder it is
    given, which lies in a private staging folder beside `path` (`.NAME.tmp`: what a tool writes
    next to its output stays there); when the block ends without an error every file is fsynced
    and the folder renamed to `path`, which must not exist. The staging folder is removed in any
    case, and first, when a killed earlier try left one."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    remove_tree(staging, path.parent)
    (staging / path.name).mkdir(parents=True)
    try:
        yield staging / path.name
        for folder, _, files in os.walk(staging / path.name):
            for name in files:
                fd = os.open(Path(folder) / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(folder))
        os.rename(staging / path.name, path)
        fsync_dir(path.parent)
    finally:
        remove_tree(staging, path.parent)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    with atomic_file(path, size_hint=len(payload)) as f:
        f.write(payload)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


FULL_DISK_MIB = 64  # less free than this after a failed write: the write failed because the disk is full


def disk_free_mib(path: Path) -> float | None:
    """Free MiB on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return None


def disk_full(error: BaseException, path: Path) -> str | None:
    """'the disk is full (N MiB free)' (or 'the disk quota is exceeded') when `error`, raised while
    writing under `path`, came from there being no room; else None. Call it before removing the
    partial files. Writers say it three ways: an OSError with ENOSPC or EDQUOT (json, tokenizers), a
    SafetensorError whose text ends `(os error 28)` (no errno), a torch.save zip writer position
    error (nothing at all: then less than FULL_DISK_MIB free is the sign)."""
    free = disk_free_mib(path)
    full = f"the disk is full ({free:.0f} MiB free)" if free is not None else "the disk is full"
    for seen in causes(error):
        code = getattr(seen, "errno", None)
        said = re.search(r"\(os error (\d+)\)", str(seen))
        code = code if code is not None else int(said.group(1)) if said else None
        if code == errno.EDQUOT:
            return "the disk quota is exceeded"
        if code == errno.ENOSPC:
            return full
    return full if free is not None and free < FULL_DISK_MIB else None
