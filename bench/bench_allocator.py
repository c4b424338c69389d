"""glibc's default malloc against engines.allocator.keep_freed_memory: tokens/s and kernel (system) time
of the scoring forward and of a LoRA step with segment attention, each setting in its own process.

    .venv/bin/python bench/bench_allocator.py                       # SmolLM2-135M-Instruct, HH pairs, ~8 min
    .venv/bin/python bench/bench_allocator.py --model DIR --pairs 8 --micro 2 --repeats 1 --dtype float32   # smallest

Each child loads the model, runs one warm-up pass and then `--passes` passes of the work, and reports
its best pass's tokens/s and the system seconds per 100 s of its passes (getrusage). The two settings
alternate `--repeats` times (a shared machine drifts); the best of each is kept.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def child(args) -> dict:
    if args.child == "kept":
        from dpo_dist.engines.allocator import keep_freed_memory

        assert keep_freed_memory(), "no glibc here"
    from bench_segments import load_work

    w = load_work(args)
    out = {}
    for name, run in (("scoring forward", w.score_pass), ("LoRA training step", w.train_pass)):
        run(True)  # warm-up
        best, sys0, wall0 = 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        for _ in range(args.passes):
            seconds, real, _ = run(True)
            best = max(best, real / seconds)
        sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0
        out[name] = {"tokens_per_s": best, "sys_per_100s": 100 * sys_s / (time.perf_counter() - wall0)}
    return out


def main(argv=None) -> int:
    from bench_segments import work_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    work_args(ap)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--child", choices=("glibc", "kept"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    passed = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    best: dict[str, dict] = {"glibc": {}, "kept": {}}
    for _ in range(args.repeats):
        for setting in ("glibc", "kept"):
            done = subprocess.run([sys.executable, __file__, *passed, "--child", setting], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"child {setting} failed:\n{done.stderr[-3000:]}")
            result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
            for work, r in result.items():
                if work not in best[setting] or r["tokens_per_s"] > best[setting][work]["tokens_per_s"]:
                    best[setting][work] = r
    table = ["| work | glibc default tokens/s | system s per 100 s | kept freed memory tokens/s | system s per 100 s | speed-up |",
             "|---|---|---|---|---|---|"]
    for work in best["glibc"]:
        g, k = best["glibc"][work], best["kept"][work]
        table.append(f"| {work} | {g['tokens_per_s']:,.0f} | {g['sys_per_100s']:.1f} | {k['tokens_per_s']:,.0f} | "
                     f"{k['sys_per_100s']:.1f} | {k['tokens_per_s'] / g['tokens_per_s']:.2f}x |")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
