"""Deletion stays inside our folders: a symlink in a run or cache folder cannot redirect it."""
import pytest

from dpo_dist.core.removal import UnsafeDeleteError, remove_tree
from dpo_dist.engines.checkpoints import remove_partials


@pytest.fixture()
def precious(tmp_path):
    """A folder outside the run that must survive everything below."""
    keep = tmp_path / "precious"
    (keep / "sub").mkdir(parents=True)
    (keep / "data.txt").write_text("do not delete")
    (keep / "sub" / "more.txt").write_text("nor this")
    return keep


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_a_symlink_is_removed_not_followed(tmp_path, precious):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    link = run / "checkpoints" / "step-2"
    link.symlink_to(precious, target_is_directory=True)
    before = files(precious)
    remove_tree(link, run)
    assert not link.exists() and not link.is_symlink() and files(precious) == before
    # a real folder with a symlink inside: the folder goes, the link's target stays
    inner = run / "checkpoints" / "step-4"
    inner.mkdir()
    (inner / "shard.pt").write_bytes(b"x")
    (inner / "escape").symlink_to(precious, target_is_directory=True)
    remove_tree(inner, run)
    assert not inner.exists() and files(precious) == before


def test_a_symlinked_folder_above_cannot_lead_a_deletion_outside(tmp_path, precious):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(precious, target_is_directory=True)
    with pytest.raises(UnsafeDeleteError, match=r"checkpoints/sub: refusing to delete it: it resolves to .*precious/sub, outside"):
        remove_tree(run / "checkpoints" / "sub", run)
    for outside in (tmp_path, run, run / ".." / "precious", precious / "data.txt"):
        with pytest.raises(UnsafeDeleteError):
            remove_tree(outside, run)
    assert (precious / "data.txt").read_text() == "do not delete" and (precious / "sub" / "more.txt").exists()


def test_resume_cleanup_of_unfinished_checkpoints_never_follows_links(tmp_path, precious):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    (ckpt / "step-8").mkdir(parents=True)  # a save cut short: no COMPLETE marker
    (ckpt / "step-8" / "shard.pt").write_bytes(b"x")
    (ckpt / "step-9").symlink_to(precious, target_is_directory=True)  # looks unfinished too
    before = files(precious)
    assert remove_partials(ckpt) == ["step-8", "step-9"]
    assert sorted(p.name for p in ckpt.iterdir()) == [] and files(precious) == before
