"""Helpers for the tests that submit slurm/*.sbatch: the environment a user would submit with, the
tiny run's overrides, free ports, and what a clean job log looks like."""
from __future__ import annotations

import os
import random
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DPO = [sys.executable, "-m", "dpo_dist.cli"]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_ports(n: int, span: int = 1) -> list[int]:
    """n ports (each with `span` consecutive free ports) in a range Linux does not hand out as
    ephemeral ports, so that concurrent Ray clusters on this machine do not collide with the job's."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    found: list[int] = []
    while len(found) < n:
        p = rng.randrange(20000, 30000)
        if all(_free(p + i) for i in range(span)) and all(abs(p - q) > span for q in found):
            found.append(p)
    return found


def base_overrides(work: Path, max_steps: int, cache: str = "cache", **more) -> list[str]:
    """The tiny run of these tests; `more` adds or replaces overrides (train__save_steps=... style)."""
    overrides = {"model.name_or_path": work / "model", "data.train": work / "train.jsonl",
                 "data.eval": work / "eval.jsonl", "cache_dir": cache if "://" in cache else work / cache,
                 "train.max_steps": max_steps,
                 "train.save_steps": 3, "train.eval_steps": 0, "score.cpu_actors": 2, "score.shard_size": 64}
    overrides.update({k.replace("__", "."): v for k, v in more.items()})
    return [f"{k}={v}" for k, v in overrides.items()]


def job_env(cluster, **variables) -> dict:
    """The environment a user would submit slurm/*.sbatch with: this venv, CPU only (1 training
    process per node), fresh Ray and rendezvous ports, plus `variables`."""
    ray_port, dash_port, client_port, rdzv_port, agent_port = free_ports(4) + free_ports(1, span=2)
    venv_bin = Path(sys.executable).parent
    activate = (f"source {venv_bin / 'activate'}" if (venv_bin / "activate").exists()
                else f"export PATH={venv_bin}:$PATH")
    env = dict(cluster.env, CONFIG="configs/demo.yaml", GPUS_PER_NODE="0", NPROC_PER_NODE="1",
               ACTIVATE=activate, PYTHON="python", RAY_PORT=str(ray_port), DASHBOARD_PORT=str(dash_port),
               RAY_CLIENT_PORT=str(client_port), RDZV_PORT=str(rdzv_port), RAY_AGENT_PORT=str(agent_port),
               RAY_OBJECT_STORE_MEMORY=str(200 * 1024 * 1024), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "OMP_NUM_THREADS", "VIRTUAL_ENV",
              "OVERRIDES", "OVERRIDES_FILE", "STAGES", "OUTPUT_DIR", "MODEL", "REF_MODEL", "DATA", "SWEEP"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in variables.items()})
    return env


def assert_clean_log(text: str) -> None:
    """No step of the job ended with an error or was killed (Ray is stopped on purpose, cleanly)."""
    bad = [line for line in text.splitlines() if "srun: error" in line or "Killed" in line or "CANCELLED" in line]
    assert not bad, "\n".join(bad) + "\n----- job output\n" + text[-6000:]
