"""Training and scoring throughput and MFU of dpo-dist's own path (DeepSpeed engine, core.packing
layouts, fused LM head, preference loss) for a ~1B Llama-architecture model built from a config.

    .venv/bin/python bench/gpu_mfu.py                          # on a GPU: 1.1B, seq 512/1024, sdpa (+ flash), bf16
    .venv/bin/python bench/gpu_mfu.py --tiny --steps 2         # the same code on CPU, tiny model (tests run this)

For each sequence length, attention implementation and micro-batch (pairs per step), it times
`--steps` training steps (forward + backward + optimizer of the DPO loss, one process, ZeRO-2) and
`--steps` scoring forwards (inference mode), after `--warmup` untimed ones, on synthetic pairs:
prompt = half the sequence, chosen and rejected a quarter each, so that the [chosen; rejected]
work equals two sequences of `seq` tokens.

FLOPs counted (the work done, not the work a naive implementation would do):
    per token through the body:     2 * N_body          (N_body: every matmul weight except the LM head)
    per response token, LM head:    2 * V * d           (the fused head runs only on response tokens)
    attention per token:            4 * L * d * t_ctx   (QK^T and AV; t_ctx: the keys it attends, causal)
    training = 3 x the forward (backward is twice the forward); scoring = the forward.
MFU = counted FLOPs / time / peak dense bf16 FLOP/s of the device (H100/H200 SXM: 989e12).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B shape
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def peak_flops(device: str) -> float | None:
    import torch

    if device == "cpu":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def pair_flops(shape: dict, n_body: int, prompt: int, chosen: int, rejected: int, layout: str) -> float:
    """Forward FLOPs of one pair in `layout` (shared: the prompt once; else twice)."""
    d, L, V = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    if layout == "shared":
        tokens = prompt + chosen + rejected
        # keys attended, summed over query tokens (causal): prompt, then chosen after the prompt, rejected after the prompt
        ctx = prompt * (prompt + 1) / 2 + chosen * prompt + chosen * (chosen + 1) / 2 + rejected * prompt + rejected * (rejected + 1) / 2
    else:
        tokens = 2 * prompt + chosen + rejected
        ctx = sum(n * (n + 1) / 2 for n in (prompt + chosen, prompt + rejected))
    return 2 * n_body * tokens + 2 * V * d * (chosen + rejected) + 4 * L * d * ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(shape: dict, attn: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(device)
    n_body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)
    return model, n_body


def pairs(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    import random

    rnd = random.Random(seed)
    p, r = seq // 2, seq // 4
    return [{"prompt_input_ids": [rnd.randrange(3, vocab) for _ in range(p)],
             "chosen_input_ids": [rnd.randrange(3, vocab) for _ in range(r)],
             "rejected_input_ids": [rnd.randrange(3, vocab) for _ in range(r)]} for _ in range(n)]


def measure(shape: dict, seq: int, attn: str, micro: int, layout: str, steps: int, warmup: int, device: str) -> dict:
    import torch

    from dpo_dist.config import TrainConfig
    from dpo_dist.core.logps import layout_logps, split_chosen_rejected, to_device
    from dpo_dist.core.loss import preference_loss
    from dpo_dist.core.packing import pairs_layout
    from dpo_dist.engines.deepspeed_engine import build_engine, fill_ds_config

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model, n_body = build(shape, attn, device, dtype)
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": device != "cpu"},
          "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": 1e-8, "weight_decay": "auto",
                                                    "torch_adam": "auto"}},
          "steps_per_print": 10**9}
    train_cfg = TrainConfig(micro_batch_size=micro, lr=1e-6)
    engine = build_engine(model, fill_ds_config(ds, train_cfg, 1, shape["hidden_size"], has_gpu=device != "cpu"), train_cfg, 10**6)
    data = pairs(micro * (steps + warmup), seq, shape["vocab_size"])
    batches = [to_device(pairs_layout(data[i * micro:(i + 1) * micro], layout, 0), device) for i in range(steps + warmup)]
    ref = torch.zeros(micro, device=device)
    flops = micro * pair_flops(shape, n_body, seq // 2, seq // 4, seq // 4, layout)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def train_step(batch):
        logps, counts = layout_logps(engine, batch)
        chosen, rejected = split_chosen_rejected(logps)
        losses, _, _ = preference_loss(chosen, rejected, ref, ref, beta=0.1)
        engine.backward(losses.mean())
        engine.step()

    out = {}
    for phase in ("train", "score"):
        for i, batch in enumerate(batches):
            if i == warmup:
                sync()
                started = time.perf_counter()
            if phase == "train":
                train_step(batch)
            else:
                with torch.inference_mode():
                    layout_logps(engine.module, batch)
        sync()
        elapsed = time.perf_counter() - started
        work = flops * steps * (3 if phase == "train" else 1)
        peak = peak_flops(device)
        out[phase] = {"tokens_per_sec": micro * 2 * seq * steps / elapsed, "tflops": work / elapsed / 1e12,
                      "mfu": work / elapsed / peak if peak else None}
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None
    engine = model = None  # drop the references (train_step's closure holds engine) before freeing the cache
    if device != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU check of the same code path)")
    ap.add_argument("--seqs", default="512,1024")
    ap.add_argument("--micro", default="1,2,4,8", help="pairs per step to sweep")
    ap.add_argument("--attn", default=None, help="comma list; default sdpa, plus flash_attention_2 when flash_attn is installed")
    ap.add_argument("--layout", default="shared", choices=["shared", "packed", "padded"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import importlib.util

    import torch

    from dpo_dist.quiet import silence_known_noise

    silence_known_noise()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    from dpo_dist.engines.deepspeed_engine import compute_init

    compute_init()
    shape = TINY if args.tiny else ONE_B
    attns = args.attn.split(",") if args.attn else (
        ["sdpa"] + (["flash_attention_2"] if device != "cpu" and importlib.util.find_spec("flash_attn") else []))
    name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    print(f"[gpu_mfu] {name}; model {shape}; layout {args.layout}; {args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    print("| seq | attention | pairs/step | train tokens/s | train TFLOP/s | train MFU | score tokens/s | score MFU | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq in (int(x) for x in args.seqs.split(",")):
        for attn in attns:
            layout = "packed" if attn.startswith("flash") and args.layout == "shared" else args.layout
            for micro in (int(x) for x in args.micro.split(",")):
                try:
                    r = measure(shape, seq, attn, micro, layout, args.steps, args.warmup, device)
                except torch.OutOfMemoryError:
                    print(f"| {seq} | {attn} | {micro} | out of memory | | | | | |", flush=True)
                    torch.cuda.empty_cache()
                    break
                rows.append({"seq": seq, "attn": attn, "micro": micro, "layout": layout, **r})
                fmt = lambda v: f"{v:.1%}" if v is not None else "n/a"  # noqa: E731
                peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
                print(f"| {seq} | {attn} | {micro} | {r['train']['tokens_per_sec']:,.0f} | {r['train']['tflops']:.1f} | "
                      f"{fmt(r['train']['mfu'])} | {r['score']['tokens_per_sec']:,.0f} | {fmt(r['score']['mfu'])} | {peak} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "shape": shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
