"""A full disk while writing a shard, a manifest or a checkpoint marker: one line naming the file,
the previous complete file intact, no partial file left. On a real 256 KiB tmpfs (needs root to
mount; skipped, saying so, elsewhere)."""
import json
import subprocess

import pytest

from dpo_dist.core.cache import DiskFullError, atomic_write_bytes, write_shard


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_names_the_file_and_keeps_what_was_there(small_disk):
    manifest = small_disk / "manifest.json"
    atomic_write_bytes(manifest, json.dumps({"shards": 3}).encode())
    with pytest.raises(DiskFullError) as e:
        atomic_write_bytes(manifest, b"x" * (1 << 20))
    message = str(e.value)
    assert message.startswith(f"{manifest}: no space left on device writing 1.0 MiB; nothing was replaced") and "\n" not in message
    assert json.loads(manifest.read_text()) == {"shards": 3}
    assert sorted(p.name for p in small_disk.iterdir()) == ["manifest.json"]  # no partial temporary file
    atomic_write_bytes(small_disk / "small.json", b"{}")  # the space the failed write took is free again


def test_a_shard_that_does_not_fit_is_not_written(small_disk):
    rows = [{"id": f"{i:016x}", "row": i, "prompt_input_ids": list(range(400)), "chosen_input_ids": list(range(300)),
             "rejected_input_ids": list(range(300)), "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0,
             "chosen_num_tokens": 300, "rejected_num_tokens": 300, "prompt_truncated": False,
             "response_truncated": False} for i in range(100)]  # 400 KB of ids
    with pytest.raises(DiskFullError, match=r"shard-00000\.arrow: no space left on device"):
        write_shard(small_disk / "train" / "shard-00000.arrow", rows)
    assert list((small_disk / "train").iterdir()) == []
