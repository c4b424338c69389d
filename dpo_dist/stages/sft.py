"""Supervised fine-tuning on the chosen responses, the DPO paper's first stage (Sec. 4: the SFT model
is both the reference and the initial policy of DPO). Same DeepSpeed engine as DPO training.

    dpo-dist sft --config configs/pythia28b_hh_paper.yaml      # single node: starts torchrun for you
    torchrun --nproc_per_node 8 launchers/train_dpo.py --stage sft --config CFG --resume

Loss: negative log-likelihood of prompt + chosen response with the prompt masked (core.loss.sft_loss),
over the same pairs, tokenization and truncation as the DPO cache. Writes to `sft.output_dir`
(default a `sft` folder beside output_dir): run.json (what the run is), checkpoints/ (resumable),
tb/ (`sft/loss`, `sft/tokens_per_sec`, `sft/lr`, `sft/grad_norm`, `sft/eval_loss`), export/ (a full
Hugging Face model; with LoRA the merged model, the adapter in export/adapter), final_metrics.json.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpo_dist.config import Config, to_yaml
from dpo_dist.core.atomic import atomic_write_bytes, atomic_write_text
from dpo_dist.core.errors import UserError
from dpo_dist.core.metrics import make_writer, memory_gb
from dpo_dist.core.sampler import BatchPlan
from dpo_dist.engines import checkpoints
from dpo_dist.engines.checkpoints import STOP_FILE, StopFlag
from dpo_dist.engines.deepspeed_engine import (Dist, all_reduce, build_engine, compute_init, fill_ds_config, load_ds_json,
                                               on_main, rank_rounds)
from dpo_dist.engines.policy import export_model, load_policy, usable_layout_noted

CKPT = "checkpoints"
FINAL = "final_metrics.json"


@dataclass
class SFTPrepared:
    base_dir: Path
    tokenizer_dir: Path
    identity: dict
    resume_step: int | None
    finished: bool
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- prepare

def sft_identity_of(cfg: Config, world_size: int) -> tuple[dict, Path, Path]:
    """(identity, base model dir, tokenizer dir) of the SFT run `cfg` asks for."""
    from dpo_dist.core import identity as ident
    from dpo_dist.models import load_tokenizer, resolve_model_dir

    trust = cfg.model.trust_remote_code
    base_dir = resolve_model_dir(cfg.model.name_or_path, trust_remote_code=trust)
    tokenizer_dir = resolve_model_dir(cfg.model.tokenizer, trust_remote_code=trust) if cfg.model.tokenizer else base_dir
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust)
    identity = ident.sft_identity(cfg, tokenizer, ident.model_identity(base_dir), world_size,
                                  load_ds_json(cfg.train.deepspeed_config))
    return identity, base_dir, tokenizer_dir


def sft_complete(cfg: Config, world_size: int) -> bool:
    """True when sft.output_dir holds a finished SFT run of exactly this config (export included).
    Refuses (IdentityError) a folder started with other settings."""
    from dpo_dist.core import identity as ident

    out = cfg.sft_dir()
    identity, _, _ = sft_identity_of(cfg, world_size)  # every input checked here, before torchrun starts
    if not ident.has_run(out):
        return False
    ident.check_run(out, identity)
    return ended_at(cfg, identity["sft.steps"])


def ended_at(cfg: Config, steps: int) -> bool:
    """The SFT folder's final_metrics.json is that of a run of `steps` steps, its export beside it.
    The metrics are written after the export, so a failed export (a full disk) leaves an earlier,
    shorter end's: not this one."""
    final = cfg.sft_dir() / FINAL
    return (final.is_file() and json.loads(final.read_text()).get("steps") == steps
            and (cfg.sft_export_dir() / "config.json").is_file())


def _prepare_main(cfg: Config, world_size: int, resume: bool, overwrite: bool) -> tuple[SFTPrepared, list[str]]:
    """Rank 0's checks; returns what is decided and the unfinished checkpoints removed."""
    from dpo_dist.core import identity as ident

    out, ckpt_dir = cfg.sft_dir(), cfg.sft_dir() / CKPT
    identity, base_dir, tokenizer_dir = sft_identity_of(cfg, world_size)
    notes = []
    if overwrite and ident.has_run(out):
        notes.append(f"moved the earlier SFT run in {out} aside to {ident.set_aside(out)}")
    ident.check_run(out, identity)
    latest = checkpoints.latest_complete(ckpt_dir)
    if latest is not None and not resume:
        raise FileExistsError(f"{ckpt_dir}: SFT checkpoints up to step {latest}; pass --resume to continue, "
                              "--overwrite to start over (the old run is moved aside), or another sft.output_dir")
    (out / STOP_FILE).unlink(missing_ok=True)
    gone = checkpoints.remove_partials(ckpt_dir)
    if ident.read_run(out) != identity:
        ident.write_run(out, identity, {"base": cfg.model.name_or_path, "data.train": cfg.data.train, "created": ident.now()})
    return SFTPrepared(base_dir, tokenizer_dir, identity, None, False, notes), gone


def _resume_point_main(cfg: Config, prep: SFTPrepared, gone: list[str], resume: bool, hashed: dict[str, str]) -> SFTPrepared:
    """Rank 0: damaged checkpoints set aside (with the ranks' digests), the step to resume at, and
    whether SFT is already complete."""
    ckpt_dir = cfg.sft_dir() / CKPT
    notes = list(prep.notes)
    if resume:
        notes += checkpoints.set_aside_damaged(ckpt_dir, hashed)
    if gone:
        notes.append(f"removed unfinished checkpoint(s) {', '.join(gone)}")
    latest = checkpoints.latest_complete(ckpt_dir) if resume else None
    steps = prep.identity["sft.steps"]
    return replace(prep, resume_step=latest, finished=resume and latest == steps and ended_at(cfg, steps), notes=notes)


# ----------------------------------------------------------------------------- data

def sft_sequences(cfg: Config, tokenizer) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(prompt ids, chosen response ids) per split, tokenized exactly as the DPO cache is."""
    from dpo_dist.core.data import iter_dataset
    from dpo_dist.core.tokenize import tokenize_pair

    d = cfg.data
    out: dict[str, list] = {"train": [], "eval": []}
    for split, pair in iter_dataset(d):
        t = tokenize_pair(tokenizer, pair, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          truncation_mode=d.truncation_mode)
        if t.chosen_input_ids:  # a prompt that filled max_length leaves nothing to learn
            out[split].append((t.prompt_input_ids, t.chosen_input_ids))
    return out


def sft_forward(engine, sequences: list, pad_id: int, device: str, model_cfg):
    """(loss, response tokens, all tokens) of one micro-batch, in model_cfg's layout (sequences: shared = packed)."""
    from dpo_dist.core.logps import layout_logps, to_device
    from dpo_dist.core.loss import sft_loss
    from dpo_dist.core.packing import sequences_layout

    batch = sequences_layout(sequences, model_cfg.layout, pad_id)
    logps, counts = layout_logps(engine, to_device(batch, device), fused=model_cfg.fused_head)  # (B,), (B,)
    return sft_loss(logps, counts), int(counts.sum()), batch["tokens"]


def evaluate(engine, sequences: list, micro: int, dist: Dist, pad_id: int, model_cfg) -> dict[str, float]:
    """Token-weighted NLL over the eval split; every rank runs the same number of forwards (ZeRO-3)."""
    import torch

    if not sequences:
        return {}
    batches = [sequences[i : i + micro] for i in range(0, len(sequences), micro)]
    nll = tokens = 0.0
    engine.eval()
    with torch.no_grad():
        for i in rank_rounds(len(batches), dist):
            loss, n, _ = sft_forward(engine, batches[i or 0], pad_id, dist.device, model_cfg)
            if i is not None:
                nll, tokens = nll + float(loss) * n, tokens + n
    engine.train()
    total = all_reduce({"nll": nll, "tokens": tokens}, dist, op="sum")
    return {"eval_loss": total["nll"] / max(total["tokens"], 1)}


# ----------------------------------------------------------------------------- the run

def sft(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Prepare (checks), build, train, export. Returns the final metrics (or {"stopped_early": True})."""
    import torch
    from tqdm import tqdm

    from dpo_dist.models import load_config, load_tokenizer

    dist = compute_init(cfg.train.collective_timeout_s)
    prep, gone = on_main(dist, lambda: _prepare_main(cfg, dist.world_size, resume, overwrite))
    # Only once the run folder is accepted: every rank hashes its files of the newest checkpoint
    hashed = checkpoints.hashed_by_ranks(cfg.sft_dir() / CKPT, dist) if resume else {}
    prep = on_main(dist, lambda: _resume_point_main(cfg, prep, gone, resume, hashed))
    out = cfg.sft_dir()
    if prep.finished:
        if dist.is_main:
            print(f"[dpo-dist] SFT already complete ({out / FINAL}); nothing to do", flush=True)
        return json.loads((out / FINAL).read_text())
    stop = StopFlag(out / STOP_FILE)
    try:
        t = cfg.sft_train()
        tokenizer = load_tokenizer(prep.tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        data = sft_sequences(cfg, tokenizer)
        plan = BatchPlan(len(data["train"]), t.micro_batch_size, t.gradient_accumulation_steps, dist.world_size, t.seed)
        if plan.steps_per_epoch == 0:
            raise UserError(f"{len(data['train'])} SFT sequences do not fill one global batch of {plan.global_batch}")
        total = prep.identity["sft.steps"]
        model_config = load_config(prep.base_dir, trust_remote_code=cfg.model.trust_remote_code)
        hidden = getattr(model_config, "hidden_size", 1024)
        cfg.model.layout = usable_layout_noted(model_config, cfg.model.layout, dist.is_main)
        ds_config = fill_ds_config(load_ds_json(t.deepspeed_config), t, dist.world_size, hidden,
                                   has_gpu=dist.device != "cpu", source=t.deepspeed_config)
        torch.manual_seed(t.seed)
        model, _keep = load_policy(cfg.model, cfg.sft.lora, prep.base_dir, ds_config)
        engine = build_engine(model, ds_config, t, total)
        start = 0
        if prep.resume_step:
            state = engine.load(out / CKPT, f"step-{prep.resume_step}")
            start = int(state["step"])
            torch.set_rng_state(state["torch_rng"])
        writer = make_writer(out / "tb", dist.is_main, purge_step=start + 1 if start else None)
        if dist.is_main:
            for note in prep.notes:
                print(f"[dpo-dist] {note}", flush=True)
            atomic_write_text(out / "config.yaml", to_yaml(cfg))
            print(f"[dpo-dist] SFT: world {dist.world_size} ({dist.device}), {len(data['train'])} train / "
                  f"{len(data['eval'])} eval sequences; per step {plan.global_batch} = micro {t.micro_batch_size} x accum "
                  f"{t.gradient_accumulation_steps} x world {dist.world_size}; {total} steps"
                  + (f"; resuming at step {start}" if start else ""), flush=True)
        lengths = [len(p) + len(r) for p, r in data["train"]]
        metrics: dict = {}
        epoch_plan: dict[int, list] = {}
        progress = tqdm(total=total, initial=start, unit="step", desc="SFT", disable=not dist.is_main,
                        dynamic_ncols=True, mininterval=5)
        engine.train()
        for step in range(start, total):
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            if epoch not in epoch_plan:
                epoch_plan = {epoch: plan.epoch_micro_batches(epoch, lengths)}
            started, lr, loss_sum, tokens = time.perf_counter(), engine.lr(), 0.0, 0
            for micro in plan.rank_step(epoch_plan[epoch], in_epoch, dist.rank):
                loss, _, n_all = sft_forward(engine, [data["train"][i] for i in micro], pad_id, dist.device, cfg.model)
                engine.backward(loss)
                engine.step()
                loss_sum, tokens = loss_sum + float(loss.detach()) / t.gradient_accumulation_steps, tokens + n_all
            elapsed = time.perf_counter() - started
            metrics = all_reduce({"loss": loss_sum}, dist)
            metrics.update({"lr": lr, "grad_norm": engine.grad_norm(), "memory_gb": memory_gb(dist.device),
                            "tokens_per_sec": all_reduce({"t": tokens}, dist, op="sum")["t"] / elapsed})
            done = step + 1
            if done % t.logging_steps == 0 or done == total:
                writer.add_scalars_dict("sft", metrics, done)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if t.eval_steps and done % t.eval_steps == 0 and done != total:
                writer.add_scalars_dict("sft", evaluate(engine, data["eval"], t.micro_batch_size, dist, pad_id, cfg.model), done)
            saved = (t.save_steps and done % t.save_steps == 0) or done == total
            if saved:
                _save(engine, out, done, plan, dist, t.keep_last)
            if os.environ.get("DPO_DIST_CRASH_AFTER_STEP") == str(done):  # failure injection for resume tests
                raise SystemExit(f"DPO_DIST_CRASH_AFTER_STEP={done}: simulated crash")
            if done < total and stop.agreed(dist):
                if not saved:
                    _save(engine, out, done, plan, dist, t.keep_last)
                if dist.is_main:
                    progress.write(f"[dpo-dist] {stop.reason()} received: SFT stopped after step {done} and saved; "
                                   "resume (same command) to continue")
                progress.close()
                writer.close()
                return {"stopped_early": True, "steps": done}
        progress.close()
        eval_metrics = evaluate(engine, data["eval"], t.micro_batch_size, dist, pad_id, cfg.model)
        writer.add_scalars_dict("sft", eval_metrics, total)
        export = export_model(engine, cfg.model, cfg.sft.lora, prep.base_dir, cfg.sft_export_dir(), tokenizer, dist,
                              merged_at_top=True)
        final = {"steps": total, "world_size": dist.world_size, "train": metrics, "eval": eval_metrics,
                 "export_dir": str(export)}
        if dist.is_main:
            atomic_write_bytes(out / FINAL, json.dumps(final, indent=2).encode())
            trained = f"loss {metrics['loss']:.4f}, " if metrics else ""  # none when resumed at the end to export again
            print(f"[dpo-dist] SFT done: {trained}eval loss {eval_metrics.get('eval_loss', float('nan')):.4f}; "
                  f"export {export}", flush=True)
        writer.close()
        return final
    finally:
        stop.restore()


def _save(engine, out: Path, step: int, plan: BatchPlan, dist: Dist, keep_last: int) -> None:
    import torch

    state = {"step": step, "samples_consumed": step * plan.global_batch, "torch_rng": torch.get_rng_state()}
    checkpoints.save(engine, out / CKPT, step, state, dist, keep_last)
