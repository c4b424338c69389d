"""slurm/dpo_hh.sbatch for real on the local 2-node Slurm cluster: Ray head on n1 and a Ray worker
on n2 (token authentication on) score the reference with `ray job submit`, then srun + torchrun
train over both nodes, export; a second submission of the same job skips scoring and resumes.

Tiny llama, synthetic pairs, CPU, 1 CPU and 1 training process per node.
"""
from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
SBATCH = REPO / "slurm" / "dpo_hh.sbatch"
DPO = [sys.executable, "-m", "dpo_dist.cli"]
MAX_STEPS = 6


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _ports(n: int, span: int = 1) -> list[int]:
    """n ports (each with `span` consecutive free ports) in a range Linux does not hand out as
    ephemeral ports, so that concurrent Ray clusters on this machine do not collide with the job's."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    found: list[int] = []
    while len(found) < n:
        p = rng.randrange(20000, 30000)
        if all(_free(p + i) for i in range(span)) and all(abs(p - q) > span for q in found):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("sbatch")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for args in (["tiny-model", "model", "--seed", "0"],
                 ["synthetic", "train.jsonl", "--n", "160", "--seed", "1"],
                 ["synthetic", "eval.jsonl", "--n", "32", "--seed", "2", "--split", "eval"]):
        subprocess.run(DPO + args, cwd=d, env=env, check=True, capture_output=True, timeout=300)
    return d


def _env(c, work: Path, output_dir: str = "run", max_steps: int = MAX_STEPS) -> dict:
    ray_port, dash_port, client_port, rdzv_port, agent_port = _ports(4) + _ports(1, span=2)
    venv_bin = Path(sys.executable).parent
    activate = (f"source {venv_bin / 'activate'}" if (venv_bin / "activate").exists()
                else f"export PATH={venv_bin}:$PATH")
    overrides = [f"model.name_or_path={work / 'model'}", f"data.train={work / 'train.jsonl'}",
                 f"data.eval={work / 'eval.jsonl'}", f"cache_dir={work / 'cache'}",
                 f"train.max_steps={max_steps}", "train.save_steps=3", "train.eval_steps=0",
                 "score.cpu_actors=2", "score.shard_size=64"]
    env = dict(c.env, CONFIG="configs/demo.yaml", OVERRIDES=" ".join(overrides), OUTPUT_DIR=str(work / output_dir),
               GPUS_PER_NODE="0", NPROC_PER_NODE="1", ACTIVATE=activate, PYTHON="python",
               RAY_PORT=str(ray_port), DASHBOARD_PORT=str(dash_port), RAY_CLIENT_PORT=str(client_port),
               RDZV_PORT=str(rdzv_port), RAY_AGENT_PORT=str(agent_port),
               RAY_OBJECT_STORE_MEMORY=str(200 * 1024 * 1024), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "OMP_NUM_THREADS", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


def _sbatch(c, env: dict, out: Path) -> str:
    return c.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                    f"--chdir={REPO}", f"--output={out}", SBATCH, env=env)


def _submit(c, work: Path, name: str) -> tuple[dict, str, float]:
    out = work / f"{name}.out"
    t0 = time.monotonic()
    job = _sbatch(c, _env(c, work), out)
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
def first_job(slurm_cluster, work):
    return _submit(slurm_cluster, work, "first")


def test_sbatch_scores_on_two_ray_nodes_and_trains_on_two_slurm_nodes(first_job, work):
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
    assert "reference scoring done" in text, text
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"], manifest
    # training: 2 nodes x 1 process
    final = json.loads((work / "run" / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == MAX_STEPS, final
    assert "world 2 (cpu)" in text, text
    assert "dpo-dist run finished" in text and "tensorboard --logdir" in text, text


def test_tensorboard_and_export(first_job, work):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    acc = EventAccumulator(str(work / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"], acc.Tags()
    assert sorted(e.step for e in acc.Scalars("train/loss")) == list(range(1, MAX_STEPS + 1))
    model = AutoModelForCausalLM.from_pretrained(work / "run" / "export")
    assert model.num_parameters() > 0


def test_second_submission_skips_scoring_and_resumes(first_job, slurm_cluster, work):
    info, text, elapsed = _submit(slurm_cluster, work, "second")
    assert "scoring skipped" in text, text
    assert "Ray cluster up" not in text, text
    assert "training already complete" in text, text  # resumed at the last checkpoint: step 6 of 6
    final = json.loads((work / "run" / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == MAX_STEPS


def test_time_limit_signal_requeues_and_training_resumes(first_job, slurm_cluster, work):
    """--signal=B:USR1@300 arrives (sent by hand here): the script requeues the job; the rerun skips
    scoring and resumes training from the latest checkpoint."""
    c = slurm_cluster
    out = work / "requeue.out"
    ckpt = work / "run_rq" / "checkpoints" / "latest"
    t0 = time.monotonic()
    job = _sbatch(c, _env(c, work, output_dir="run_rq", max_steps=12), out)
    deadline = time.monotonic() + 300
    while not ckpt.exists():
        assert time.monotonic() < deadline and c.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), (
            c.job_info(job), out.read_text(errors="replace") if out.exists() else "")
        time.sleep(0.5)
    c.run("scancel", "--batch", "--signal=USR1", job)
    info = c.wait(job, timeout=300)
    text = out.read_text(errors="replace")
    print(f"requeue: job {job} submit -> finished in {time.monotonic() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
    assert info["Restarts"] == "1", info
    assert "time limit near: requeueing" in text and f"job {job} (restart 1)" in text, text
    assert text.count("scoring skipped") == 2, text
    assert "resuming at step" in text, text
    final = json.loads((work / "run_rq" / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["steps"] == 12, final
