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


def assert_same_weights(got: dict, want: dict, init: dict, rel: float = 1e-3) -> None:
    """Equal to the uninterrupted run's weights, far inside how far training moved them (within `rel`
    of the largest move)."""
    assert got.keys() == want.keys()
    drift = max(float((want[k].float() - init[k].float()).abs().max()) for k in want)
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert drift > 1e-3, drift  # the run really moved the weights (by ~0.01 here)
    assert worst <= rel * drift, f"max |resumed - uninterrupted| {worst:.3g} vs drift {drift:.3g}"


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


class _LocalServer:
    """An HTTP server process of a test on a free loopback port, up once `probe` (a path) answers."""

    def _start(self, log: Path, command: list[str], probe: str, env: dict | None = None) -> None:
        import socket
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name(command[0])), *command[1:], *self.port_args()],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}{probe}", timeout=1)
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{command[0]} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)

    def port_args(self) -> list[str]:
        raise NotImplementedError

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class S3Server(_LocalServer):
    """A real S3 HTTP endpoint on this machine: moto's standalone server (`moto_server`), with IAM
    authentication on, one user allowed everything, and one bucket. `env` holds what a client needs
    (endpoint, region, that user's key); requests signed with any other key are refused."""

    def __init__(self, log: Path, bucket: str = "dpo-bucket"):
        import boto3

        # The first 3 requests (create the user, its policy and its key) pass unauthenticated; every
        # later one must be signed with a key the server knows.
        self._start(log, ["moto_server", "-H", "127.0.0.1"], "/moto-api/", dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3"))
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="dpo")
        iam.put_user_policy(UserName="dpo", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="dpo")["AccessKey"]
        self.bucket = bucket
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str) -> dict[str, bytes]:
        """Every object under `prefix`, by key."""
        s3, out = self.client(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
        return out

    def port_args(self) -> list[str]:
        return ["-p", str(self.port)]


class GcsServer(_LocalServer):
    """A real Google Cloud Storage JSON-API endpoint on this machine (gcp-storage-emulator, in memory,
    one bucket). `env` holds what a client needs: STORAGE_EMULATOR_HOST, as with Google's own clients."""

    def __init__(self, log: Path, bucket: str = "dpo-gcs"):
        self.bucket = bucket
        self._start(log, ["gcp-storage-emulator", "start", "--host=127.0.0.1", "--in-memory", f"--default-bucket={bucket}"],
                    f"/storage/v1/b/{bucket}")
        self.env = {"STORAGE_EMULATOR_HOST": self.endpoint}

    def port_args(self) -> list[str]:
        return [f"--port={self.port}"]

    def fs(self):
        import pyarrow.fs as pafs

        return pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{self.port}", scheme="http")
