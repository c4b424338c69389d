"""Sweep files: runs and grids, one-line errors with the line, nothing that would need another cache."""
from pathlib import Path

import pytest

from dpo_dist.config import ConfigError
from dpo_dist.sweep import load_sweep, plan, task_overrides

BASE = ["model.name_or_path=m", "data.train=t.jsonl", "output_dir=out/base"]


def _write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_runs_and_grid(tmp_path):
    sweep = load_sweep(_write(tmp_path, "output_dir: out/sweep\nruns:\n  b01: [loss.beta=0.1]\n"
                                        "  ipo: {loss.loss_type: ipo, loss.beta: 0.5}\n"
                                        "grid:\n  loss.beta: [0.05, 0.2]\n  train.lr: [5.0e-7]\n"))
    assert [r.name for r in sweep.runs] == ["b01", "ipo", "beta0.05-lr5.0e-07", "beta0.2-lr5.0e-07"]
    assert sweep.runs[1].overrides == ["loss.loss_type=ipo", "loss.beta=0.5"] and sweep.runs[1].line == 4
    base, runs = plan(None, BASE, sweep)
    assert base.output_dir == "out/sweep" and base.cache_dir == "out/sweep/cache"
    assert [cfg.output_dir for _, cfg in runs] == [f"out/sweep/{r.name}" for r in sweep.runs]
    assert {cfg.cache_dir for _, cfg in runs} == {"out/sweep/cache"}
    assert runs[1][1].loss.loss_type == "ipo" and runs[3][1].train.lr == 5e-7
    assert task_overrides(None, BASE, sweep, 1)[-5:] == ["loss.loss_type=ipo", "loss.beta=0.5", "output_dir=out/sweep/ipo",
                                                         "cache_dir=out/sweep/cache", "sft.output_dir=out/sweep/sft"]
    # One SFT run for the whole sweep (its export is every run's reference when the recipe has sft).
    assert {cfg.sft_dir() for _, cfg in runs} == {base.sft_dir()} == {Path("out/sweep/sft")}


@pytest.mark.parametrize("text, message", [
    ("runs:\n  a: [loss.beta=0.1]\n  b: [data.max_length=256]\n", "sweep.yaml:3: run 'b': data.max_length=256 changes data"),
    ("runs:\n  a: [score.dtype=bfloat16]\n", "sweep.yaml:2: run 'a': score.dtype=bfloat16 changes score"),
    ("runs:\n  a: [output_dir=x]\n", "changes output_dir"),
    ("runs:\n  a: [loss.beta=0]\n", "sweep.yaml:2: run 'a': override loss.beta=0: loss.beta: beta must be > 0"),
    ("runs:\n  a: [loss.beta=0.1]\n  a: [loss.beta=0.2]\n", "sweep.yaml:3: run name 'a' is used twice"),
    ("runs:\n  'a b': [loss.beta=0.1]\n", "sweep.yaml:2: run name 'a b' must be"),
    ("runs:\n  a: loss.beta=0.1\n", "sweep.yaml:2: run 'a': give a list of KEY=VALUE"),
    ("grid:\n  loss.beta: []\n", "sweep.yaml:2: `grid` must map fields to non-empty lists"),
    ("runz: {}\n", "sweep.yaml:1: unknown key 'runz'"),
    ("runs: [1, 2\n", "sweep.yaml:2: invalid YAML"),
    ("{}\n", "no runs"),
    ("runs:\n  a: [model.name_or_path=other]\n", "reference defaults to the policy"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        plan(None, BASE, load_sweep(_write(tmp_path, text)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_task_index_out_of_range(tmp_path):
    sweep = load_sweep(_write(tmp_path, "runs:\n  a: [loss.beta=0.1]\n"))
    with pytest.raises(ConfigError, match=r"task 3 out of range: the sweep has 1 runs"):
        task_overrides(None, BASE, sweep, 3)


def test_an_object_store_cache_is_every_runs_cache_as_written(tmp_path):
    """cache_dir=s3://... reaches every run (and each array task's overrides) unchanged, not as a path."""
    sweep = load_sweep(_write(tmp_path, "output_dir: out/sweep\nruns:\n  b01: [loss.beta=0.1]\n  b02: [loss.beta=0.2]\n"))
    base, runs = plan(None, [*BASE, "cache_dir=s3://bucket/caches/hh"], sweep)
    assert base.resolved_cache_dir() == "s3://bucket/caches/hh"
    assert {cfg.resolved_cache_dir() for _, cfg in runs} == {"s3://bucket/caches/hh"}
    assert "cache_dir=s3://bucket/caches/hh" in task_overrides(None, [*BASE, "cache_dir=s3://bucket/caches/hh"], sweep, 0)
