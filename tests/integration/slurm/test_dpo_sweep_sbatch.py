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
from pathlib import Path

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


def _jobs(c) -> set[str]:
    """Every job id squeue knows (pending, running and recently finished)."""
    return set(c.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split())


def _sweep_slurm(c, work, name: str, runs: dict[str, str], overrides: list[str], sbatch_args: str,
                 score_args: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    """`dpo-dist sweep --slurm` of a sweep file `name`.yaml (runs into work/`name`), as a user submits it."""
    root = work / name
    (work / f"{name}.yaml").write_text(f"output_dir: {root}\nruns:\n" + "".join(f"  {k}: [{v}]\n" for k, v in runs.items()))
    cmd = DPO + ["sweep", "--config", "configs/demo.yaml", str(work / f"{name}.yaml"), *overrides, "--slurm",
                 f"--sbatch-args={sbatch_args}", *([f"--score-sbatch-args={score_args}"] if score_args else [])]
    return subprocess.run(cmd, cwd=REPO, env=job_env(c), capture_output=True, text=True, timeout=300), root


def test_sweep_on_slurm_whose_scoring_job_fails_never_starts_the_array_tasks(slurm_cluster, work, request):
    """A training file with a line that is not JSON: `sweep --slurm` does not read the data (only
    scoring does), so it submits both jobs and says what to do if scoring fails. The scoring job
    fails (FAILED, exit 1, the file and line named in its log); the array tasks, held by
    --dependency=afterok, never start: they stay PENDING with Reason=DependencyNeverSatisfied (no task
    log, no run folder) until cancelled as the submit output said."""
    c = slurm_cluster
    good = (work / "train.jsonl").read_text()
    bad = work / "train_unreadable.jsonl"
    bad.write_text(good + "{not json\n")
    overrides = base_overrides(work, MAX_STEPS, cache="unreadable_cache", data__train=bad, export__enabled="false")
    submit, root = _sweep_slurm(
        c, work, "sweep_unreadable", {"b0.1": "loss.beta=0.1", "b0.3": "loss.beta=0.3"}, overrides,
        f"--nodes=1 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --time=10 --chdir={REPO} "
        f"--output={work}/unreadable-%A_%a.out", f"--output={work}/unreadable-score.out")
    assert submit.returncode == 0, submit.stdout + submit.stderr
    score_job = re.search(r"scoring job (\d+)", submit.stdout)[1]
    array_job = re.search(r"array job (\d+)", submit.stdout)[1]
    request.addfinalizer(lambda: c.run("scancel", score_job, array_job, check=False))
    assert (f"(if the scoring job fails, the array tasks wait forever with Reason=DependencyNeverSatisfied: "
            f"scancel {array_job})") in submit.stdout, submit.stdout

    score = c.wait(score_job, timeout=300)
    log = (work / "unreadable-score.out").read_text(errors="replace")
    assert score["JobState"] == "FAILED" and score["ExitCode"] == "1:0", (score, log[-6000:])
    assert f"{bad}:{len(good.splitlines()) + 1}: invalid JSON" in log and "reference scoring failed" in log, log[-6000:]
    deadline = time.monotonic() + 120  # a guard, not an assertion: the scheduler looks every 2 s
    while (states := c.run("squeue", "-h", "-r", "-j", array_job, "-o", "%T %r").stdout.splitlines()) != [
            "PENDING DependencyNeverSatisfied"] * 2:
        assert time.monotonic() < deadline, (states, c.job_info(array_job))
        time.sleep(1)
    assert all(c.job_info(f"{array_job}_{task}")["StartTime"] == "Unknown" for task in ("0", "1"))
    assert not list(work.glob(f"unreadable-{array_job}_*.out")) and not (root / "b0.1").exists() and not (root / "b0.3").exists()
    c.run("scancel", array_job)
    assert {c.wait(f"{array_job}_{task}", timeout=60)["JobState"] for task in ("0", "1")} == {"CANCELLED"}


def test_sweep_on_slurm_names_the_scoring_job_to_cancel_when_the_array_submission_fails(slurm_cluster, work, request):
    """The array submission fails after the scoring job was submitted: --sbatch-args names a
    partition that does not exist, and --score-sbatch-args (which come after it) the real one, so
    only the array's sbatch refuses (the scoring job is also --hold, so that it never runs). The
    sweep exits 2 with one line: sbatch's own error and `scancel <the scoring job>`; that job is in
    squeue, no array job was made and no sweep.json written."""
    c = slurm_cluster
    before = _jobs(c)
    submit, root = _sweep_slurm(c, work, "sweep_no_array", {"b0.1": "loss.beta=0.1", "b0.3": "loss.beta=0.3"},
                                base_overrides(work, MAX_STEPS, cache="no_array_cache"),
                                f"--nodes=1 --gpus-per-node=0 --cpus-per-task=1 --time=10 --chdir={REPO} --partition=no_such_partition",
                                "--partition=debug --hold")
    scoring = re.search(r"scoring job (\d+)", submit.stdout)
    assert scoring, submit.stdout + submit.stderr
    score_job = scoring[1]
    request.addfinalizer(lambda: c.run("scancel", score_job, check=False))
    err = submit.stderr.strip().splitlines()
    assert submit.returncode == 2 and len(err) == 1, submit.stdout + submit.stderr
    assert err[0].startswith("error: sbatch --parsable") and "--array=0-1" in err[0], err
    assert f"--dependency=afterok:{score_job}" in err[0] and "invalid partition" in err[0].lower(), err
    assert err[0].endswith(f"(the scoring job {score_job} was submitted: scancel {score_job})"), err
    assert _jobs(c) - before == {score_job}, (_jobs(c) - before)
    info = c.job_info(score_job)
    assert info["JobState"] == "PENDING" and info["Reason"] == "JobHeldUser", info
    assert "array job" not in submit.stdout and not (root / "sweep.json").exists()
    c.run("scancel", score_job)
    assert c.wait(score_job, timeout=60)["JobState"] == "CANCELLED"


def test_sweep_on_slurm_refuses_a_batch_that_does_not_fit_the_world_before_submitting(slurm_cluster, work):
    """train.global_batch_size=16 with micro 4: on 2 nodes (world 2) the run with accumulation 2
    fits, the run with the base's accumulation 4 (4 x 4 x 2 = 32) does not. `sweep --slurm` refuses
    with exit 2 and one line naming the sweep file's line, the run, the arithmetic and what to change;
    no job is submitted and nothing is written (no sweep folder, no cache)."""
    c = slurm_cluster
    before = _jobs(c)
    submit, root = _sweep_slurm(c, work, "sweep_misfit", {"fits": "train.gradient_accumulation_steps=2", "b0.3": "loss.beta=0.3"},
                                base_overrides(work, MAX_STEPS, cache="misfit_cache", train__micro_batch_size=4,
                                               train__gradient_accumulation_steps=4, train__global_batch_size=16),
                                f"--nodes=2 --gpus-per-node=0 --cpus-per-task=1 --time=10 --chdir={REPO}")
    assert submit.returncode == 2, submit.stdout + submit.stderr
    assert "2 node(s) x 1 process(es) = world 2" in submit.stdout, submit.stdout
    assert submit.stderr.strip().splitlines() == [
        f"error: {work / 'sweep_misfit.yaml'}:4: run 'b0.3': train.global_batch_size=16 but micro 4 x accumulation 4 x "
        "world 2 = 32: change the nodes (--sbatch-args), NPROC_PER_NODE or the overrides"], submit.stderr
    assert "scoring job" not in submit.stdout and _jobs(c) <= before
    assert not root.exists() and not (work / "misfit_cache").exists()


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
