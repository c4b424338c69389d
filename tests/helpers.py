"""Test helpers shared by unit and integration tests (pytest puts tests/ on sys.path: `import helpers`)."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # the checkout
DPO = [sys.executable, "-m", "dpo_dist.cli"]  # `dpo-dist` as this interpreter runs it


def offline_env(**more: str) -> dict:
    """This process's environment for a subprocess of ours: offline hub, no tokenizer threads, Ray
    without a token (loopback only), plus `more`."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled", **more)

CUSTOM_CONFIG = '''from transformers import LlamaConfig


class DpoTinyCustomConfig(LlamaConfig):
    model_type = "dpo_tiny_custom"
'''
CUSTOM_MODELING = '''from transformers import LlamaForCausalLM

from .configuration_dpo_tiny import DpoTinyCustomConfig


class DpoTinyCustomForCausalLM(LlamaForCausalLM):
    config_class = DpoTinyCustomConfig
'''


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; fail under CI (CI=true), where every prerequisite must be present."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "64m"):
    """A real tmpfs of `size` at `folder` (mounting needs root: skip_or_fail elsewhere), unmounted after."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        skip_or_fail(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        gc.collect()  # a loaded model's memory-mapped weights would keep the tmpfs busy
        subprocess.run(["umount", str(folder)], check=False)


def write_custom_code_model(llama_dir: Path, out: Path) -> Path:
    """A copy of a tiny Llama under a new model_type whose classes live in the folder (config auto_map):
    it loads only with trust_remote_code=True, and computes exactly what the Llama does."""
    shutil.copytree(llama_dir, out)
    (out / "configuration_dpo_tiny.py").write_text(CUSTOM_CONFIG)
    (out / "modeling_dpo_tiny.py").write_text(CUSTOM_MODELING)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="dpo_tiny_custom", architectures=["DpoTinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_dpo_tiny.DpoTinyCustomConfig",
        "AutoModelForCausalLM": "modeling_dpo_tiny.DpoTinyCustomForCausalLM"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def shard_hashes(cache: Path) -> dict:
    """(split, index) -> sha256 as the manifest records it, checked against the file on disk."""
    manifest = json.loads((cache / "manifest.json").read_text())
    out = {}
    for split, info in manifest["splits"].items():
        for index, entry in info["shards"].items():
            assert hashlib.sha256((cache / split / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
            out[(split, int(index))] = entry["sha256"]
    return out


def manifest_shards(cache: Path) -> int:
    """How many shards the cache's manifest lists so far (0 before it exists or while half-written)."""
    try:
        manifest = json.loads((cache / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(len(info["shards"]) for info in manifest["splits"].values())


def cmdline(proc) -> str:
    """A psutil process's command line as one string ("" once it is gone or out of reach)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard folder: tag -> step -> value (later writes win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def weights(export_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(export_dir / "model.safetensors"))


def assert_same_weights(got: dict, want: dict, init: dict) -> None:
    """Equal to the uninterrupted run's weights, far inside how far training moved them."""
    assert got.keys() == want.keys()
    drift = max(float((want[k].float() - init[k].float()).abs().max()) for k in want)
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert drift > 1e-3, drift  # the run really moved the weights (by ~0.01 here)
    assert worst <= 1e-3 * drift, f"max |resumed - uninterrupted| {worst:.3g} vs drift {drift:.3g}"


def fake_checkpoint(ckpt: Path, step: int) -> Path:
    """A marked-complete checkpoint folder of two ranks' small shard files (engines.checkpoints layout)."""
    from dpo_dist.engines.checkpoints import LATEST, mark_complete

    folder = ckpt / f"step-{step}"
    (folder / "global_step").mkdir(parents=True)
    (folder / "global_step" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "global_step" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"\x07" * 5000)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    mark_complete(folder, step)
    (ckpt / LATEST).write_text(f"step-{step}\n")
    return folder


def flip(path: Path, at: int) -> None:
    """One bit of the file at byte `at` flipped."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
