"""`dpo-dist run`: the config's stages in order (sft, score, train, generate, judge, report), each
skipped when its output is complete and matches, then a summary.

One command for one machine; running it again resumes wherever it stopped: a finished SFT run and
complete shards are kept, training continues from its latest complete checkpoint, generation from
its last complete shard, judging from its verdict cache. Running it with other result-changing
settings into the same output_dir is refused before any work (--overwrite moves the old run aside).
"""
from __future__ import annotations

import json
from pathlib import Path

from dpo_dist.core import cache as cache_mod
from dpo_dist.config import Config


def cache_ready(cfg: Config) -> bool:
    """True when the cache is complete, intact and was built for exactly this config (no Ray needed)."""
    from dpo_dist.identity import training_cache

    if cache_mod.load_manifest(cfg.resolved_cache_dir()) is None:
        return False
    manifest = cache_mod.find_manifest(cfg.resolved_cache_dir(), training_cache(cfg).identity)
    return manifest is not None and manifest.complete() and not cache_mod.verify(cfg.resolved_cache_dir(), manifest=manifest)


def check_run_folder(cfg: Config, world_size: int, overwrite: bool, check_cache: bool = False) -> str | None:
    """Before any work: refuse an output_dir that holds a run with other result-changing settings,
    or, with `overwrite`, move that run aside (returns a note saying where to). With `check_cache`,
    also refuse a cache that is missing, incomplete or built for other work. The trainer's ranks
    check all of it again (they may be started by srun without this process)."""
    from dpo_dist import identity as ident

    out_dir = Path(cfg.output_dir)
    if check_cache:
        cache_mod.open_cache(cfg.resolved_cache_dir(), ident.training_cache(cfg).identity)
    if not ident.has_run(out_dir):
        return None
    if overwrite:
        aside = ident.set_aside(out_dir, keep=[cfg.resolved_cache_dir()], extra=[cfg.export_dir()])
        return f"moved the earlier run in {out_dir} aside to {aside}"
    ident.check_run(out_dir, run_identity_of(cfg, world_size))
    return None


def run_identity_of(cfg: Config, world_size: int) -> dict:
    """The run.json identity a training run of `cfg` on `world_size` processes records (a run in
    output_dir started on another world size keeps its global batch: identity.for_world)."""
    from dpo_dist import identity as ident
    from dpo_dist.core.ds_json import load_ds_json
    from dpo_dist.models import resolve_model_dir

    cfg, _ = ident.for_world(cfg, world_size)
    spec = ident.training_cache(cfg)
    policy = ident.model_identity(resolve_model_dir(cfg.policy_model(), trust_remote_code=cfg.model.trust_remote_code))
    return ident.run_identity(cfg, spec.identity, policy, world_size, load_ds_json(cfg.train.deepspeed_config))


def training_complete(cfg: Config, world_size: int) -> bool:
    """True when output_dir holds this exact run, trained to its last step, metrics and export written."""
    from dpo_dist import identity as ident

    out = Path(cfg.output_dir)
    final = out / "final_metrics.json"
    if not final.is_file():
        return False
    identity = run_identity_of(cfg, world_size)
    return (ident.read_run(out) == identity and json.loads(final.read_text()).get("steps") == identity["train.steps"]
            and (not cfg.export.enabled or cfg.export_dir().exists()))


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


def ensure_cache(cfg: Config) -> None:
    """Score into cfg's cache unless it is complete and matches; frees Ray's cores afterwards."""
    from dpo_dist.stages.score import run_scoring

    if cache_ready(cfg):
        print(f"[dpo-dist] reference cache {cfg.resolved_cache_dir()} is complete and matches: scoring skipped", flush=True)
        return
    result = run_scoring(cfg)
    print(f"[dpo-dist] scored {result.scored_shards} shards ({result.skipped_shards} already done), "
          f"{result.tokens:,} tokens in {result.seconds:.1f}s", flush=True)
    import ray

    ray.shutdown()  # free the cores for training


def run_sft(cfg: Config, config_path: str | None, overrides: list[str], world_size: int, resume: bool = True,
            overwrite: bool = False, base_dir: str | None = None) -> int:
    """The SFT stage under torchrun, skipped when sft.output_dir holds this exact run, finished.
    `overwrite` moves an SFT run aside only when it was started with other settings."""
    from dpo_dist.identity import IdentityError
    from dpo_dist.launch import run_torchrun
    from dpo_dist.stages.sft import sft_complete

    try:
        if sft_complete(cfg, world_size):
            print(f"[dpo-dist] SFT run {cfg.sft_dir()} is complete and matches: SFT skipped", flush=True)
            return 0
        overwrite = False  # nothing there, or this run unfinished: resume it
    except IdentityError:
        if not overwrite:
            raise
    code = run_torchrun(cfg, config_path, overrides, resume=resume, overwrite=overwrite, base_dir=base_dir, stage="sft")
    if code == 0 and not (cfg.sft_dir() / "final_metrics.json").exists():
        print("[dpo-dist] SFT stopped early (signal) after saving a checkpoint; rerun the same command to resume")
        return 75
    return code


def generation_models(cfg: Config) -> list[tuple[str, str, int | None]]:
    """(label, model folder, DPO step) of each entry of generate.models."""
    out = []
    for label in cfg.generate.models:
        if label == "base":
            out.append((label, cfg.model.name_or_path, None))
        elif label == "sft":
            out.append((label, str(cfg.sft_export_dir()), None))
        elif label == "dpo":
            export = cfg.export_dir() / "merged" if cfg.model.lora.enabled else cfg.export_dir()
            out.append((label, str(export), None))
        else:  # step-N: exported by the trainer at that step
            export = Path(cfg.output_dir) / "exports" / label
            out.append((label, str(export / "merged" if cfg.model.lora.enabled else export), int(label[5:])))
    return out


def run_after_training(cfg: Config, stages: list[str]) -> None:
    """generate, judge, report: whichever of them `stages` holds, in that order."""
    out = Path(cfg.output_dir)
    if "generate" in stages:
        from dpo_dist.stages.generate import run_generate

        for label, model, step in generation_models(cfg):
            run_generate(cfg, model, label, out / "generations", checkpoint_step=step)
    if "judge" in stages:
        from dpo_dist.stages.judge import format_table, run_judge

        print(format_table(run_judge(cfg, out / "generations", out / "judge")), flush=True)
    if "report" in stages:
        from dpo_dist.stages.report import write_report

        path = write_report(out, sft_dir=cfg.sft_dir() if cfg.uses_sft() else None)
        print(f"[dpo-dist] report: {path}", flush=True)


def run_pipeline(cfg: Config, config_path: str | None, overrides: list[str], overwrite: bool = False,
                 base_dir: str | None = None, only: list[str] | None = None) -> int:
    """The config's stages (or `only` those of them) in order; see the module docstring."""
    from dpo_dist.config import ConfigError
    from dpo_dist.launch import num_procs, preflight, run_torchrun

    stages = cfg.stages if only is None else [s for s in cfg.stages if s in only]
    extra = [s for s in only or [] if s not in cfg.stages]
    if extra or not stages:
        raise ConfigError(f"--only {','.join(only or [])}: give stages of the config's recipe ({', '.join(cfg.stages)}); "
                          "add a stage to the recipe with stages=[...]")
    world, has_gpu = num_procs(cfg)
    for stage in ("sft", "train"):  # the trainers' input, refused before any stage's work
        if stage in stages:
            preflight(cfg, world, has_gpu, "sft" if stage == "sft" else "dpo", overwrite)
    sft_pending = cfg.uses_sft() and not (cfg.sft_export_dir() / "config.json").is_file()
    if not sft_pending and "train" in stages:  # with the SFT export at hand, the run folder is checked before any work
        note = check_run_folder(cfg, world, overwrite)
        if note:
            print(f"[dpo-dist] {note}", flush=True)
    if "sft" in stages:
        code = run_sft(cfg, config_path, overrides, world, overwrite=overwrite, base_dir=base_dir)
        if code != 0:
            return code
        if sft_pending and "train" in stages:
            note = check_run_folder(cfg, world, overwrite)
            if note:
                print(f"[dpo-dist] {note}", flush=True)
    if "score" in stages:
        ensure_cache(cfg)
    if "train" in stages and training_complete(cfg, world):
        print(f"[dpo-dist] training already complete ({Path(cfg.output_dir) / 'final_metrics.json'}): training skipped", flush=True)
        print(summary(cfg))
    elif "train" in stages:
        code = run_torchrun(cfg, config_path, overrides, resume=True, base_dir=base_dir)
        if code == 2:  # the ranks refused the input; the error is printed
            return code
        if code != 0:  # run_torchrun said what failed and where a rerun resumes
            return code
        if not (Path(cfg.output_dir) / "final_metrics.json").exists():
            print("[dpo-dist] training stopped early (signal) after saving a checkpoint; rerun the same command to resume")
            return 75  # EX_TEMPFAIL: not finished, resumable
        print(summary(cfg))
    run_after_training(cfg, stages)
    return 0
