"""Segment attention against the dense-mask rows: tokens/s of the scoring forward and of a LoRA
training step (forward + backward), same model, same pairs, same micro-batches, one process.

    .venv/bin/python bench/bench_segments.py                          # SmolLM2-135M-Instruct, HH pairs, ~3 min
    .venv/bin/python bench/bench_segments.py --model DIR --pairs 8 --micro 2 --budget 512 --repeats 1   # smallest

Both sides run the `shared` layout through `core.logps.layout_logps` on the same model object (loaded
with sdpa, so segment attention is its attention for one-row batches and transformers' sdpa with the
4D mask for the rows of the dense layout). Scoring: pairs in length batches under `--budget` tokens
(`score.token_budget`), inference mode. Training: micro-batches of `--micro` pairs in data order
(as the trainer draws them), LoRA r=16 on every projection, loss = sum of log-probs, backward. The two
sides alternate `--repeats` times and the best pass of each is kept (the machine may be shared).
A second table: the LoRA step with the CPU training kernels (core.segments' parts attention, the
fused head's kept logits) switched on one by one, against torch's SDPA per part.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def work_args(ap: argparse.ArgumentParser) -> None:
    """The options of the work (also bench_allocator.py's)."""
    ap.add_argument("--model", default=None, help="model folder (default: the real SmolLM2-135M-Instruct)")
    ap.add_argument("--hh", default=str(HH))
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--budget", type=int, default=16384, help="scoring tokens per forward")
    ap.add_argument("--micro", type=int, default=4, help="training pairs per micro-batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="default: bfloat16 where the CPU multiplies it fast, else float32")


def load_work(args) -> SimpleNamespace:
    """The model, the pairs and the two passes: score_pass(segments), train_pass(segments), each
    giving (seconds, real tokens, padded tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dpo_dist.core.batching import length_batches
    from dpo_dist.core.data import load_pairs
    from dpo_dist.core.logps import layout_logps, segment_attention_on
    from dpo_dist.core.metrics import cpu_multiplies_bf16
    from dpo_dist.core.packing import pairs_layout
    from dpo_dist.core.tokenize import pad_token_id, tokenize_pair
    from dpo_dist.models import load_causal_lm, load_tokenizer
    from dpo_dist.quiet import silence_known_noise

    silence_known_noise()
    torch.set_num_threads(args.threads)
    if args.model is None:
        from dpo_dist.fixtures.real_model import ensure

        args.model = str(ensure())
    dtype = getattr(torch, args.dtype or ("bfloat16" if cpu_multiplies_bf16() else "float32"))
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=dtype, attn_implementation="sdpa")
    if not segment_attention_on(model):
        raise SystemExit(f"{args.model}: this architecture does not run segment attention")
    pairs, _ = load_pairs(args.hh)
    rows = []
    for p in pairs[: args.pairs]:
        t = tokenize_pair(tok, p, max_length=args.max_length, max_prompt_length=args.max_length // 2,
                          truncation_mode="keep_end")
        rows.append({"prompt_input_ids": t.prompt_input_ids, "chosen_input_ids": t.chosen_input_ids,
                     "rejected_input_ids": t.rejected_input_ids})
    pad = pad_token_id(tok)
    lengths = [sum(len(v) for v in r.values()) for r in rows]
    score_groups = [[rows[i] for i in ids] for ids in length_batches(lengths, args.budget, rows_per_item=1)]
    train_groups = [rows[i:i + args.micro] for i in range(0, len(rows), args.micro)]

    def score_pass(segments: bool) -> tuple[float, int, int]:
        batches = [pairs_layout(g, "shared", pad, segment_attention=segments) for g in score_groups]
        started = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                layout_logps(model, b)
        return time.perf_counter() - started, sum(b["tokens"] for b in batches), sum(b["input_ids"].numel() for b in batches)

    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    for p in lora.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)  # as DeepSpeed's bf16 engine holds them

    def train_pass(segments: bool) -> tuple[float, int, int]:
        batches = [pairs_layout(g, "shared", pad, segment_attention=segments) for g in train_groups]
        lora.train()
        started = time.perf_counter()
        for b in batches:
            sums, _ = layout_logps(lora, b)
            sums.sum().backward()
        lora.zero_grad(set_to_none=True)
        return time.perf_counter() - started, sum(b["tokens"] for b in batches), sum(b["input_ids"].numel() for b in batches)

    return SimpleNamespace(score_pass=score_pass, train_pass=train_pass, dtype=dtype, tokens=sum(lengths), pairs=len(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    work_args(ap)
    args = ap.parse_args(argv)
    w = load_work(args)
    score_pass, train_pass = w.score_pass, w.train_pass
    print(f"[bench] {Path(args.model).name}, {w.pairs} HH pairs, {w.tokens:,} tokens (shared layout), {w.dtype}, "
          f"{args.threads} threads", flush=True)
    table = ["| work | dense 4D mask tokens/s | padding efficiency | segment attention tokens/s | speed-up |", "|---|---|---|---|---|"]
    for name, run in (("scoring forward", score_pass), ("LoRA training step", train_pass)):
        best = {False: None, True: None}
        run(True)  # warm-up (oneDNN kernels, allocator)
        for _ in range(args.repeats):
            for segments in (False, True):
                seconds, real, padded = run(segments)
                if best[segments] is None or seconds < best[segments][0]:
                    best[segments] = (seconds, real, padded)
        dense, seg = best[False], best[True]
        table.append(f"| {name} | {dense[1] / dense[0]:,.0f} | {dense[1] / dense[2]:.2f} | {seg[1] / seg[0]:,.0f} | "
                     f"{dense[0] / seg[0]:.2f}x |")
    print("\n".join(table))
    print("\n".join(kernel_table(train_pass, args.repeats)))
    return 0


# The LoRA step (segment attention) with the CPU training kernels of core.segments and core.logps
# switched on one by one: torch's SDPA per part and a recomputed head first (as before them).
KERNELS = (("SDPA per part, head recomputed", False, 0), ("CPU parts attention, head recomputed", True, 0),
           ("CPU parts attention, head logits kept", True, None))


def kernel_table(train_pass, repeats: int) -> list[str]:
    import dpo_dist.core.logps as logps
    import dpo_dist.core.segments as segments

    default_parts, default_kept = segments.CPU_TRAINING_PARTS, logps.KEPT_LOGITS_BYTES
    best = {}
    try:
        for _ in range(repeats):
            for name, parts, kept in KERNELS:
                segments.CPU_TRAINING_PARTS = parts
                logps.KEPT_LOGITS_BYTES = default_kept if kept is None else kept
                seconds, real, _ = train_pass(True)
                best[name] = min(best.get(name, (float("inf"), real)), (seconds, real))
    finally:
        segments.CPU_TRAINING_PARTS, logps.KEPT_LOGITS_BYTES = default_parts, default_kept
    base = best[KERNELS[0][0]][0]
    table = ["| LoRA training step (segment attention) | tokens/s | speed-up |", "|---|---|---|"]
    table += [f"| {name} | {real / seconds:,.0f} | {base / seconds:.2f}x |" for name, (seconds, real) in best.items()]
    return table


if __name__ == "__main__":
    sys.exit(main())
