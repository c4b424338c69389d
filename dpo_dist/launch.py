"""Start the trainer on one machine under torchrun (one process per GPU, or N CPU processes)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dpo_dist.config import Config

LAUNCHER = Path(__file__).resolve().parents[1] / "launchers" / "train_dpo.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def num_procs(cfg: Config) -> tuple[int, bool]:
    """(processes, has_gpu): one per visible GPU, else train.num_procs or 2 CPU processes."""
    import torch

    if torch.cuda.is_available():
        return cfg.train.num_procs or torch.cuda.device_count(), True
    return cfg.train.num_procs or 2, False


def run_torchrun(cfg: Config, config_path: str | None, overrides: list[str], resume: bool) -> int:
    nproc, has_gpu = num_procs(cfg)
    env = dict(os.environ)
    if not has_gpu:  # share the cores: torchrun does not set OMP_NUM_THREADS on its own
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(LAUNCHER)]
    if config_path:
        cmd += ["--config", config_path]
    cmd += list(overrides) + (["--resume"] if resume else [])
    print(f"[dpo-dist] {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)
