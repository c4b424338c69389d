"""Peak memory of the log-probs of one micro-batch through the LM head: the plain path (full logits,
then log-softmax) against the fused head (core.logps.HeadTokenLogps: response tokens only, chunks of
128 MB of float32 logits, recomputed in backward), at the vocabularies of SmolLM2 (49,152), Llama 3 (128,256)
and Qwen2 (151,936). Forward and backward, float32 on CPU (bf16 halves the tensors of both paths).

    .venv/bin/python bench/bench_head_memory.py          # ~1 min
    .venv/bin/python bench/bench_head_memory.py --tokens 256 --vocabs 49152   # smallest (tests): a few seconds

Each case runs in a fresh process; memory = peak RSS during forward + backward minus RSS before
(hidden states and head weight already allocated). The micro-batch: 8 sequences x 512 tokens
(4,096 positions), 40% of them response tokens (HH-like), hidden size 576.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VOCABS = {"SmolLM2 49,152": 49152, "Llama 3 128,256": 128256, "Qwen2 151,936": 151936}
TOKENS, HIDDEN, RESPONSE_SHARE = 4096, 576, 0.4


def child(path: str, vocab: int, tokens: int) -> dict:
    import torch

    from dpo_dist.core.logps import HEAD_CHUNK_ELEMENTS, HeadTokenLogps, token_logps_plain

    torch.manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
    weight = (torch.randn(vocab, HIDDEN) * 0.02).requires_grad_(True)
    n_resp = int(tokens * RESPONSE_SHARE)
    targets = torch.randint(0, vocab, (n_resp,))
    positions = torch.arange(n_resp) * 2  # every other position carries a response token
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if path == "plain":  # today's path before issue 11: logits for every position, then the targets
        logits = hidden @ weight.t()  # (T, V)
        logps = token_logps_plain(logits.index_select(0, positions), targets)
    else:
        chunk = max(32, HEAD_CHUNK_ELEMENTS // vocab)  # what layout_logps uses
        logps = HeadTokenLogps.apply(hidden.index_select(0, positions), weight, None, targets, chunk)
    logps.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_gb": (peak - before) / 2**20, "value": float(logps.detach().sum()),
            "grad_norm": float(weight.grad.norm())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=TOKENS, help=f"positions in the micro-batch (default {TOKENS})")
    ap.add_argument("--vocabs", default=",".join(map(str, VOCABS.values())), help="comma-separated vocabulary sizes")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.tokens)))
        return 0
    names = {v: k for k, v in VOCABS.items()}
    print(f"{args.tokens:,} positions, {int(args.tokens * RESPONSE_SHARE):,} response tokens, hidden size {HIDDEN}")
    print("| vocabulary | plain: full logits | fused head | ratio | values equal |")
    print("|---|---|---|---|---|")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        name = names.get(vocab, f"{vocab:,}")
        res = {}
        for path in ("plain", "fused"):
            out = subprocess.run([sys.executable, __file__, "--child", path, str(vocab), "--tokens", str(args.tokens)],
                                 capture_output=True, text=True, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                raise SystemExit(f"{path} head, vocabulary {vocab}: exit {out.returncode}\n{out.stderr[-3000:]}")
            res[path] = json.loads(line[7:])
        p, f = res["plain"], res["fused"]
        equal = abs(p["value"] - f["value"]) <= 1e-4 * abs(p["value"]) and abs(p["grad_norm"] - f["grad_norm"]) <= 1e-4 * p["grad_norm"]
        print(f"| {name} | {p['extra_gb']:.2f} GB | {f['extra_gb']:.2f} GB | {p['extra_gb'] / max(f['extra_gb'], 1e-3):.1f}x | {equal} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
