"""Deleting inside our own folders only: nothing outside the run, cache or output folder is ever
deleted, and a symlink inside one cannot redirect a deletion (a symlink is removed, never followed).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from dpo_dist.core.errors import UserError


class UnsafeDeleteError(UserError, OSError):
    """A deletion that would reach outside the folder it belongs to."""


def remove_tree(path: Path, root: Path, missing_ok: bool = True) -> None:
    """Delete `path` (a folder, a file or a symlink), which must lie inside `root`.

    The folders above `path` are resolved: one that is a symlink leading out of `root` makes this
    a refusal (UnsafeDeleteError naming both). `path` itself, when a symlink, is unlinked and its
    target left alone; inside a folder, `shutil.rmtree` unlinks symlinks without following them.
    """
    path, root = Path(path), Path(root)
    real_root = root.resolve()
    where = path.parent.resolve() / path.name  # the last component is not followed
    if where == real_root or not where.is_relative_to(real_root):
        raise UnsafeDeleteError(f"{path}: refusing to delete it: it resolves to {where}, outside {root} "
                                f"({real_root}); a symlink in the folder points elsewhere")
    if where.is_symlink() or where.is_file():
        where.unlink(missing_ok=missing_ok)
    elif where.is_dir():
        shutil.rmtree(where)
    elif not missing_ok:
        raise FileNotFoundError(f"{path}: nothing to delete")
