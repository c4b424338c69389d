"""The step-0 check calibrated on a real trained model: what correct runs measure, what errors measure.

At step 0 the policy has the reference's weights, so its log-probs must equal the cached ones up to
the arithmetic of the dtypes and layouts in play. This measures, on SmolLM2-135M-Instruct (the real
model of `dpo_dist.fixtures.real_model`) and HH-RLHF harmless-base pairs, per sequence, the
difference policy - cache on the training path (`stages.train.collate` + `dpo_forward`, micro-batches
of 2 pairs) against caches written by the real scorer (`stages.score.RefScorer`):

  correct  cache float32 or bf16 x policy bf16 or float32 x layout shared / packed / padded
  wrong    a cache of other weights under this identity (a few SFT steps; one layer changed),
           a broken shared-layout mask (rejected sees chosen), broken position ids (rejected's
           positions run on after chosen), an attention that ignores the mask

    .venv/bin/python bench/bench_step0_bound.py [--pairs 192] [--out step0.json]
    .venv/bin/python bench/bench_step0_bound.py --model M --pairs 4 --max-length 128 --layer-scales 1.5 --sft-steps 1  # smallest

Prints each configuration's check statistic over micro-batches of 2 pairs and its ratio to the
bound (`core.step0.step0_bound`) for first steps of 1-8 pairs, and writes the raw per-sequence
differences to --out (--from-json re-prints a table from such a file). BENCHMARKS.md, "Step-0 check on a real model", holds a run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def load_rows(tokenizer, n: int, max_length: int) -> tuple[list, list[dict]]:
    from dpo_dist.core.data import load_pairs
    from dpo_dist.core.tokenize import tokenize_pair

    pairs, _ = load_pairs(str(HH), max_samples=n)
    rows = [vars(tokenize_pair(tokenizer, p, max_length=max_length, max_prompt_length=max_length // 2)) for p in pairs]
    return pairs, rows


def cache_values(model_dir: Path, pairs, dtype: str, max_length: int) -> list[dict]:
    """The real scorer's rows (token ids + ref log-probs) for `pairs`, in `dtype`."""
    from dpo_dist.stages.score import RefScorer, ShardTask

    scorer = RefScorer(str(model_dir), str(model_dir), dtype, "sdpa", False, threads=torch.get_num_threads(),
                       max_length=max_length, max_prompt_length=max_length // 2, truncation_mode="keep_end",
                       token_budget=16384, device="cpu")
    started = time.perf_counter()
    out = scorer.score(ShardTask("train", 0, pairs, "bench"))
    print(f"  cache {dtype}: {out['real_tokens']} tokens in {time.perf_counter() - started:.0f} s", flush=True)
    return out["rows"]


def policy_values(model, rows: list[dict], layout: str, pad_id: int, micro: int = 2, breakage=None) -> list[list]:
    """Per micro-batch of `micro` pairs, on the training path: [(policy log-prob, response tokens) per
    sequence], chosen of each pair, then rejected of each (rows[i] with i = batch start + j).
    As the trainer's first step computes them: autograd on, one-row segment attention where the model
    has it (with the scorer's kernels: `collate(first_step=True)`); a `breakage` (which edits the dense
    mask or positions) runs the dense rows."""
    from dpo_dist.config import Config
    from dpo_dist.stages.train import collate, dpo_forward

    cfg = Config()
    cfg.model.layout = layout
    batches = []
    with torch.enable_grad():
        for i in range(0, len(rows) - micro + 1, micro):
            batch = collate(rows[i:i + micro], pad_id, "cpu", layout, engine=None if breakage else model, first_step=True)
            if breakage:
                breakage(batch)
            out = dpo_forward(model, batch, cfg)
            logps = torch.cat([out["chosen_logps"], out["rejected_logps"]]).detach()
            tokens = torch.cat([out["chosen_tokens"], out["rejected_tokens"]])
            batches.append([[float(v), int(t)] for v, t in zip(logps, tokens)])
    return batches


def diffs(policy: list[list], ref: list[dict], micro: int = 2) -> list[list]:
    """Per micro-batch: [(policy - cached log-prob, tokens) per sequence]."""
    out = []
    for k, batch in enumerate(policy):
        rows = ref[k * micro:(k + 1) * micro]
        cached = [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows]
        out.append([[v - c, t] for (v, t), c in zip(batch, cached)])
    return out


def scored(model, rows: list[dict], pad_id: int) -> list[dict]:
    """Reference log-probs of `rows` by another model (a cache of other weights under this identity)."""
    from dpo_dist.core.logps import layout_logps
    from dpo_dist.core.packing import pairs_layout

    out = []
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            chunk = rows[i:i + 8]
            lp, _ = layout_logps(model, pairs_layout(chunk, "shared", pad_id))
            out += [{"ref_chosen_logps": float(lp[j]), "ref_rejected_logps": float(lp[len(chunk) + j])}
                    for j in range(len(chunk))]
    return out


def unmask_chosen(batch: dict) -> None:
    """A shared-layout mask that lets the rejected tokens see the chosen ones (a plain causal row)."""
    mask = batch["attention_mask"]
    batch["attention_mask"] = mask | torch.ones_like(mask).tril()  # tail blocks stay causal


def running_positions(batch: dict) -> None:
    """Position ids 0..W-1 along each row: rejected's positions run on after chosen's."""
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.arange(width).expand_as(batch["position_ids"]).contiguous()


def register_maskless_attention() -> str:
    """An attention implementation that drops the mask (causal only): a kernel without packed-row support."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def maskless(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})

    AttentionInterface.register("maskless_sdpa", maskless)
    return "maskless_sdpa"


def sft_steps(model_dir: Path, rows: list[dict], steps: int, lr: float, pad_id: int):
    """The model after `steps` AdamW steps of NLL on chosen responses (batches of 8): other weights."""
    from dpo_dist.core.logps import layout_logps
    from dpo_dist.core.packing import sequences_layout
    from dpo_dist.models import load_causal_lm

    model = load_causal_lm(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        chunk = rows[(8 * step) % len(rows):][:8]
        batch = sequences_layout([(r["prompt_input_ids"], r["chosen_input_ids"]) for r in chunk], "packed", pad_id)
        logps, counts = layout_logps(model, batch)
        loss = -(logps.sum() / counts.sum())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def one_layer_changed(model_dir: Path, layer: int, scale: float):
    """The model with one decoder layer's MLP output scaled by `scale` (a cache of another checkpoint)."""
    from dpo_dist.models import load_causal_lm

    model = load_causal_lm(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight.mul_(scale)
    return model


def first_steps(batches: list[list], k: int) -> list[list]:
    """Regroup the per-sequence values into first steps of `k` pairs (k=1: each pair alone)."""
    pairs = [[b[j], b[len(b) // 2 + j]] for b in batches for j in range(len(b) // 2)]
    return [sum(pairs[i:i + k], []) for i in range(0, len(pairs) - k + 1, k)]


def ratios(batches: list[list], k: int, both_fp32: bool) -> list[float]:
    """The check statistic over its bound (core.step0.step0_bound), per first step of k pairs: > 1 refuses."""
    from dpo_dist.config import Config
    from dpo_dist.core.step0 import step0_bound

    out = []
    for step in first_steps(batches, k):
        tokens = sum(t for _, t in step)
        stat = sum(abs(d) for d, _ in step) / max(tokens, 1)
        dtype = "float32" if both_fp32 else "bfloat16"
        out.append(stat / step0_bound(Config(), dtype, "float32", tokens, sum(math.sqrt(t) for _, t in step)))
    return out


def summarize(name: str, batches: list[list]) -> str:
    both_fp32 = "cache float32, policy float32" in name
    cells = []
    for k in (1, 2, 4, 8):
        r = ratios(batches, k, both_fp32)
        cells.append(f"{min(r):.2f} - {max(r):.2f}" if r else "n/a")  # n/a: fewer than k pairs measured
    stat = sorted(sum(abs(d) for d, _ in b) / max(sum(t for _, t in b), 1) for b in batches)
    return f"| {name} | {stat[len(stat) // 2]:.2e} | {stat[-1]:.2e} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=192)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--model", default=None, help="a Hugging Face folder (default: the real-model fixture)")
    ap.add_argument("--out", default=None, help="write the per-sequence differences here (JSON)")
    ap.add_argument("--bf16-layouts", default="shared,packed,padded",
                    help="layouts of the bf16 policy (bf16 is slow on CPUs without AVX-512 BF16 / AMX)")
    ap.add_argument("--sft-steps", type=int, default=2)
    ap.add_argument("--layer-scales", type=float, nargs="*", default=[1.02, 1.1, 1.5])
    ap.add_argument("--from-json", default=None, help="print the table of an earlier --out file")
    args = ap.parse_args()
    if args.from_json:
        for name, batches in json.loads(Path(args.from_json).read_text()).items():
            print(summarize(name, batches))
        return
    from dpo_dist.fixtures.real_model import ensure
    from dpo_dist.models import load_causal_lm, load_tokenizer
    from dpo_dist.quiet import silence_known_noise

    silence_known_noise()
    torch.manual_seed(0)
    model_dir = Path(args.model) if args.model else ensure()
    tokenizer = load_tokenizer(str(model_dir))
    pad = tokenizer.pad_token_id
    pairs, _ = load_rows(tokenizer, args.pairs, args.max_length)
    started = time.time()
    cache = {d: cache_values(model_dir, pairs, d, args.max_length) for d in ("float32", "bfloat16")}
    rows = cache["float32"]
    tick = lambda what: print(f"  {what}: {time.time() - started:.0f} s", flush=True)  # noqa: E731
    policies = {"float32": load_causal_lm(str(model_dir), dtype=torch.float32, attn_implementation="sdpa"),
                "bfloat16": load_causal_lm(str(model_dir), dtype=torch.bfloat16, attn_implementation="sdpa")}
    values = {}  # (policy dtype, layout) -> per micro-batch policy values
    for dtype, layouts in (("float32", ("shared", "packed", "padded")), ("bfloat16", args.bf16_layouts.split(","))):
        for layout in layouts:
            values[dtype, layout] = policy_values(policies[dtype], rows, layout, pad)
            tick(f"policy {dtype} {layout}")
    results: dict[str, list] = {}
    for (dtype, layout), v in values.items():
        for cache_dtype in cache:
            results[f"correct: cache {cache_dtype}, policy {dtype}, {layout}"] = diffs(v, cache[cache_dtype])
    # Errors the identity checks cannot see, on the float32 path (fast everywhere) and, with a
    # bf16 policy, against the bf16 cache where it was measured.
    fp32 = policies["float32"]
    wrong = {"broken mask (rejected sees chosen)": policy_values(fp32, rows, "shared", pad, breakage=unmask_chosen),
             "broken position ids (rejected's run on after chosen)": policy_values(fp32, rows, "shared", pad,
                                                                                   breakage=running_positions)}
    fp32.config._attn_implementation = register_maskless_attention()
    wrong["attention that drops the mask"] = policy_values(fp32, rows, "shared", pad)
    fp32.config._attn_implementation = "sdpa"
    for name, v in wrong.items():
        results[f"wrong: {name}; cache float32, policy float32"] = diffs(v, cache["float32"])
    tick("broken layouts")
    others = {f"a cache of the model after {args.sft_steps} SFT steps (lr 1e-5)": sft_steps(model_dir, rows, args.sft_steps, 1e-5, pad)}
    layer = policies["float32"].config.num_hidden_layers // 2  # 15 of SmolLM2-135M's 30
    for scale in args.layer_scales:
        others[f"a cache with layer {layer}'s MLP output x{scale:g}"] = one_layer_changed(model_dir, layer, scale)
    for name, other in others.items():
        ref = scored(other, rows, pad)
        for (dtype, layout), v in values.items():
            if layout == "shared":
                results[f"wrong: {name}; policy {dtype}"] = diffs(v, ref)
        tick(name)
    n_tokens = sum(r["chosen_num_tokens"] + r["rejected_num_tokens"] for r in rows)
    print(f"\n{len(pairs)} HH harmless-base pairs ({n_tokens} response tokens), micro-batches of 2 pairs, "
          f"{time.time() - started:.0f} s")
    print("statistic: sum |policy - cache| / response tokens per micro-batch of 2 pairs; then statistic / bound "
          "(min - max) for a first step of 1, 2, 4, 8 pairs (> 1 refuses)")
    print("| configuration | statistic median | max | 1 pair | 2 pairs | 4 pairs | 8 pairs |")
    print("|---|---|---|---|---|---|---|")
    for name, batches in results.items():
        print(summarize(name, batches))
    if args.out:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
