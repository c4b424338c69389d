"""The scoring driver streams its source: it holds only the shards it has pulled (memory stays flat).

The dispatch loop pulls a new shard only when one of its 2-per-actor slots is free, so reading
lazily here bounds the driver's memory by (2 x actors + 1) shards whatever the dataset size.
"""
import json

from dpo_dist.config import load_config
from dpo_dist.core.data import DataReport, in_eval_fraction
from dpo_dist.stages.score import plan_shards


def test_plan_reads_the_source_one_shard_at_a_time(tmp_path):
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"}) + "\n")
    cfg = load_config(None, [f"data.train={src}", "score.shard_size=100"])
    reports, done = {"train": DataReport(), "eval": DataReport()}, {}
    plan = plan_shards(cfg, reports, done, cfg.score.shard_size)
    first = next(plan)
    assert (first.split, first.index, len(first.pairs)) == ("train", 0, 100)
    assert reports["train"].rows == 100  # nothing beyond the first shard has been read
    second = next(plan)
    assert second.index == 1 and reports["train"].rows == 200
    rest = list(plan)
    assert len(rest) == 198 and done == {"train": 200, "eval": 0}


def test_eval_fraction_is_by_id_and_stable():
    ids = [f"{i:016x}" for i in range(4000)]
    held = [i for i in ids if in_eval_fraction(i, 0.1)]
    assert 300 < len(held) < 500
    assert held == [i for i in reversed(ids) if in_eval_fraction(i, 0.1)][::-1]  # order-independent
    assert not any(in_eval_fraction(i, 0.0) for i in ids)
