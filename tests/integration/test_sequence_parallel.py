"""Sequence parallelism (DeepSpeed Ulysses around segment attention) on real 2-process gloo groups, a
tiny llama with 4 attention heads:

- rows of 4-7k tokens (pairs of a few thousand): per-pair log-probs and every parameter's gradient of
  a 2-way split equal the unsplit computation in the same processes (float32);
- a DPO run split over 2 ranks has the unsplit run's per-step losses: test_train.py
  (test_a_sequence_parallel_run_crashed_and_resumed_has_the_unsplit_run_s_losses, on its cache).
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from dpo_dist.fixtures.tiny import write_tiny_model

pytestmark = pytest.mark.integration

RANK = r"""
import json, os, sys
import torch
from dpo_dist.core.logps import layout_logps
from dpo_dist.core.packing import on_ranks, pairs_layout
from dpo_dist.engines.deepspeed_engine import compute_init, sequence_parallel
from dpo_dist.engines.dist import compute_shutdown
from dpo_dist.models import attention_for, load_causal_lm, load_model_config

model_dir, out = sys.argv[1], sys.argv[2]
dist = compute_init(timeout_s=120)
torch.manual_seed(0)
vocab = load_model_config(model_dir).vocab_size
def tokens(n):
    return torch.randint(3, vocab, (n,)).tolist()
# two long pairs and a short one: the cut between the two slices falls inside a pair
rows = [{"prompt_input_ids": tokens(p), "chosen_input_ids": tokens(c), "rejected_input_ids": tokens(r)}
        for p, c, r in ((900, 1300, 1100), (40, 30, 50), (700, 600, 900))]
model = load_causal_lm(model_dir, dtype=torch.float32, attn_implementation=attention_for(load_model_config(model_dir), "sdpa"))
weights = torch.linspace(-1.0, 1.0, 2 * len(rows))
LAYOUTS = ("shared", "packed")


def run(batch):
    model.zero_grad(set_to_none=True)
    logps, counts = layout_logps(model, batch)
    (logps * weights).sum().backward()
    return logps.detach(), counts, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# unsplit first: sequence_parallel puts Ulysses around the model's attention for good
whole = {layout: run(pairs_layout(rows, layout, 0, segment_attention=True, pad_to_multiple_of=2)) for layout in LAYOUTS}
sp = sequence_parallel(model, 2)
reports = {}
for layout in LAYOUTS:
    batch = on_ranks(pairs_layout(rows, layout, 0, segment_attention=True, pad_to_multiple_of=2), sp)
    split = run(batch)
    for g in split[2].values():  # DeepSpeed's reduction: the mean over the ranks (it sees them as data-parallel)
        torch.distributed.all_reduce(g)
        g.div_(dist.world_size)
    w = whole[layout]
    reports[layout] = {
        "width": int(batch["input_ids"].shape[1]), "targets": int(batch["target_pos"].numel()), "all_targets": int(w[1].sum()),
        "logps_whole": w[0].tolist(), "logps_split": split[0].tolist(), "counts_equal": bool(torch.equal(w[1], split[1])),
        "grad_rel": max(float((split[2][n] - w[2][n]).norm() / w[2][n].norm().clamp_min(1e-30)) for n in w[2])}
with open(f"{out}.{sp.rank}", "w") as f:
    json.dump(reports, f)
compute_shutdown()
# as launchers/train_dpo.py: no C++ static destructors, where a joinable gloo thread can abort a
# finished process ("terminate called without an active exception")
sys.stdout.flush()
os._exit(0)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny llama with 4 attention heads and room for 4k-token rows."""
    return write_tiny_model(tmp_path_factory.mktemp("sp") / "model", num_heads=4, max_position_embeddings=8192)


def test_a_two_way_split_gives_the_unsplit_logps_and_gradients(long_model, tmp_path):
    port = _port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, str(long_model), str(tmp_path / "out")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    for layout in ("shared", "packed"):
        reports = [r[layout] for r in ranks]
        whole = reports[0]["logps_whole"]
        # each rank ran half the row and its own targets; together, every target once
        assert reports[0]["width"] == reports[1]["width"]
        assert reports[0]["targets"] + reports[1]["targets"] == reports[0]["all_targets"] and min(r["targets"] for r in reports) > 0
        print(f"sequence parallel {layout}: row of {2 * reports[0]['width']} tokens, targets {reports[0]['targets']} + "
              f"{reports[1]['targets']}, gradient relative error {max(r['grad_rel'] for r in reports):.2e}, log-probs "
              f"{max(abs(a - b) / abs(b) for r in reports for a, b in zip(r['logps_split'], whole)):.2e}")
        for r in reports:
            assert r["counts_equal"]
            assert r["logps_split"] == pytest.approx(whole, rel=1e-5)
            assert r["grad_rel"] < 1e-5, (layout, r["grad_rel"])
