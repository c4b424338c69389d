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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpo_dist.config import Config, to_yaml
from dpo_dist.core.atomic import atomic_write_bytes, atomic_write_text
from dpo_dist.core.errors import UserError
from dpo_dist.core.ds_json import load_ds_json
from dpo_dist.core.metrics import memory_gb
from dpo_dist.core.sampler import BatchPlan
from dpo_dist.core.tokenize import pad_token_id
from dpo_dist.engines import checkpoints, trainer
from dpo_dist.engines.checkpoints import STOP_FILE, StopFlag
from dpo_dist.engines.deepspeed_engine import compute_init
from dpo_dist.engines.dist import Dist, all_reduce, on_main, rank_rounds, sp_note
from dpo_dist.engines.policy import export_model
from dpo_dist.engines.trainer import CKPT
FINAL = "final_metrics.json"


@dataclass
class SFTPrepared:
    base_dir: Path
    tokenizer_dir: Path
    identity: dict
    resume_step: int | None
    finished: bool
    accumulation: int  # sft.gradient_accumulation_steps on this world (identity.for_world)
    adjusted: str | None = None  # how for_world changed it, if it did
    universal: bool = False  # resume_step is loaded from its universal checkpoint (another world size)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- prepare

def sft_identity_of(cfg: Config, world_size: int) -> tuple[dict, Path, Path]:
    """(identity, base model dir, tokenizer dir) of the SFT run `cfg` asks for on `world_size` processes
    (`cfg` with the accumulation of that world: identity.for_world)."""
    from dpo_dist import identity as ident
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
    from dpo_dist import identity as ident

    out = cfg.sft_dir()
    cfg, _ = ident.for_world(cfg, world_size, "sft")  # a run there started on another world keeps its global batch
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
    from dpo_dist import identity as ident

    cfg, adjusted = ident.for_world(cfg, world_size, "sft", overwrite=overwrite)
    identity, base_dir, tokenizer_dir = sft_identity_of(cfg, world_size)
    accum = cfg.sft.gradient_accumulation_steps
    notes, gone = trainer.claim_run_folder(cfg.sft_dir(), identity, resume, overwrite, what="SFT ", hint="sft.output_dir",
                                           record={"base": cfg.model.name_or_path, "data.train": cfg.data.train,
                                                   "created": ident.now()},
                                           started={"world_size": world_size, "gradient_accumulation_steps": accum})
    return SFTPrepared(base_dir, tokenizer_dir, identity, None, False, accum, adjusted, notes=notes), gone


def _resume_point_main(cfg: Config, dist: Dist, prep: SFTPrepared, gone: list[str], resume: bool,
                       hashed: dict[str, str]) -> SFTPrepared:
    """Rank 0: the step to resume at (damaged checkpoints set aside; one of another world size made
    loadable here), and whether SFT is already complete."""
    t, steps = replace(cfg.sft_train(), gradient_accumulation_steps=prep.accumulation), prep.identity["sft.steps"]

    def ended(latest: int | None) -> bool:
        return resume and latest == steps and ended_at(cfg, steps)

    latest, universal, notes = trainer.resume_point(cfg.sft_dir() / CKPT, prep.notes, gone, resume, hashed, t, dist,
                                                    prep.adjusted, ended)
    latest = latest if resume else None
    return replace(prep, resume_step=latest, finished=ended(latest), universal=universal, notes=notes)


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
    from dpo_dist.core.logps import layout_logps, segment_attention_on, to_device
    from dpo_dist.core.loss import sft_loss
    from dpo_dist.core.packing import on_ranks, sequences_layout

    sp = getattr(engine, "sp", None)  # sequence parallelism: this rank's slice of the row
    batch = on_ranks(sequences_layout(sequences, model_cfg.layout, pad_id, segment_attention=segment_attention_on(engine),
                                      pad_to_multiple_of=sp.size if sp else None), sp)
    logps, counts = layout_logps(engine, to_device(batch, device), fused=model_cfg.fused_head)  # (B,), (B,)
    return sft_loss(logps, counts), int(counts.sum()), batch["tokens"]


def eval_nll(engine, sequences: list, micro: int, dist: Dist, pad_id: int, model_cfg) -> dict[str, float]:
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
    from dpo_dist.models import load_tokenizer

    dist = compute_init(cfg.train.collective_timeout_s, cfg.train.sequence_parallel_size)
    prep, gone = on_main(dist, lambda: _prepare_main(cfg, dist.world_size, resume, overwrite))
    # Only once the run folder is accepted: every rank hashes its files of the newest checkpoint
    hashed = checkpoints.hashed_by_ranks(cfg.sft_dir() / CKPT, dist) if resume else {}
    prep = on_main(dist, lambda: _resume_point_main(cfg, dist, prep, gone, resume, hashed))
    cfg = replace(cfg, sft=replace(cfg.sft, gradient_accumulation_steps=prep.accumulation))
    out = cfg.sft_dir()
    if prep.finished:
        if dist.is_main:
            print(f"[dpo-dist] SFT already complete ({out / FINAL}); nothing to do", flush=True)
        return json.loads((out / FINAL).read_text())
    stop = StopFlag(out / STOP_FILE)
    writer = None
    try:
        t = cfg.sft_train()
        tokenizer = load_tokenizer(prep.tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code)
        pad_id = pad_token_id(tokenizer)
        data = sft_sequences(cfg, tokenizer)
        plan = BatchPlan(len(data["train"]), t.micro_batch_size, t.gradient_accumulation_steps, dist.dp_world, t.seed)
        if plan.steps_per_epoch == 0:
            raise UserError(f"{len(data['train'])} SFT sequences do not fill one global batch of {plan.global_batch}")
        total = prep.identity["sft.steps"]
        built = trainer.build_policy(cfg.model, cfg.sft.lora, t, prep.base_dir, dist, total, out, prep.resume_step, prep.universal)
        engine, start, writer = built.engine, built.start_step, built.writer
        if dist.is_main:
            for note in prep.notes:
                print(f"[dpo-dist] {note}", flush=True)
            atomic_write_text(out / "config.yaml", to_yaml(cfg))
            print(f"[dpo-dist] SFT: world {dist.world_size} ({dist.device}{sp_note(dist)}), {len(data['train'])} train / "
                  f"{len(data['eval'])} eval sequences; per step {plan.global_batch} = micro {t.micro_batch_size} x accum "
                  f"{t.gradient_accumulation_steps} x {'data-parallel ranks' if dist.sp_size > 1 else 'world'} {dist.dp_world}; {total} steps"
                  + (f"; resuming at step {start}" if start else ""), flush=True)

        def one_step(step: int, micro_batches: list[list[int]]) -> dict:
            started, lr, loss_sum, tokens = time.perf_counter(), engine.lr(), 0.0, 0
            for micro in micro_batches:
                loss, _, n_all = sft_forward(engine, [data["train"][i] for i in micro], pad_id, dist.device, cfg.model)
                trainer.backward(engine, loss, step, dist)
                engine.step()
                loss_sum, tokens = loss_sum + float(loss.detach()) / t.gradient_accumulation_steps, tokens + n_all
            elapsed = time.perf_counter() - started
            metrics = all_reduce({"loss": loss_sum}, dist)
            metrics.update({"lr": lr, "grad_norm": engine.grad_norm(), "memory_gb": memory_gb(dist.device),
                            "tokens_per_sec": all_reduce({"t": tokens}, dist, op="sum")["t"] / elapsed})
            return metrics

        def evaluate(done: int) -> None:
            writer.add_scalars_dict("sft", eval_nll(engine, data["eval"], t.micro_batch_size, dist, pad_id, cfg.model), done)

        loop = trainer.Loop(engine, dist, plan, [len(p) + len(r) for p, r in data["train"]], total, start, out, t, writer,
                            one_step, evaluate, desc="SFT", tag="sft", what="SFT ")
        metrics, done, stopped = trainer.run_loop(loop, stop)
        if stopped:
            return {"stopped_early": True, "steps": done}
        eval_metrics = eval_nll(engine, data["eval"], t.micro_batch_size, dist, pad_id, cfg.model)
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
        return final
    finally:
        if writer is not None:
            writer.close()
        stop.restore()
