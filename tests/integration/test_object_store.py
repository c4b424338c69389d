"""Reference caches on object storage: a real S3 HTTP server on this machine (moto's standalone
server, IAM authentication on), reached by pyarrow's S3 client over HTTP, and a real GCS JSON-API
server (gcp-storage-emulator) reached by pyarrow's GCS client; nothing patched in process.

    .venv/bin/python -m pytest -q tests/integration/test_object_store.py

Every cache here is scored from the same config as a local-folder baseline, so its objects must hold
the baseline's bytes: scored whole, killed and resumed, with an object corrupted or a manifest entry
lost. Training reads the shards fetched once into DPO_DIST_FETCH_DIR.
"""
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dpo_dist.cli import main as cli_main
from dpo_dist.config import load_config
from dpo_dist.core.cache import CachedSplit, CacheError, load_manifest, open_cache
from dpo_dist.identity import training_cache
from dpo_dist.stages.score import run_scoring
from helpers import DPO, GcsServer, S3Server, offline_env, shard_hashes

pytestmark = pytest.mark.integration

CFG = ["data.eval_fraction=0.1", "data.max_samples=160", "score.shard_size=16", "score.cpu_actors=1",
       "score.threads_per_actor=1", "score.dtype=float32"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, with its endpoint and key in this process's environment (as a user would export
    them) and a private fetch folder."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        mp.setenv("DPO_DIST_FETCH_DIR", str(tmp_path_factory.mktemp("fetched")))
        yield server
    server.stop()


def _overrides(model: Path, data: Path, cache: str, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model}", f"data.train={data}", f"cache_dir={cache}", f"output_dir={out}", *CFG, *extra]


def _cfg(model, data, cache, out, *extra):
    return load_config(None, _overrides(model, data, cache, out, *extra))


def _object_hashes(s3: S3Server, prefix: str) -> dict:
    """(split, index) -> sha256 of each listed shard object, checked against the object's bytes."""
    objects = s3.keys(prefix)
    manifest = json.loads(objects[f"{prefix}/manifest.json"])
    out = {}
    for split, info in manifest["splits"].items():
        for index, entry in info["shards"].items():
            assert hashlib.sha256(objects[f"{prefix}/{split}/{entry['name']}"]).hexdigest() == entry["sha256"]
            out[(split, int(index))] = entry["sha256"]
    return out


@pytest.fixture(scope="module")
def baseline(tiny_model, synthetic_path, tmp_path_factory, ray_cluster):
    cache = tmp_path_factory.mktemp("local") / "cache"
    run_scoring(_cfg(tiny_model, synthetic_path, str(cache), cache.parent / "run"))
    return shard_hashes(cache)


@pytest.fixture(scope="module")
def scored(s3, baseline, tiny_model, synthetic_path, tmp_path_factory):
    url = f"s3://{s3.bucket}/caches/whole"
    result = run_scoring(_cfg(tiny_model, synthetic_path, url, tmp_path_factory.mktemp("out") / "run"))
    return url, result


def test_scoring_into_s3_writes_the_folder_bytes_and_only_listed_objects(s3, scored, baseline, tiny_model, synthetic_path, tmp_path, capsys):
    url, result = scored
    assert result.scored_shards == len(baseline) and result.cache_dir == url
    assert _object_hashes(s3, "caches/whole") == baseline
    manifest = load_manifest(url)
    listed = {f"caches/whole/{s}/{e['name']}" for s in ("train", "eval") for e in manifest.shard_entries(s)}
    assert set(s3.keys("caches/whole")) == listed | {"caches/whole/manifest.json"}  # no temporary or stray object
    capsys.readouterr()
    assert cli_main(["cache", "info", url, "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {url}" in out and "verify: OK" in out
    assert cli_main(["cache", "ready", *_overrides(tiny_model, synthetic_path, url, tmp_path)]) == 0


def test_training_reads_the_s3_cache_and_no_credential_is_written(s3, scored, tiny_model, synthetic_path, tmp_path):
    """`dpo-dist run` (score, then train on 1 rank) on the S3 cache: scoring is skipped (the cache is
    ready), the shards arrive once in DPO_DIST_FETCH_DIR, and neither key appears in anything the run
    wrote (logs, run.json, TensorBoard, the store)."""
    url, _ = scored
    out = tmp_path / "run"
    fetched = tmp_path / "fetched"
    proc = subprocess.run([*DPO, "run", *_overrides(
        tiny_model, synthetic_path, url, out, "train.max_steps=2", "train.micro_batch_size=2", "train.num_procs=1",
        "train.sample_prompts=0", "export.enabled=false")],
        capture_output=True, text=True, timeout=300, env=offline_env(DPO_DIST_FETCH_DIR=str(fetched)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"reference cache {url} is complete and matches: scoring skipped" in proc.stdout, proc.stdout[-3000:]
    manifest = load_manifest(url)
    want = {e["sha256"] for s in ("train", "eval") for e in manifest.shard_entries(s)}
    assert {p.stem for p in fetched.glob("*.arrow")} == want
    secrets = [s3.env["AWS_SECRET_ACCESS_KEY"], s3.env["AWS_ACCESS_KEY_ID"]]
    written = [proc.stdout, proc.stderr] + [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    written += [b.decode("latin-1") for b in s3.keys("caches/whole").values()]
    assert not [s for s in secrets for text in written if s in text]


def _manifest_shards(s3: S3Server, prefix: str) -> int:
    try:
        body = s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    except s3.client().exceptions.NoSuchKey:
        return 0
    return sum(len(info["shards"]) for info in json.loads(body)["splits"].values())


def test_scoring_killed_resumes_into_the_store_and_adopts_an_unlisted_shard(s3, baseline, tiny_model, synthetic_path, tmp_path):
    """SIGKILL `dpo-dist score` after 3 shards; drop one of them from the manifest (as a kill between
    the shard's PUT and the manifest's would); the rerun skips every shard the store holds, the
    unlisted one found by listing and checked against its checksum, and ends with the baseline's bytes."""
    url, prefix = f"s3://{s3.bucket}/caches/killed", "caches/killed"
    args = [*DPO, "score", *_overrides(tiny_model, synthetic_path, url, tmp_path / "run")]
    log = open(tmp_path / "score.log", "wb")
    driver = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=offline_env())
    try:
        deadline = time.monotonic() + 120
        while _manifest_shards(s3, prefix) < 3:
            assert driver.poll() is None, (tmp_path / "score.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    manifest = json.loads(s3.keys(f"{prefix}/manifest.json")[f"{prefix}/manifest.json"])
    assert manifest["splits"]["train"]["num_shards"] is None
    done = {(s, int(i)) for s, info in manifest["splits"].items() for i in info["shards"]}
    dropped = sorted(done)[0]
    del manifest["splits"][dropped[0]]["shards"][str(dropped[1])]
    s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest).encode())

    result = run_scoring(_cfg(tiny_model, synthetic_path, url, tmp_path / "run"))
    assert result.skipped_shards >= len(done) and result.skipped_shards + result.scored_shards == len(baseline)
    assert _object_hashes(s3, prefix) == baseline


def test_a_corrupted_object_is_named_refused_and_rescored(s3, scored, baseline, tiny_model, synthetic_path, tmp_path, monkeypatch, capsys):
    url, _ = scored
    client = s3.client()
    for key, body in s3.keys("caches/whole").items():  # a copy of the whole cache, one object corrupted
        client.put_object(Bucket=s3.bucket, Key=key.replace("caches/whole", "caches/corrupt"), Body=body)
    url = f"s3://{s3.bucket}/caches/corrupt"
    entry = load_manifest(url).splits["train"]["shards"]["2"]
    key = f"caches/corrupt/train/{entry['name']}"
    body = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))
    capsys.readouterr()
    assert cli_main(["cache", "info", url, "--verify"]) == 1
    assert f"{url}/train/{entry['name']}: checksum mismatch" in capsys.readouterr().out
    monkeypatch.setenv("DPO_DIST_FETCH_DIR", str(tmp_path / "fresh-node"))  # a node without a good copy
    cfg = _cfg(tiny_model, synthetic_path, url, tmp_path / "run")
    with pytest.raises(CacheError, match=rf"{url}/train/{entry['name']}: checksum mismatch"):
        open_cache(url, training_cache(cfg).identity)
    fetched = [p.name for p in (tmp_path / "fresh-node").iterdir() if not p.name.endswith(".lock")]
    assert f"{entry['sha256']}.arrow" not in fetched and not [n for n in fetched if ".tmp-" in n]  # bad bytes never kept
    result = run_scoring(cfg)
    assert result.scored_shards == 1 and _object_hashes(s3, "caches/corrupt") == baseline


@pytest.mark.parametrize("fault", ["unreachable", "credentials"])
def test_store_faults_are_one_line_before_any_work(s3, tiny_model, synthetic_path, tmp_path, fault):
    """No server at the endpoint, or a wrong secret: `dpo-dist score` says so in one line naming the URL,
    before Ray starts, and nothing is written (the secret is not printed)."""
    url = f"s3://{s3.bucket}/caches/{fault}"
    env = offline_env(RAY_TMPDIR=str(tmp_path / "ray"))
    if fault == "unreachable":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the block ends
        said = "cannot reach the object store at http://127.0.0.1"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        said = "access denied by http://127.0.0.1"
    proc = subprocess.run([*DPO, "score", *_overrides(tiny_model, synthetic_path, url, tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(f"error: {url}: ") and said in error[0], proc.stderr[-2000:]
    assert "not-the-secret" not in proc.stderr + proc.stdout
    assert not (tmp_path / "ray").exists()
    assert s3.keys(f"caches/{fault}") == {}


def test_a_sweep_trains_its_runs_from_the_s3_cache(s3, scored, tiny_model, synthetic_path, tmp_path):
    """`dpo-dist sweep` with cache_dir=s3://...: the cache is found ready (not rescored, the store
    unchanged) and the run trains from it."""
    url, _ = scored
    before = s3.keys("caches/whole")
    (tmp_path / "sweep.yaml").write_text(f"output_dir: {tmp_path / 'sweep'}\nruns:\n  b02: [loss.beta=0.2]\n")
    proc = subprocess.run([*DPO, "sweep", str(tmp_path / "sweep.yaml"), *_overrides(
        tiny_model, synthetic_path, url, tmp_path / "base", "train.max_steps=2", "train.micro_batch_size=2",
        "train.num_procs=1", "train.sample_prompts=0", "export.enabled=false")],
        capture_output=True, text=True, timeout=300, env=offline_env(DPO_DIST_FETCH_DIR=str(tmp_path / "fetched")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scoring skipped" in proc.stdout and f"one cache {url}" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "sweep" / "b02" / "final_metrics.json").is_file()
    assert s3.keys("caches/whole") == before


def test_a_gcs_cache_is_scored_verified_read_and_a_corrupted_object_named(baseline, tiny_model, synthetic_path, tmp_path,
                                                                          monkeypatch, capsys):
    """gs://: scoring writes the folder's bytes; `cache info --verify` and `cache ready` pass; the
    trainer's reader fetches every shard once and reads the rows; a corrupted object is named by
    --verify and refused by a node without a good copy."""
    server = GcsServer(tmp_path / "gcs.log")
    try:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DPO_DIST_FETCH_DIR", str(tmp_path / "fetched"))
        url = f"gs://{server.bucket}/caches/hh"
        cfg = _cfg(tiny_model, synthetic_path, url, tmp_path / "run")
        result = run_scoring(cfg)
        assert result.scored_shards == len(baseline) and result.cache_dir == url
        fs, manifest = server.fs(), load_manifest(url)
        got = {}
        for split in ("train", "eval"):
            for index, entry in manifest.splits[split]["shards"].items():
                with fs.open_input_stream(f"{server.bucket}/caches/hh/{split}/{entry['name']}") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
                got[(split, int(index))] = entry["sha256"]
        assert got == baseline
        capsys.readouterr()
        assert cli_main(["cache", "info", url, "--verify"]) == 0
        assert "verify: OK" in capsys.readouterr().out
        assert cli_main(["cache", "ready", *_overrides(tiny_model, synthetic_path, url, tmp_path / "run")]) == 0
        opened = open_cache(url, training_cache(cfg).identity)
        rows = CachedSplit(url, "train", opened)
        assert len(rows) == manifest.rows("train") and rows[0]["id"]
        fetched = {p.stem for p in (tmp_path / "fetched").glob("*.arrow")}
        assert fetched == {e["sha256"] for sp in ("train", "eval") for e in manifest.shard_entries(sp)}

        entry = manifest.splits["train"]["shards"]["1"]
        key = f"{server.bucket}/caches/hh/train/{entry['name']}"
        with fs.open_input_stream(key) as f:
            body = bytearray(f.read())
        body[len(body) // 2] ^= 0xFF
        with fs.open_output_stream(key) as f:
            f.write(bytes(body))
        capsys.readouterr()
        assert cli_main(["cache", "info", url, "--verify"]) == 1
        assert f"{url}/train/{entry['name']}: checksum mismatch" in capsys.readouterr().out
        monkeypatch.setenv("DPO_DIST_FETCH_DIR", str(tmp_path / "fresh-node"))
        with pytest.raises(CacheError, match=rf"{url}/train/{entry['name']}: checksum mismatch"):
            open_cache(url, training_cache(cfg).identity)
    finally:
        server.stop()
