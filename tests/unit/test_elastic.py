"""Elastic resume without engines: the accumulation that keeps a run's global batch on another world
size (core.elastic), the refusal when none does, what a run folder records (identity.for_world, old
records included), the batch plan's steps on every world size, and the checkpoint side that needs
no DeepSpeed (the world a checkpoint was written by, a conversion done once, what is refused).
The real conversion and resumes: tests/integration/test_train.py::test_a_run_resumed_on_other_world_sizes_...
"""
import json
from dataclasses import replace

import pytest
from helpers import fake_checkpoint

from dpo_dist import identity as ident
from dpo_dist.config import Config
from dpo_dist.core.atomic import atomic_folder
from dpo_dist.core.errors import UserError
from dpo_dist.core.elastic import ElasticBatchError, accumulation_for, resumed_accumulation, world_choices
from dpo_dist.core.sampler import BatchPlan
from dpo_dist.engines import checkpoints


def test_the_accumulation_that_keeps_the_global_batch():
    """global 16 = micro 4 x accumulation 2 x world 2: world 1 needs 16 / (4 x 1) = 4, world 4 needs
    16 / (4 x 4) = 1, world 3 none (16 / 12 is not whole); 16 / 4 = 4 passes per step split over
    1, 2 or 4 ranks."""
    assert accumulation_for(16, 4, 1) == 4 and accumulation_for(16, 4, 4) == 1 and accumulation_for(16, 4, 3) is None
    assert world_choices(16, 4) == [(1, 4), (2, 2), (4, 1)]
    assert world_choices(64, 2) == [(1, 32), (2, 16), (4, 8), (8, 4), (16, 2), (32, 1)]
    assert world_choices(10, 4) == []


def resumed(**given):
    """The run of these tests: global 16 = micro 4 x accumulation 2 x world 2 when it started."""
    args = dict(run_global=16, run_micro=4, started_accum=2, micro=4, accum=2, global_batch_size=None, world=2)
    return resumed_accumulation("train", **{**args, **given})


def test_the_same_command_on_another_world_adjusts_the_accumulation_and_says_so():
    assert resumed() == (2, None)  # the world it started on
    assert resumed(world=1) == (4, "train.gradient_accumulation_steps 2 -> 4 keeps this run's global batch of 16 = "
                                   "micro 4 x 4 x world 1")
    assert resumed(world=4)[0] == 1
    assert resumed(world=1, accum=4) == (4, None)  # adjusted by hand: taken as written
    assert resumed(world=1, accum=3, global_batch_size=16)[0] == 4  # an explicit global batch that is the run's


def test_a_changed_micro_or_global_batch_is_left_for_the_run_identity_to_refuse():
    """Nothing adjusted: the identity then differs (train.micro_batch_size or train.global_batch) and
    the run folder is refused naming the field, as any other changed setting."""
    assert resumed(world=1, micro=2) == (2, None)  # global 2 x 2 x 1 = 4, not 16
    assert resumed(world=2, accum=4) == (4, None)  # global 32 on the same world
    assert resumed(world=1, accum=3) == (3, None)  # another accumulation than the run started with
    assert resumed(world=1, global_batch_size=32) == (2, None)


def test_a_world_that_cannot_keep_the_global_batch_is_refused_in_one_line_naming_those_that_can():
    with pytest.raises(ElasticBatchError) as e:
        resumed(world=3)
    assert str(e.value) == ("train: this run's global batch of 16 (micro 4 x accumulation x world) cannot be kept on world 3: "
                            "16 is not a multiple of micro 4 x world 3; world sizes that keep it: 1 (accumulation 4), "
                            "2 (accumulation 2), 4 (accumulation 1)")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("worlds", [(1, 2, 4), (1, 3)])
def test_each_step_trains_the_same_micro_batches_on_every_world_size_that_keeps_the_global_batch(worlds):
    """The epoch's micro-batches depend on (pairs, micro, global batch, seed) only; a step's A x W of
    them are dealt to the ranks, so the pairs of every step are the same on 1, 2 or 4 ranks (global
    16 = 4 x 4 x 1 = 4 x 2 x 2 = 4 x 1 x 4), and on 1 or 3 (global 12 = 4 x 3 x 1 = 4 x 1 x 3)."""
    lengths = [(i * 37) % 50 + 1 for i in range(211)]
    passes = 4 if worlds[-1] == 4 else 3
    plans = [BatchPlan(211, 4, passes // w, w, seed=3, group_steps=2) for w in worlds]
    assert len({p.steps_per_epoch for p in plans}) == 1 and plans[0].steps_per_epoch > 10
    for epoch in (0, 1):
        per_world = []
        for plan in plans:
            micro = plan.epoch_micro_batches(epoch, lengths)
            per_world.append([sorted(tuple(mb) for r in range(plan.world_size) for mb in plan.rank_step(micro, s, r))
                              for s in range(plan.steps_per_epoch)])
        assert all(w == per_world[0] for w in per_world), epoch


def write_old_run(out, world=2, accum=2, micro=4):
    """run.json as dpo-dist wrote it before runs were elastic: world size and accumulation in the identity."""
    out.mkdir(parents=True)
    identity = {"train.micro_batch_size": micro, "train.gradient_accumulation_steps": accum, "train.world_size": world,
                "loss.beta": 0.1}
    (out / "run.json").write_text(json.dumps({"identity": identity, "names": {}, "created": "then"}))


def test_a_run_folder_of_older_dpo_dist_reads_as_its_global_batch_and_resumes_on_another_world(tmp_path):
    out = tmp_path / "run"
    write_old_run(out)
    record = ident.read_record(out)
    assert record["identity"] == {"train.micro_batch_size": 4, "train.global_batch": 16, "loss.beta": 0.1}
    assert record["started"] == {"world_size": 2, "gradient_accumulation_steps": 2}
    cfg = Config(output_dir=str(out))
    cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=4, gradient_accumulation_steps=2))
    same, note = ident.for_world(cfg, 2)
    assert same is cfg and note is None
    one, note = ident.for_world(cfg, 1)
    assert one.train.gradient_accumulation_steps == 4 and "2 -> 4" in note
    assert ident.for_world(cfg, 1, overwrite=True) == (cfg, None)  # --overwrite: a new run, the config as written
    with pytest.raises(ElasticBatchError, match="world sizes that keep it: 1 "):
        ident.for_world(cfg, 3)
    # rewritten (a longer run, say): the record keeps the world and accumulation of the first start
    ident.write_run(out, {**record["identity"], "train.steps": 20}, {}, {"world_size": 1, "gradient_accumulation_steps": 4})
    assert json.loads((out / "run.json").read_text())["started"] == {"world_size": 2, "gradient_accumulation_steps": 2}


def test_the_world_a_checkpoint_was_written_by(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)  # shard files of ranks 0 and 1, no world_size recorded (older)
    assert checkpoints.saved_world(folder) == 2
    (folder / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 8}))
    assert checkpoints.saved_world(folder) == 8
    stage0 = tmp_path / "stage0"
    stage0.mkdir()
    (stage0 / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert checkpoints.saved_world(stage0) is None


def test_stage0_loads_as_it_is_a_conversion_is_made_once_and_nvme_offload_is_refused(tmp_path, capsys):
    folder = fake_checkpoint(tmp_path, 4)  # written by 2 ranks
    assert checkpoints.for_world(tmp_path, 4, 2, 4, 2, {"zero_optimization": {"stage": 3}}) == (False, None)
    universal, said = checkpoints.for_world(tmp_path, 4, 1, 4, 4, {"zero_optimization": {"stage": 0}})
    assert not universal and said == ("resuming step 4 of world 2 on world 1: accumulation 2 -> 4 (global batch 16 kept), "
                                      "ZeRO stage 0 holds the whole state on every rank: loaded as it is")
    with pytest.raises(UserError, match="NVMe offload"):
        checkpoints.for_world(tmp_path, 4, 1, 4, 4, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    # an intact conversion (its marker matches its files) is used again: nothing converted
    done = folder / checkpoints.UNIVERSAL
    (done / "zero").mkdir(parents=True)
    (done / "zero" / "optimizer_state.pt").write_bytes(b"state")
    checkpoints.mark_complete(done, 4)
    universal, said = checkpoints.for_world(tmp_path, 4, 1, 4, 4, {"zero_optimization": {"stage": 3}})
    assert universal and said.endswith("its universal checkpoint (converted before) reused")
    # and the ranks' checksums before a resume leave it out (it is not the checkpoint's own)
    assert all(checkpoints.UNIVERSAL not in p for p in checkpoints.hashed_by_ranks(tmp_path, checkpoints.Dist(0, 0, 1, "cpu")))


def test_a_folder_is_written_complete_or_not_at_all(tmp_path):
    target = tmp_path / "step-4" / "universal"
    target.parent.mkdir()
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as out:
            (out / "half.pt").write_bytes(b"x")
            (out.parent / "latest_universal").write_text("beside the output")  # what ds_to_universal writes
            raise RuntimeError("killed")
    assert list(target.parent.iterdir()) == []
    (target.parent / ".universal.tmp" / "universal").mkdir(parents=True)  # left by a try that was SIGKILLed
    with atomic_folder(target) as out:
        (out / "zero").mkdir()
        (out / "zero" / "fp32.pt").write_bytes(b"weights")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "step-4", "step-4/universal", "step-4/universal/zero", "step-4/universal/zero/fp32.pt"]


def test_a_conversion_that_fails_is_one_line_and_leaves_the_checkpoint_as_it_was(tmp_path, capsys):
    """DeepSpeed's converter on a folder it cannot read (shard files of no real checkpoint): one line
    naming the step and what to do; no universal folder, no staging folder, the files unchanged."""
    folder = fake_checkpoint(tmp_path, 4)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as e:
        checkpoints.for_world(tmp_path, 4, 1, 4, 4, {"zero_optimization": {"stage": 3}})
    said = str(e.value)
    assert "\n" not in said and said.startswith(f"{folder / 'universal'}: converting checkpoint step-4 to a universal "
                                                 "checkpoint failed: ") and said.endswith(
        "the partial conversion was removed and step-4 is intact: fix that and rerun, or resume on 2 ranks, which needs "
        "no conversion"), said
    assert "converting it with DeepSpeed's ds_to_universal for 1 ranks" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "global_step", "trainer_state.json"]
