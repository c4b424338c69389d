"""Learning on a real model, side by side with TRL: dpo-dist and TRL 1.16's DPOTrainer on
SmolLM2-135M-Instruct (dpo_dist.fixtures.real_model), the same HH harmless-base pairs split into
train and held-out, LoRA r=16 on every projection, the same lr, beta, batch and epochs, one process
each (TRL with precompute_ref_log_probs), CPU.

    .venv/bin/pip install -e '.[bench]'                                  # TRL (bench-only)
    .venv/bin/python bench/bench_real_model.py [--pairs 1024] [--epochs 1] [--json out.json]
    .venv/bin/python bench/bench_real_model.py --pairs 4 --held-out 2 --max-length 128 --micro 1 --accum 1 --eval-steps 1

Each system runs in a fresh process. Recorded per eval step: held-out reward accuracy and margin of
both; time: dpo-dist's scoring + epoch (optimizer steps only), TRL's precompute (at DPOTrainer's
construction, train and eval pairs) + epoch (train_runtime less its evaluations); peak memory per
phase as the summed PSS of the process tree (Ray's processes included); FLOP/s of scoring and
training as a fraction of this machine's measured matmul peak for the dtype in use
(bench/matmul_peak.py).
--precision fp32 (default where the CPU has no bf16 matrix instructions) or bf16: both systems alike
(TRL's model is loaded in it, and DPOConfig's bf16 follows it; TRL's default would be bf16 on).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare(work: Path, n_pairs: int, held_out: int, max_length: int) -> dict:
    """The first n HH pairs that fit max_length untruncated with this tokenizer, the last `held_out` of them held out."""
    from dpo_dist.core.data import load_pairs
    from dpo_dist.fixtures.real_model import ensure
    from dpo_dist.models import load_tokenizer

    model = ensure()
    tok = load_tokenizer(str(model))
    pairs, _ = load_pairs(str(HH))
    rows = []
    for p in pairs:
        prompt = len(tok(p.prompt)["input_ids"])
        c, r = (len(tok(x)["input_ids"]) + 1 for x in (p.chosen, p.rejected))
        if prompt + max(c, r) <= max_length and prompt <= max_length // 2:
            rows.append({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "tokens": prompt + c + r,
                         "response_tokens": c + r, "lengths": (prompt, c, r)})
        if len(rows) == n_pairs:
            break
    train, held = rows[:len(rows) - held_out], rows[len(rows) - held_out:]
    for name, part in (("train", train), ("eval", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({k: x[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                                    for x in part))
    return {"model": str(model), "train_pairs": len(train), "eval_pairs": len(held),
            "train_tokens": sum(x["tokens"] for x in train), "train_response_tokens": sum(x["response_tokens"] for x in train),
            "all_tokens": sum(x["tokens"] for x in rows), "all_response_tokens": sum(x["response_tokens"] for x in rows),
            "train_attended": sum(attended(*x["lengths"]) for x in train),
            "all_attended": sum(attended(*x["lengths"]) for x in rows)}


def attended(prompt: int, chosen: int, rejected: int) -> int:
    """(query, key) pairs a shared-prompt pair attends to: [prompt; chosen] causal, and each rejected
    token the prompt and the rejected tokens up to itself (the prompt counted once, as computed)."""
    first = prompt + chosen
    return first * (first + 1) // 2 + rejected * prompt + rejected * (rejected + 1) // 2


def attention_flops_per_pair(model_dir: str) -> float:
    """Forward FLOPs of attention per attended (query, key) pair over all layers: QK^T and the
    weighted sum of V, 2 x head_dim each, for every query head."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 4.0 * cfg["num_attention_heads"] * head_dim * cfg["num_hidden_layers"]


def flops_per_token(model_dir: str) -> tuple[float, int, int]:
    """(2 x body params per token forward, params, embedding params) of the model: the dense FLOP count."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    from safetensors import safe_open

    total = emb = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = f.get_slice(k).get_shape()
            size = 1
            for d in n:
                size *= d
            total += size
            if "embed_tokens" in k:
                emb += size
    head = cfg["vocab_size"] * cfg["hidden_size"]  # tied: the head costs as much as a matmul of the embedding
    return 2.0 * (total - emb), total, head


# ----------------------------------------------------------------------------- children

def dd_config(work: Path, a: dict):
    from dpo_dist.config import load_config

    ds = json.loads((REPO / "ds_configs" / "zero0_bf16.json").read_text())
    ds["bf16"] = {"enabled": a["precision"] == "bf16"}
    (work / "ds.json").write_text(json.dumps(ds))
    overrides = [f"model.name_or_path={a['model']}", f"data.train={work / 'train.jsonl'}", f"data.eval={work / 'eval.jsonl'}",
                 f"data.max_length={a['max_length']}", f"data.max_prompt_length={a['max_length'] // 2}",
                 f"cache_dir={work / 'cache'}", "score.cpu_actors=1", f"score.threads_per_actor={a['threads']}",
                 f"output_dir={work / 'dd-run'}", f"train.deepspeed_config={work / 'ds.json'}",
                 "model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=16", f"model.lora.target_modules={TARGETS}",
                 f"train.micro_batch_size={a['micro']}", f"train.gradient_accumulation_steps={a['accum']}",
                 f"train.lr={a['lr']}", f"loss.beta={a['beta']}", f"train.epochs={a['epochs']}", "train.warmup_steps=0",
                 "train.lr_scheduler=linear", f"train.eval_steps={a['eval_steps']}", "train.save_steps=0",
                 "train.sample_prompts=0", "export.enabled=false"]
    return load_config(None, overrides)


def child_dd_score(work: Path, a: dict, memory) -> dict:
    """`dpo-dist score` (its own process, as users run it): Ray, one actor."""
    from dpo_dist.stages.score import run_scoring
    from bench_vs_trl import forward_seconds

    cfg = dd_config(work, a)
    memory.mark("reference")
    started = time.perf_counter()
    run_scoring(cfg)
    return {"score_seconds": time.perf_counter() - started, "score_forward_seconds": forward_seconds(work / "cache")}


def child_dd_train(work: Path, a: dict, memory) -> dict:
    """`dpo-dist train` on one process (its own, as torchrun starts it) over the cache just scored."""
    import torch

    from dpo_dist.stages import train as train_mod
    from bench_vs_trl import _free_port

    cfg = dd_config(work, a)
    memory.mark("train")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.set_num_threads(a["threads"])
    train_mod.train(cfg, overwrite=True)
    final = json.loads((Path(cfg.output_dir) / "final_metrics.json").read_text())
    from helpers import scalars  # tests/helpers.py: TensorBoard scalars

    tb = scalars(Path(cfg.output_dir) / "tb")
    evals = {int(s): {"accuracy": v, "margin": tb["eval/rewards/margins"][s]} for s, v in tb["eval/rewards/accuracies"].items()}
    return {"epoch_seconds": final["step_time"]["seconds"], "steps": final["steps"], "evals": evals}


def child_trl(work: Path, a: dict, memory) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(a["threads"])
    load = lambda name: datasets.Dataset.from_list([json.loads(x) for x in (work / name).read_text().splitlines()])  # noqa: E731
    tok = AutoTokenizer.from_pretrained(a["model"])
    # the model's own precision, as TRL's examples load it (dtype="auto": SmolLM2 is a bf16 release)
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.bfloat16 if a["precision"] == "bf16" else torch.float32)
    args = DPOConfig(output_dir=str(work / "trl-run"), per_device_train_batch_size=a["micro"],
                     per_device_eval_batch_size=a["micro"], gradient_accumulation_steps=a["accum"],
                     learning_rate=a["lr"], num_train_epochs=a["epochs"], max_length=a["max_length"], beta=a["beta"],
                     gradient_checkpointing=False, precompute_ref_log_probs=True,
                     precompute_ref_batch_size=a["micro"] * 4, eval_strategy="steps", eval_steps=a["eval_steps"],
                     logging_steps=a["eval_steps"], save_strategy="no", report_to=[], use_cpu=True,
                     bf16=a["precision"] == "bf16", dataloader_num_workers=0, seed=0, lr_scheduler_type="linear",
                     warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch")
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    memory.mark("reference")
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=load("train.jsonl"), eval_dataset=load("eval.jsonl"),
                         processing_class=tok, peft_config=lora)
    init = time.perf_counter() - started
    memory.mark("train")
    out = trainer.train()
    final_eval = trainer.evaluate()
    history = trainer.state.log_history + [{**final_eval, "step": trainer.state.global_step}]
    evals = {int(h["step"]): {"accuracy": h["eval_rewards/accuracies"], "margin": h["eval_rewards/margins"]}
             for h in history if "eval_rewards/accuracies" in h}
    eval_s = sum(h.get("eval_runtime", 0) for h in trainer.state.log_history)
    return {"precompute_seconds": init, "epoch_seconds": out.metrics["train_runtime"] - eval_s,
            "steps": trainer.state.global_step, "evals": evals}


# ----------------------------------------------------------------------------- parent

def run_child(system: str, work: Path, a: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a["threads"]), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore",
               PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, __file__, "--child", system, "--work", str(work), "--args", json.dumps(a)],
                          env=env, capture_output=True, text=True)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{system} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    from dpo_dist.core.metrics import cpu_multiplies_bf16

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1024, help="HH pairs in all (train + held-out)")
    ap.add_argument("--held-out", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-steps", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if cpu_multiplies_bf16() else "fp32")
    ap.add_argument("--systems", default="dd,trl")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from bench_vs_trl import TreeMemory, peak_rss_gb

        from dpo_dist.quiet import silence_known_noise

        silence_known_noise()
        a = json.loads(args.args)
        memory = TreeMemory()
        child = {"dd-score": child_dd_score, "dd-train": child_dd_train, "trl": child_trl}[args.child]
        out = child(args.work, a, memory)
        out["peak_rss_gb"] = peak_rss_gb()
        out["peak_pss_gb"] = memory.stop()  # per phase: reference pass, training
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    from matmul_peak import peaks

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(work, args.pairs, args.held_out, args.max_length)
    a = {k: getattr(args, k) for k in ("micro", "accum", "lr", "beta", "epochs", "eval_steps", "threads", "precision", "max_length")}
    a["model"] = info["model"]
    peak = peaks(threads=args.threads)["bfloat16" if args.precision == "bf16" else "float32"]
    print(f"[bench] SmolLM2-135M-Instruct, {info['train_pairs']} train / {info['eval_pairs']} held-out HH pairs, "
          f"{info['train_tokens']:,} train tokens, {args.precision}, matmul peak {peak:.0f} GFLOP/s, work {work}", flush=True)
    results = {}
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if system == "dd":  # two processes, as `dpo-dist score` and `dpo-dist train`
            score, train = run_child("dd-score", work, a), run_child("dd-train", work, a)
            results[system] = {**score, **train, "peak_rss_gb": max(score["peak_rss_gb"], train["peak_rss_gb"]),
                               "peak_pss_gb": {"reference": score["peak_pss_gb"]["reference"],
                                               "train": train["peak_pss_gb"]["train"]}}
        else:
            results[system] = run_child(system, work, a)
        print(f"[bench] {system}: {json.dumps(results[system])}", flush=True)
    # measured again after the work, the larger kept: a shared machine can halve one measurement
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    peak_before, peak = peak, max(peak, peaks(threads=args.threads)[dtype])
    if peak > 1.2 * peak_before:
        print(f"[bench] matmul peak measured again after the work: {peak:.0f} GFLOP/s (before: {peak_before:.0f})", flush=True)
    body, _, head = flops_per_token(info["model"])
    attn = attention_flops_per_pair(info["model"])
    lines = ["| system | reference pass s | epoch s | total s | peak memory GB: reference pass | training | "
             "final held-out accuracy | margin |", "|---|---|---|---|---|---|---|---|"]
    for system, r in results.items():
        ref_s = r.get("score_seconds", r.get("precompute_seconds"))
        last = r["evals"][max(r["evals"], key=int)]
        pss = r["peak_pss_gb"]
        lines.append(f"| {system} | {ref_s:.0f} | {r['epoch_seconds']:.0f} | {ref_s + r['epoch_seconds']:.0f} | "
                     f"{pss.get('reference', 0):.2f} | {pss.get('train', 0):.2f} | {last['accuracy']:.3f} | {last['margin']:.3f} |")
    lines.append("(peak memory: the summed PSS of the process and every process below it, Ray's included, per phase)")
    if "dd" in results:
        dd = results["dd"]
        # shared prompt: the body runs once over prompt + chosen + rejected, the head over response tokens only
        score_flops = body * info["all_tokens"] + 2 * head * info["all_response_tokens"] + attn * info["all_attended"]
        # forward time where the cache records it; else the scorer's wall time (Ray and model load included)
        score_s = dd["score_forward_seconds"] or dd["score_seconds"]
        score_what = "" if dd["score_forward_seconds"] else " (end to end: no forward time in the cache manifest)"
        score_frac = score_flops / score_s / (peak * 1e9)
        # LoRA: forward + input gradients through the frozen body and head (2 x forward), attention forward +
        # gradients of Q, K and V (3 x forward); the adapters' own FLOPs are left out
        train_flops = (2 * (body * info["train_tokens"] + 2 * head * info["train_response_tokens"])
                       + 3 * attn * info["train_attended"]) * args.epochs
        train_frac = train_flops / dd["epoch_seconds"] / (peak * 1e9)
        lines.append(f"\ndpo-dist FLOP/s as a fraction of the {args.precision} matmul peak ({peak:.0f} GFLOP/s): "
                     f"scoring {score_frac:.0%}{score_what}, training {train_frac:.0%} (matmul FLOPs of the body and head, "
                     "and of causal attention over the pairs each token attends to, the prompt once per pair; LoRA's left out)")
    if {"dd", "trl"} <= set(results):
        dd, trl = results["dd"], results["trl"]
        ratio = (dd["score_seconds"] + dd["epoch_seconds"]) / (trl["precompute_seconds"] + trl["epoch_seconds"])
        most = lambda r: max(r["peak_pss_gb"].values())  # noqa: E731
        lines.append(f"dpo-dist scoring + epoch = {ratio:.2f}x TRL's precompute + epoch; peak memory {most(dd):.2f} "
                     f"vs {most(trl):.2f} GB")
        lines.append("\n| step | dpo-dist accuracy | margin | TRL accuracy | margin |\n|---|---|---|---|---|")
        for step in sorted(set(map(int, dd["evals"])) | set(map(int, trl["evals"]))):
            d, t = dd["evals"].get(str(step)) or dd["evals"].get(step), trl["evals"].get(str(step)) or trl["evals"].get(step)
            fmt = lambda e: f"{e['accuracy']:.3f} | {e['margin']:.3f}" if e else " | "  # noqa: E731
            lines.append(f"| {step} | {fmt(d)} | {fmt(t)} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "args": a, "peak_gflops": peak, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
