"""DeepSpeed JSON filling, batch arithmetic, lr schedule and the step sampler: pure, no engine."""
import json
import math

import pytest

from helpers import REPO
from dpo_dist.config import TrainConfig
from dpo_dist.core.ds_json import load_ds_json
from dpo_dist.core.schedule import lr_lambda
from dpo_dist.engines.deepspeed_engine import BatchArithmeticError, fill_ds_config
from dpo_dist.core.sampler import BatchPlan



@pytest.mark.parametrize("name", ["zero3_bf16.json", "zero3_bf16_offload.json", "zero2_bf16.json", "zero0_bf16.json"])
def test_shipped_configs_fill_every_auto(name):
    ds = load_ds_json(str(REPO / "ds_configs" / name))
    t = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=4, lr=5e-7, weight_decay=0.01, max_grad_norm=10.0)
    filled = fill_ds_config(ds, t, world_size=8, hidden_size=2560, has_gpu=True)
    assert "auto" not in json.dumps(filled)
    assert filled["train_batch_size"] == 2 * 4 * 8 == 64
    assert filled["gradient_clipping"] == 10.0
    assert filled["optimizer"]["params"]["lr"] == 5e-7 and filled["optimizer"]["params"]["torch_adam"] is False
    assert ds["train_batch_size"] == "auto"  # the input is not modified


def test_batch_arithmetic_is_asserted_not_rewritten():
    ds = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
    with pytest.raises(BatchArithmeticError, match="train_micro_batch_size_per_gpu is 4"):
        fill_ds_config(ds, TrainConfig(micro_batch_size=2), world_size=2, hidden_size=64, has_gpu=False)
    with pytest.raises(BatchArithmeticError, match=r"global_batch_size=64 but .* = 32"):
        fill_ds_config({}, TrainConfig(micro_batch_size=2, gradient_accumulation_steps=4, global_batch_size=64),
                       world_size=4, hidden_size=64, has_gpu=False)
    ok = fill_ds_config({"train_batch_size": 16}, TrainConfig(micro_batch_size=2, gradient_accumulation_steps=4),
                        world_size=2, hidden_size=64, has_gpu=False)
    assert ok["train_batch_size"] == 16


def test_unknown_auto_field_is_an_error():
    with pytest.raises(ValueError, match="no rule to fill"):
        fill_ds_config({"scheduler": {"params": {"warmup": "auto"}}}, TrainConfig(), 1, 64, False)


def test_lr_schedule_by_hand():
    """warmup 2, total 6: steps 0,1 -> 1/2, 2/2; then linear 1 - (s-2)/4; cosine 0.5(1+cos(pi (s-2)/4))."""
    lin = lr_lambda(2, 6, "linear")
    assert [lin(s) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    cos = lr_lambda(2, 6, "cosine")
    assert cos(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(0, 6, "constant")(5) == 1.0


def test_sampler_covers_each_pair_once_per_epoch_and_splits_ranks():
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    plan = BatchPlan(num_pairs=103, micro_batch_size=3, accumulation=2, world_size=2, seed=5, group_steps=4)
    assert plan.global_batch == 12 and plan.steps_per_epoch == 8 and plan.dropped_per_epoch == 7
    micro = plan.epoch_micro_batches(0, lengths)
    seen = [i for step in range(8) for rank in range(2) for mb in plan.rank_step(micro, step, rank) for i in mb]
    assert len(seen) == len(set(seen)) == 96
    assert micro == plan.epoch_micro_batches(0, lengths)  # deterministic: resume needs only the step
    assert micro != plan.epoch_micro_batches(1, lengths)


def test_sampler_groups_by_length():
    """Within a window, micro-batches hold neighbours in length order: padding far below random batching."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(4096)]
    plan = BatchPlan(num_pairs=4096, micro_batch_size=4, accumulation=1, world_size=2, seed=0)
    micro = plan.epoch_micro_batches(0, lengths)
    grouped = sum(len(mb) * max(lengths[i] for i in mb) for mb in micro)
    shuffled = list(range(4096))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + 4] for i in range(0, 4096, 4)]
    baseline = sum(len(mb) * max(lengths[i] for i in mb) for mb in random_batches)
    assert sum(lengths) / grouped > 0.95 > sum(lengths) / baseline


def test_deepspeed_s_muon_import_compiles_nothing_and_leaves_dynamo_on():
    """build_engine imports DeepSpeed's Muon module first with dynamo off (its import-time
    torch.compile costs seconds per rank); afterwards TORCHDYNAMO_DISABLE is as it was."""
    import os
    import subprocess
    import sys

    code = ("import os, sys, torch, torch._dynamo\n"
            "from dpo_dist.engines.deepspeed_engine import _import_muon_uncompiled\n"
            "_import_muon_uncompiled()\n"
            "print('deepspeed.runtime.zero.muon.muon_optimizer' in sys.modules, 'torch._inductor.compile_fx' in sys.modules,"
            " os.environ.get('TORCHDYNAMO_DISABLE'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].split() == ["True", "False", "None"], proc.stdout
