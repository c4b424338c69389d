"""Integration fixtures: a private Ray temp dir, a tiny float32 model, synthetic pairs, one embedded Ray.

Every test here runs real engines on 2 CPU cores, offline. The embedded Ray session is shared by the
tests of a module (`ray.init` costs ~3 s); `run_scoring` reuses an initialized Ray.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: runs real engines (Ray, DeepSpeed, Slurm) on tiny models; slower")


@pytest.fixture(scope="session", autouse=True)
def offline_env():
    """Offline, no Ray auth token, quiet tokenizers; Ray files in a private short temp dir.

    A private RAY_TMPDIR keeps `ray.init()` from finding (and joining) a cluster that someone else
    started with `ray start` on this machine; it is short because Ray's unix sockets live under it.
    """
    ray_tmp = tempfile.mkdtemp(prefix="dpoR", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        if VENV_BIN.is_dir():  # subprocesses (dpo-dist, ray, a job's `python`) use the venv
            mp.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        yield
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide float32 llama with the local tokenizer (BOS on prompts, EOS id 1)."""
    from dpo_dist.fixtures.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def synthetic_path(tmp_path_factory) -> Path:
    """600 generated pairs (prompt / chosen / rejected jsonl)."""
    from dpo_dist.fixtures.synthetic import write_synthetic_pairs

    return write_synthetic_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", n=600, seed=1)


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded 2-CPU Ray session for the module; shut down at its end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from dpo_dist.engines.ray_pool import init_ray

    init_ray(num_cpus=2, log_to_driver=False)  # embedded, loopback only; never joins a leftover cluster
    yield ray
    ray.shutdown()
