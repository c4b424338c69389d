"""DPO training with DeepSpeed (ZeRO-3, bf16) from the reference cache; one process per device.

    torchrun --nproc_per_node 8 launchers/train_dpo.py --config configs/pythia28b_hh.yaml [--resume]
    dpo-dist train --config configs/demo.yaml            # single node: starts torchrun for you

Reads the cache memory-mapped (no reference model in memory), checks the step-0 identity
(DESIGN.md invariant 3), logs rank-averaged metrics to TensorBoard, checkpoints, resumes, exports.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dpo_dist import cache as cache_mod
from dpo_dist.config import Config, to_yaml
from dpo_dist.engine import (Dist, Engine, all_reduce, barrier, build_engine,
                             compute_init, fill_ds_config, load_ds_json)
from dpo_dist.metrics import flatten, make_writer, memory_gb, mfu, peak_tflops
from dpo_dist.sampler import BatchPlan

CKPT = "checkpoints"


class Step0Error(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    final_metrics: dict
    eval_metrics: dict
    export_dir: Path | None


# ----------------------------------------------------------------------------- checks

def expected_fingerprint(cfg: Config, tokenizer, ref_dir: Path) -> dict:
    """The fingerprint fields the trainer can check from its own config (not the raw data)."""
    from dpo_dist.logps import LOGPS_VERSION
    from dpo_dist.score import weights_hash
    from dpo_dist.tokenize import tokenizer_fingerprint

    tok = tokenizer_fingerprint(tokenizer)
    return {"vocab_hash": tok["vocab_hash"], "special_tokens": tok["special_tokens"],
            "chat_template_hash": tok["chat_template_hash"], "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length, "truncation_mode": cfg.data.truncation_mode,
            "ref_weights_hash": weights_hash(ref_dir), "logps_version": LOGPS_VERSION,
            "cache_format": cache_mod.FORMAT_VERSION}


def check_cache(cfg: Config, tokenizer, ref_dir: Path) -> cache_mod.Manifest:
    """Refuse a cache that is incomplete, corrupt, or built for another model/tokenizer/lengths."""
    return cache_mod.open_cache(cfg.resolved_cache_dir(), expected_fingerprint(cfg, tokenizer, ref_dir))


# ----------------------------------------------------------------------------- model

def load_policy(cfg: Config, ds_config: dict, dist: Dist):
    """from_pretrained under ZeRO-3 (partitioned at load), bf16, dropout off, optional LoRA."""
    import torch
    import torch._dynamo  # noqa: F401  (must be imported before zero.Init, see DESIGN.md)
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    keep = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841  (kept alive for from_pretrained)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype,
                                                 attn_implementation=cfg.model.attn_implementation,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    for module in model.modules():  # DPO compares log-probs: the policy must be deterministic like the reference
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = cfg.model.lora
        targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, keep


def count_params(model) -> tuple[int, int]:
    """(all, trainable) parameter counts, using ZeRO-3's full sizes when partitioned."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def local_param_fraction(model) -> float:
    """Share of all parameter elements held by this rank (1.0 unpartitioned, ~1/world under ZeRO-3)."""
    full = local = 0
    for p in model.parameters():
        full += getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local / max(full, 1)


# ----------------------------------------------------------------------------- batches

def collate(rows: list[dict], pad_id: int, device: str) -> dict:
    import torch

    from dpo_dist.logps import concat_batch

    batch = {k: v.to(device) for k, v in concat_batch(rows, pad_id).items()}
    batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float32, device=device)
    batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float32, device=device)
    return batch


def dpo_forward(engine, batch: dict, cfg: Config) -> dict:
    """Policy log-probs of the concatenated batch, the loss and its per-example pieces."""
    from dpo_dist.logps import concatenated_forward, split_chosen_rejected
    from dpo_dist.loss import preference_loss

    logps, counts = concatenated_forward(engine, batch)  # (2B,), (2B,)
    chosen, rejected = split_chosen_rejected(logps)
    n_chosen, n_rejected = split_chosen_rejected(counts)
    losses, r_chosen, r_rejected = preference_loss(
        chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
        loss_type=cfg.loss.loss_type, beta=cfg.loss.beta, label_smoothing=cfg.loss.label_smoothing,
        chosen_lengths=n_chosen, rejected_lengths=n_rejected, **cfg.loss.params)
    return {"losses": losses, "chosen_rewards": r_chosen, "rejected_rewards": r_rejected,
            "chosen_logps": chosen.detach(), "rejected_logps": rejected.detach(),
            "chosen_tokens": n_chosen, "rejected_tokens": n_rejected}


def batch_metrics(out: dict) -> dict[str, float]:
    rc, rr = out["chosen_rewards"].float(), out["rejected_rewards"].float()
    return {"loss": float(out["losses"].float().mean()), "rewards/chosen": float(rc.mean()),
            "rewards/rejected": float(rr.mean()), "rewards/accuracies": float((rc > rr).float().mean()),
            "rewards/margins": float((rc - rr).mean()), "logps/chosen": float(out["chosen_logps"].float().mean()),
            "logps/rejected": float(out["rejected_logps"].float().mean())}


def step0_check(out: dict, batch: dict, dist: Dist, tolerance: float) -> dict[str, float]:
    """Policy log-probs vs cached reference on the first batch, per token; raises beyond tolerance."""
    import torch

    diffs = torch.cat([(out["chosen_logps"] - batch["ref_chosen_logps"]).abs() / out["chosen_tokens"].clamp(min=1),
                       (out["rejected_logps"] - batch["ref_rejected_logps"]).abs() / out["rejected_tokens"].clamp(min=1)])
    seq = torch.cat([(out["chosen_logps"] - batch["ref_chosen_logps"]).abs(),
                     (out["rejected_logps"] - batch["ref_rejected_logps"]).abs()])
    stats = all_reduce({"mean_abs_diff_per_token": float(diffs.mean()), "mean_abs_diff": float(seq.mean()),
                             "loss": float(out["losses"].float().mean())}, dist)
    stats["max_abs_diff"] = all_reduce({"m": float(seq.max())}, dist, op="max")["m"]
    return stats


# ----------------------------------------------------------------------------- evaluation

def evaluate(engine, split: cache_mod.CachedSplit, cfg: Config, dist: Dist, pad_id: int) -> dict[str, float]:
    """Reward metrics over the whole eval split; every rank runs the same number of forwards (ZeRO-3)."""
    import torch

    from dpo_dist.batching import length_batches

    if len(split) == 0:
        return {}
    lengths = split.lengths()
    batches = length_batches(lengths, token_budget=10**12, max_items=cfg.train.micro_batch_size)
    mine = batches[dist.rank::dist.world_size]
    rounds = math.ceil(len(batches) / dist.world_size)
    sums = {k: 0.0 for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                             "rewards/margins", "logps/chosen", "logps/rejected", "pairs")}
    engine.eval()
    with torch.no_grad():
        for i in range(rounds):
            real = i < len(mine)
            batch = collate([split[j] for j in (mine[i] if real else batches[0])], pad_id, dist.device)
            out = dpo_forward(engine, batch, cfg)
            if not real:
                continue  # a padding forward so that every rank joins ZeRO-3's gathers
            n = out["losses"].shape[0]
            for key, value in batch_metrics(out).items():
                sums[key] += value * n
            sums["pairs"] += n
    engine.train()
    total = all_reduce(sums, dist, op="sum")
    return {k: v / total["pairs"] for k, v in total.items() if k != "pairs"}


# ----------------------------------------------------------------------------- checkpoints

def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    return f.read_text().strip() if f.exists() else None


def save_checkpoint(engine: Engine, ckpt_dir: Path, step: int, plan: BatchPlan, dist: Dist, keep_last: int) -> None:
    import torch

    state = {"step": step, "samples_consumed": step * plan.global_batch, "epoch": step // plan.steps_per_epoch,
             "step_in_epoch": step % plan.steps_per_epoch, "torch_rng": torch.get_rng_state()}
    engine.save(ckpt_dir, f"step-{step}", state)
    barrier(dist)
    if dist.is_main:
        trainer_state = {k: v for k, v in state.items() if k != "torch_rng"}
        (ckpt_dir / f"step-{step}" / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        tags = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dist)


# ----------------------------------------------------------------------------- export

def export_model(engine: Engine, cfg: Config, tokenizer, dist: Dist) -> Path | None:
    """Gather the ZeRO-3 shards to rank 0 and write a Hugging Face model (or LoRA adapter) directory."""
    state = engine.full_state_dict()  # collective: every rank must call it
    out = cfg.export_dir()
    if dist.is_main:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # plain (unpartitioned) models from here on
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.model.lora.enabled:
            engine.module.save_pretrained(str(tmp), state_dict={k: v.cpu() for k, v in state.items()})
            if cfg.model.lora.merge_on_export:
                from peft import PeftModel

                base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.bfloat16)
                merged = PeftModel.from_pretrained(base, str(tmp)).merge_and_unload()
                merged.save_pretrained(str(tmp / "merged"), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp / "merged"))
        else:
            config = engine.module.config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            missing, unexpected = model.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
            missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", []) and "lm_head" not in k]
            if missing or unexpected:
                raise RuntimeError(f"export: gathered weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    barrier(dist)
    return out


# ----------------------------------------------------------------------------- main loop

def train(cfg: Config, resume: bool = False) -> TrainResult:
    import torch
    from transformers import AutoTokenizer

    from dpo_dist.score import resolve_model_dir

    dist = compute_init()
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / CKPT
    if ckpt_dir.exists() and latest_tag(ckpt_dir) and not resume:
        raise FileExistsError(f"{ckpt_dir}: checkpoints from an earlier run; pass --resume to continue it, "
                              "or choose another output_dir")

    # Check everything cheap before building the model.
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref_dir = resolve_model_dir(cfg.ref_model())
    manifest = check_cache(cfg, tokenizer, ref_dir)
    train_split = cache_mod.CachedSplit(cfg.resolved_cache_dir(), "train", manifest)
    eval_split = cache_mod.CachedSplit(cfg.resolved_cache_dir(), "eval", manifest)
    lengths = train_split.lengths()
    t = cfg.train
    plan = BatchPlan(len(train_split), t.micro_batch_size, t.gradient_accumulation_steps, dist.world_size, t.seed)
    if plan.steps_per_epoch == 0:
        raise ValueError(f"{len(train_split)} training pairs do not fill one global batch of {plan.global_batch} "
                         f"(micro {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} x world {dist.world_size})")
    total_steps = t.max_steps or t.epochs * plan.steps_per_epoch
    policy_is_ref = cfg.model.ref_name_or_path in (None, cfg.model.name_or_path)
    final_file = out_dir / "final_metrics.json"
    if resume and latest_tag(ckpt_dir) == f"step-{total_steps}" and final_file.exists() and (
            not cfg.export.enabled or cfg.export_dir().exists()):
        if dist.is_main:
            print(f"[dpo-dist] training already complete ({total_steps} steps, {final_file}); nothing to do", flush=True)
        final = json.loads(final_file.read_text())
        return TrainResult(total_steps, final["train"], final["eval"], cfg.export_dir() if cfg.export.enabled else None)

    from transformers import AutoConfig

    hidden = getattr(AutoConfig.from_pretrained(cfg.model.name_or_path), "hidden_size", 1024)
    ds_config = fill_ds_config(load_ds_json(t.deepspeed_config), t, dist.world_size, hidden,
                               has_gpu=dist.device != "cpu", source=t.deepspeed_config)
    model, _hf_ds = load_policy(cfg, ds_config, dist)
    n_params, n_trainable = count_params(model)
    engine = build_engine(model, ds_config, t, total_steps)
    local_fraction = all_reduce({"f": local_param_fraction(engine.module)}, dist)["f"]

    start_step = 0
    if resume and latest_tag(ckpt_dir):
        state = engine.load(ckpt_dir)
        start_step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
    writer = make_writer(out_dir / "tb", dist.is_main, purge_step=start_step + 1 if start_step else None)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        writer.add_text("config", "```\n" + to_yaml(cfg) + "\n```")
        mean_len = sum(lengths) / max(len(lengths), 1)
        print(f"[dpo-dist] world {dist.world_size} ({dist.device}), {len(train_split)} train / {len(eval_split)} eval pairs; "
              f"per step: {plan.global_batch} pairs = micro {t.micro_batch_size} x accum {t.gradient_accumulation_steps} "
              f"x world {dist.world_size}, ~{int(2 * plan.global_batch * mean_len):,} tokens; {total_steps} steps "
              f"({plan.steps_per_epoch}/epoch, {plan.dropped_per_epoch} pairs/epoch left over); "
              f"params {n_params:,} ({n_trainable:,} trainable); ZeRO stage {ds_config['zero_optimization']['stage']}, "
              f"each rank holds {local_fraction:.0%} of the weights"
              + (f"; resuming at step {start_step}" if start_step else ""), flush=True)

    from tqdm import tqdm

    progress = tqdm(total=total_steps, initial=start_step, unit="step", desc="training", disable=not dist.is_main,
                    dynamic_ncols=True)
    peak = peak_tflops(dist.device)
    metrics: dict = {}
    eval_metrics: dict = {}
    epoch_cache: dict[int, list] = {}
    engine.train()
    for step in range(start_step, total_steps):
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: plan.epoch_micro_batches(epoch, lengths)}
        started = time.perf_counter()
        lr = engine.lr()  # the rate this step uses (the scheduler moves on at the step)
        sums: dict[str, float] = {}
        tokens = 0
        for micro in plan.rank_step(epoch_cache[epoch], in_epoch, dist.rank):
            batch = collate([train_split[i] for i in micro], pad_id, dist.device)
            out = dpo_forward(engine, batch, cfg)
            if step == 0 and not sums:
                check = step0_check(out, batch, dist, t.step0_tolerance)
                writer.add_scalars_dict("step0", check, 0)
                if dist.is_main:
                    print(f"[dpo-dist] step-0 identity: loss {check['loss']:.4f} (ln 2 = {math.log(2):.4f}), "
                          f"mean |policy - ref| {check['mean_abs_diff_per_token']:.4f}/token, max {check['max_abs_diff']:.4f}/sequence",
                          flush=True)
                if policy_is_ref and check["mean_abs_diff_per_token"] > t.step0_tolerance:
                    raise Step0Error(
                        f"step-0 identity failed: policy log-probs differ from the cached reference by "
                        f"{check['mean_abs_diff_per_token']:.4f} per token on average (tolerance "
                        f"train.step0_tolerance={t.step0_tolerance}). The cache was scored with another model, "
                        "tokenizer or code version, or the policy is not loaded as the reference; see README troubleshooting")
            engine.backward(out["losses"].mean())
            engine.step()
            for key, value in batch_metrics(out).items():
                sums[key] = sums.get(key, 0.0) + value / t.gradient_accumulation_steps
            tokens += int(batch["attention_mask"].sum())
        elapsed = time.perf_counter() - started
        metrics = all_reduce(sums, dist)
        total_tokens = all_reduce({"tokens": tokens}, dist, op="sum")["tokens"]
        metrics.update({"lr": lr, "grad_norm": engine.grad_norm(), "tokens_per_sec": total_tokens / elapsed,
                        "pairs_per_sec": plan.global_batch / elapsed, "memory_gb": memory_gb(dist.device)})
        utilisation = mfu(n_params, n_trainable, total_tokens / elapsed / dist.world_size, peak)
        if utilisation is not None:
            metrics["mfu"] = utilisation
        done = step + 1
        if done % t.logging_steps == 0 or done == total_steps:
            writer.add_scalars_dict("train", metrics, done)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
        if t.eval_steps and done % t.eval_steps == 0 and done != total_steps:
            eval_metrics = evaluate(engine, eval_split, cfg, dist, pad_id)
            writer.add_scalars_dict("eval", eval_metrics, done)
        if (t.save_steps and done % t.save_steps == 0) or done == total_steps:
            save_checkpoint(engine, ckpt_dir, done, plan, dist, t.keep_last)
        if os.environ.get("DPO_DIST_CRASH_AFTER_STEP") == str(done):  # failure injection for resume tests
            raise SystemExit(f"DPO_DIST_CRASH_AFTER_STEP={done}: simulated crash")
    progress.close()
    eval_metrics = evaluate(engine, eval_split, cfg, dist, pad_id)
    writer.add_scalars_dict("eval", eval_metrics, total_steps)
    export_dir = export_model(engine, cfg, tokenizer, dist) if cfg.export.enabled else None
    final = {"steps": total_steps, "world_size": dist.world_size, "local_param_fraction": local_fraction, "train": metrics, "eval": eval_metrics, "export_dir": str(export_dir) if export_dir else None}
    if dist.is_main:
        writer.add_hparams(flatten({"loss": cfg.loss.__dict__, "train": {"lr": t.lr, "micro_batch_size": t.micro_batch_size,
                                    "gradient_accumulation_steps": t.gradient_accumulation_steps, "world_size": dist.world_size}}),
                           {f"hparam/eval_{k.replace('/', '_')}": v for k, v in eval_metrics.items()})
        final_file.write_text(json.dumps(final, indent=2))
    writer.close()
    return TrainResult(total_steps, metrics, eval_metrics, export_dir)
