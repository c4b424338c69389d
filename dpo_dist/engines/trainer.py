"""The one training loop, shared by SFT and DPO: run folder checks and resume point, the engine
built with its checkpoint, the step loop (metrics, eval, checkpoints, stop requests, failure
injection) and the checkpoint state. Each stage passes what is its own: identity, data, step and eval.

    prep, gone = on_main(dist, lambda: claim_run_folder(out, identity, resume, overwrite, what="SFT", ...))
    hashed = checkpoints.hashed_by_ranks(out / CKPT, dist) if resume else {}
    latest, universal, notes = on_main(dist, lambda: resume_point(out / CKPT, notes, gone, resume, hashed, t, dist, adjusted))
    built = build_policy(cfg.model, lora, t, model_dir, dist, total, out, resume_step, universal)
    metrics, done, stopped = run_loop(Loop(...), stop)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dpo_dist.core.sampler import BatchPlan
from dpo_dist.engines import checkpoints
from dpo_dist.engines.checkpoints import STOP_FILE, StopFlag
from dpo_dist.core.ds_json import load_ds_json, precision
from dpo_dist.engines.deepspeed_engine import Engine, build_engine, fill_ds_config, sequence_parallel
from dpo_dist.engines.dist import Dist

CKPT = "checkpoints"


# ----------------------------------------------------------------------------- the run folder

def claim_run_folder(out: Path, identity: dict, resume: bool, overwrite: bool, *, record: dict, started: dict,
                     what: str = "", aside: dict | None = None, hint: str = "output_dir") -> tuple[list[str], list[str]]:
    """Rank 0: the folder `out` is this run's (or new), with no stale stop request and no unfinished
    checkpoint. Refuses (IdentityError) a folder of another run, and checkpoints without `resume`;
    `overwrite` moves an earlier run aside first. `started`: the world size and accumulation a new
    run starts with (identity.write_run). Returns (notes, unfinished checkpoints removed)."""
    from dpo_dist import identity as ident

    ckpt_dir = out / CKPT
    notes = []
    if overwrite and ident.has_run(out):
        notes.append(f"moved the earlier {what}run in {out} aside to {ident.set_aside(out, **(aside or {}))}")
    same = ident.check_run(out, identity)
    latest = checkpoints.latest_complete(ckpt_dir)
    if latest is not None and not resume:
        raise FileExistsError(f"{ckpt_dir}: {what}checkpoints of this run up to step {latest}; pass --resume to continue "
                              f"it, --overwrite to start over (the old run is moved aside), or another {hint}")
    (out / STOP_FILE).unlink(missing_ok=True)  # a stop request was for the job that has ended
    gone = checkpoints.remove_partials(ckpt_dir)
    if not same or ident.read_run(out) != identity:  # new, or allowed to train longer
        ident.write_run(out, identity, record, started)
    return notes, gone


def resume_point(ckpt_dir: Path, notes: list[str], gone: list[str], resume: bool, hashed: dict[str, str],
                 t, dist: Dist, adjusted: str | None = None,
                 finished: Callable[[int | None], bool] = lambda latest: False) -> tuple[int | None, bool, list[str]]:
    """Rank 0: damaged checkpoints set aside (with the ranks' digests); (latest complete step, load it
    as a universal checkpoint?, notes). Unless the run is `finished` at that step, a checkpoint of
    another world size is prepared for this one (checkpoints.for_world: DeepSpeed's universal
    checkpoint, converted once) with the TrainConfig `t` as this world runs it (identity.for_world:
    the accumulation that keeps the run's global batch, and `adjusted`, its note, said unless the
    summary of the world change says it)."""
    notes = list(notes)
    if resume:
        notes += checkpoints.set_aside_damaged(ckpt_dir, hashed)
    latest = checkpoints.latest_complete(ckpt_dir)
    if gone:
        notes.append(f"removed unfinished checkpoint(s) {', '.join(gone)} (a save cut short); resuming from "
                     + (f"step-{latest}" if latest is not None else "the start"))
    universal, summary = False, None
    if resume and latest is not None and not finished(latest):
        universal, summary = checkpoints.for_world(ckpt_dir, latest, dist.world_size, t.micro_batch_size, t.gradient_accumulation_steps,
                                                   load_ds_json(t.deepspeed_config), dist.sp_size)
    notes += [summary or adjusted] if summary or adjusted else []
    return latest, universal, notes


# ----------------------------------------------------------------------------- the engine

@dataclass
class Built:
    engine: Engine
    model: object
    start_step: int
    writer: object
    policy_dtype: str
    keep: object = None  # what load_policy needs kept alive alongside the model


def build_policy(model_cfg, lora, t, model_dir: Path, dist: Dist, total_steps: int, out: Path,
                 resume_step: int | None, universal: bool = False) -> Built:
    """The policy under the DeepSpeed engine of `t` (its JSON filled for this world), the resume
    checkpoint loaded (weights, optimizer, scheduler, RNG; with `universal`, from its universal
    checkpoint, which DeepSpeed reshards for this world), and the TensorBoard writer."""
    import torch

    from dpo_dist.engines.policy import load_policy, usable_layout_noted
    from dpo_dist.models import load_model_config

    model_config = load_model_config(model_dir, trust_remote_code=model_cfg.trust_remote_code)
    model_cfg.layout = usable_layout_noted(model_config, model_cfg.layout, dist.is_main)
    ds_config = fill_ds_config(load_ds_json(t.deepspeed_config), t, dist.world_size, getattr(model_config, "hidden_size", 1024),
                               has_gpu=dist.device != "cpu", source=t.deepspeed_config)
    if universal:  # a load setting, not a training one: the run's DeepSpeed JSON is unchanged
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    torch.manual_seed(t.seed)
    model, keep = load_policy(model_cfg, lora, model_dir, ds_config)
    engine = build_engine(model, ds_config, t, total_steps, sequence_parallel(model, dist.sp_size))
    start = 0
    if resume_step:
        folder = out / CKPT / f"step-{resume_step}"
        state = engine.load(folder, checkpoints.UNIVERSAL) if universal else engine.load(folder.parent, folder.name)
        start = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
    writer = make_writer_for(out, dist, start)
    return Built(engine, model, start, writer, precision(ds_config), keep)


def make_writer_for(out: Path, dist: Dist, start: int):
    from dpo_dist.core.metrics import make_writer

    return make_writer(out / "tb", dist.is_main, purge_step=start + 1 if start else None)


def backward(engine: Engine, loss, step: int, dist: Dist) -> None:
    """The micro-batch's backward, then the mid-step failure injection (checkpoints.maybe_killed)."""
    engine.backward(loss)
    checkpoints.maybe_killed("IN_STEP", step + 1, dist)


def save(engine: Engine, out: Path, step: int, plan: BatchPlan, dist: Dist, keep_last: int) -> None:
    """A complete-or-absent checkpoint of `step`, with the position in the data and the RNG."""
    import torch

    state = {"step": step, "samples_consumed": step * plan.global_batch, "epoch": step // plan.steps_per_epoch,
             "step_in_epoch": step % plan.steps_per_epoch, "world_size": dist.world_size, "torch_rng": torch.get_rng_state()}
    checkpoints.save(engine, out / CKPT, step, state, dist, keep_last)


# ----------------------------------------------------------------------------- the loop

@dataclass
class Loop:
    """One stage's loop: its step and eval, where it writes, and how it shows progress."""

    engine: Engine
    dist: Dist
    plan: BatchPlan
    lengths: list[int]  # per training item, for the length-grouped micro-batches
    total_steps: int
    start_step: int
    out: Path
    train: object  # the TrainConfig (logging, eval, save cadence)
    writer: object
    step: Callable[[int, list[list[int]]], dict]  # (step, this rank's micro-batches) -> rank-averaged metrics
    evaluate: Callable[[int], None]  # mid-run eval at a step (writes its own scalars)
    desc: str = "training"
    tag: str = "train"  # TensorBoard prefix of the step metrics
    postfix: Callable[[dict], dict] = lambda m: {"loss": f"{m['loss']:.4f}"}
    after_step: Callable[[int], None] = lambda done: None
    what: str = ""  # "SFT " in SFT's stop message


def run_loop(loop: Loop, stop: StopFlag) -> tuple[dict, int, bool]:
    """From start_step to total_steps: returns (last step's metrics, steps done, stopped early on request)."""
    from tqdm import tqdm

    t, dist = loop.train, loop.dist
    progress = tqdm(total=loop.total_steps, initial=loop.start_step, unit="step", desc=loop.desc,
                    disable=not dist.is_main, dynamic_ncols=True, mininterval=5)
    metrics: dict = {}
    epoch_plan: dict[int, list] = {}
    loop.engine.train()
    done = loop.start_step
    try:
        for step in range(loop.start_step, loop.total_steps):
            epoch, in_epoch = divmod(step, loop.plan.steps_per_epoch)
            if epoch not in epoch_plan:
                epoch_plan = {epoch: loop.plan.epoch_micro_batches(epoch, loop.lengths)}
            metrics = loop.step(step, loop.plan.rank_step(epoch_plan[epoch], in_epoch, dist.dp_rank))
            done = step + 1
            if done % t.logging_steps == 0 or done == loop.total_steps:
                loop.writer.add_scalars_dict(loop.tag, metrics, done)
            progress.update(1)
            progress.set_postfix(**loop.postfix(metrics))
            if t.eval_steps and done % t.eval_steps == 0 and done != loop.total_steps:
                loop.evaluate(done)
            saved = (t.save_steps and done % t.save_steps == 0) or done == loop.total_steps
            if saved:
                save(loop.engine, loop.out, done, loop.plan, dist, t.keep_last)
            loop.after_step(done)
            if os.environ.get("DPO_DIST_CRASH_AFTER_STEP") == str(done):  # failure injection for resume tests
                raise SystemExit(f"DPO_DIST_CRASH_AFTER_STEP={done}: simulated crash")
            if done < loop.total_steps and stop.agreed(dist):
                if not saved:
                    save(loop.engine, loop.out, done, loop.plan, dist, t.keep_last)
                if dist.is_main:
                    progress.write(f"[dpo-dist] {stop.reason()} received: {loop.what}stopped after step {done} and saved "
                                   f"checkpoint step-{done}; resume (same command, --resume) to continue")
                return metrics, done, True
    finally:
        progress.close()
    return metrics, done, False

