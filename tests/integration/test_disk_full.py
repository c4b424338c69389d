"""A full disk while writing a shard, a manifest or a checkpoint marker: one line naming the file,
the previous complete file intact, no partial file left; each writer's own way of saying the disk
is full is recognised. On a real 256 KiB tmpfs (needs root to mount; skipped, saying so, elsewhere)."""
import errno
import json

import helpers
import pytest

from dpo_dist.core.atomic import DiskFullError, atomic_write_bytes
from dpo_dist.core.cache import write_shard

pytestmark = pytest.mark.integration


@pytest.fixture()
def small_disk(tmp_path):
    with helpers.small_disk(tmp_path / "disk", "256k") as mount:
        yield mount


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
    with pytest.raises(DiskFullError, match=r"train/shard-00000-[0-9a-f]{16}\.arrow: no space left on device"):
        write_shard(small_disk, "train", 0, rows)
    assert list((small_disk / "train").iterdir()) == []


def test_each_writers_full_disk_error_is_recognised(small_disk, tmp_path):
    """What really arrives when an export or a checkpoint fills the disk: json and tokenizers an
    OSError ENOSPC, safetensors a SafetensorError whose text ends `(os error 28)`, torch.save a zip
    writer position RuntimeError with no errno (known only by the little space left)."""
    import torch
    from safetensors.torch import save_file

    from dpo_dist.core.atomic import FULL_DISK_MIB, disk_free_mib, disk_full

    writers = {"json": lambda: (small_disk / "a.json").write_text(json.dumps(list(range(100_000)))),
               "safetensors": lambda: save_file({"w": torch.zeros(1 << 18)}, str(small_disk / "a.safetensors")),
               "torch.save": lambda: torch.save({"w": torch.zeros(1 << 18)}, str(small_disk / "a.pt"))}
    roomy = (disk_free_mib(tmp_path) or 0) > FULL_DISK_MIB  # there only what the error says counts
    seen = {}
    for name, write in writers.items():
        try:
            write()
        except Exception as e:  # noqa: BLE001  (kept as text: a kept traceback holds the file open)
            seen[name] = (type(e).__name__, str(e), disk_full(e, small_disk), roomy and disk_full(e, tmp_path))
        for p in small_disk.iterdir():
            p.unlink()
    assert seen["safetensors"][:2] == ("SafetensorError", "Error while serializing: I/O error: No space left on device (os error 28)")
    assert seen["torch.save"][0] == "RuntimeError" and "unexpected pos" in seen["torch.save"][1]
    assert [s[2] for s in seen.values()] == ["the disk is full (0 MiB free)"] * 3
    if roomy:
        assert [n for n, s in seen.items() if s[3]] == ["json", "safetensors"]
        assert disk_full(ValueError("no"), tmp_path) is None and disk_full(OSError(errno.EDQUOT, "quota"), tmp_path) == "the disk quota is exceeded"


def test_an_sft_export_lost_to_a_full_disk_is_not_taken_for_the_end(tmp_path):
    """SFT grown from 2 to 4 steps whose step-4 export failed: final_metrics.json (written after the
    export) and the export are still step 2's, so a rerun at step 4 must export, not skip."""
    from dpo_dist.config import load_config
    from dpo_dist.stages.sft import ended_at

    cfg = load_config(None, ["model.name_or_path=m", f"sft.output_dir={tmp_path / 'sft'}"])
    (tmp_path / "sft" / "export").mkdir(parents=True)
    (tmp_path / "sft" / "export" / "config.json").write_text("{}")
    (tmp_path / "sft" / "final_metrics.json").write_text(json.dumps({"steps": 2}))
    assert ended_at(cfg, 2) and not ended_at(cfg, 4)
