"""dpo-dist against TRL's DPOTrainer on the same work: same model, same HH-RLHF pairs, same
micro-batch, lengths, optimizer (AdamW, lr, no warmup, linear decay) and number of steps; CPU,
float32, one process, whole epochs over the same pairs.

    .venv/bin/pip install -e '.[bench]'          # TRL, bench-only (`make bench` does it)
    .venv/bin/python bench/bench_vs_trl.py --size tiny                  # ~6 min on 2 cores
    .venv/bin/python bench/bench_vs_trl.py --size smol --pairs 16       # SmolLM2-135M shape (186M): ~40 min

Systems, each in a fresh process (peak RSS is that process's), alternating order over --repeats:
  trl-ref / trl-ref-gc   TRL DPOTrainer with its reference model in memory; -gc: gradient checkpointing
                         on (TRL's default), else off
  trl-pre / trl-pre-gc   TRL with precompute_ref_log_probs (the precompute is timed apart, in its init)
  dd-padded              `dpo-dist train` as before issue 11: padded [chosen; rejected] rows, full logits
  dd-packed              packed rows (no padding), fused head
  dd                     the default: shared prompt (computed once per pair), packed, fused head
  dd-zero2               the default with ZeRO-2 instead of ZeRO-3 (one process holds everything anyway)
  dd-zero0               the default with ZeRO stage 0: DeepSpeed's engine around a plain torch AdamW
  dd-gc                  the default with gradient checkpointing
  dd-2proc               the default on 2 processes (torchrun, 1 thread each, same global batch)
  score / score-2        `dpo-dist score` end to end (Ray start, tokenize, forward, shards) with 1 actor
                         of 2 threads / 2 actors of 1 thread
dpo-dist trains in this process as rank 0 of 1 (no torchrun), from the cache `score` wrote.
Figures: epoch seconds (the optimizer steps only: TRL's train_runtime, dpo-dist's step_time), pairs/s,
real tokens/s (prompt counted twice per pair: the work a [chosen; rejected] batch does), peak RSS.
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
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
SIZES = {  # write_tiny_model shapes
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4),  # 3.9M parameters
    "smol": dict(hidden_size=576, num_layers=30, num_heads=9, vocab_size=49152),  # 186M (SmolLM2-135M widths, untied)
}
TRL_SYSTEMS = ["trl-ref", "trl-ref-gc", "trl-pre", "trl-pre-gc"]
# name: (layout, fused head, ZeRO stage, gradient checkpointing, processes)
DD_SYSTEMS = {"dd-padded": ("padded", False, 3, False, 1), "dd-packed": ("packed", True, 3, False, 1),
              "dd": ("shared", True, 3, False, 1), "dd-zero2": ("shared", True, 2, False, 1),
              "dd-zero0": ("shared", True, 0, False, 1),
              "dd-gc": ("shared", True, 3, True, 1), "dd-2proc": ("shared", True, 3, False, 2)}
LR = 1e-5
MAX_LENGTH = 512


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class TreeMemory:
    """Peak memory of this process and every process below it (Ray's GCS, raylet and actors
    included), sampled every `interval` seconds in a thread: the sum of their proportional set sizes
    (PSS: a shared page counts once over all processes), so actors and the driver are not compared
    with one process alone. `mark(name)` starts a phase; `peaks` holds each phase's peak in GB. A sample
    of a few GB of processes reads their page tables for ~40 ms: every 2 s that is 1% of one core
    (every 0.5 s it was 4% of this 2-core machine, taken from the work measured)."""

    def __init__(self, interval: float = 2.0):
        import threading

        import psutil

        self._psutil, self.interval, self.phase, self.peaks = psutil, interval, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> float:
        me = self._psutil.Process()
        total = 0
        for proc in [me] + me.children(recursive=True):
            try:
                total += proc.memory_full_info().pss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                pass
        return total / 2**30

    def _run(self) -> None:
        while not self._stop.is_set():
            gb = self.sample()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), gb)
            self._stop.wait(self.interval)

    def mark(self, phase: str) -> None:
        self.phase = phase

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 3) for k, v in self.peaks.items()}


def rss_gb() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# ----------------------------------------------------------------------------- inputs

def prepare(work: Path, size: str, n_pairs: int) -> dict:
    """The model, the first n HH pairs that fit MAX_LENGTH untruncated (both tokenizations), as jsonl."""
    from dpo_dist.core.data import load_pairs
    from dpo_dist.fixtures.tiny import write_tiny_model
    from dpo_dist.models import load_tokenizer

    model = work / "model"
    if not model.exists():
        write_tiny_model(model, arch="llama", seed=0, **SIZES[size])
    tok = load_tokenizer(model)
    pairs, _ = load_pairs(str(HH))
    chosen, tokens = [], 0
    for p in pairs:
        prompt = len(tok(p.prompt)["input_ids"])
        c, r = (len(tok(x)["input_ids"]) + 1 for x in (p.chosen, p.rejected))
        if prompt + max(c, r) <= MAX_LENGTH - 8 and prompt <= MAX_LENGTH // 2:
            chosen.append({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
            tokens += 2 * prompt + c + r
        if len(chosen) == n_pairs:
            break
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in chosen))
    from dpo_dist.fixtures.tiny import count_parameters

    return {"pairs": len(chosen), "tokens": tokens, "params": count_parameters(model)}


# ----------------------------------------------------------------------------- children

def child_trl(system: str, work: Path, micro: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    args = DPOConfig(output_dir=str(work / f"out-{system}"), per_device_train_batch_size=micro,
                     gradient_accumulation_steps=1, learning_rate=LR, num_train_epochs=1, max_length=MAX_LENGTH,
                     beta=0.1, gradient_checkpointing=system.endswith("-gc"),
                     precompute_ref_log_probs=system.startswith("trl-pre"), precompute_ref_batch_size=micro * 4,
                     logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     dataloader_num_workers=0, seed=0, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                     optim="adamw_torch")
    from transformers import TrainerCallback

    phases: dict = {"model_loaded": rss_gb()}

    class NoteMemory(TrainerCallback):
        def on_step_end(self, *a, **k):
            phases.setdefault("after_steps", []).append(round(rss_gb(), 3))

    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[NoteMemory()])
    init = time.perf_counter() - started
    phases["initialized"] = rss_gb()
    out = trainer.train()
    return {"epoch_seconds": out.metrics["train_runtime"], "init_seconds": init, "steps": trainer.state.global_step,
            "memory": phases}


def forward_seconds(cache: Path) -> float | None:
    """The scoring actors' forward seconds summed over the cache's shards, where its manifest records
    them per shard (`forward_seconds`); None where it does not."""
    manifest = json.loads((cache / "manifest.json").read_text())
    times = [e.get("forward_seconds") for split in manifest["splits"].values() for e in split["shards"].values()]
    return sum(times) if times and None not in times else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(work: Path, micro: int) -> list[str]:
    return [f"model.name_or_path={work / 'model'}", f"data.train={work / 'pairs.jsonl'}", "data.eval_fraction=0",
            f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={MAX_LENGTH // 2}", f"cache_dir={work / 'cache'}",
            "score.cpu_actors=1", "score.threads_per_actor=2", "score.shard_size=64", "score.dtype=float32",
            f"train.micro_batch_size={micro}", "train.gradient_accumulation_steps=1", f"train.lr={LR}",
            "train.epochs=1", "train.warmup_steps=0", "train.sample_prompts=0", "export.enabled=false"]


def child_dd(system: str, work: Path, micro: int) -> dict:
    import torch

    from dpo_dist.config import load_config
    from dpo_dist.stages.train import run as train_mod  # build and one_step are looked up there

    # Memory by phase: resident memory after the engine is built and after each step.
    phases: dict = {"before_build": rss_gb()}
    build, one_step = train_mod.build, train_mod.one_step

    def build_and_note(*a, **k):
        run = build(*a, **k)
        phases["built"] = rss_gb()
        return run

    def step_and_note(*a, **k):
        metrics = one_step(*a, **k)
        phases.setdefault("after_steps", []).append(round(rss_gb(), 3))
        return metrics

    train_mod.build, train_mod.one_step = build_and_note, step_and_note
    layout, fused, stage, gc, procs = DD_SYSTEMS[system]
    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    ds["bf16"] = {"enabled": False}
    ds["zero_optimization"]["stage"] = stage
    if stage != 3:
        ds["zero_optimization"] = {k: v for k, v in ds["zero_optimization"].items() if not k.startswith("stage3_")}
    ds_path = work / f"ds-{system}.json"
    ds_path.write_text(json.dumps(ds))
    overrides = _overrides(work, micro) + [f"output_dir={work / ('run-' + system)}", f"train.deepspeed_config={ds_path}",
                                           f"model.layout={layout}", f"model.fused_head={str(fused).lower()}",
                                           f"model.gradient_checkpointing={str(gc).lower()}", "train.save_steps=0", "train.eval_steps=0"]
    if procs > 1:  # torchrun, one thread per process, the global batch split over the processes
        overrides = [o for o in overrides if not o.startswith("train.micro_batch_size")]
        proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "train", "--overwrite", *overrides,
                               f"train.micro_batch_size={micro // procs}", f"train.num_procs={procs}"],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        cfg = load_config(None, overrides)
        timing = json.loads((Path(cfg.output_dir) / "final_metrics.json").read_text())["step_time"]
        return {"epoch_seconds": timing["seconds"], "steps": timing["steps"], "rss_note": "launcher only"}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = load_config(None, overrides)
    result = train_mod.train(cfg, overwrite=True)
    timing = json.loads((Path(cfg.output_dir) / "final_metrics.json").read_text())["step_time"]
    return {"epoch_seconds": timing["seconds"], "steps": result.steps, "memory": phases}


def child_score(work: Path, micro: int, actors: int = 1) -> dict:
    import shutil

    from dpo_dist.config import load_config
    from dpo_dist.stages.score import run_scoring

    cache = work / ("cache" if actors == 1 else f"cache-{actors}")
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    overrides = _overrides(work, micro) + [f"cache_dir={cache}", f"score.cpu_actors={actors}", f"score.threads_per_actor={2 // actors}"]
    run_scoring(load_config(None, overrides))
    total = time.perf_counter() - started
    return {"epoch_seconds": total, "forward_seconds": forward_seconds(cache)}


# ----------------------------------------------------------------------------- parent

def run_child(system: str, work: Path, micro: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, __file__, "--child", system, "--work", str(work), "--micro", str(micro)],
                          env=env, capture_output=True, text=True)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{system} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--pairs", type=int, default=256, help="pairs in the epoch (a multiple of --micro)")
    ap.add_argument("--micro", type=int, default=4, help="pairs per step (micro-batch; no accumulation)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the systems, alternating their order")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--systems", default=",".join(["score", "score-2", *TRL_SYSTEMS, *DD_SYSTEMS]))
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from dpo_dist.quiet import silence_known_noise

        silence_known_noise()
        fn = {"score": lambda: child_score(args.work, args.micro),
              "score-2": lambda: child_score(args.work, args.micro, actors=2)}.get(args.child)
        if fn is None:
            fn = (lambda: child_trl(args.child, args.work, args.micro)) if args.child.startswith("trl") else (
                lambda: child_dd(args.child, args.work, args.micro))
        out = fn()
        out["peak_rss_gb"] = peak_rss_gb()
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    if not HH.exists():
        raise SystemExit(f"{HH}: HH-RLHF test file not found (../shared/data)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(work, args.size, args.pairs - args.pairs % args.micro)
    print(f"[bench] {args.size}: {info['params']:,} parameters, {info['pairs']} HH pairs, {info['tokens']:,} tokens "
          f"per epoch, micro-batch {args.micro}, {args.threads} threads, work {work}", flush=True)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if "score" in systems:  # dpo-dist trains from the cache it writes
        systems = ["score"] + [s for s in systems if s != "score"]
    results: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        order = systems if r % 2 == 0 else systems[:1] + systems[:0:-1]
        for system in order:
            res = run_child(system, work, args.micro, args.threads)
            results.setdefault(system, []).append(res)
            print(f"[bench] round {r + 1}: {system:11s} {res['epoch_seconds']:8.1f} s  peak RSS {res['peak_rss_gb']:.2f} GB"
                  + (f"  (init {res['init_seconds']:.1f} s)" if "init_seconds" in res else ""), flush=True)
    table = summarize(results, info)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))
    return 0


def summarize(results: dict, info: dict) -> str:
    def best(system: str, key: str) -> float:
        return min(r[key] for r in results[system])

    base = next((s for s in ("trl-ref-gc", "trl-ref") if s in results), None)
    pre = "trl-pre" if "trl-pre" in results else None
    lines = ["| system | epoch s (best) | pairs/s | tokens/s | peak RSS GB | vs TRL default | vs TRL precompute (gc off) |",
             "|---|---|---|---|---|---|---|"]
    for system in results:
        sec = best(system, "epoch_seconds")
        rss = max(r["peak_rss_gb"] for r in results[system])
        trains = not system.startswith("score")
        vs_base = f"{best(base, 'epoch_seconds') / sec:.2f}x" if base and trains else ""
        vs_pre = f"{best(pre, 'epoch_seconds') / sec:.2f}x" if pre and trains else ""
        if "rss_note" in results[system][0]:
            rss = float("nan")
        extra = ""
        if system == "trl-pre" or system == "trl-pre-gc":
            extra = f" (+{best(system, 'init_seconds'):.0f} s precompute)"
        lines.append(f"| {system}{extra} | {sec:.1f} | {info['pairs'] / sec:.2f} | {info['tokens'] / sec:,.0f} | {rss:.2f} | {vs_base} | {vs_pre} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
