"""The run of DPO training (see the package docstring). Phases, each a function below: `prepare`
(every check, before a model is built: the cache matches this config, the run folder belongs to
this run), `build` (policy under ZeRO-3, engine, resume), `run_steps` (the loop: step-0 identity,
metrics, eval, checkpoints, preemption), `finish` (final eval, export, final_metrics.json).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpo_dist.core.atomic import atomic_write_bytes, atomic_write_text
from dpo_dist.core import cache as cache_mod
from dpo_dist.config import Config, to_yaml
from dpo_dist.core.ds_json import load_ds_json
from dpo_dist.core.errors import UserError
from dpo_dist.core.metrics import flatten, memory_gb, mfu, peak_tflops
from dpo_dist.engines import checkpoints, trainer
from dpo_dist.engines.checkpoints import STOP_FILE, StopFlag
from dpo_dist.engines.deepspeed_engine import Engine, compute_init, local_param_fraction, param_counts
from dpo_dist.engines.dist import Dist, all_reduce, on_main, sp_note
from dpo_dist.engines.policy import export_model
from dpo_dist.engines.trainer import CKPT
from dpo_dist.core.sampler import BatchPlan
from dpo_dist.core.step0 import Step0Sums, step0_bound
from dpo_dist.core.tokenize import pad_token_id
from dpo_dist.stages.train.forward import batch_metrics, collate, dpo_forward, eval_rewards
from dpo_dist.stages.train.step0 import check_step0, step0_stats


@dataclass
class TrainResult:
    steps: int
    final_metrics: dict
    eval_metrics: dict
    export_dir: Path | None
    stopped_early: bool = False  # a signal asked to stop: saved, resume to continue


@dataclass
class Prepared:
    """Everything decided before the model is built; the same on every rank."""

    policy_dir: Path
    tokenizer_dir: Path
    identity: dict  # identity.run_identity
    cache_dtype: str
    policy_is_reference: bool  # same weights: the step-0 identity must hold
    resume_step: int | None  # latest complete checkpoint, when resuming
    finished: bool  # the run is complete (metrics, export): nothing to do
    accumulation: int  # train.gradient_accumulation_steps on this world (identity.for_world)
    adjusted: str | None = None  # how for_world changed the accumulation, if it did
    universal: bool = False  # resume_step is loaded from its universal checkpoint (another world size)
    notes: list[str] = field(default_factory=list)  # printed by rank 0
    cache_identity: dict = field(default_factory=dict)  # the cache view this run trains on


# ----------------------------------------------------------------------------- prepare

def prepare(cfg: Config, dist: Dist, resume: bool, overwrite: bool) -> Prepared:
    """Rank 0 checks the cache, the run folder and the resume point; every rank gets the answer.

    Refuses (one line per field) a cache built for other work and a run folder started with other
    result-changing settings; `overwrite` moves an old run aside first.
    """
    prepared, gone = on_main(dist, lambda: _prepare_main(cfg, dist.world_size, resume, overwrite))
    # Only once the run folder is accepted: every rank hashes its files of the newest checkpoint
    hashed = checkpoints.hashed_by_ranks(Path(cfg.output_dir) / CKPT, dist) if resume else {}
    return on_main(dist, lambda: _resume_point_main(cfg, dist, prepared, gone, resume, hashed))


def _prepare_main(cfg: Config, world_size: int, resume: bool, overwrite: bool) -> tuple[Prepared, list[str]]:
    """Rank 0's checks; returns what is decided and the unfinished checkpoints removed."""
    from dpo_dist import identity as ident
    from dpo_dist.models import resolve_model_dir

    cfg, adjusted = ident.for_world(cfg, world_size, overwrite=overwrite)
    spec = ident.training_cache(cfg)
    cache_mod.open_cache(cfg.resolved_cache_dir(), spec.identity)
    policy_dir = resolve_model_dir(cfg.policy_model(), trust_remote_code=cfg.model.trust_remote_code)
    policy_weights = ident.model_identity(policy_dir)
    accum = cfg.train.gradient_accumulation_steps
    run_id = ident.run_identity(cfg, spec.identity, policy_weights, world_size, load_ds_json(cfg.train.deepspeed_config))
    notes, gone = trainer.claim_run_folder(Path(cfg.output_dir), run_id, resume, overwrite,
                                           record={"policy": cfg.policy_model(), **spec.names},
                                           started={"world_size": world_size, "gradient_accumulation_steps": accum},
                                           aside={"keep": [cfg.resolved_cache_dir()], "extra": [cfg.export_dir()]})
    return Prepared(policy_dir, spec.tokenizer_dir, run_id, spec.identity["reference.dtype"], policy_weights == spec.identity["reference.weights"],
                    None, False, accum, adjusted, notes=notes, cache_identity=spec.identity), gone


def _resume_point_main(cfg: Config, dist: Dist, prepared: Prepared, gone: list[str], resume: bool,
                       hashed: dict[str, str]) -> Prepared:
    """Rank 0: the step to resume at (damaged checkpoints set aside; one of another world size made
    loadable here), and whether the run is already complete."""
    out_dir = Path(cfg.output_dir)
    final = out_dir / "final_metrics.json"
    t = replace(cfg.train, gradient_accumulation_steps=prepared.accumulation)

    def ended(latest: int | None) -> bool:
        return (resume and latest == prepared.identity["train.steps"] and final.exists()
                and (not cfg.export.enabled or cfg.export_dir().exists()))

    latest, universal, notes = trainer.resume_point(out_dir / CKPT, prepared.notes, gone, resume, hashed, t, dist,
                                                    prepared.adjusted, ended)
    finished = ended(latest)
    if final.exists() and not finished:  # training on past an earlier end: that end's metrics are kept aside
        final.rename(final.with_name(f"final_metrics.step-{latest}.json"))
    return replace(prepared, resume_step=latest if resume else None, finished=finished, universal=universal, notes=notes)


# ----------------------------------------------------------------------------- samples

def log_samples(run: "Run", step: int) -> None:
    """Greedy responses of the policy to the first eval prompts, as a TensorBoard text table, so
    users can read the model change. Every rank generates (ZeRO-3 gathers weights collectively)."""
    from dpo_dist.core.sampling import generate_ids, stop_token_ids

    n = min(run.cfg.train.sample_prompts, len(run.eval_split))
    if n == 0 or run.dist.sp_size > 1:  # generation runs no sequence-parallel attention (announce says so)
        return
    prompts = [run.eval_split[i]["prompt_input_ids"] for i in range(n)]
    module = run.engine.module
    stop_ids = stop_token_ids(run.tokenizer, getattr(module.generation_config, "eos_token_id", None))
    module.eval()
    try:
        completions = generate_ids(module, prompts, pad_id=run.pad_id, stop_ids=stop_ids,
                                   max_new_tokens=run.cfg.train.sample_max_new_tokens, synced_gpus=run.dist.world_size > 1)
    finally:
        module.train()
    if run.dist.is_main:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ").strip() or " "

        rows = [f"| {cell(run.tokenizer.decode(p, skip_special_tokens=True)[-300:])} | "
                f"{cell(run.tokenizer.decode(c.ids, skip_special_tokens=True))} |" for p, c in zip(prompts, completions)]
        run.writer.add_text("samples", "| prompt (end) | response (greedy) |\n|---|---|\n" + "\n".join(rows), step)


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """What the loop works with, built once on every rank."""

    cfg: Config
    dist: Dist
    prepared: Prepared
    engine: Engine
    tokenizer: object
    pad_id: int
    train_split: cache_mod.CachedSplit
    eval_split: cache_mod.CachedSplit
    plan: BatchPlan
    total_steps: int
    start_step: int
    writer: object
    n_params: int
    n_trainable: int
    policy_dtype: str
    local_fraction: float = 1.0  # share of the weights this rank holds (about 1/world under ZeRO-3)
    step_seconds: float = 0.0  # time in optimizer steps (forward, backward, step) of this process's loop
    step_tokens: int = 0  # real tokens of those steps, all ranks

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def build(cfg: Config, dist: Dist, prepared: Prepared) -> Run:
    """Read the cache, plan the batches, build the engine, load the resume checkpoint."""
    from dpo_dist.models import load_tokenizer

    tokenizer = load_tokenizer(prepared.tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code)
    manifest = cache_mod.find_manifest(cfg.resolved_cache_dir(), prepared.cache_identity)
    train_split = cache_mod.CachedSplit(cfg.resolved_cache_dir(), "train", manifest)
    eval_split = cache_mod.CachedSplit(cfg.resolved_cache_dir(), "eval", manifest)
    t = cfg.train
    plan = BatchPlan(len(train_split), t.micro_batch_size, t.gradient_accumulation_steps, dist.dp_world, t.seed)
    if plan.steps_per_epoch == 0:
        raise UserError(f"{len(train_split)} training pairs do not fill one global batch of {plan.global_batch} "
                        f"(micro {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} x {_ranks(dist)})")
    total_steps = prepared.identity["train.steps"]
    built = trainer.build_policy(cfg.model, cfg.model.lora, t, prepared.policy_dir, dist, total_steps, Path(cfg.output_dir),
                                 prepared.resume_step, prepared.universal)
    n_params, n_trainable = param_counts(built.model)
    return Run(cfg, dist, prepared, built.engine, tokenizer, pad_token_id(tokenizer), train_split, eval_split, plan,
               total_steps, built.start_step, built.writer, n_params, n_trainable, built.policy_dtype)


def announce(run: Run) -> None:
    """Rank 0 prints the batch arithmetic and what each rank holds; the config goes to TensorBoard."""
    cfg, t, plan, dist = run.cfg, run.cfg.train, run.plan, run.dist
    fraction = all_reduce({"f": local_param_fraction(run.engine.module)}, dist)["f"]
    run.local_fraction = fraction
    if not dist.is_main:
        return
    for note in run.prepared.notes:
        print(f"[dpo-dist] {note}", flush=True)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out_dir / "config.yaml", to_yaml(cfg))
    run.writer.add_text("config", "```\n" + to_yaml(cfg) + "\n```")
    lengths = run.train_split.lengths()
    mean_len = sum(lengths) / max(len(lengths), 1)
    stage = run.prepared.identity["train.zero_stage"]
    print(f"[dpo-dist] world {dist.world_size} ({dist.device}{sp_note(dist)}), {len(run.train_split)} train / "
          f"{len(run.eval_split)} eval pairs; per step: {plan.global_batch} pairs = micro {t.micro_batch_size} x accum "
          f"{t.gradient_accumulation_steps} x {_ranks(dist)}, ~{int(2 * plan.global_batch * mean_len):,} tokens; {run.total_steps} steps "
          f"({plan.steps_per_epoch}/epoch, {plan.dropped_per_epoch} pairs/epoch left over); "
          f"params {run.n_params:,} ({run.n_trainable:,} trainable, {run.policy_dtype}); ZeRO stage {stage}, "
          f"each rank holds {fraction:.0%} of the weights" + (f"; resuming at step {run.start_step}" if run.start_step else ""),
          flush=True)
    if dist.sp_size > 1 and t.sample_prompts:
        print("[dpo-dist] train.sample_prompts: no samples in TensorBoard with sequence parallelism (generation "
              "does not run the sequence-parallel attention)", flush=True)
    if dist.world_size == 1 and stage == 3:
        print("[dpo-dist] one process: ZeRO-3 partitions nothing here and costs time and memory; "
              "ds_configs/zero0_bf16.json trains faster and leaner (BENCHMARKS.md)", flush=True)


def _ranks(dist: Dist) -> str:
    return f"world {dist.world_size}" if dist.sp_size == 1 else f"data-parallel ranks {dist.dp_world}"


def one_step(run: Run, step: int, micro_batches: list[list[int]]) -> dict[str, float]:
    """Forward/backward over this rank's micro-batches of one optimizer step; rank-averaged metrics."""
    cfg, dist, engine = run.cfg, run.dist, run.engine
    started = time.perf_counter()
    lr = engine.lr()  # the rate this step uses (the scheduler moves on at the step)
    sums: dict[str, float] = {}
    tokens = 0
    step0 = Step0Sums()
    for micro in micro_batches:
        batch = collate([run.train_split[i] for i in micro], run.pad_id, dist.device, cfg.model.layout, engine,
                        first_step=step == 0)
        out = dpo_forward(engine, batch, cfg)
        if step == 0:  # every micro-batch of the first step sees the reference's weights
            step0.add(out, batch)
        trainer.backward(engine, out["losses"].mean(), step, dist)
        if step == 0 and step0.micro_batches == len(micro_batches):  # before the optimizer moves a weight
            stats = step0_stats(step0, dist)
            bound = step0_bound(cfg, run.policy_dtype, run.prepared.cache_dtype, stats["tokens"], stats["sqrt_tokens"])
            check_step0(stats, run.prepared, bound, dist, run.writer)
        engine.step()
        for key, value in batch_metrics(out).items():
            sums[key] = sums.get(key, 0.0) + value / cfg.train.gradient_accumulation_steps
        tokens += batch["tokens"]
    elapsed = time.perf_counter() - started
    metrics = all_reduce(sums, dist)
    total_tokens = all_reduce({"tokens": tokens}, dist, op="sum")["tokens"]
    run.step_seconds += elapsed
    run.step_tokens += int(total_tokens)
    metrics.update({"lr": lr, "grad_norm": engine.grad_norm(), "tokens_per_sec": total_tokens / elapsed,
                    "pairs_per_sec": run.plan.global_batch / elapsed, "memory_gb": memory_gb(dist.device)})
    utilisation = mfu(run.n_params, run.n_trainable, total_tokens / elapsed / dist.world_size, peak_tflops(dist.device))
    if utilisation is not None:
        metrics["mfu"] = utilisation
    return metrics


def run_steps(run: Run, stop: StopFlag) -> tuple[dict, int, bool]:
    """The loop from start_step (engines.trainer.run_loop): (last train metrics, steps done, stopped early on request)."""
    cfg, dist = run.cfg, run.dist

    def evaluate(done: int) -> None:
        run.writer.add_scalars_dict("eval", eval_rewards(run.engine, run.eval_split, cfg, dist, run.pad_id), done)
        log_samples(run, done)

    def after_step(done: int) -> None:
        if f"step-{done}" in cfg.generate.models:  # a checkpoint to sample later (generate)
            export_model(run.engine, cfg.model, cfg.model.lora, run.prepared.policy_dir,
                         run.out_dir / "exports" / f"step-{done}", run.tokenizer, dist)

    loop = trainer.Loop(run.engine, dist, run.plan, run.train_split.lengths(), run.total_steps, run.start_step, run.out_dir,
                        cfg.train, run.writer, lambda step, micro: one_step(run, step, micro), evaluate,
                        postfix=lambda m: {"loss": f"{m['loss']:.4f}", "acc": f"{m['rewards/accuracies']:.2f}"},
                        after_step=after_step)
    return trainer.run_loop(loop, stop)


def finish(run: Run, metrics: dict) -> TrainResult:
    """Final eval over the held-out split, export, final_metrics.json, hparams."""
    cfg, dist, t = run.cfg, run.dist, run.cfg.train
    eval_metrics = eval_rewards(run.engine, run.eval_split, cfg, dist, run.pad_id)
    run.writer.add_scalars_dict("eval", eval_metrics, run.total_steps)
    log_samples(run, run.total_steps)
    export_dir = (export_model(run.engine, cfg.model, cfg.model.lora, run.prepared.policy_dir, cfg.export_dir(), run.tokenizer, dist)
                  if cfg.export.enabled else None)
    timing = {"seconds": run.step_seconds, "steps": run.total_steps - run.start_step, "tokens": run.step_tokens,
              "pairs_per_sec": (run.total_steps - run.start_step) * run.plan.global_batch / max(run.step_seconds, 1e-9),
              "tokens_per_sec": run.step_tokens / max(run.step_seconds, 1e-9)}
    final = {"steps": run.total_steps, "world_size": dist.world_size, "local_param_fraction": run.local_fraction,
             "step_time": timing,  # this invocation's steps only (a resumed run counts from its resume point)
             "train": metrics, "eval": eval_metrics, "export_dir": str(export_dir) if export_dir else None}
    if dist.is_main:
        run.writer.add_hparams(flatten({"loss": cfg.loss.__dict__, "train": {
            "lr": t.lr, "micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "world_size": dist.world_size}}), {f"hparam/eval_{k.replace('/', '_')}": v for k, v in eval_metrics.items()})
        atomic_write_bytes(run.out_dir / "final_metrics.json", json.dumps(final, indent=2).encode())
    return TrainResult(run.total_steps, metrics, eval_metrics, export_dir)


def finished_result(cfg: Config) -> TrainResult:
    final = json.loads((Path(cfg.output_dir) / "final_metrics.json").read_text())
    return TrainResult(final["steps"], final["train"], final["eval"], cfg.export_dir() if cfg.export.enabled else None)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Prepare (all checks), build, run the steps, finish. Rerun with resume=True after a crash or a signal."""
    dist = compute_init(cfg.train.collective_timeout_s, cfg.train.sequence_parallel_size)
    prepared = prepare(cfg, dist, resume, overwrite)  # removes a stale STOP file
    cfg = replace(cfg, train=replace(cfg.train, gradient_accumulation_steps=prepared.accumulation))
    if prepared.finished:
        if dist.is_main:
            print(f"[dpo-dist] training already complete ({prepared.identity['train.steps']} steps, "
                  f"{Path(cfg.output_dir) / 'final_metrics.json'}); nothing to do", flush=True)
        return finished_result(cfg)
    # From here on a stop request (e.g. during a long model load) is honoured after the next step.
    stop = StopFlag(Path(cfg.output_dir) / STOP_FILE)
    try:
        run = build(cfg, dist, prepared)
        announce(run)
        try:
            metrics, done, stopped = run_steps(run, stop)
            if stopped:
                return TrainResult(done, metrics, {}, None, stopped_early=True)
            return finish(run, metrics)
        finally:
            run.writer.close()
    finally:
        stop.restore()
