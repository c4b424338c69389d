"""What the trainer's ranks would refuse is refused by the launching process, before torchrun starts:
the DeepSpeed JSON and the batch arithmetic; and a DeepSpeed build lock left by a killed build
(which would make every later start wait forever without a word) is removed."""
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO
from dpo_dist.config import load_config
from dpo_dist.core.ds_json import DeepSpeedConfigError
from dpo_dist.engines.deepspeed_engine import BatchArithmeticError
from dpo_dist.launch import clear_stale_build_locks, preflight



def cfg_with(*overrides):
    return load_config(None, ["model.name_or_path=m", *overrides])


def test_deepspeed_json_is_checked_before_torchrun(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=r"^train.deepspeed_config: .*nope.json: no such file"):
        preflight(cfg_with(f"train.deepspeed_config={tmp_path / 'nope.json'}"), 2, False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size":\n')
    with pytest.raises(DeepSpeedConfigError, match=r"bad.json:2: invalid JSON"):
        preflight(cfg_with(f"train.deepspeed_config={bad}"), 2, False)
    bad.write_text("[1, 2]")
    with pytest.raises(DeepSpeedConfigError, match="a DeepSpeed config is a JSON object, got list"):
        preflight(cfg_with(f"train.deepspeed_config={bad}"), 2, False)
    bad.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.stage must be 0, 1, 2 or 3; got 4"):
        preflight(cfg_with(f"train.deepspeed_config={bad}"), 2, False)


def test_batch_arithmetic_is_checked_with_the_world_size(tmp_path):
    ds = f"train.deepspeed_config={REPO}/ds_configs/zero3_bf16.json"
    preflight(cfg_with(ds, "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
                       "train.global_batch_size=8"), 2, False)
    with pytest.raises(BatchArithmeticError, match=r"global_batch_size=8 .* world size 3 = 12"):
        preflight(cfg_with(ds, "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
                           "train.global_batch_size=8"), 3, False)
    fixed = REPO / "ds_configs" / "zero2_bf16.json"
    pinned = tmp_path / "pinned.json"
    pinned.write_text(fixed.read_text().replace('"train_micro_batch_size_per_gpu": "auto"',
                                                '"train_micro_batch_size_per_gpu": 16'))
    with pytest.raises(BatchArithmeticError, match="train_micro_batch_size_per_gpu is 16"):
        preflight(cfg_with(f"train.deepspeed_config={pinned}", "train.micro_batch_size=4"), 1, False)
    # SFT is checked with SFT's own batch
    preflight(cfg_with(f"train.deepspeed_config={pinned}", "train.micro_batch_size=4", "sft.micro_batch_size=16"),
              1, False, stage="sft")


def test_a_stale_build_lock_is_removed_a_young_one_named(tmp_path, capsys):
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    young = tmp_path / "deepspeed_cpu_adam" / "lock"
    other = tmp_path / "someone_elses_op" / "lock"
    for lock in (old, young, other):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(other, (an_hour_ago, an_hour_ago))
    assert clear_stale_build_locks(tmp_path) == [old]
    assert not old.exists() and young.exists() and other.exists()  # not ours to judge: left alone
    out = capsys.readouterr().out
    assert "removed a stale DeepSpeed build lock" in out and str(old) in out
    assert f"a DeepSpeed op is being built ({young}" in out and "delete that file" in out


def test_cli_refuses_a_missing_deepspeed_json_without_starting_torchrun(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "train", "model.name_or_path=m",
                           f"train.deepspeed_config={tmp_path / 'nope.json'}", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: train.deepspeed_config: {tmp_path / 'nope.json'}: no such file "
                                                "(shipped configs are in ds_configs/)"]
    assert "torchrun" not in proc.stdout and not (tmp_path / "run").exists()


def test_the_shipped_deepspeed_json_is_found_from_any_working_folder(tmp_path, monkeypatch):
    """`ds_configs/NAME` (the default) from a folder without one: the copy shipped with dpo-dist; a
    folder that has its own wins; a name nobody has is still an error."""
    import json

    from dpo_dist.core.ds_json import SHIPPED_DS_CONFIGS, load_ds_json

    monkeypatch.chdir(tmp_path)
    assert load_ds_json("ds_configs/zero3_bf16.json") == json.loads((SHIPPED_DS_CONFIGS / "zero3_bf16.json").read_text())
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3_bf16.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert load_ds_json("ds_configs/zero3_bf16.json") == {"zero_optimization": {"stage": 2}}
    with pytest.raises(FileNotFoundError, match="ds_configs/nope.json: DeepSpeed config not found"):
        load_ds_json("ds_configs/nope.json")


def test_an_agent_run_in_this_process_leaves_its_environment_signals_and_name_as_they_were(monkeypatch):
    """launch.agent_here runs torchrun's agent in the `dpo-dist` process (CPU, ranks forked): torchrun
    sets environment variables, installs its signal handlers and names the process pt_elastic; all
    are put back afterwards (a sweep launches again from the same process). Torchrun itself is
    replaced by a stand-in that does those things; the real one runs in every training test."""
    import signal

    from dpo_dist import launch, torchrun

    seen = {}

    def stand_in(argv):
        seen.update(argv=argv, env=os.environ.get("DPO_DIST_TEST_VAR"), term=signal.getsignal(signal.SIGTERM))
        os.environ["OMP_NUM_THREADS"] = "1"  # torchrun's own setting for several ranks
        for s in (signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        launch.process_name("pt_elastic")
        return 1

    monkeypatch.setattr(torchrun, "launch", stand_in)
    env_before, name = dict(os.environ), launch.process_name()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)}
    code = launch.agent_here(2, ["--stage", "dpo"], {**os.environ, "DPO_DIST_TEST_VAR": "yes"})
    assert code == 1 and seen["env"] == "yes" and seen["term"] not in (signal.SIG_DFL, handlers[signal.SIGTERM])
    assert "--signals_to_handle=SIGINT,SIGHUP,SIGQUIT" in seen["argv"] and seen["argv"][-2:] == ["--stage", "dpo"]
    assert dict(os.environ) == env_before and launch.process_name() == name
    assert {s: signal.getsignal(s) for s in handlers} == handlers
