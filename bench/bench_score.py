"""Reference scoring: throughput of `run_scoring` (Ray) against a plain in-process forward loop,
and padding efficiency of the batching, on the HH-RLHF harmless-base test file.

    .venv/bin/python bench/bench_score.py                      # ~5 min on a quiet 2-core CPU
    .venv/bin/python bench/bench_score.py --hidden-size 128 --layers 2 --max-samples 800   # quicker
    .venv/bin/python bench/bench_score.py --hidden-size 64 --layers 2 --max-samples 48 --shard-size 16  # smallest (tests)

What is timed (both sides exclude Ray start-up, actor start and model load):
- scorer: `run_scoring` with 1 CPU actor of `--threads` torch threads, end to end through the driver
  (tokenize in the actor, length batching, forward, rows back over Ray, Arrow shard write + fsync,
  manifest). The first shard carries actor start and model load, so the clock runs from the moment
  shard 0 is written to the moment the last one is: tokens of shards 1..N-1 over that time.
- plain loop: the same model and dtype in this process, same torch threads, over the same pairs of
  shards 1..N-1 (pre-tokenized, batches built before the clock starts), the same length batches
  under the same token budget; only forward + log-probs are timed. It runs before and after the scorer and the mean is the
  reference (the machine may be shared). "plain loop + tokenization" adds the time to tokenize them.
The scorer runs with `model.layout=padded model.fused_head=false`, the layout and head of the plain
loop, so both do the same work on the same batches (the default shared layout and fused head are
measured by bench_vs_trl.py's `score` systems).
Tokens are real (attention-mask) tokens. Padding efficiency = real / padded tokens.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def pair_batches_in_order(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Batches in source order under the same budget: (pairs x 2 rows x longest) <= budget."""
    batches, current, width = [], [], 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * 2 * max(width, n) > token_budget:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, n)
    return batches + ([current] if current else [])


def padding_table(tokenized, shard_size: int, token_budget: int) -> list[tuple[str, float]]:
    """Real / padded tokens of the concatenated forward batches, per batching scheme, within shards."""
    from dpo_dist.core.batching import length_batches

    totals = {"pairs, source order": [0, 0], "pairs, length-sorted": [0, 0], "sequences, length-sorted (scorer)": [0, 0]}
    for start in range(0, len(tokenized), shard_size):
        shard = tokenized[start : start + shard_size]
        p = [len(t.prompt_input_ids) for t in shard]
        rows = [(p[i] + len(t.chosen_input_ids), p[i] + len(t.rejected_input_ids)) for i, t in enumerate(shard)]
        pair_len = [max(r) for r in rows]
        for name, batches in (("pairs, source order", pair_batches_in_order(pair_len, token_budget)),
                              ("pairs, length-sorted", length_batches(pair_len, token_budget))):
            totals[name][0] += sum(sum(rows[i]) for b in batches for i in b)
            totals[name][1] += sum(2 * len(b) * max(pair_len[i] for i in b) for b in batches)
        seq_len = [n for r in rows for n in r]
        for b in length_batches(seq_len, token_budget, rows_per_item=1):
            totals["sequences, length-sorted (scorer)"][0] += sum(seq_len[i] for i in b)
            totals["sequences, length-sorted (scorer)"][1] += len(b) * max(seq_len[i] for i in b)
    return [(name, real / padded) for name, (real, padded) in totals.items()]


def plain_loop(model_dir: Path, rows: list[dict], token_budget: int, threads: int, pairs_together: bool,
               shard_size: int) -> tuple[int, int, float]:
    """(real tokens, padded tokens, seconds) of a batched forward over `rows`, length-batched within shards like the scorer."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_dist.core.batching import length_batches
    from dpo_dist.core.logps import concat_batch, concatenated_forward, sequence_batch

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    pad = model.config.pad_token_id
    batches = []
    for start in range(0, len(rows), shard_size):
        shard = rows[start : start + shard_size]
        if pairs_together:
            lengths = [len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in shard]
            batches += [concat_batch([shard[i] for i in b], pad) for b in length_batches(lengths, token_budget)]
        else:
            seqs = [(r["prompt_input_ids"], r[k]) for r in shard for k in ("chosen_input_ids", "rejected_input_ids")]
            lengths = [len(p) + len(s) for p, s in seqs]
            batches += [sequence_batch([seqs[i] for i in b], pad) for b in length_batches(lengths, token_budget, rows_per_item=1)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    with torch.inference_mode():
        concatenated_forward(model, batches[-1])  # warm-up (the scorer's warm-up is its first shard)
        start = time.perf_counter()
        for batch in batches:
            concatenated_forward(model, batch)
        return tokens, padded, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hh", default=str(HH), help="HH-RLHF jsonl.gz file")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the actor and of the plain loop")
    args = parser.parse_args()
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("RAY_AUTH_MODE", "disabled")):
        os.environ.setdefault(k, v)

    import ray
    from transformers import AutoTokenizer

    from dpo_dist.core import cache as cache_mod
    from dpo_dist.config import load_config
    from dpo_dist.core.data import iter_pairs
    from dpo_dist.stages.score import run_scoring
    from dpo_dist.fixtures.tiny import count_parameters, write_tiny_model
    from dpo_dist.core.tokenize import tokenize_pair

    work = Path(tempfile.mkdtemp(prefix="bench_score."))
    atexit.register(shutil.rmtree, work, True)
    model_dir = write_tiny_model(work / "model", hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")
    print(f"model: llama hidden {args.hidden_size}, {args.layers} layers, {count_parameters(model_dir):,} parameters, float32")

    # Padding efficiency on the HH length distribution (tokenization only, no model).
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = list(iter_pairs(args.hh, max_samples=args.max_samples))
    tokenized = [tokenize_pair(tokenizer, p, max_length=args.max_length, max_prompt_length=args.max_prompt_length) for p in pairs]
    print(f"\npadding efficiency (real / padded tokens), {len(tokenized)} HH pairs, max_length {args.max_length}, "
          f"token budget {args.token_budget}, length batching within shards of {args.shard_size}:")
    for name, eff in padding_table(tokenized, args.shard_size, args.token_budget):
        print(f"  {name:<36} {eff:.3f}")

    # Timed pairs: shards 1..N-1 (no eval split, so shard k holds pairs [k*size, (k+1)*size)).
    rows = [asdict(t) for t in tokenized[args.shard_size:]]
    start = time.perf_counter()
    for p in pairs[args.shard_size:]:
        tokenize_pair(tokenizer, p, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    tokenize_seconds = time.perf_counter() - start

    # Plain loop before and after the scorer: their mean cancels slow drift of a shared machine's load.
    plain_tokens, plain_padded, plain_before = plain_loop(model_dir, rows, args.token_budget, args.threads, pairs_together=False, shard_size=args.shard_size)

    # The scorer: embedded Ray started here (not timed), 1 actor.
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    written: list[tuple[str, float]] = []
    real_write = cache_mod.write_shard

    def timed_write(location, split, index, rows):
        entry = real_write(location, split, index, rows)
        written.append((entry["name"], time.perf_counter()))
        return entry

    cache_mod.write_shard = timed_write
    cache = work / "cache"
    overrides = [f"model.name_or_path={model_dir}", f"data.train={args.hh}", f"cache_dir={cache}",
                 f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_prompt_length}",
                 f"score.shard_size={args.shard_size}", f"score.token_budget={args.token_budget}",
                 "score.cpu_actors=1", f"score.threads_per_actor={args.threads}", "score.dtype=float32",
                 "model.layout=padded", "model.fused_head=false"]
    if args.max_samples:
        overrides.append(f"data.max_samples={args.max_samples}")
    result = run_scoring(load_config(None, overrides))
    cache_mod.write_shard = real_write
    ray.shutdown()
    manifest = cache_mod.load_manifest(cache)
    entries = {e["name"]: e for e in manifest.shard_entries("train")}
    assert len(written) >= 2, "need at least 2 shards (one is the warm-up)"
    assert [cache_mod.shard_index(name)[0] for name, _ in written] == list(range(len(written)))
    scorer_tokens = sum(entries[name]["real_tokens"] for name, _ in written[1:])
    scorer_seconds = written[-1][1] - written[0][1]

    _, _, plain_after = plain_loop(model_dir, rows, args.token_budget, args.threads, pairs_together=False, shard_size=args.shard_size)
    pair_tokens, _, pair_seconds = plain_loop(model_dir, rows, args.token_budget, args.threads, pairs_together=True, shard_size=args.shard_size)
    assert plain_tokens == scorer_tokens == pair_tokens, (plain_tokens, scorer_tokens, pair_tokens)
    scorer_padded = sum(entries[name]["padded_tokens"] for name, _ in written[1:])
    assert plain_padded == scorer_padded, (plain_padded, scorer_padded)  # the very same batches

    plain_seconds = (plain_before + plain_after) / 2
    table = [("plain loop: sequences length-sorted (mean)", plain_seconds),
             ("  same, run before the scorer", plain_before),
             ("  same, run after the scorer", plain_after),
             ("plain loop + tokenization", plain_seconds + tokenize_seconds),
             ("plain loop: [chosen; rejected] pairs sorted", pair_seconds),
             ("dpo-dist run_scoring (Ray, 1 actor)", scorer_seconds)]
    print(f"\nthroughput over shards 1..{len(written) - 1} ({len(rows)} pairs, {plain_tokens:,} real tokens), "
          f"{args.threads} torch threads; ratio = tokens/s over the plain loop's mean:")
    print(f"  {'':<46} {'tokens/s':>10} {'seconds':>8} {'ratio':>6}")
    for name, seconds in table:
        print(f"  {name:<46} {plain_tokens / seconds:>10,.0f} {seconds:>8.2f} {plain_seconds / seconds:>6.3f}")
    print(f"\nscorer wall time incl. actor start + model load: {result.seconds:.1f}s for {result.pairs} pairs; "
          f"cache padding efficiency {manifest.splits['train']['report']['padding_efficiency']}; "
          f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
