"""`dpo-dist sweep --slurm` for real on the local 2-node Slurm cluster: one scoring job
(slurm/dpo_hh.sbatch, STAGES=score, Ray over both nodes), then an array job (slurm/dpo_sweep.sbatch)
of two 1-node training tasks, loss.beta 0.1 and 0.3, that starts only after the scoring job
succeeded and reads the cache it wrote without touching it.

Tiny llama, synthetic pairs, CPU, 1 CPU and 1 training process per task.
"""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from slurm_jobs import DPO, REPO, assert_clean_log, base_overrides, job_env

pytestmark = pytest.mark.integration
MAX_STEPS = 4
BETAS = {"b0.1": 0.1, "b0.3": 0.3}


def _tasks(c, array_job: str) -> dict[str, dict]:
    """`scontrol show job -o` of every task of an array job, by task id ("0", "1")."""
    out = c.run("scontrol", "show", "job", "-o", array_job, check=False).stdout
    tasks = {}
    for line in out.splitlines():
        info = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if "ArrayTaskId" in info:
            tasks[info["ArrayTaskId"]] = info
    return tasks


def test_sweep_on_slurm_scores_once_then_trains_every_run_in_an_array(slurm_cluster, work, request):
    c = slurm_cluster
    root = work / "sweep"
    (work / "sweep_slurm.yaml").write_text(f"output_dir: {root}\nruns:\n"
                                           + "".join(f"  {name}: [loss.beta={beta}]\n" for name, beta in BETAS.items()))
    overrides = base_overrides(work, MAX_STEPS, cache="sweep_cache", train__save_steps=1000, export__enabled="false")
    task_args = (f"--nodes=1 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --time=10 --chdir={REPO} "
                 f"--output={work}/sweep-%A_%a.out")
    env = job_env(c)
    del env["RDZV_PORT"]  # one port for all tasks would collide where tasks share a host: the default differs per job
    t0 = time.monotonic()
    submit = subprocess.run(
        DPO + ["sweep", "--config", "configs/demo.yaml", str(work / "sweep_slurm.yaml"), *overrides, "--slurm",
               f"--sbatch-args={task_args}", f"--score-sbatch-args=--nodes=2 --output={work}/sweep-score.out"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    out = submit.stdout
    score_job = re.search(r"scoring job (\d+)", out)[1]
    array_job = re.search(r"array job (\d+)", out)[1]
    request.addfinalizer(lambda: c.run("scancel", score_job, array_job, check=False))  # none left pending on failure
    assert "1 node(s) x 1 process(es) = world 1" in out, out
    assert f"squeue -j {score_job},{array_job}" in out and f"tensorboard --logdir {root}" in out, out

    # The tasks wait for the scoring job; when it has succeeded, the cache is final.
    pending = c.run("squeue", "-h", "-r", "-j", array_job, "-o", "%T %E").stdout.split()
    assert pending == ["PENDING", f"afterok:{score_job}(unfulfilled)"] * len(BETAS), (pending, c.job_info(score_job))
    score = c.wait(score_job, timeout=600)
    score_log = (work / "sweep-score.out").read_text(errors="replace")
    assert score["JobState"] == "COMPLETED" and score["ExitCode"] == "0:0", (score, score_log[-6000:])
    assert score["NodeList"] == "n[1-2]" and "Ray cluster up" in score_log and "training is left to" in score_log, score_log
    assert_clean_log(score_log)
    manifest = (work / "sweep_cache" / "manifest.json").read_bytes()

    tasks = {}
    for task in map(str, range(len(BETAS))):
        tasks[task] = c.wait(f"{array_job}_{task}", timeout=600)
    print(f"sweep: scoring job {score_job} and array job {array_job} submit -> finished in {time.monotonic() - t0:.1f}s")
    tasks = _tasks(c, array_job)
    assert sorted(tasks) == ["0", "1"], tasks
    for task, (name, beta) in zip(("0", "1"), BETAS.items()):
        info = tasks[task]
        log = (work / f"sweep-{array_job}_{task}.out").read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-6000:])
        assert info["StartTime"] >= score["EndTime"], (info["StartTime"], score["EndTime"])  # ISO times sort as text
        assert f"array job {array_job} task {task}" in log and "stages train" in log, log
        assert "scoring skipped" in log and "scoring the reference" not in log and "Ray cluster up" not in log, log
        assert "dpo-dist run finished" in log, log
        assert_clean_log(log)
        run = root / name
        final = json.loads((run / "final_metrics.json").read_text())
        assert final["steps"] == MAX_STEPS and final["world_size"] == 1, final
        assert json.loads((run / "run.json").read_text())["identity"]["loss.beta"] == beta
        assert any((run / "tb").glob("events.out.tfevents.*")), list(run.rglob("*"))
        assert (run / "slurm" / f"task-{array_job}_{task}.overrides").read_text().splitlines()[-3:] == [
            f"output_dir={run}", f"cache_dir={work / 'sweep_cache'}", f"sft.output_dir={root / 'sft'}"]
    # the array only read the cache
    after = (work / "sweep_cache" / "manifest.json").read_bytes()
    assert json.loads(after)["names"]["created"] == json.loads(manifest)["names"]["created"] and after == manifest

    # Again with another lr: the run folders hold runs with other settings, refused before any sbatch.
    jobs_before = set(c.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split())
    again = subprocess.run(submit.args[:-3] + ["train.lr=5e-3", *submit.args[-3:]], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "this run folder was started with other settings" in again.stderr, again.stderr
    assert "train.lr" in again.stderr and "scoring job" not in again.stdout, again.stdout + again.stderr
    assert set(c.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split()) <= jobs_before  # nothing submitted
    # Again with the same settings: the cache is ready, so no scoring job and no dependency.
    again = subprocess.run(submit.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "is complete and matches: no scoring job" in again.stdout, again.stdout + again.stderr
    rerun = re.search(r"array job (\d+)", again.stdout)[1]
    assert c.job_info(rerun).get("Dependency") == "(null)", c.job_info(rerun)
    c.run("scancel", rerun)


def test_job_shape_reads_sbatch_args_over_the_script_header(tmp_path):
    """The world size `sweep --slurm` checks run folders with: nodes x processes per node, as the
    batch script will count them."""
    from dpo_dist.sweep import job_shape

    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --gpus-per-node=8\n#SBATCH --time=1:00:00\n")
    assert job_shape([], script, {}).world_size == 16
    assert job_shape(["--nodes", "1", "--time", "5", "-p", "gpu"], script, {}).world_size == 8
    assert job_shape(["-N3", "--gpus-per-node=a100:4"], script, {}).world_size == 12
    assert job_shape(["--nodes=2-4"], script, {"GPUS_PER_NODE": "0"}).world_size == 2  # CPU: 1 process per node
    assert job_shape(["--nodes=1"], script, {"GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2"}).world_size == 2
