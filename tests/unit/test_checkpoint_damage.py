"""A checkpoint damaged on disk after it was marked complete (cut short, a flipped bit, a file gone)
is found by its marker's checksums before a resume, named, set aside, and the previous one used."""
import pytest

from dpo_dist.engines.checkpoints import COMPLETE, LATEST, complete_steps, damage, set_aside_damaged
from helpers import flip, fake_checkpoint as save


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


def test_the_writer_of_a_file_is_read_from_deepspeeds_name():
    from dpo_dist.engines.checkpoints import rank_of_file

    assert rank_of_file("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert rank_of_file("zero_pp_rank_1_mp_rank_00_model_states.pt") == 1
    assert rank_of_file("mp_rank_00_model_states.pt") is None and rank_of_file("trainer_state.json") is None
