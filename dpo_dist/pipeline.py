"""`dpo-dist run`: score (skipped when the cache is complete and matches), train, export, summary.

One command for one machine; running it again resumes wherever it stopped: complete shards are
kept, training continues from its latest checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from dpo_dist import cache as cache_mod
from dpo_dist.config import Config


def cache_ready(cfg: Config) -> bool:
    """True when the cache is complete, intact and was built with this config (no Ray needed)."""
    import torch
    from transformers import AutoTokenizer

    from dpo_dist.score import build_fingerprint, resolve_dtype, resolve_model_dir

    manifest = cache_mod.load_manifest(cfg.resolved_cache_dir())
    if manifest is None or not all(manifest.is_complete(s) for s in cache_mod.SPLITS):
        return False
    ref_dir = resolve_model_dir(cfg.ref_model())
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path() if cfg.model.tokenizer else str(ref_dir))
    # `run` scores on an embedded Ray, which sees exactly the GPUs torch sees here.
    wanted = build_fingerprint(cfg, tokenizer, resolve_dtype(cfg.score.dtype, torch.cuda.is_available()), ref_dir)
    return not cache_mod.fingerprint_diff(manifest.fingerprint, wanted) and not cache_mod.verify(cfg.resolved_cache_dir())


def summary(cfg: Config) -> str:
    out = Path(cfg.output_dir)
    final = json.loads((out / "final_metrics.json").read_text())
    tr, ev = final.get("train", {}), final.get("eval", {})

    def fmt(m: dict, key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "n/a"

    lines = [
        "",
        "dpo-dist run finished",
        f"  reference cache : {cfg.resolved_cache_dir()}",
        f"  TensorBoard logs: {out / 'tb'}",
        f"  checkpoints     : {out / 'checkpoints'}",
        f"  exported model  : {final.get('export_dir') or 'export disabled'}",
        f"  steps           : {final['steps']} on {final.get('world_size', '?')} processes",
        f"  train   reward accuracy {fmt(tr, 'rewards/accuracies')}, margin {fmt(tr, 'rewards/margins')}, loss {fmt(tr, 'loss')}",
        f"  held-out reward accuracy {fmt(ev, 'rewards/accuracies')}, margin {fmt(ev, 'rewards/margins')}, loss {fmt(ev, 'loss')}",
        f"  look at it:  tensorboard --logdir {out / 'tb'}",
    ]
    return "\n".join(lines)


def run_pipeline(cfg: Config, config_path: str | None, overrides: list[str]) -> int:
    from dpo_dist.launch import run_torchrun
    from dpo_dist.score import run_scoring

    if cache_ready(cfg):
        print(f"[dpo-dist] reference cache {cfg.resolved_cache_dir()} is complete and matches: scoring skipped", flush=True)
    else:
        result = run_scoring(cfg)
        print(f"[dpo-dist] scored {result.scored_shards} shards ({result.skipped_shards} already done), "
              f"{result.tokens:,} tokens in {result.seconds:.1f}s", flush=True)
        import ray

        ray.shutdown()  # free the cores for training
    code = run_torchrun(cfg, config_path, overrides, resume=True)
    if code != 0:
        print(f"[dpo-dist] training failed (exit {code}); rerun the same command to resume from the last checkpoint")
        return code
    print(summary(cfg))
    return 0
