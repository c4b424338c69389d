"""How reference scoring and training start-up scale with the number of preference pairs: the same
tiny model and generated data, cut at each size; every figure comes from a fresh `dpo-dist` process.

    .venv/bin/python bench/bench_scale.py                                # 20,000 and 200,000 pairs
    .venv/bin/python bench/bench_scale.py --sizes 500,2000 --json /tmp/scale.json   # quick check
    .venv/bin/python bench/bench_scale.py --sizes 40 --repeats 1 --no-warmup --extensions-dir .cache/torch_extensions  # smallest

Inputs, built once in --work (default a temporary folder): a llama of hidden size 32, 1 layer, 2 heads
(`write_tiny_model`, seed 0) and `write_synthetic_pairs(n=largest size, seed=1)`; each size takes the
first N pairs of that file (`data.max_samples=N`, 1% held out for eval by id hash). dpo-dist drops
and counts duplicate pairs: the table shows the pairs it kept (train + eval) as its cache reports them.
Remembered data hashes go to --work/memo (DPO_DIST_CACHE), so no size profits from an earlier run.
DeepSpeed's JIT-built comm op goes to --work/torch_extensions (--extensions-dir), built by one
unmeasured warm-up `train` run before the timed ones: a shared folder is rebuilt (and locked) by any
other process that loads the op with other flags, which would land in the start-up time.

Per size, in this order:
  score   `dpo-dist score` into --work/cache-N (1 CPU actor). Polled every 0.2 s with psutil: the
          peak RSS of the driver (the `dpo-dist` process itself) and of the scoring actor (a
          descendant whose command line holds "RefScorer"; the largest of them if several), each the
          larger of the polled RSS and the kernel's high-water mark (VmHWM). Wall time is the whole
          process; tokens and tok/s are from its `scored ... tokens in ...s (... tok/s)` line.
  train   `dpo-dist train` from that cache: one process, ZeRO stage 0, 1 step of micro-batch 4, no
          export, no samples. Start-up = seconds from the process start to the rank's "step-0 identity"
          line (printed in the first step's forward, after the cache is read and the engine built);
          the wall time of the whole run (it also saves a checkpoint and evaluates the held-out 1%,
          which grows with N) is shown apart. Peak RSS is the rank's (the descendant named
          dpo-rank-0 by launchers/train_dpo.py). Each size is trained --repeats
          times (default 3, sizes alternating): the median times and the largest peak are shown.
Scoring runs for every size first, then the warm-up, then training for every size. The load
average during each run is recorded (the machine may be shared: it moves wall times, not memory).
Then a table per size and a table of largest / smallest size ratios. Goals checked: driver and actor
peak RSS at the largest size within 1.2x of the smallest's; training start-up time and rank memory
flat in the cache size (also judged against 1.2x here).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DPO_DIST = Path(sys.executable).with_name("dpo-dist")
DS_CONFIG = REPO / "ds_configs/zero0_bf16.json"
MODEL_SHAPE = dict(hidden_size=32, num_layers=1, num_heads=2)
POLL_S = 0.2
GOAL_RATIO = 1.2
GB = 2**30
SCORED_LINE = re.compile(r"scored (\d+) shards.*?([\d,]+) tokens in ([\d.]+)s \(([\d,]+) tok/s\)")


# ----------------------------------------------------------------------------- inputs

def prepare(work: Path, max_size: int) -> tuple[Path, Path]:
    """The tiny model and the pairs file (largest size), reused when already in `work`."""
    from dpo_dist.fixtures.synthetic import write_synthetic_pairs
    from dpo_dist.fixtures.tiny import write_tiny_model

    model, data = work / "model", work / f"pairs-{max_size}.jsonl"
    if not (model / "model.safetensors").exists():
        write_tiny_model(model, arch="llama", seed=0, overwrite=True, **MODEL_SHAPE)
    if not data.exists():
        write_synthetic_pairs(data, n=max_size, seed=1)
    return model, data


def overrides(work: Path, model: Path, data: Path, n: int, threads: int) -> list[str]:
    """What `score` and `train` share: model, data cut at n pairs, lengths, cache and run folder."""
    return [f"model.name_or_path={model}", f"data.train={data}", f"data.max_samples={n}", "data.eval_fraction=0.01",
            "data.max_length=128", "data.max_prompt_length=64", f"cache_dir={work / f'cache-{n}'}",
            f"output_dir={work / f'run-{n}'}", "score.cpu_actors=1", f"score.threads_per_actor={threads}"]


# ----------------------------------------------------------------------------- watching a process tree

def high_water_gb(proc) -> float:
    """The larger of a process's RSS now and its kernel-recorded peak (VmHWM), in GB."""
    rss = proc.memory_info().rss
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = max(rss, int(line.split()[1]) * 1024)
    except OSError:
        pass
    return rss / GB


class Watch:
    """Runs a command; records the time each stdout/stderr marker first appears and, every POLL_S,
    the peak memory of the process and of its descendants, by the role `classify(name, cmdline)` gives them."""

    def __init__(self, cmd: list[str], env: dict, log: Path, markers: dict[str, str], classify):
        self.cmd, self.env, self.log, self.markers, self.classify = cmd, env, log, markers, classify
        self.seen: dict[str, float] = {}  # marker -> seconds after start
        self.peaks: dict[str, float] = {}  # role -> GB (max over that role's processes)
        self.names: set[str] = set()  # command names of descendants seen
        self.text: list[str] = []

    def _read(self, stream, started: float, lock: threading.Lock) -> None:
        """Read a stream in chunks (tqdm ends lines with \\r), note markers as they arrive."""
        pending = ""
        for chunk in iter(lambda: stream.read1(4096), b""):
            now = time.perf_counter() - started
            with lock:
                text = chunk.decode(errors="replace")
                self.text.append(text)
                pending = (pending + text)[-4096:]
                for name, pattern in self.markers.items():
                    if name not in self.seen and re.search(pattern, pending):
                        self.seen[name] = now

    def run(self) -> tuple[int, float]:
        """(exit code, wall seconds)."""
        import psutil

        started = time.perf_counter()
        proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lock = threading.Lock()
        readers = [threading.Thread(target=self._read, args=(s, started, lock), daemon=True)
                   for s in (proc.stdout, proc.stderr)]
        for r in readers:
            r.start()
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            self._sample(root, psutil)
            time.sleep(POLL_S)
        wall = time.perf_counter() - started
        for r in readers:
            r.join()
        self.log.write_text("".join(self.text))
        return proc.returncode, wall

    def _sample(self, root, psutil) -> None:
        try:
            procs = [("driver", root)] + [(None, c) for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for role, p in procs:
            try:
                cmdline = " ".join(p.cmdline())
                if role is None:
                    self.names.add(process_name(p.name(), cmdline))
                    role = self.classify(p.name(), cmdline)
                if role:
                    self.peaks[role] = max(self.peaks.get(role, 0.0), high_water_gb(p))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue


def process_name(name: str, cmdline: str) -> str:
    """"ray::RefScorer.score" for Ray workers (their title), else the name and the script it runs."""
    if cmdline.startswith("ray::"):
        return cmdline.split(" ")[0]
    args = cmdline.split(" ")[1:] if name.startswith("python") else []
    script = next((Path(a).name for a in args if a.endswith(".py")), None)
    return f"{name} ({script})" if script else name


def is_scoring_actor(name: str, cmdline: str) -> str | None:
    return "actor" if "RefScorer" in cmdline else None


def is_training_rank(name: str, cmdline: str) -> str | None:
    return "rank" if name.startswith("dpo-rank-") else None  # launchers/train_dpo.py names its process


# ----------------------------------------------------------------------------- the two stages

def score(work: Path, env: dict, args_common: list[str], n: int) -> dict:
    watch = Watch([str(DPO_DIST), "score", *args_common], env, work / f"score-{n}.log", {}, is_scoring_actor)
    load = os.getloadavg()[0]
    code, wall = watch.run()
    out = "".join(watch.text)
    if code != 0:
        raise SystemExit(f"dpo-dist score ({n} pairs) failed with exit {code}; log {watch.log}:\n{out[-3000:]}")
    match = SCORED_LINE.search(out)
    reports = {}
    for split in ("train", "eval"):  # `train: {...}` lines: the manifest's per-split report
        line = re.search(rf"^{split}: (\{{.*\}})$", out, re.M)
        reports[split] = ast.literal_eval(line.group(1)) if line else {}
    dropped = {}
    for r in reports.values():
        for reason, count in r.get("source", {}).get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + count
    return {"wall_s": wall, "summary": match.group(0) if match else None,
            "tokens": int(match.group(2).replace(",", "")) if match else None,
            "tok_s": int(match.group(4).replace(",", "")) if match else None,
            "train_pairs": reports["train"].get("pairs"), "eval_pairs": reports["eval"].get("pairs"),
            "kept": sum(r.get("pairs", 0) for r in reports.values()), "dropped": dropped,
            "driver_gb": watch.peaks.get("driver"), "actor_gb": watch.peaks.get("actor"),
            "processes": sorted(watch.names), "load_before": load, "load_after": os.getloadavg()[0]}


def op_builds(env: dict) -> int:
    """Compile steps ninja has logged in the extensions folder (grows when an op is rebuilt)."""
    logs = Path(env["TORCH_EXTENSIONS_DIR"]).glob("*/.ninja_log")
    return sum(len(p.read_text().splitlines()) - 1 for p in logs)


def train(work: Path, env: dict, args_common: list[str], label) -> dict:
    cmd = [str(DPO_DIST), "train", *args_common, "train.num_procs=1", f"train.deepspeed_config={DS_CONFIG}",
           "train.max_steps=1", "train.micro_batch_size=4", "train.save_steps=0", "train.eval_steps=0",
           "export.enabled=false", "train.sample_prompts=0"]
    markers = {"step0": r"step-0 identity", "step1": r"training: 100%\|[^\r\n]*1/1", "announce": r"\[dpo-dist\] world "}
    watch = Watch(cmd, env, work / f"train-{label}.log", markers, is_training_rank)
    builds, load = op_builds(env), os.getloadavg()[0]
    code, wall = watch.run()
    if code != 0:
        raise SystemExit(f"dpo-dist train ({label}) failed with exit {code}; log {watch.log}:\n{''.join(watch.text)[-3000:]}")
    return {"wall_s": wall, "startup_s": watch.seen.get("step0"), "announce_s": watch.seen.get("announce"),
            "step1_s": watch.seen.get("step1"), "rank_gb": watch.peaks.get("rank"), "driver_gb": watch.peaks.get("driver"),
            "op_rebuilt": op_builds(env) != builds, "load_before": load, "load_after": os.getloadavg()[0]}


def with_output(args_common: list[str], out: Path) -> list[str]:
    """The same overrides with another run folder (a finished run is refused without --resume)."""
    return [x for x in args_common if not x.startswith("output_dir=")] + [f"output_dir={out}"]


# ----------------------------------------------------------------------------- tables

def median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}"


def tables(results: list[dict]) -> str:
    lines = ["| size | kept pairs (train + eval) | scoring wall s | tokens/s | driver peak RSS GB | actor peak RSS GB "
             "| training start-up s (median) | train wall s (median) | rank peak RSS GB (max) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, t = r["score"], r["train"]
        lines.append(f"| {r['size']:,} | {s['kept']:,} ({s['train_pairs']:,} + {s['eval_pairs']:,}) | {fmt(s['wall_s'], 1)} "
                     f"| {fmt(s['tok_s'])} | {fmt(s['driver_gb'], 3)} | {fmt(s['actor_gb'], 3)} | {fmt(t['startup_s'], 1)} "
                     f"| {fmt(t['wall_s'], 1)} | {fmt(t['rank_gb'], 3)} |")
    small, large = results[0], results[-1]
    lines += ["", f"Ratios, {large['size']:,} / {small['size']:,} pairs (goal: <= {GOAL_RATIO}x):", "",
              "| figure | smallest | largest | ratio | goal met |", "|---|---|---|---|---|"]
    for name, stage, key in (("driver peak RSS", "score", "driver_gb"), ("actor peak RSS", "score", "actor_gb"),
                             ("training start-up time", "train", "startup_s"), ("rank peak RSS", "train", "rank_gb")):
        a, b = small[stage][key], large[stage][key]
        ratio = b / a if a and b is not None else None
        met = "n/a" if ratio is None else ("yes" if ratio <= GOAL_RATIO else "NO")
        lines.append(f"| {name} | {fmt(a, 3)} | {fmt(b, 3)} | {fmt(ratio)}x | {met} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,200000", help="comma-separated pair counts (default: 20000,200000)")
    ap.add_argument("--work", help="working folder (default: a new temporary folder, kept)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the scoring actor (default: 1)")
    ap.add_argument("--repeats", type=int, default=3, help="training runs per size; the median time and the "
                    "largest peak are shown (default: 3)")
    ap.add_argument("--extensions-dir", help="TORCH_EXTENSIONS_DIR of the runs (default: WORK/torch_extensions)")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one unmeasured train run first, which builds DeepSpeed's op (--no-warmup: an --extensions-dir "
                    "that holds it already)")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "DPO_DIST_CACHE": str(work / "memo"), "TORCH_EXTENSIONS_DIR": args.extensions_dir or str(work / "torch_extensions")}
    began = time.perf_counter()
    print(f"work folder {work}; sizes {sizes}", flush=True)
    model, data = prepare(work, sizes[-1])
    print(f"inputs ready in {time.perf_counter() - began:.1f}s: {model}, {data}", flush=True)
    results = []
    for n in sizes:
        s = score(work, env, overrides(work, model, data, n, args.threads), n)
        print(f"[{n}] score: {s['wall_s']:.1f}s, kept {s['kept']} ({s['train_pairs']} train + {s['eval_pairs']} eval), "
              f"dropped {s['dropped'] or 'none'}, driver {fmt(s['driver_gb'], 3)} GB, actor {fmt(s['actor_gb'], 3)} GB, "
              f"load {s['load_before']:.1f} -> {s['load_after']:.1f}", flush=True)
        print(f"[{n}]   {s['summary']}", flush=True)
        print(f"[{n}]   processes seen under the driver: {', '.join(s['processes'])}", flush=True)
        results.append({"size": n, "score": s})
    if args.warmup:
        warm = with_output(overrides(work, model, data, sizes[0], args.threads), work / "run-warmup")
        t = train(work, env, warm, "warmup")
        print(f"warm-up train: wall {t['wall_s']:.1f}s (op built: {t['op_rebuilt']})", flush=True)
    for rep in range(args.repeats):  # sizes in turn, the order reversed every other round
        for r in results if rep % 2 == 0 else results[::-1]:
            n = r["size"]
            common = with_output(overrides(work, model, data, n, args.threads), work / f"run-{n}-{rep}")
            t = train(work, env, common, f"{n}-{rep}")
            r.setdefault("train_runs", []).append(t)
            print(f"[{n}] train #{rep + 1}: start-up {fmt(t['startup_s'], 1)}s (announce {fmt(t['announce_s'], 1)}s, 1/1 at "
                  f"{fmt(t['step1_s'], 1)}s), wall {t['wall_s']:.1f}s, rank {fmt(t['rank_gb'], 3)} GB, load "
                  f"{t['load_before']:.1f} -> {t['load_after']:.1f}" + (", DeepSpeed op REBUILT during it" if t["op_rebuilt"] else ""),
                  flush=True)
    for r in results:
        runs = r["train_runs"]
        r["train"] = {"startup_s": median([t["startup_s"] for t in runs]), "wall_s": median([t["wall_s"] for t in runs]),
                      "rank_gb": max(t["rank_gb"] for t in runs)}
    total = time.perf_counter() - began
    print("\n" + tables(results) + f"\n\ntotal {total:.0f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "work": str(work), "total_s": total,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
