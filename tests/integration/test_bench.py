"""The GPU benchmark's code path, run on CPU with a tiny model: the day a GPU is there, the script
works (same engine, layouts, fused head, loss and FLOP count)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_gpu_mfu_script_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "mfu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_mfu.py"), "--tiny", "--seqs", "64", "--micro", "1,2",
                           "--steps", "2", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                                   TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["seq"], r["micro"], r["attn"]) for r in rows] == [(64, 1, "sdpa"), (64, 2, "sdpa")]
    for r in rows:
        assert r["train"]["tokens_per_sec"] > 0 and r["score"]["tokens_per_sec"] > r["train"]["tokens_per_sec"]
        assert r["train"]["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert "| 64 | sdpa | 2 |" in proc.stdout


def test_flop_count_of_a_pair_by_hand():
    """2 N per token through the body, 2 V d per response token for the head, 4 L d per attended key."""
    from gpu_mfu import pair_flops

    shape = {"hidden_size": 4, "num_hidden_layers": 2, "vocab_size": 10}
    # padded/packed: sequences of 3 (prompt 2 + chosen 1) and 3 (prompt 2 + rejected 1): 6 tokens, 2 x (1+2+3) keys
    assert pair_flops(shape, 100, 2, 1, 1, "packed") == 2 * 100 * 6 + 2 * 10 * 4 * 2 + 4 * 2 * 4 * 12
    # shared: 4 tokens; keys: prompt 1 + 2, chosen 3, rejected 3 (the prompt and itself)
    assert pair_flops(shape, 100, 2, 1, 1, "shared") == 2 * 100 * 4 + 2 * 10 * 4 * 2 + 4 * 2 * 4 * 9


def test_checkpoint_hash_bench_runs_and_both_markers_agree():
    """bench/bench_ckpt_hash.py at a tiny size: 2 gloo ranks, the per-rank records equal rank 0's alone."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_ckpt_hash.py"), "--gib", "0.02", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "marker, each rank its own files" in proc.stdout and "speed-up of the marker" in proc.stdout
