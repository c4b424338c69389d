"""slurm/dpo_hh.sbatch under a fault schedule, on a second local 2-node cluster (lossy_cluster) whose
slurmctld gives up on a silent node after 15 s:

1. reference scoring on the job's 2-node Ray cluster: a scoring actor is SIGKILLed mid-shard, and
   right after it the Ray worker node on n2 (raylet, workers, agents: the Slurm node stays up);
2. training over both nodes: node n2 goes silent after checkpoint step-4, as after a power cut (its
   slurmd, its slurmstepd and every job process on it SIGSTOPped at once: no connection is closed);
3. Slurm itself finds the node silent, marks it DOWN and requeues the job; while it waits for nodes,
   a bit of the newest checkpoint is flipped on disk;
4. n2 reboots (its stopped processes SIGKILLed, its slurmd started again); the requeued job skips scoring, sets the damaged checkpoint
   aside, resumes from the one before and finishes.

The end state is compared with a clean run of the same config on this machine (embedded Ray scoring,
2-process training, no faults): the same cache bytes, per-step metrics and final weights.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import assert_same_weights, cmdline, manifest_shards, scalars, shard_hashes, weights
from slurm_jobs import DPO, REPO, base_overrides, job_env

pytestmark = pytest.mark.integration
SBATCH = REPO / "slurm" / "dpo_hh.sbatch"
MAX_STEPS = 12


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no job output yet)"


def _job_processes(conf: Path, node: str | None = None):
    """Processes of jobs on `node` (any node: None) of the cluster whose slurm.conf is `conf`:
    slurmd hands SLURM_CONF and SLURMD_NODENAME to every task, and the tasks' children inherit them."""
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_CONF") == str(conf) and (node is None or env.get("SLURMD_NODENAME") == node):
            yield p


def _node_of(proc) -> str:
    try:
        return proc.environ().get("SLURMD_NODENAME", "?")
    except psutil.Error:
        return "?"


def _kill_a_scoring_actor(c, cache: Path, job: str, deadline: float) -> str:
    """SIGKILL a RefScorer actor of the job while it scores a shard (one on n1 if there is one),
    once the manifest lists a first shard. Returns the actor's node.

    Scoring the tiny model's shards takes a fraction of a second, so the tight part of the loop only
    reads the manifest and the known actors' titles; the job's state (a Slurm command) and the scan
    of every process for the actors (seconds on a loaded machine) run once a second."""
    actors: list[tuple[str, object]] = []
    rescan = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= rescan:
            assert c.state(job) in ("PENDING", "CONFIGURING", "RUNNING"), (c.job_info(job), c.logs())
            actors = sorted(((_node_of(p), p) for p in _job_processes(c.conf) if cmdline(p).startswith("ray::RefScorer")),
                            key=lambda a: a[0] != "n1")
            rescan = time.monotonic() + 1.0
        if actors and manifest_shards(cache) >= 1:
            for node, p in actors:
                if cmdline(p).startswith("ray::RefScorer.score"):
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    return node
        time.sleep(0.005)
    raise AssertionError("no busy scoring actor found: scoring ended (or never started) before the kill")


def _lose_ray_node(c, node: str) -> list[str]:
    """The Ray worker node on `node` dies (every process of the job there: the Ray step's shell,
    `ray start`, the raylet, its workers and agents), the Slurm node itself stays up."""
    names = []
    for p in list(_job_processes(c.conf, node)):
        try:
            names.append(p.name())
            p.kill()
        except psutil.Error:
            pass
    return sorted(names)


def _silence_node(c, node: str) -> dict[int, str]:
    """What a power cut or a network partition does to an emulated node, seen from the others: its
    slurmd, its slurmstepds and every job process on it stop at once (SIGSTOP) and answer nothing.
    No connection is closed (a killed process's would be, by the kernel), so the rank left on the
    other node learns nothing until Slurm gives up on the node. Returns {pid: name} of what stopped."""
    victims = {int((c.state_dir / f"slurmd-{node}.pid").read_text())}
    for p in _job_processes(c.conf, node):
        victims.add(p.pid)
        victims.update(a.pid for a in p.parents() if a.name() == "slurmstepd")
    stopped = {}
    for pid in victims:
        try:
            stopped[pid] = psutil.Process(pid).name()
            os.kill(pid, signal.SIGSTOP)
        except (psutil.Error, ProcessLookupError):
            pass
    return stopped


def _reboot(stopped: dict[int, str]) -> None:
    """The silent node goes down for good (its stopped processes SIGKILLed), as before a reboot."""
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _flip_a_bit(checkpoint: Path) -> Path:
    """Flip one bit in the middle of the checkpoint's largest file; returns that file."""
    victim = max((p for p in checkpoint.rglob("*") if p.is_file() and p.name != "COMPLETE"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    return victim


def test_a_job_under_faults_ends_as_a_clean_run(lossy_cluster, work):
    c = lossy_cluster
    run_dir, cache, out = work / "run_faults", work / "cache_faults", work / "faults.out"
    overrides = base_overrides(work, MAX_STEPS, cache=cache.name, score__shard_size=16, train__save_steps=2)
    job = c.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                   f"--chdir={REPO}", f"--output={out}", SBATCH,
                   env=job_env(c, OVERRIDES=" ".join(overrides), OUTPUT_DIR=run_dir))
    t0 = time.monotonic()

    # 1. a scoring actor killed mid-shard, then the Ray worker node on n2 lost with its actor: the
    # rest is scored by the head node's replacement actor
    actor_node = _kill_a_scoring_actor(c, cache, job, deadline=t0 + 300)
    ray_killed = _lose_ray_node(c, "n2")
    assert "raylet" in ray_killed, ray_killed

    # 2. node n2 lost once checkpoint step-4 is complete
    while not (run_dir / "checkpoints" / "step-4" / "COMPLETE").exists():
        assert time.monotonic() < t0 + 480 and c.state(job) == "RUNNING", (c.job_info(job), _text(out)[-6000:])
        time.sleep(0.1)
    silenced = _silence_node(c, "n2")
    lost_at = time.monotonic()
    assert "slurmd" in silenced.values() and "slurmstepd" in silenced.values(), silenced

    # the clean run to compare with, on this machine while Slurm notices the loss
    clean_args = ["--config", "configs/demo.yaml", *base_overrides(work, MAX_STEPS, cache="cache_clean", score__shard_size=16,
                                                                   train__save_steps=2), f"output_dir={work / 'run_clean'}"]
    with open(work / "clean.log", "w") as clean_log:
        clean = subprocess.Popen(["bash", "-c", f"{shlex.join(DPO + ['score', *clean_args])} && "
                                                f"{shlex.join(DPO + ['train', *clean_args, 'train.num_procs=2'])}"],
                                 cwd=REPO, stdout=clean_log, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled"))
    try:
        _recover_and_compare(c, job, work, run_dir, cache, out, t0, lost_at, actor_node, clean, silenced)
    finally:
        _reboot(silenced)
        if clean.poll() is None:
            clean.kill()
            clean.wait()


def _recover_and_compare(c, job, work, run_dir, cache, out, t0, lost_at, actor_node, clean, silenced):
    # 3. Slurm marks n2 DOWN and requeues the job (JobRequeue=1, sbatch --requeue)
    while not (c.state(job) == "PENDING" and c.job_info(job).get("Restarts") == "1"):
        assert time.monotonic() < lost_at + 120, (c.job_info(job), _text(out)[-6000:], c.logs())
        time.sleep(0.5)
    detected_s = time.monotonic() - lost_at
    assert "DOWN" in c.run("scontrol", "show", "node", "n2").stdout
    newest = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    damaged = _flip_a_bit(run_dir / "checkpoints" / f"step-{newest}")

    # 4. n2 rebooted and back: the requeued job runs again and finishes
    _reboot(silenced)
    c.run("slurmd", "-N", "n2", "-f", str(c.conf))
    info = c.wait(job, timeout=420)
    text = _text(out)
    print(f"faults: job {job} finished {time.monotonic() - t0:.0f}s after submission; actor killed on {actor_node}, then the Ray node on n2; "
          f"n2 lost after step-4, found DOWN and requeued after {detected_s:.0f}s; step-{newest} damaged")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, text[-8000:])
    first, second = text.split(f"job {job} (restart 1)")
    # the killed actor's death is reported; so is the lost node's actor when the kill was on n1 (after
    # a kill on n2, the replacement may have started on n1 and n2 held no actor when it was lost)
    deaths = 2 if actor_node == "n1" else 1
    assert first.count("actor died on shard") >= deaths and "reference scoring done" in first, first[-6000:]
    # the rank left on n1 waits in its collective (nothing tells it the peer is gone) until Slurm
    # cancels the job for the node failure; the log holds no traceback
    assert "CANCELLED" in first and "DUE TO NODE FAILURE" in first and "Traceback" not in text, text[-8000:]
    assert "ERROR: training failed" not in first or "ERROR: training failed (exit 1): node(s) n2 of this job lost" in first, first[-6000:]
    assert "scoring skipped" in second and "Ray cluster up" not in second, second
    assert f"checkpoint step-{newest} is damaged" in second and damaged.name in second, second
    assert f"resuming at step {newest - 2}" in second and (run_dir / "checkpoints" / f"damaged-step-{newest}").is_dir(), second
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == MAX_STEPS, final

    # the same end as the clean run: cache bytes, per-step metrics, final weights
    clean.wait(timeout=600)
    assert clean.returncode == 0, _text(work / "clean.log")[-6000:]
    assert shard_hashes(cache) == shard_hashes(work / "cache_clean")
    got, want = scalars(run_dir / "tb"), scalars(work / "run_clean" / "tb")
    for tag in ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/grad_norm"):
        assert sorted(got[tag]) == list(range(1, MAX_STEPS + 1)), tag
        for step in got[tag]:
            assert got[tag][step] == pytest.approx(want[tag][step], rel=1e-3, abs=1e-4), (tag, step)
    assert_same_weights(weights(run_dir / "export"), weights(work / "run_clean" / "export"), weights(work / "model"))
