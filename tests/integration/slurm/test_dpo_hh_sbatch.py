"""slurm/dpo_hh.sbatch for real on the local 2-node Slurm cluster: Ray head on n1 and a Ray worker
on n2 (token authentication on) score the reference with `ray job submit` into an S3 cache (moto's
S3 server on this machine, IAM auth on; the key reaches the job through its environment), stop
cleanly, then srun + torchrun train over both nodes from that cache, export; a second submission
of the same job skips scoring and resumes; USR1 stops training at a step through OUTPUT_DIR/STOP and
requeues, and the job requeued onto 1 node resumes there (elastic resume); STAGES=train with an
OVERRIDES_FILE.

Tiny llama, synthetic pairs, CPU, 1 CPU and 1 training process per node.
"""
from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path

import pytest

from helpers import S3Server
from slurm_jobs import REPO, assert_clean_log, base_overrides, job_env

pytestmark = pytest.mark.integration
SBATCH = REPO / "slurm" / "dpo_hh.sbatch"
MAX_STEPS = 6


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


def _env(c, work: Path, output_dir: str = "run", max_steps: int = MAX_STEPS, **more) -> dict:
    s3 = more.pop("s3", None)
    env = job_env(c, OVERRIDES=" ".join(base_overrides(work, max_steps, **more)), OUTPUT_DIR=work / output_dir)
    if s3 is not None:
        env.update(s3.env, DPO_DIST_FETCH_DIR=str(work / "fetched"))
    return env


def _s3_cache(s3) -> str:
    return f"s3://{s3.bucket}/caches/hh"


def _sbatch(c, env: dict, out: Path) -> str:
    return c.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                    f"--chdir={REPO}", f"--output={out}", SBATCH, env=env)


def _submit(c, work: Path, name: str, s3) -> tuple[dict, str, float]:
    out = work / f"{name}.out"
    t0 = time.monotonic()
    job = _sbatch(c, _env(c, work, cache=_s3_cache(s3), s3=s3), out)
    try:
        info = c.wait(job, timeout=600)
    finally:
        elapsed = time.monotonic() - t0
    text = out.read_text(errors="replace") if out.exists() else "(no job output)"
    print(f"{name}: job {job} submit -> finished in {elapsed:.1f}s")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"{info}\n----- job output\n{text[-8000:]}\n----- slurm logs\n{c.logs()}")
    return info, text, elapsed


@pytest.fixture(scope="module")
def first_job(slurm_cluster, work, s3):
    return _submit(slurm_cluster, work, "first", s3)


def test_sbatch_scores_on_two_ray_nodes_and_trains_on_two_slurm_nodes(first_job, work, s3):
    info, text, elapsed = first_job
    assert info["NodeList"] == "n[1-2]", info
    # Ray: a head on n1 and a worker on n2, with token authentication
    assert "Ray token authentication on" in text, text
    assert "Ray token authentication enforced" in text, text  # a client without the token was refused
    token = next((work / "run" / "slurm").glob("job-*/ray_auth_token"))
    assert len(token.read_text().strip()) == 64
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert "Ray cluster up" in text and "2 node(s)" in text, text
    assert "slurm_node_n1" in text and "slurm_node_n2" in text, text  # from `ray status`
    # where the job's Ray processes listen is checked and logged: Ray 2.60 puts a cluster node's GCS
    # and raylet on every interface (`ray start` turns 127.0.0.1 into the machine's address), which
    # the job accepts only because the token is enforced (without it: the next test)
    assert re.search(r"Ray listens on \S.* besides 127\.0\.0\.1 \(Ray's choice for a cluster node\); token "
                     r"authentication guards them", text), text
    assert "reference scoring done" in text, text
    # Ray is stopped on purpose: its steps end with exit 0, srun reports nothing
    assert "Ray stopped (expected)" in text, text
    assert_clean_log(text)
    for log in (work / "run" / "slurm").glob("job-*/ray-*.log"):
        assert "stopped (expected)" in log.read_text(errors="replace"), log
    manifest = json.loads(s3.keys("caches/hh/manifest.json")["caches/hh/manifest.json"])
    assert manifest["splits"]["train"]["shards"], manifest
    assert f"reference cache : {_s3_cache(s3)}" in text, text
    fetched = {p.stem for p in (work / "fetched").glob("*.arrow")}  # the training ranks' copies
    assert fetched == {e["sha256"] for info in manifest["splits"].values() for e in info["shards"].values()}
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in text
    # training: 2 nodes x 1 process
    final = json.loads((work / "run" / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == MAX_STEPS, final
    assert "world 2 (cpu)" in text, text
    assert "dpo-dist run finished" in text and "tensorboard --logdir" in text, text
    assert text.rstrip().splitlines()[-1].strip() == f"look at it:  tensorboard --logdir {work / 'run' / 'tb'}", text[-3000:]


def test_ray_without_its_token_is_refused_once_it_listens_beyond_loopback(slurm_cluster, work):
    """RAY_AUTH=disabled with a loopback head (allowed to start): the job sees its Ray listening on
    other interfaces too, and refuses before any scoring is submitted."""
    c = slurm_cluster
    out = work / "noauth.out"
    env = _env(c, work, output_dir="run_noauth", cache="cache_noauth")  # a cache nobody scored: Ray starts
    env["RAY_AUTH"] = "disabled"
    info = c.wait(_sbatch(c, env, out), timeout=300)
    text = out.read_text(errors="replace")
    assert info["JobState"] == "FAILED", (info, text)
    assert "Ray token authentication DISABLED" in text and re.search(
        r"Ray listens on \S.* without authentication: refused", text), text
    assert "reference scoring done" not in text and not (work / "cache_noauth" / "manifest.json").exists(), text


def test_tensorboard_and_export(first_job, work):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    acc = EventAccumulator(str(work / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"], acc.Tags()
    assert sorted(e.step for e in acc.Scalars("train/loss")) == list(range(1, MAX_STEPS + 1))
    model = AutoModelForCausalLM.from_pretrained(work / "run" / "export")
    assert model.num_parameters() > 0


def test_second_submission_skips_scoring_and_resumes(first_job, slurm_cluster, work, s3):
    info, text, elapsed = _submit(slurm_cluster, work, "second", s3)
    assert "scoring skipped" in text, text
    assert "Ray cluster up" not in text, text
    assert "training already complete" in text, text  # resumed at the last checkpoint: step 6 of 6
    final = json.loads((work / "run" / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == MAX_STEPS


def test_time_limit_signal_stops_training_at_a_step_and_the_job_requeued_on_one_node_resumes_there(
        first_job, slurm_cluster, work, s3):
    """--signal=B:USR1@300 arrives (sent by hand here) mid-training of a 2-node job: the script writes
    OUTPUT_DIR/STOP, both nodes' ranks finish their step and save checkpoint step-N, and the script
    requeues the job, which waits to run again on 1 node (as a job of `--nodes=1-2` whose second node
    is gone; here `scontrol update NumNodes=1 NumTasks=1` while it waits). The rerun skips scoring
    and resumes at step N on world 1, accumulation 2 -> 4 keeping the run's global batch of 16
    (micro 4), from DeepSpeed's universal checkpoint of step-N, and finishes. No checkpoint but that
    one (save_steps is large)."""
    c = slurm_cluster
    out = work / "requeue.out"
    max_steps = 30
    t0 = time.monotonic()
    job = _sbatch(c, _env(c, work, output_dir="run_rq", max_steps=max_steps, train__save_steps=1000,
                          cache=_s3_cache(s3), s3=s3), out)
    deadline = time.monotonic() + 300
    while "step-0 identity" not in (out.read_text(errors="replace") if out.exists() else ""):  # training started
        assert time.monotonic() < deadline and c.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), (
            c.job_info(job), out.read_text(errors="replace") if out.exists() else "")
        time.sleep(0.5)
    time.sleep(2)
    c.run("scancel", "--batch", "--signal=USR1", job)
    while not (c.state(job) == "PENDING" and c.job_info(job).get("Restarts") == "1"):  # requeued by the script
        assert time.monotonic() < deadline + 120, (c.job_info(job), out.read_text(errors="replace"))
        time.sleep(0.2)
    # one task per node: the task count goes with the node count
    c.run("scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1")
    info = c.wait(job, timeout=420)
    text = out.read_text(errors="replace")
    print(f"requeue: job {job} submit -> finished in {time.monotonic() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
    assert info["Restarts"] == "1" and info["NumNodes"] == "1", info
    assert "USR1 (time limit near) during train" in text and f"requeueing job {job}" in text, text
    stopped = re.search(r"STOP received: stopped after step (\d+) and saved checkpoint step-(\d+)", text)
    assert stopped and stopped[1] == stopped[2] and 0 < int(stopped[1]) < max_steps, text
    assert f"job {job} (restart 1) on 1 node(s)" in text and text.count("scoring skipped") == 2, text
    assert (f"resuming step {stopped[1]} of world 2 on world 1: accumulation 2 -> 4 (global batch 16 kept), checkpoint "
            "converted to universal in") in text, text
    assert f"resuming at step {stopped[1]}" in text and "world 1 (cpu)" in text, text
    assert "srun: error" not in text, text
    final = json.loads((work / "run_rq" / "final_metrics.json").read_text())
    assert final["world_size"] == 1 and final["steps"] == max_steps, final
    assert not (work / "run_rq" / "STOP").exists()


def test_train_stage_reads_an_overrides_file_refuses_a_missing_cache_and_reports_a_stop_from_outside(
        first_job, slurm_cluster, work, s3):
    """STAGES=train with OVERRIDES_FILE (an output_dir with spaces): training starts on the cache the
    first job scored; a STOP file written from outside stops it after a step with a checkpoint, and
    the job fails, saying so. The same with a cache nobody scored is refused before any training."""
    c = slurm_cluster
    out_dir = work / "run with spaces"
    jobs = {}
    for name, cache in (("stop", _s3_cache(s3)), ("nocache", "cache_nobody_scored")):
        overrides = work / f"{name}.overrides"
        overrides.write_text("\n".join(["# one override per line", *base_overrides(work, 30, cache=cache, train__save_steps=1000),
                                        f"output_dir={out_dir if name == 'stop' else work / 'run_nocache'}", ""]))
        env = job_env(c, STAGES="train", OVERRIDES_FILE=overrides, DPO_DIST_FETCH_DIR=work / "fetched", **s3.env)
        jobs[name] = c.sbatch("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                              f"--chdir={REPO}", f"--output={work / name}.out", SBATCH, env=env)
    deadline = time.monotonic() + 300
    log = work / "stop.out"
    while "step-0 identity" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline and c.state(jobs["stop"]) in ("PENDING", "RUNNING", "CONFIGURING"), (
            c.job_info(jobs["stop"]), log.read_text(errors="replace") if log.exists() else "")
        time.sleep(0.5)
    (out_dir / "STOP").touch()
    info = c.wait(jobs["stop"], timeout=300)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, text)
    assert "stages train" in text and "scoring skipped" in text and "Ray cluster" not in text, text
    stopped = re.search(r"STOP received: stopped after step (\d+) and saved checkpoint step-\1", text)
    assert stopped and (out_dir / "checkpoints" / f"step-{stopped[1]}" / "COMPLETE").exists(), text
    assert "training stopped before its last step without a USR1 to this script" in text and "resubmit" in text, text
    assert not (out_dir / "final_metrics.json").exists()
    assert_clean_log(text)

    info = c.wait(jobs["nocache"], timeout=120)
    text = (work / "nocache.out").read_text(errors="replace")
    assert info["JobState"] == "FAILED" and "STAGES=train: the reference cache" in text and "is not ready" in text, (info, text)
    assert "training:" not in text and not (work / "cache_nobody_scored").exists(), text
