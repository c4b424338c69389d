"""How far bf16 policy log-probs fall from float32 cached ones at step 0: the bound of the step-0 check.

The trainer's step-0 identity compares the policy (training dtype, bf16 by default) with the cache
(scored in float32 on CPU, bf16 on GPU) per token, for the worst pair of its first batch. This
measures that statistic on HH-RLHF pairs for models whose logits look like a real model's:

  random   a random-init Llama (flat logits: the easy case)
  sft      the same model after supervised fine-tuning on HH chosen responses (peaked logits)
  smollm   a SmolLM2-135M-shaped Llama (49k vocab, 30 layers), random init (--smollm; minutes)

    .venv/bin/python bench/bench_step0_bound.py [--pairs 128] [--sft-steps 200] [--smollm]

Prints, per model, the per-token |bf16 - float32| difference per pair (the check statistic): its
median, 99th percentile and maximum over pairs, and the same in float32 vs float32 with another
batch composition (the 1e-4 bound).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dpo_dist.core.data import load_pairs
from dpo_dist.core.logps import concat_batch, concatenated_forward
from dpo_dist.fixtures.tiny import build_tokenizer
from dpo_dist.core.tokenize import tokenize_pair

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def tokenized_pairs(tokenizer, n: int) -> list[dict]:
    pairs, _ = load_pairs(str(HH), max_samples=n)
    return [vars(tokenize_pair(tokenizer, p, max_length=512, max_prompt_length=256)) for p in pairs]


def logps(model, rows: list[dict], batch: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, counts = [], []
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            lp, n = concatenated_forward(model, concat_batch(rows[i:i + batch], pad_id))
            half = lp.shape[0] // 2
            out.append(torch.stack([lp[:half], lp[half:]], 1))
            counts.append(torch.stack([n[:half], n[half:]], 1))
    return torch.cat(out).float(), torch.cat(counts)


def per_pair_token_diff(a, b, counts) -> list[float]:
    """Per pair, the larger of chosen / rejected |a - b| / tokens: what the step-0 check bounds."""
    return ((a - b).abs() / counts.clamp(min=1)).max(dim=1).values.tolist()


def summary(name: str, diffs: list[float]) -> str:
    ordered = sorted(diffs)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"| {name} | {statistics.median(ordered):.2e} | {p99:.2e} | {ordered[-1]:.2e} |"


def sft(model, rows: list[dict], steps: int, pad_id: int) -> None:
    """Plain NLL on prompt + chosen (response tokens only), AdamW: makes the logits peak like a real LM's."""
    from dpo_dist.core.logps import sequence_batch

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(len(rows), (16,), generator=g).tolist()
        batch = sequence_batch([(rows[i]["prompt_input_ids"], rows[i]["chosen_input_ids"]) for i in idx], pad_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"  sft step {step}: loss {out.loss.item():.3f}", flush=True)
    model.eval()


def measure(name: str, model, rows: list[dict], pad_id: int) -> list[str]:
    print(f"  measuring {name} on {len(rows)} pairs", flush=True)
    model.eval()
    ref, counts = logps(model, rows, 8, pad_id)  # the cache: float32
    other_batch, _ = logps(model, rows, 3, pad_id)  # float32 again, another batch composition
    half = logps(model.to(torch.bfloat16), rows, 4, pad_id)[0]  # the policy at step 0: bf16
    model.to(torch.float32)
    return [summary(f"{name}: float32 vs float32 (other batches)", per_pair_token_diff(other_batch, ref, counts)),
            summary(f"{name}: bf16 vs float32", per_pair_token_diff(half, ref, counts))]


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--smollm", action="store_true", help="also a SmolLM2-135M-shaped model (49k vocab; slow)")
    ap.add_argument("--smollm-pairs", type=int, default=24)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = build_tokenizer("llama")
    rows = tokenized_pairs(tok, args.pairs)
    pad = tok.pad_token_id
    lines = ["| model | median | p99 | max |", "|---|---|---|---|"]
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    t0 = time.time()
    lines += measure("random 3.9M Llama", model, rows, pad)
    sft(model, tokenized_pairs(tok, 2000), args.sft_steps, pad)
    lines += measure(f"same after {args.sft_steps} SFT steps", model, rows, pad)
    if args.smollm:
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True)
        big = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        lines += measure("SmolLM2-135M shape, random", big, rows[:args.smollm_pairs], pad)
    print(f"\n{len(rows)} HH pairs, per-token |difference| per pair (worst of chosen/rejected), {time.time() - t0:.0f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
