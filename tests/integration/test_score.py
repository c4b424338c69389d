"""Reference scoring on real Ray: values, a `ray start` cluster, resume after kills, refusals.

    .venv/bin/python -m pytest -q tests/integration/test_score.py      # ~2-3 min on 2 CPU cores

Every scoring run of the synthetic data uses the same config (600 pairs, 10% eval hold-out, shards of
16 pairs, 2 CPU actors), so every run, interrupted or not, must give byte-identical shards to the
uninterrupted `baseline` run: the manifest's per-shard sha256 are compared.
"""
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import torch
import transformers
import psutil
import ray  # noqa: F401

from dpo_dist.core.cache import CacheError, info_text, load_manifest, open_cache, read_shard, verify  # noqa: E402
from helpers import REPO, cmdline, manifest_shards, shard_hashes
from dpo_dist.identity import training_cache  # noqa: E402
from dpo_dist.cli import main as cli_main  # noqa: E402
from dpo_dist.config import load_config  # noqa: E402
from dpo_dist.stages.score import run_scoring  # noqa: E402

pytestmark = pytest.mark.integration
VENV_BIN = REPO / ".venv" / "bin"

SYNTHETIC = ["data.eval_fraction=0.1", "score.shard_size=16", "score.cpu_actors=2", "score.threads_per_actor=1"]


def _overrides(model: Path, data: Path, cache: Path, *extra: str) -> list[str]:
    # float32: these tests compare values with plain float32 forwards (auto would follow the bf16 JSON)
    return [f"model.name_or_path={model}", f"data.train={data}", f"cache_dir={cache}",
            f"output_dir={cache.parent / 'run'}", "score.dtype=float32", *extra]


def _cfg(model: Path, data: Path, cache: Path, *extra: str):
    return load_config(None, _overrides(model, data, cache, *extra))


def _kill_pids(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def baseline(ray_cluster, tiny_model, synthetic_path, tmp_path_factory) -> Path:
    """The uninterrupted embedded run every other synthetic run is compared with."""
    cache = tmp_path_factory.mktemp("baseline") / "cache"
    result = run_scoring(_cfg(tiny_model, synthetic_path, cache, *SYNTHETIC))
    assert result.skipped_shards == 0 and result.pairs == 600
    assert verify(cache) == []
    assert len(shard_hashes(cache)) == result.scored_shards > 30
    return cache


# ----------------------------------------------------------------------------- values

def _reference_logps(model, prompt: list[int], response: list[int]) -> float:
    """Sum of log p(response | prompt): one sequence, float32, log_softmax + gather on the response."""
    ids = torch.tensor([prompt + response])  # (1, T)
    logits = model(input_ids=ids).logits[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # rows predicting the response
    return float(logprobs.gather(1, torch.tensor(response)[:, None]).sum())


def test_values_equal_single_pair_forward_on_hh(ray_cluster, tiny_model, hh_path, tmp_path):
    """Every HH pair's cached ref log-probs match a plain one-pair-at-a-time HF forward (float32)."""
    from dpo_dist.core.data import load_pairs

    cache = tmp_path / "cache"
    result = run_scoring(_cfg(tiny_model, hh_path, cache, "data.max_length=256", "data.max_prompt_length=128",
                              "score.cpu_actors=1"))
    manifest = load_manifest(cache)
    assert manifest.fingerprint["reference.dtype"] == "float32"
    report = manifest.splits["train"]["report"]
    assert report["source"]["kept"] == 2303 and report["pairs"] == 2303 == result.pairs
    assert report["source"]["dropped"] == {"empty_response": 4, "prompt_mismatch": 5}
    assert manifest.rows("eval") == 0 and manifest.is_complete("eval")
    assert cli_main(["cache", "info", str(cache), "--verify"]) == 0

    rows = [r for e in manifest.shard_entries("train") for r in read_shard(cache / "train" / e["name"]).to_pylist()]
    assert len(rows) == 2303 and len({r["id"] for r in rows}) == 2303

    # Tokenization, re-derived with the tokenizer itself: prompt + response == tokenize(joined) + EOS.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    pairs = {p.id: p for p in load_pairs(str(hh_path))[0]}
    checked = mismatched = 0
    for r in rows:
        if r["prompt_truncated"] or r["response_truncated"]:
            continue
        pair = pairs[r["id"]]
        for text, key in ((pair.chosen, "chosen_input_ids"), (pair.rejected, "rejected_input_ids")):
            joined = tokenizer(pair.prompt + text)["input_ids"] + [tokenizer.eos_token_id]
            mismatched += r["prompt_input_ids"] + r[key] != joined
            checked += 1
    assert checked > 1000 and mismatched <= 2 * report["boundary_mismatch"]
    assert all(len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) <= 256 for r in rows)

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    torch.set_num_threads(2)
    worst = 0.0
    with torch.inference_mode():
        for r in rows[::12]:  # 192 of the 2,303 pairs (every value is checked on the synthetic set)
            for side in ("chosen", "rejected"):
                expected = _reference_logps(model, r["prompt_input_ids"], r[f"{side}_input_ids"])
                # The cache stores float32 sums of up to ~250 tokens (|sum| up to ~2e3, ulp ~1e-4):
                # 1e-5 is relative to the sum, i.e. about 1e-5 per token.
                worst = max(worst, abs(r[f"ref_{side}_logps"] - expected) / max(1.0, abs(expected)))
                assert r[f"{side}_num_tokens"] == len(r[f"{side}_input_ids"])
    assert worst < 1e-5, f"largest relative difference {worst:.2e}"


def test_values_equal_single_pair_forward_on_the_tiny_model(baseline, tiny_model):
    """Always on (no data file needed): every cached value of the synthetic baseline equals a plain
    one-pair-at-a-time float32 forward with its own log_softmax."""
    manifest = load_manifest(baseline)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    worst, n = 0.0, 0
    with torch.inference_mode():
        for split in ("train", "eval"):
            for entry in manifest.shard_entries(split):
                for r in read_shard(baseline / split / entry["name"]).to_pylist():
                    for side in ("chosen", "rejected"):
                        expected = _reference_logps(model, r["prompt_input_ids"], r[f"{side}_input_ids"])
                        worst = max(worst, abs(r[f"ref_{side}_logps"] - expected) / max(1.0, abs(expected)))
                        n += 1
    assert n == 1200 and worst < 1e-5, f"largest relative difference {worst:.2e}"


def test_another_shard_size_completes_the_cache_with_its_own(baseline, tiny_model, synthetic_path, tmp_path):
    """Shard size is not identity: an interrupted cache rescored with another score.shard_size is
    completed with its own shards (same bytes as the baseline), and a complete one is used as it is."""
    from dpo_dist.pipeline import cache_ready

    cache = tmp_path / "cache"
    shutil.copytree(baseline, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    for split in ("train", "eval"):  # as if the run had stopped after 5 shards of each split
        info = manifest["splits"][split]
        for index in sorted(info["shards"], key=int)[5:]:
            (cache / split / info["shards"].pop(index)["name"]).unlink()
        info["num_shards"] = None
    (cache / "manifest.json").write_text(json.dumps(manifest))
    # one actor: the bytes do not depend on how many actors scored them (the baseline had two)
    cfg = _cfg(tiny_model, synthetic_path, cache, *SYNTHETIC[:1], "score.shard_size=128", "score.cpu_actors=1", *SYNTHETIC[3:])
    assert not cache_ready(cfg)
    result = run_scoring(cfg)
    assert result.skipped_shards == 10 and verify(cache) == []
    assert shard_hashes(cache) == shard_hashes(baseline)
    assert cache_ready(cfg) and cli_main(["cache", "info", str(cache)]) == 0
    again = run_scoring(cfg)
    assert again.scored_shards == 0 and again.skipped_shards == len(shard_hashes(baseline))


def test_trust_remote_code_reaches_the_scorer_and_cache_ready(ray_cluster, tiny_model, synthetic_path, tmp_path):
    """A model with its own code: refused in one line without model.trust_remote_code, scored by the
    Ray actors with it, and `cache ready` loads it the same way; values equal the plain Llama's."""
    from helpers import write_custom_code_model

    from dpo_dist.pipeline import cache_ready

    custom = write_custom_code_model(tiny_model, tmp_path / "custom")
    cache = tmp_path / "cache"
    extra = ["data.max_samples=40", "score.shard_size=20", "score.cpu_actors=1"]
    with pytest.raises(Exception, match="trust_remote_code") as refused:
        run_scoring(_cfg(custom, synthetic_path, cache, *extra))
    assert "\n" not in str(refused.value) and not cache.exists()
    cfg = _cfg(custom, synthetic_path, cache, *extra, "model.trust_remote_code=true")
    run_scoring(cfg)
    assert cache_ready(cfg)
    plain = tmp_path / "plain"
    run_scoring(_cfg(tiny_model, synthetic_path, plain, *extra))
    rows = lambda c: [r for e in load_manifest(c).shard_entries("train") for r in read_shard(c / "train" / e["name"]).to_pylist()]  # noqa: E731
    # the custom class has no segment attention (its model_type is its own), so the plain Llama's
    # one-row batches and its padded batches agree to float32 rounding, not bit for bit
    assert [r["ref_chosen_logps"] for r in rows(cache)] == pytest.approx([r["ref_chosen_logps"] for r in rows(plain)], rel=1e-6, abs=1e-4)


# ----------------------------------------------------------------------------- a real `ray start` cluster

def test_ray_job_submit_gives_identical_shards(baseline, tiny_model, synthetic_path, tmp_path):
    """`ray start --head` + `ray job submit` of the launcher writes the same bytes as the embedded run."""
    gcs, dash, client, agent_http, agent_grpc, runtime_env_agent, metrics = _free_ports(7)
    ray_tmp = tempfile.mkdtemp(prefix="dpoJ", dir="/tmp")  # its own temp dir: short socket paths, no crosstalk
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # --block keeps `ray start` as the parent of the cluster, so the test stops exactly its own
    # processes (`ray stop` would kill every Ray process on the machine, other users' included).
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "2",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
         "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "ray_start.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, (tmp_path / "ray_start.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "dashboard did not come up in 90 s"
                time.sleep(0.5)
        runtime_env = {"working_dir": str(REPO),
                       "excludes": [".venv", ".git", ".cache", ".pytest_cache", "**/__pycache__", "*.egg-info",
                                    "runs", "outputs", "build"],
                       "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        # README's form: upload the repository, config paths relative to the submitting folder.
        project = tmp_path / "project"
        (project / "configs").mkdir(parents=True)
        (project / "configs" / "score.yaml").write_text(
            "model: {name_or_path: models/tiny}\ndata: {train: data/train.jsonl, eval_fraction: 0.1}\n"
            "output_dir: outputs/run\ncache_dir: outputs/cache\nscore: {shard_size: 16, cpu_actors: 2, dtype: float32}\n")
        shutil.copytree(tiny_model, project / "models" / "tiny")
        (project / "data").mkdir()
        shutil.copy(synthetic_path, project / "data" / "train.jsonl")
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--runtime-env-json", json.dumps(runtime_env), "--", "python", "launchers/score_ref.py",
                  "--config", str(project / "configs" / "score.yaml")]
        refused = subprocess.run(submit, env=env, cwd=project, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "--base-dir" in refused.stdout + refused.stderr, refused.stdout[-3000:]
        # With --base-dir: scores; the job's `python` is the venv's (printed first by the same job).
        score_cmd = submit[-4:-2] + ["--base-dir", str(project), *submit[-2:]]  # python launchers/score_ref.py --base-dir P --config C
        based = subprocess.run(
            submit[:-4] + ["bash", "-c", "python -c 'import sys; print(\"job python:\", sys.executable)' && " + shlex.join(score_cmd)],
            env=env, cwd=project, capture_output=True, text=True, timeout=300)
        log = based.stdout + based.stderr
        assert based.returncode == 0 and "succeeded" in log, log[-4000:]
        assert f"job python: {VENV_BIN / 'python'}" in log, log[-4000:]
        cache = project / "outputs" / "cache"
    finally:
        cluster = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        _kill_pids([p for p in cluster if p.is_running()])
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert shard_hashes(cache) == shard_hashes(baseline)
    for split in ("train", "eval"):
        for entry in load_manifest(cache).shard_entries(split):
            assert read_shard(cache / split / entry["name"]).equals(read_shard(baseline / split / entry["name"]))
    assert load_manifest(cache).splits["train"]["report"] == load_manifest(baseline).splits["train"]["report"]


# ----------------------------------------------------------------------------- resume

@contextlib.contextmanager
def _killing_a_busy_scorer(cache: Path):
    """While the block runs: SIGKILL the first RefScorer actor of this process's Ray seen scoring a
    shard once `cache`'s manifest lists one; yields a dict that gets the killed actor's "pid"."""
    killed: dict = {}
    stop = threading.Event()

    def kill_a_busy_actor():
        me = psutil.Process()
        while not stop.is_set():
            if manifest_shards(cache) >= 1:
                busy = [p for p in me.children(recursive=True) if cmdline(p).startswith("ray::RefScorer.score")]
                if busy:
                    killed["pid"] = busy[0].pid
                    os.kill(busy[0].pid, signal.SIGKILL)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=kill_a_busy_actor, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join()


def test_actor_killed_mid_run_is_replaced_and_shards_identical(baseline, tiny_model, synthetic_path, tmp_path, capfd):
    """SIGKILL a RefScorer while it scores a shard: the shard is retried on a new actor; same bytes."""
    cache = tmp_path / "cache"
    with _killing_a_busy_scorer(cache) as killed:
        result = run_scoring(_cfg(tiny_model, synthetic_path, cache, *SYNTHETIC))
    assert "pid" in killed, "the run finished before an actor could be killed"
    out = capfd.readouterr()
    assert "actor died on shard" in out.out + out.err
    assert result.skipped_shards == 0 and verify(cache) == []
    assert shard_hashes(cache) == shard_hashes(baseline)


def _listening(procs) -> set[tuple[str, str]]:
    """(address, process name) of every listening TCP socket of `procs`."""
    pids = {p.pid: cmdline(p).split(" ")[0].rsplit("/", 1)[-1] for p in procs}
    return {(c.laddr.ip, pids[c.pid]) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_work_goes_on_when_a_lost_actor_cannot_be_replaced(ray_cluster):
    """A node lost with its GPUs: the dead actor's replacement can never be placed (it needs a
    resource no node has any more). Its tasks are retried on the survivor and every result arrives;
    with no survivor, the run fails after place_timeout_s with a message instead of waiting forever."""
    from dpo_dist.engines.ray_pool import ActorPool

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Doubler:
        def work(self, x):
            time.sleep(0.05)
            return 2 * x

    made = []

    def new_actor():
        gone = {"resources": {"gpu_of_the_lost_node": 1}} if len(made) >= 2 else {}
        made.append(Doubler.options(**gone).remote())
        return made[-1]

    said = []
    pool = ActorPool(ray, new_actor, 2, max_retries=2, say=said.append, place_timeout_s=2)
    results = {}
    for task, out in pool.run(range(30), lambda actor, x: actor.work.remote(x), name=lambda x: f"task {x}"):
        results[task] = out
        if len(results) == 3:
            ray.kill(made[0], no_restart=True)  # its node is gone
    assert results == {x: 2 * x for x in range(30)}
    assert said and all("actor died on task" in line for line in said) and len(made) == 3

    made.clear()
    pool = ActorPool(ray, new_actor, 2, max_retries=2, say=said.append, place_timeout_s=2)
    with pytest.raises(RuntimeError, match=r"no actor left, and none could be placed in 2 s .* not done, e\.g\. task \d+"):
        for _, _ in pool.run(range(30), lambda actor, x: actor.work.remote(x), name=lambda x: f"task {x}"):
            for actor in made[:2]:
                ray.kill(actor, no_restart=True)


def _ray_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own session: the Popen is the node, its children its processes."""
    ports = _free_ports(4)
    return subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
         "--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port", str(ports[1]),
         "--runtime-env-agent-port", str(ports[2]), "--metrics-export-port", str(ports[3]), "--disable-usage-stats", *args],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop_node(node: subprocess.Popen, sig=signal.SIGTERM) -> None:
    procs = psutil.Process(node.pid).children(recursive=True) if node.poll() is None else []
    node.send_signal(sig)
    try:
        node.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.kill()
    _kill_pids([p for p in procs if p.is_running()])


def test_a_worker_node_lost_mid_run_the_work_finishes_on_the_others(baseline, tiny_model, synthetic_path, tmp_path):
    """Two Ray nodes (a head and a worker joined to it, 1 CPU each, one scoring actor each). The
    worker node is SIGKILLed mid-run, with its actor: its shards are retried on the head's actor,
    the replacement actor (no CPU left anywhere) is never placed and never waited for, and the cache
    ends byte-identical to a clean run's."""
    gcs, = _free_ports(1)
    ray_tmp = tempfile.mkdtemp(prefix="dpoN", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    head = _ray_node(["--head", "--port", str(gcs), "--include-dashboard", "false"], env, tmp_path / "head.log")
    worker = None
    try:
        deadline = time.monotonic() + 90
        status = None
        while status is None or status.count(" node_") < 2:  # `ray status`: one " 1 node_<id>" line per node
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            if worker is None and (tmp_path / "head.log").read_text().count("Ray runtime started") >= 1:
                worker = _ray_node(["--address", f"127.0.0.1:{gcs}"], env, tmp_path / "worker.log")
            if worker is not None:
                status = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs}"], env=env,
                                        capture_output=True, text=True, timeout=60).stdout
            assert time.monotonic() < deadline, f"2 Ray nodes not up in 90 s: {status}"
            time.sleep(1)
        cache = tmp_path / "cache"
        log = open(tmp_path / "score.log", "wb")
        driver = subprocess.Popen([str(VENV_BIN / "dpo-dist"), "score", *_overrides(tiny_model, synthetic_path, cache, *SYNTHETIC)],
                                  env=dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs}"), stdout=log, stderr=subprocess.STDOUT)
        while manifest_shards(cache) < 3:
            assert driver.poll() is None, (tmp_path / "score.log").read_text()[-3000:]
            assert time.monotonic() < deadline + 120
            time.sleep(0.05)
        _stop_node(worker, signal.SIGKILL)  # the node and everything on it, at once
        assert driver.wait(timeout=300) == 0, (tmp_path / "score.log").read_text()[-3000:]
    finally:
        if worker is not None:
            _stop_node(worker, signal.SIGKILL)
        _stop_node(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    said = (tmp_path / "score.log").read_text()
    assert "actor died on shard" in said, said[-3000:]
    assert shard_hashes(cache) == shard_hashes(baseline) and verify(cache) == []


def test_driver_killed_then_rerun_skips_done_shards(baseline, tiny_model, synthetic_path, tmp_path):
    """SIGKILL `dpo-dist score` after a few shards; the rerun skips them and ends with the same bytes.
    While it runs, every socket its embedded Ray listens on (GCS, raylet, workers, agents) is on the
    loopback address: no other machine can reach it (the ShadowRay attack, CVE-2023-48022)."""
    cache = tmp_path / "cache"
    log = open(tmp_path / "score.log", "wb")
    driver = subprocess.Popen([str(VENV_BIN / "dpo-dist"), "score", *_overrides(tiny_model, synthetic_path, cache, *SYNTHETIC)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    descendants = []
    try:
        deadline = time.monotonic() + 120
        while manifest_shards(cache) < 3:
            assert driver.poll() is None, (tmp_path / "score.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        descendants = psutil.Process(driver.pid).children(recursive=True)
        sockets = _listening([psutil.Process(driver.pid), *descendants])
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill_pids([p for p in descendants if p.is_running()])  # what is left of its embedded cluster
    names = {name for _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 5, sockets
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in sockets), sockets
    done = shard_hashes(cache)
    assert 3 <= len(done) < len(shard_hashes(baseline))
    assert load_manifest(cache).splits["train"]["num_shards"] is None  # the killed run never finished

    result = run_scoring(_cfg(tiny_model, synthetic_path, cache, *SYNTHETIC))
    assert result.skipped_shards >= len(done) > 0
    assert result.skipped_shards + result.scored_shards == len(shard_hashes(baseline))
    assert shard_hashes(cache) == shard_hashes(baseline)
    assert cli_main(["cache", "info", str(cache), "--verify"]) == 0


# ----------------------------------------------------------------------------- refusals

def _file_bytes(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_refuses_other_fingerprint_and_overwrites_when_asked(baseline, tiny_model, synthetic_path, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(baseline, cache)
    before = _file_bytes(cache)
    with pytest.raises(CacheError, match=r"data.max_length: 512 -> 384") as refused:
        run_scoring(_cfg(tiny_model, synthetic_path, cache, *SYNTHETIC, "data.max_length=384"))
    assert "overwrite" in str(refused.value)
    assert _file_bytes(cache) == before  # manifest and shards untouched

    result = run_scoring(_cfg(tiny_model, synthetic_path, cache, *SYNTHETIC, "data.max_length=384",
                              "score.shard_size=128", "score.overwrite=true", "score.cpu_actors=1"))
    manifest = load_manifest(cache)
    assert manifest.fingerprint["data.max_length"] == 384 and verify(cache) == []
    assert result.skipped_shards == 0 and manifest.rows("train") + manifest.rows("eval") == 600
    arrow_files = sorted(p.relative_to(cache) for p in cache.rglob("*.arrow"))
    listed = sorted(Path(s) / e["name"] for s in ("train", "eval") for e in manifest.shard_entries(s))
    assert arrow_files == listed  # the old 16-pair shards are gone


@pytest.mark.parametrize("what", ["model", "data"])
def test_missing_path_fails_before_ray_starts(what, tiny_model, synthetic_path, tmp_path):
    missing = tmp_path / f"no-such-{what}"
    model, data = (missing, synthetic_path) if what == "model" else (tiny_model, missing.with_suffix(".jsonl"))
    ray_tmp = tmp_path / "ray"  # a Ray start would leave its session folder here
    proc = subprocess.run([str(VENV_BIN / "dpo-dist"), "score", *_overrides(model, data, tmp_path / "cache")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    assert proc.returncode == 2, proc.stderr
    assert str(model if what == "model" else data) in proc.stderr
    assert "Ray" not in proc.stderr and not ray_tmp.exists(), proc.stderr[-2000:]
    assert not (tmp_path / "cache").exists()


def test_a_corrupted_shard_is_named_refused_and_rescored_alone(baseline, tiny_model, synthetic_path, tmp_path, capsys):
    """A bit flipped in one shard: `cache info --verify` names it, training refuses the cache, and
    scoring rescores that shard alone, back to the clean run's bytes."""
    cache = tmp_path / "cache"
    shutil.copytree(baseline, cache)
    shard = cache / "train" / load_manifest(cache).splits["train"]["shards"]["3"]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["cache", "info", str(cache), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"{shard}: checksum mismatch" in out and "verify: 1 problem(s)" in out
    cfg = _cfg(tiny_model, synthetic_path, cache, *SYNTHETIC)
    with pytest.raises(CacheError, match=rf"{cache}: {shard}: checksum mismatch"):
        open_cache(cache, training_cache(cfg).identity)
    result = run_scoring(cfg)
    assert result.scored_shards == 1 and result.skipped_shards == len(shard_hashes(baseline)) - 1
    assert shard_hashes(cache) == shard_hashes(baseline) and verify(cache) == []


# ----------------------------------------------------------------------------- scored pairs reused

def _train(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_grown_data_scores_only_the_new_pairs_and_gives_the_same_bytes(baseline, tiny_model, synthetic_path, tmp_path):
    """Score the first 60 pairs, then all 600 into the same cache: only the pairs not scored before
    reach the reference model, every shard has the bytes of scoring all 600 at once, and the
    60-pair view is kept: a run trained on it to a checkpoint before the cache grew resumes."""
    from dpo_dist.pipeline import cache_ready

    cache = tmp_path / "cache"
    small = _cfg(tiny_model, synthetic_path, cache, *SYNTHETIC, "data.max_samples=60")
    first = run_scoring(small)
    assert first.scored_pairs == first.pairs == 60
    # a run trained on the 60 pairs (one process, ZeRO stage 0), stopped after a checkpoint at step 2
    run = tmp_path / "run60"
    train = [str(VENV_BIN / "dpo-dist"), "train", *_overrides(tiny_model, synthetic_path, cache, *SYNTHETIC),
             "data.max_samples=60", f"output_dir={run}", "train.num_procs=1", "train.micro_batch_size=4",
             f"train.deepspeed_config={REPO}/ds_configs/zero0_bf16.json", "train.save_steps=2", "train.eval_steps=0",
             "train.sample_prompts=0", "train.warmup_steps=0"]
    _train(train + ["train.max_steps=2"])
    grown = run_scoring(_cfg(tiny_model, synthetic_path, cache, *SYNTHETIC))
    assert grown.pairs == 600 and grown.scored_pairs == 540, (grown.scored_pairs, grown.reused_pairs)
    assert shard_hashes(cache) == shard_hashes(baseline)
    assert load_manifest(cache).splits["train"]["report"]["pairs"] + load_manifest(cache).splits["eval"]["report"]["pairs"] == 600
    small_id = training_cache(small).identity
    kept = open_cache(cache, small_id)
    assert kept.rows("train") + kept.rows("eval") == 60 and cache_ready(small)
    assert f"kept view: data train {small_id['data.train']}" in info_text(cache)
    # the run on the 60 pairs resumes from its checkpoint on the grown cache (its view) and goes on
    resumed = _train(train + ["train.max_steps=3", "--resume"])
    assert "resuming at step 2" in resumed.stdout + resumed.stderr
    assert json.loads((run / "final_metrics.json").read_text())["steps"] == 3

    # Another cache that names this one in score.reuse_from scores nothing.
    other = run_scoring(_cfg(tiny_model, synthetic_path, tmp_path / "other", *SYNTHETIC, f"score.reuse_from=[{cache}]"))
    assert other.scored_pairs == 0 and other.reused_pairs == 600
    assert shard_hashes(tmp_path / "other") == shard_hashes(baseline)


def test_sequence_parallel_scoring_gives_the_unsplit_values(baseline, tiny_model, synthetic_path, tmp_path):
    """score.sequence_parallel_size=2: the 2 actors score every batch together (DeepSpeed Ulysses, a
    slice of the row each, over a gloo group of their own). Every pair's ids are the baseline's and
    its log-probs equal the unsplit baseline's to float rounding; the cache's identity is the same
    (a config without sequence parallelism finds it ready)."""
    from dpo_dist.core.cache import CachedSplit
    from dpo_dist.pipeline import cache_ready

    cache = tmp_path / "cache"
    cfg = _cfg(tiny_model, synthetic_path, cache, *SYNTHETIC, "data.max_samples=96", "score.sequence_parallel_size=2")
    result = run_scoring(cfg)
    assert result.pairs == 96 and result.scored_pairs == 96
    manifest = load_manifest(cache)
    assert {e.get("sequence_parallel") for s in ("train", "eval") for e in manifest.shard_entries(s)} == {2}
    want = {}
    for split in ("train", "eval"):
        rows = CachedSplit(baseline, split, load_manifest(baseline))
        want.update({r["id"]: r for r in (rows[i] for i in range(len(rows)))})
    seen = 0
    for split in ("train", "eval"):
        rows = CachedSplit(cache, split, load_manifest(cache))
        for i in range(len(rows)):
            got, ref = rows[i], want[rows[i]["id"]]
            for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "chosen_num_tokens", "rejected_num_tokens"):
                assert got[key] == ref[key], key
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5), (key, got[key], ref[key])
            seen += 1
    assert seen == 96
    assert cache_ready(_cfg(tiny_model, synthetic_path, cache, *SYNTHETIC, "data.max_samples=96"))

    # An actor of the group SIGKILLed mid-run: the group cannot go on (its collectives need every
    # member), so the run stops in one line; the rerun keeps the done shards and ends with the bytes
    # of the uninterrupted run (same group size, same arithmetic).
    again = tmp_path / "again"
    cfg_again = _cfg(tiny_model, synthetic_path, again, *SYNTHETIC, "data.max_samples=96", "score.sequence_parallel_size=2")
    with _killing_a_busy_scorer(again) as killed:
        with pytest.raises(RuntimeError, match=r"shard \w+/\d+: a sequence-parallel group lost an actor .*; rerun to finish"):
            run_scoring(cfg_again)
    assert "pid" in killed
    rerun = run_scoring(cfg_again)
    assert rerun.skipped_shards >= 1 and shard_hashes(again) == shard_hashes(cache)
