"""Scored pairs reused when the data grows: score a fraction of the HH file, then all of it into the
same cache, against scoring all of it at once into a fresh cache; same model, same Ray set-up.

    .venv/bin/python bench/bench_score_reuse.py                  # SmolLM2-135M, 2,312 HH pairs, ~8 min on 2 cores
    .venv/bin/python bench/bench_score_reuse.py --model M --pairs 24 --shard-size 8   # smallest (tests)

Prints the pairs each run sent to the reference model, its wall time (Ray start and actor load
included: each run is a `run_scoring` call), and compares the two caches pair by pair: token ids
and the float32 bytes of ref_chosen_logps / ref_rejected_logps, and the shards' sha256.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def rows_by_id(cache: Path) -> dict[str, dict]:
    from dpo_dist.core.cache import SPLITS, load_manifest, shard_table

    manifest, out = load_manifest(cache), {}
    for split in SPLITS:
        for entry in manifest.shard_entries(split):
            for row in shard_table(cache, split, entry, check=True).to_pylist():
                out[row["id"]] = {**row, "split": split}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the real SmolLM2-135M-Instruct)")
    ap.add_argument("--hh", default=str(HH))
    ap.add_argument("--pairs", type=int, default=None, help="pairs of the HH file (default: all)")
    ap.add_argument("--fraction", type=float, default=0.1, help="the first run scores this fraction of the pairs")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the caches here (default: a temporary folder)")
    args = ap.parse_args()

    from dpo_dist.config import load_config
    from dpo_dist.fixtures import real_model
    from dpo_dist.stages.score import run_scoring

    model = args.model or str(real_model.ensure(real_model.model_dir()))
    total = args.pairs or sum(1 for _ in __import__("gzip").open(args.hh, "rt"))
    small = max(1, int(total * args.fraction))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="reuse-bench-"))

    def score(cache: Path, pairs: int):
        cfg = load_config(None, [f"model.name_or_path={model}", f"data.train={args.hh}", "data.format=hh",
                                 f"data.max_samples={pairs}", "data.eval_fraction=0.05", f"cache_dir={cache}",
                                 f"output_dir={root / 'run'}", f"score.shard_size={args.shard_size}",
                                 f"score.cpu_actors={args.actors}", "score.threads_per_actor=1",
                                 f"score.dtype={args.dtype}", f"data.max_length={args.max_length}",
                                 f"data.max_prompt_length={args.max_length // 2}"])
        start = time.perf_counter()
        result = run_scoring(cfg)
        return result, time.perf_counter() - start

    fresh, t_fresh = score(root / "fresh", total)
    first, t_first = score(root / "grown", small)
    grown, t_grown = score(root / "grown", total)

    a, b = rows_by_id(root / "fresh"), rows_by_id(root / "grown")
    import struct

    def value_bytes(row):
        return struct.pack("<ff", row["ref_chosen_logps"], row["ref_rejected_logps"])

    same_values = sum(value_bytes(a[k]) == value_bytes(b[k]) for k in a if k in b)
    same_rows = sum(a[k] == b[k] for k in a if k in b)
    from dpo_dist.core.cache import load_manifest

    def hashes(cache):
        m = load_manifest(cache)
        return {(s, e["name"]): e["sha256"] for s in ("train", "eval") for e in m.shard_entries(s)}

    print(f"\n## Reuse of scored pairs: {total} pairs of {Path(args.hh).name}, first {small} then all; "
          f"{Path(model).name}, {args.dtype}, {args.actors} CPU actors, shards of {args.shard_size}\n")
    print("| run | pairs | scored | reused or kept | wall s |")
    print("|---|---|---|---|---|")
    print(f"| fresh cache, all pairs | {fresh.pairs:,} | {fresh.scored_pairs:,} | 0 | {t_fresh:.1f} |")
    print(f"| first {args.fraction:.0%} | {first.pairs:,} | {first.scored_pairs:,} | 0 | {t_first:.1f} |")
    print(f"| then all, same cache | {grown.pairs:,} | {grown.scored_pairs:,} | {grown.pairs - grown.scored_pairs:,} | {t_grown:.1f} |")
    print(f"\nscored in the grown run: {grown.scored_pairs / grown.pairs:.1%} of the pairs; time {t_grown / t_fresh:.2f}x the fresh run")
    print(f"pairs with identical value bytes: {same_values} of {len(a)}; identical rows (ids, tokens, values, flags): {same_rows} of {len(a)}")
    print(f"shards with identical sha256: {sum(h in set(hashes(root / 'fresh').values()) for h in hashes(root / 'grown').values())} "
          f"of {len(hashes(root / 'fresh'))}")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    if same_values != len(a) or len(a) != len(b) or grown.scored_pairs != fresh.pairs - first.pairs:
        sys.exit("the grown cache differs from the fresh one")


if __name__ == "__main__":
    main()
