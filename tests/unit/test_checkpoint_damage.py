"""A checkpoint damaged on disk after it was marked complete (cut short, a flipped bit, a file gone)
is found by its marker's checksums before a resume, named, set aside, and the previous one used."""
import hashlib
import json

import pytest

from dpo_dist.engines.checkpoints import COMPLETE, LATEST, complete_steps, damage, mark_complete, set_aside_damaged


def save(ckpt, step):
    folder = ckpt / f"step-{step}"
    (folder / "global_step").mkdir(parents=True)
    (folder / "global_step" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "global_step" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"\x07" * 5000)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    mark_complete(folder, step)
    (ckpt / LATEST).write_text(f"step-{step}\n")
    return folder


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, problem", [
    ("flip", "checksum mismatch"),
    ("truncate", "bytes, written with 10240 (cut short or changed)"),
    ("delete", "missing"),
])
def test_damage_is_named_and_the_previous_checkpoint_is_resumed(tmp_path, how, problem):
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 4)
    latest = save(ckpt, 8)
    shard = latest / "global_step" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    assert damage(latest) is None and set_aside_damaged(ckpt) == []
    if how == "flip":
        flip(shard, 5000)
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[:4096])
    else:
        shard.unlink()
    assert problem in damage(latest) and str(shard) in damage(latest)
    notes = set_aside_damaged(ckpt)
    assert len(notes) == 1 and notes[0].startswith("checkpoint step-8 is damaged (") and "moved to damaged-step-8" in notes[0]
    assert complete_steps(ckpt) == [4] and (ckpt / LATEST).read_text() == "step-4\n"
    assert (ckpt / "damaged-step-8" / COMPLETE).exists()  # kept for a look, never deleted


def test_every_checkpoint_damaged_means_starting_over_and_old_markers_pass(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        flip(save(ckpt, step) / "trainer_state.json", 0)
    assert len(set_aside_damaged(ckpt)) == 2 and complete_steps(ckpt) == [] and not (ckpt / LATEST).exists()
    old = ckpt / "step-6"
    old.mkdir()
    (old / COMPLETE).write_text("6\n")  # a marker from before checksums were recorded
    assert damage(old) is None and set_aside_damaged(ckpt) == [] and complete_steps(ckpt) == [6]


RANK = """
import json, sys
from pathlib import Path
import torch.distributed as tdist
from dpo_dist.engines import checkpoints
from dpo_dist.engines.deepspeed_engine import Dist

rank, folder, store = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
hashed = []
real = checkpoints.sha256_file
checkpoints.sha256_file = lambda p: hashed.append(p.name) or real(p)
records = checkpoints.file_records(folder, Dist(rank, rank, 2, "cpu"))
print(json.dumps({"hashed": sorted(hashed), "records": records}))
tdist.destroy_process_group()
"""


def test_each_rank_hashes_the_shard_files_it_wrote_and_rank_0_gets_them_all(tmp_path):
    """file_records on a real 2-process gloo group: the same records as one process hashing every
    file, with rank 1 hashing only its own `zero_pp_rank_1_` files and rank 0 the rest."""
    import subprocess
    import sys

    folder = save(tmp_path / "checkpoints", 2)
    (folder / "global_step" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"\x01" * 3000)
    (folder / "global_step" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x02" * 3000)
    (folder / COMPLETE).unlink()
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(folder), str(tmp_path / "store")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert got[1]["records"] is None
    assert got[1]["hashed"] == ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert got[0]["hashed"] == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state.json",
                                "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    # The independent computation: hashlib over every file's bytes, read here.
    expected = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                for p in sorted(folder.rglob("*")) if p.is_file()}
    assert got[0]["records"] == expected
    mark_complete(folder, 2, got[0]["records"])
    assert damage(folder) is None


def test_the_writer_of_a_file_is_read_from_deepspeeds_name():
    from dpo_dist.engines.checkpoints import rank_of_file

    assert rank_of_file("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert rank_of_file("zero_pp_rank_1_mp_rank_00_model_states.pt") == 1
    assert rank_of_file("mp_rank_00_model_states.pt") is None and rank_of_file("trainer_state.json") is None


RESUME_RANK = """
import json, sys
from pathlib import Path
import torch.distributed as tdist
from dpo_dist.engines import checkpoints
from dpo_dist.engines.deepspeed_engine import Dist

rank, ckpt, store = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
hashed = checkpoints.hashed_by_ranks(ckpt, Dist(rank, rank, 2, "cpu"))
notes = []
if rank == 0:
    real = checkpoints.sha256_file
    rank0 = []
    checkpoints.sha256_file = lambda p: rank0.append(p.name) or real(p)
    notes = checkpoints.set_aside_damaged(ckpt, hashed)
    print(json.dumps({"hashed": sorted(Path(k).name for k in hashed), "rank0": sorted(rank0), "notes": notes}))
tdist.destroy_process_group()
"""


@pytest.mark.parametrize("flip_rank1", [False, True])
def test_before_a_resume_each_rank_checks_its_own_files(tmp_path, flip_rank1):
    """hashed_by_ranks + set_aside_damaged on a real 2-process gloo group: every rank hashes its own
    shard files of the newest checkpoint, rank 0 only the shared ones; a flipped bit in rank 1's
    file is still found (its digest came from rank 1) and the previous checkpoint used."""
    import subprocess
    import sys

    ckpt = tmp_path / "checkpoints"
    save(ckpt, 2)
    newest = save(ckpt, 4)
    if flip_rank1:
        flip(newest / "global_step" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 100)
    procs = [subprocess.Popen([sys.executable, "-c", RESUME_RANK, str(r), str(ckpt), str(tmp_path / "store")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = json.loads(outs[0][0].strip().splitlines()[-1])
    assert got["hashed"] == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    if flip_rank1:
        assert len(got["notes"]) == 1 and "checkpoint step-4 is damaged" in got["notes"][0] and "checksum mismatch" in got["notes"][0]
        assert complete_steps(ckpt) == [2] and (ckpt / "damaged-step-4").is_dir()
        assert "trainer_state.json" in got["rank0"]  # step-2, checked by rank 0 alone
    else:
        assert got["notes"] == [] and complete_steps(ckpt) == [2, 4]
        assert got["rank0"] == ["trainer_state.json"]  # the shard files' digests came from their ranks
