"""Sequence parallelism (DeepSpeed Ulysses around segment attention) on real 2-process gloo groups, a
tiny llama with 4 attention heads:

- rows of 4-7k tokens (pairs of a few thousand): per-pair log-probs and every parameter's gradient of
  a 2-way split equal the unsplit computation in the same processes (float32);
- `dpo-dist train` with train.sequence_parallel_size=2 on 2 ranks (ZeRO-3), crashed and resumed, has
  the per-step losses of the same run unsplit on 1 rank.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from dpo_dist.fixtures.tiny import write_tiny_model
from helpers import DPO, REPO, offline_env, scalars

pytestmark = pytest.mark.integration

RANK = r"""
import json, sys
import torch
from dpo_dist.core.logps import layout_logps
from dpo_dist.core.packing import pairs_layout, sequence_shard
from dpo_dist.engines.deepspeed_engine import compute_init, compute_shutdown, sequence_parallel
from dpo_dist.models import attention_for, load_causal_lm, load_model_config

model_dir, layout, out = sys.argv[1], sys.argv[2], sys.argv[3]
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


def run(batch):
    model.zero_grad(set_to_none=True)
    logps, counts = layout_logps(model, batch)
    (logps * weights).sum().backward()
    return logps.detach(), counts, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


whole = run(pairs_layout(rows, layout, 0, segment_attention=True, pad_to_multiple_of=2))
sp = sequence_parallel(model, 2)
batch = sequence_shard(pairs_layout(rows, layout, 0, segment_attention=True, pad_to_multiple_of=2), sp.rank, sp.size)
batch["sp_group"] = sp.group
split = run(batch)
for g in split[2].values():  # DeepSpeed's reduction: the mean over the ranks (it sees them as data-parallel)
    torch.distributed.all_reduce(g)
    g.div_(dist.world_size)
report = {"rank": sp.rank, "width": int(batch["input_ids"].shape[1]), "targets": int(batch["target_pos"].numel()),
          "all_targets": int(whole[1].sum()),
          "logps_whole": whole[0].tolist(), "logps_split": split[0].tolist(),
          "counts_equal": bool(torch.equal(whole[1], split[1])),
          "grad_rel": max(float((split[2][n] - whole[2][n]).norm() / whole[2][n].norm().clamp_min(1e-30)) for n in whole[2]),
          "grad_norm": float(sum(g.norm() ** 2 for g in whole[2].values()) ** 0.5)}
with open(f"{out}.{sp.rank}", "w") as f:
    json.dump(report, f)
compute_shutdown()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny llama with 4 attention heads and room for 4k-token rows."""
    return write_tiny_model(tmp_path_factory.mktemp("sp") / "model", num_heads=4, max_position_embeddings=8192)


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_a_two_way_split_gives_the_unsplit_logps_and_gradients(long_model, tmp_path, layout):
    port = _port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK, str(long_model), layout, str(tmp_path / "out")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    reports = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    # each rank ran half the row and its own targets; together, every target once
    assert reports[0]["width"] == reports[1]["width"]
    whole = reports[0]["logps_whole"]
    assert reports[0]["targets"] + reports[1]["targets"] == reports[0]["all_targets"] and min(r["targets"] for r in reports) > 0
    print(f"sequence parallel {layout}: row of {2 * reports[0]['width']} tokens, targets {reports[0]['targets']} + "
          f"{reports[1]['targets']}, gradient relative error {max(r['grad_rel'] for r in reports):.2e}, log-probs "
          f"{max(abs(a - b) / abs(b) for r in reports for a, b in zip(r['logps_split'], whole)):.2e}")
    for r in reports:
        assert r["counts_equal"]
        assert r["logps_split"] == pytest.approx(whole, rel=1e-5)
        assert r["grad_rel"] < 1e-5, r["grad_rel"]


@pytest.fixture(scope="module")
def sp_work(long_model, synthetic_path, tmp_path_factory, ray_cluster):
    """A float32 cache of 64 synthetic pairs scored with the 4-head model, and a float32 ZeRO-3 JSON."""
    from dpo_dist.config import load_config
    from dpo_dist.stages.score import run_scoring

    d = tmp_path_factory.mktemp("sp_work")
    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    ds["bf16"] = {"enabled": False}
    (d / "zero3_fp32.json").write_text(json.dumps(ds))
    run_scoring(load_config(None, _overrides(d, long_model, synthetic_path)))
    return d


def _overrides(d, model, data, *more) -> list[str]:
    return [f"model.name_or_path={model}", f"data.train={data}", "data.max_samples=64", "data.eval_fraction=0.125",
            f"cache_dir={d / 'cache'}", "score.dtype=float32", "score.cpu_actors=1", f"output_dir={d / 'run'}",
            f"train.deepspeed_config={d / 'zero3_fp32.json'}", "train.micro_batch_size=4", "train.lr=1e-3",
            "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "train.seed=5", "export.enabled=false",
            "model.layout=shared", *more]


def _train(d, model, data, run: str, *more, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([*DPO, "train", *_overrides(d, model, data, f"output_dir={d / run}", *more)], cwd=d,
                          capture_output=True, text=True, timeout=600, env=offline_env(OMP_NUM_THREADS="1", **env))
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_a_dpo_run_split_over_two_ranks_has_the_unsplit_run_s_losses(sp_work, long_model, synthetic_path):
    """DPO with ZeRO-3 (float32): sequence parallel 2 on 2 ranks (one data-parallel rank), crashed
    after its step-2 checkpoint and resumed, against 1 rank unsplit with the same global batch of 8:
    per-step losses, margins, gradient norms and the eval metrics agree to float tolerance."""
    _train(sp_work, long_model, synthetic_path, "run1", "train.num_procs=1", "train.gradient_accumulation_steps=2")
    split = ["train.num_procs=2", "train.gradient_accumulation_steps=2", "train.sequence_parallel_size=2"]
    crashed = _train(sp_work, long_model, synthetic_path, "run2", *split, check=False, DPO_DIST_CRASH_AFTER_STEP="2")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    assert "sequence parallel 2 x 1 data-parallel" in crashed.stdout and "x data-parallel ranks 1" in crashed.stdout, crashed.stdout[-2000:]
    resumed = _train(sp_work, long_model, synthetic_path, "run2", *split, "--resume")
    assert "resuming at step 2" in resumed.stdout, resumed.stdout[-2000:]
    got, want = scalars(sp_work / "run2" / "tb"), scalars(sp_work / "run1" / "tb")
    for tag in ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/grad_norm", "eval/rewards/margins"):
        assert sorted(got[tag]) == sorted(want[tag]) and got[tag], tag
        for step in want[tag]:
            assert got[tag][step] == pytest.approx(want[tag][step], rel=1e-5, abs=1e-6), (tag, step)
    # the losses moved: the comparison is not of two untrained runs
    assert abs(want["train/loss"][4] - want["train/loss"][1]) > 1e-3
