"""Every script in bench/ at its smallest size, as a subprocess: the day it is run for real, it runs.

Each asserts exit 0 and one figure of its output; the numbers themselves are BENCHMARKS.md's business.
gpu_mfu.py: the GPU benchmark's code path on CPU with a tiny model (same engine, layouts, fused head,
loss and FLOP count).
"""
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, offline_env

pytestmark = pytest.mark.integration
sys.path.insert(0, str(REPO / "bench"))
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def run_bench(script: str, *args, threads: int = 1, timeout: int = 300, **env) -> str:
    """Run bench/`script` with `args`; its stdout (asserts exit 0, else shows the end of both streams)."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=offline_env(OMP_NUM_THREADS=str(threads), TORCH_EXTENSIONS_DIR=EXTENSIONS, **env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_mfu_script_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "mfu.json"
    stdout = run_bench("gpu_mfu.py", "--tiny", "--seqs", 64, "--micro", "1,2", "--steps", 2, "--warmup", 1, "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["seq"], r["micro"], r["attn"]) for r in rows] == [(64, 1, "sdpa"), (64, 2, "sdpa")]
    for r in rows:
        assert r["train"]["tokens_per_sec"] > 0 and r["score"]["tokens_per_sec"] > r["train"]["tokens_per_sec"]
        assert r["train"]["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert "| 64 | sdpa | 2 |" in stdout


def test_flop_count_of_a_pair_by_hand():
    """2 N per token through the body, 2 V d per response token for the head, 4 L d per attended key."""
    from gpu_mfu import pair_flops

    shape = {"hidden_size": 4, "num_hidden_layers": 2, "vocab_size": 10}
    # padded/packed: sequences of 3 (prompt 2 + chosen 1) and 3 (prompt 2 + rejected 1): 6 tokens, 2 x (1+2+3) keys
    assert pair_flops(shape, 100, 2, 1, 1, "packed") == 2 * 100 * 6 + 2 * 10 * 4 * 2 + 4 * 2 * 4 * 12
    # shared: 4 tokens; keys: prompt 1 + 2, chosen 3, rejected 3 (the prompt and itself)
    assert pair_flops(shape, 100, 2, 1, 1, "shared") == 2 * 100 * 4 + 2 * 10 * 4 * 2 + 4 * 2 * 4 * 9


def test_checkpoint_hash_bench_runs_and_both_markers_agree():
    """2 gloo ranks; the bench itself asserts the per-rank records equal rank 0's alone."""
    stdout = run_bench("bench_ckpt_hash.py", "--gib", 0.02, "--repeats", 1)
    assert "marker, each rank its own files" in stdout and "speed-up of the marker" in stdout


def test_matmul_peak_prints_both_dtypes():
    result = json.loads(run_bench("matmul_peak.py", "--threads", 1, "--size", 128).splitlines()[-1])
    assert result["threads"] == 1 and result["float32"] > 0 and result["bfloat16"] > 0


def test_head_memory_bench_fused_and_plain_heads_agree():
    stdout = run_bench("bench_head_memory.py", "--tokens", 256, "--vocabs", 49152)
    row = next(line for line in stdout.splitlines() if line.startswith("| SmolLM2 49,152 |"))
    assert row.endswith("| True |"), row  # same log-probs and head gradient on both paths


def test_score_bench_scorer_and_plain_loop_on_the_same_batches(hh_path):
    """The bench asserts that the scorer and the plain loop saw the same real and padded tokens."""
    stdout = run_bench("bench_score.py", "--hh", hh_path, "--hidden-size", 64, "--layers", 2, "--max-samples", 48,
                       "--shard-size", 16, "--max-length", 128, "--max-prompt-length", 64, "--threads", 1)
    assert re.search(r"dpo-dist run_scoring \(Ray, 1 actor\)\s+[\d,]+ ", stdout), stdout
    assert "throughput over shards 1..2 (32 pairs" in stdout


def test_bench_vs_trl_trains_both_systems(hh_path, tmp_path):
    """dpo-dist from the cache `score` wrote (its phase hooks on stages.train still fire) and TRL's DPOTrainer."""
    out = tmp_path / "trl.json"
    stdout = run_bench("bench_vs_trl.py", "--size", "tiny", "--pairs", 4, "--micro", 2, "--threads", 1,
                       "--systems", "score,trl-ref,dd", "--work", tmp_path / "work", "--json", out)
    results = json.loads(out.read_text())["results"]
    assert results["trl-ref"][0]["steps"] == results["dd"][0]["steps"] == 2
    assert len(results["dd"][0]["memory"]["after_steps"]) == 2 and "built" in results["dd"][0]["memory"]
    assert re.search(r"^\| dd \| [\d.]+ \|", stdout, re.M), stdout


def test_real_model_bench_dpo_dist_and_trl_evaluate(real_model, hh_path, tmp_path):
    """SmolLM2-135M-Instruct, LoRA, 2 train and 2 held-out pairs: both systems train 2 steps and evaluate."""
    out = tmp_path / "real.json"
    stdout = run_bench("bench_real_model.py", "--pairs", 4, "--held-out", 2, "--max-length", 128, "--micro", 1,
                       "--accum", 1, "--eval-steps", 1, "--threads", 1, "--work", tmp_path / "work", "--json", out,
                       DPO_DIST_REAL_MODEL=str(real_model))
    results = json.loads(out.read_text())["results"]
    assert results["dd"]["steps"] == results["trl"]["steps"] == 2
    assert {int(s) for s in results["dd"]["evals"]} == {1, 2} and results["trl"]["evals"]
    assert "dpo-dist scoring + epoch = " in stdout


def test_step0_bound_bench_accepts_correct_runs_and_refuses_a_broken_mask(tiny_model, hh_path):
    stdout = run_bench("bench_step0_bound.py", "--model", tiny_model, "--pairs", 4, "--max-length", 128,
                       "--layer-scales", 1.5, "--sft-steps", 1)
    worst_one_pair = {}  # configuration -> largest statistic / bound over first steps of 1 pair
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith(("correct:", "wrong:")):
            worst_one_pair[cells[0]] = float(cells[3].split(" - ")[1])
    assert len([k for k in worst_one_pair if k.startswith("correct:")]) == 12, stdout
    assert all(v < 1 for k, v in worst_one_pair.items() if k.startswith("correct:")), worst_one_pair
    assert worst_one_pair["wrong: broken mask (rejected sees chosen); cache float32, policy float32"] > 1


def test_scale_bench_scores_and_trains_one_size(tmp_path):
    out = tmp_path / "scale.json"
    run_bench("bench_scale.py", "--sizes", 40, "--repeats", 1, "--no-warmup", "--extensions-dir", EXTENSIONS,
              "--work", tmp_path / "work", "--json", out)
    (r,) = json.loads(out.read_text())["results"]
    assert r["score"]["kept"] == 40 and r["score"]["actor_gb"] > 0
    assert r["train"]["startup_s"] > 0 and r["train"]["rank_gb"] > 0  # the rank reached its step-0 line


def test_allocator_bench_times_both_settings(tiny_model, hh_path):
    stdout = run_bench("bench_allocator.py", "--model", tiny_model, "--pairs", 8, "--micro", 2, "--budget", 512,
                       "--repeats", 1, "--passes", 1, "--dtype", "float32", "--max-length", 128)
    for work in ("scoring forward", "LoRA training step"):
        assert re.search(rf"^\| {work} \| [\d,]+ \| [\d.]+ \| [\d,]+ \| [\d.]+ \| [\d.]+x \|$", stdout, re.M), stdout


def test_segment_attention_bench_times_both_paths(tiny_model, hh_path):
    stdout = run_bench("bench_segments.py", "--model", tiny_model, "--pairs", 8, "--micro", 2, "--budget", 512,
                       "--repeats", 1, "--dtype", "float32", "--max-length", 128)
    for work in ("scoring forward", "LoRA training step"):
        assert re.search(rf"^\| {work} \| [\d,]+ \| [\d.]+ \| [\d,]+ \| [\d.]+x \|$", stdout, re.M), stdout
    for kernels in ("SDPA per part, head recomputed", "CPU parts attention, head recomputed",
                    "CPU parts attention, head logits kept"):  # the CPU training kernels, one by one
        assert re.search(rf"^\| {kernels} \| [\d,]+ \| [\d.]+x \|$", stdout, re.M), stdout


def test_reuse_bench_scores_only_the_new_pairs_to_the_same_bytes(tiny_model, hh_path):
    stdout = run_bench("bench_score_reuse.py", "--model", tiny_model, "--hh", hh_path, "--pairs", 20, "--shard-size", 8,
                       "--max-length", 128, "--dtype", "float32", "--actors", 1)
    assert re.search(r"^\| then all, same cache \| 20 \| 18 \| 2 \| [\d.]+ \|$", stdout, re.M), stdout
    assert "pairs with identical value bytes: 20 of 20" in stdout, stdout


def test_sequence_parallel_bench_runs_a_split_pair_at_toy_size(tiny_model, tmp_path):
    """bench_sequence_parallel.py (the GPU script too: --peak-tflops adds MFU) on 2 gloo ranks at 128
    tokens, degree 2: the ranks share one pair, each runs half of its row."""
    out = tmp_path / "sp.json"
    stdout = run_bench("bench_sequence_parallel.py", "--model", tiny_model, "--lengths", 128, "--degrees", 2, "--steps", 1,
                       "--peak-tflops", 1, "--json", out)
    [row] = json.loads(out.read_text())
    assert (row["length"], row["degree"], row["row_tokens_per_rank"]) == (128, 2, 64), row
    assert row["tokens_per_s"] > 0 and row["peak_mib_per_rank"] >= 0 and 0 < row["mfu"] < 1, row
    assert "tokens/pair degree" in stdout
