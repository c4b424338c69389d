"""Sequence parallelism (DeepSpeed Ulysses around segment attention): tokens/s and peak memory per
rank of a training forward+backward of one long pair per data-parallel rank, at several pair lengths,
degree 1 (each rank its own pair) against degree N (N ranks share one pair), on the same ranks.

    python bench/bench_sequence_parallel.py                              # CPU: 2 gloo ranks, 2k/8k/32k tokens
    python bench/bench_sequence_parallel.py --lengths 32768 65536 131072 --model PATH --ranks 8   # GPUs (NCCL), with MFU

Each configuration runs in fresh processes (torch.distributed; gloo on CPU, NCCL on GPU), a warm-up
step then --steps timed steps. A pair of L tokens is prompt L/4, chosen and rejected 3L/8 each, in the
shared-prompt layout (one row). Peak memory: the rank's peak RSS over its steps minus its RSS before
them on CPU, torch.cuda.max_memory_allocated on GPU. MFU (GPU only): the model FLOPs of the step
(6 x parameters x tokens + causal attention) over the elapsed time and --peak-tflops per GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rank_main(args) -> None:
    import torch

    from dpo_dist.core.logps import layout_logps
    from dpo_dist.core.packing import on_ranks, pairs_layout
    from dpo_dist.engines.deepspeed_engine import compute_init, sequence_parallel
    from dpo_dist.engines.dist import compute_shutdown
    from dpo_dist.models import attention_for, load_causal_lm, load_model_config

    dist = compute_init(timeout_s=600)
    torch.set_num_threads(args.threads)
    device = dist.device
    config = load_model_config(args.model)
    dtype = getattr(torch, args.dtype)
    model = load_causal_lm(args.model, dtype=dtype, attn_implementation=attention_for(config, "sdpa")).to(device)
    sp = sequence_parallel(model, args.degree)
    group_rank = dist.rank // args.degree  # ranks of a group share their pair
    gen = torch.Generator().manual_seed(group_rank)
    n = args.length
    p, c = n // 4, 3 * n // 8

    def tokens(k):
        return torch.randint(3, config.vocab_size, (k,), generator=gen).tolist()

    row = [{"prompt_input_ids": tokens(p), "chosen_input_ids": tokens(c), "rejected_input_ids": tokens(n - p - c)}]
    batch = pairs_layout(row, "shared", 0, segment_attention=True, pad_to_multiple_of=args.degree)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in on_ranks(batch, sp).items()}

    def step():
        model.zero_grad(set_to_none=True)
        logps, _ = layout_logps(model, batch)
        logps.sum().backward()

    step()  # warm-up (allocator, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.distributed.barrier()
    rss_before = _rss_now()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    params = sum(x.numel() for x in model.parameters())
    report = {"rank": dist.rank, "seconds": elapsed, "peak_bytes": peak, "params": params,
              "layers": config.num_hidden_layers, "hidden": config.hidden_size,
              "row_tokens": int(batch["input_ids"].shape[1])}
    Path(f"{args.out}.{dist.rank}").write_text(json.dumps(report))
    compute_shutdown()
    # as launchers/train_dpo.py: skip C++ static destructors, where a joinable gloo thread can abort a
    # finished process ("terminate called without an active exception")
    sys.stdout.flush()
    os._exit(0)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(model: str, length: int, degree: int, ranks: int, steps: int, threads: int, dtype: str,
               peak_tflops: float | None) -> dict:
    """One (length, degree) on `ranks` fresh processes; the per-rank figures and the totals."""
    with tempfile.TemporaryDirectory() as tmp:
        out, port = Path(tmp) / "rank", _free_port()
        procs = []
        for rank in range(ranks):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
            cmd = [sys.executable, __file__, "--child", "--model", model, "--length", str(length), "--degree", str(degree),
                   "--steps", str(steps), "--threads", str(threads), "--dtype", dtype, "--out", str(out)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=3600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"length {length} degree {degree} failed:\n" + "\n".join(log[-3000:] for log in logs))
        reports = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]
    seconds = max(r["seconds"] for r in reports)
    pairs = ranks // degree * steps  # one pair per data-parallel rank per step
    tokens = pairs * length
    result = {"length": length, "degree": degree, "ranks": ranks, "steps": steps, "seconds": round(seconds, 3),
              "tokens_per_s": round(tokens / seconds, 1), "peak_mib_per_rank": round(max(r["peak_bytes"] for r in reports) / 2**20, 1),
              "row_tokens_per_rank": reports[0]["row_tokens"]}
    if peak_tflops:
        r0 = reports[0]
        # 6 N per token (forward + backward) and causal attention: 6 x 2 x L^2/2 x hidden per layer (q.k and p.v)
        flops = pairs * (6 * r0["params"] * length + 6 * r0["layers"] * length * length * r0["hidden"])
        result["mfu"] = round(flops / seconds / (ranks * peak_tflops * 1e12), 4)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a Hugging Face llama-family folder (default: a tiny 4-head llama, written once)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768], help="tokens per pair")
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak (e.g. 989 for an H100's bf16): reports MFU")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--degree", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _rank_main(args)
    model = args.model
    if model is None:
        from dpo_dist.fixtures.tiny import write_tiny_model

        model = str(Path(tempfile.gettempdir()) / "dpo-dist-bench-sp-model")
        config = Path(model) / "config.json"
        if not config.exists() or json.loads(config.read_text())["max_position_embeddings"] < max(args.lengths):
            write_tiny_model(model, num_heads=4, max_position_embeddings=max(args.lengths), overwrite=True)
    results = []
    print(f"{'tokens/pair':>11} {'degree':>6} {'row/rank':>8} {'tokens/s':>10} {'peak MiB/rank':>13}" + ("  MFU" if args.peak_tflops else ""))
    for length in args.lengths:
        for degree in args.degrees:
            r = run_config(model, length, degree, args.ranks, args.steps, args.threads, args.dtype, args.peak_tflops)
            results.append(r)
            print(f"{length:>11} {degree:>6} {r['row_tokens_per_rank']:>8} {r['tokens_per_s']:>10.1f} {r['peak_mib_per_rank']:>13.1f}"
                  + (f"  {r['mfu']:.3f}" if "mfu" in r else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
