"""Reference scoring on Ray: one actor per GPU (or N CPU actors) writes the cache once.

    dpo-dist score --config configs/demo.yaml                     # embedded local Ray, or RAY_ADDRESS
    ray job submit --address http://HEAD:8265 --working-dir . -- python launchers/score_ref.py --config CFG

The driver streams pairs from the source, cuts them into shards of `score.shard_size` in source
order, skips shards the manifest already lists (same ids, same checksum), and keeps at most two
shards per actor in flight, so its memory stays flat as the data grows. Actors tokenize, batch by
length under a token budget, run the reference forward and return Arrow-ready rows; the driver
writes each shard atomically and then the manifest. A dead actor is replaced and its shard retried.

The package along its seams: `actor` (RefScorer, the Ray actor body) and `run` (the driver).
"""
from dpo_dist.stages.score.actor import RefScorer, ShardTask, tokenize_row
from dpo_dist.stages.score.run import (ScoreResult, estimate_rows, plan_shards, prepare_cache_dir, run_scoring,
                                       source_name)

__all__ = ["RefScorer", "ScoreResult", "ShardTask", "estimate_rows", "plan_shards", "prepare_cache_dir", "run_scoring",
           "source_name", "tokenize_row"]
