"""Checkpoint checksums on a real 2-process gloo group: each rank hashes the shard files it wrote
(after a save, and before a resume), rank 0 gathers them; against hashlib over the bytes."""
import hashlib
import json

import pytest

from dpo_dist.engines.checkpoints import COMPLETE, complete_steps, damage, mark_complete
from helpers import fake_checkpoint as save, flip

pytestmark = pytest.mark.integration


RANK = """
import json, sys
from pathlib import Path
import torch.distributed as tdist
from dpo_dist.engines import checkpoints
from dpo_dist.engines.dist import Dist

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


RESUME_RANK = """
import json, sys
from pathlib import Path
import torch.distributed as tdist
from dpo_dist.engines import checkpoints
from dpo_dist.engines.dist import Dist

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
