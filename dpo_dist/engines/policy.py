"""The trained model in and out of DeepSpeed: load under ZeRO-3 (optionally with LoRA), export a
Hugging Face folder. Shared by the SFT and DPO stages."""
from __future__ import annotations

from pathlib import Path

from dpo_dist.config import LoraConfig, ModelConfig
from dpo_dist.core.atomic import DiskFullError, disk_full
from dpo_dist.core.removal import remove_tree
from dpo_dist.core.ds_json import precision
from dpo_dist.engines.deepspeed_engine import Engine, release_zero3, zero3_init
from dpo_dist.engines.dist import Dist, on_main


def load_policy(model_cfg: ModelConfig, lora: LoraConfig, policy_dir: Path, ds_config: dict):
    """from_pretrained under ZeRO-3 (partitioned at load), in the engine's dtype, every dropout off,
    optional LoRA. Returns (model, keepalive): keep the second alive while the engine is built."""
    import torch

    from dpo_dist.models import load_causal_lm

    keep = zero3_init(ds_config)
    model = load_causal_lm(policy_dir, dtype=getattr(torch, precision(ds_config)),
                           attn_implementation=model_cfg.attn_implementation,
                           trust_remote_code=model_cfg.trust_remote_code)
    model.config.use_cache = False  # training never reuses past keys; export turns it back on
    if model_cfg.gradient_checkpointing:
        # transformers renamed it (the old name warns from 5.2x on); either way non-reentrant
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
        model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
        if model_cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, keep


def export_model(engine: Engine, model_cfg: ModelConfig, lora: LoraConfig, policy_dir: Path, out: Path,
                 tokenizer, dist: Dist, merged_at_top: bool = False) -> Path:
    """Gather the ZeRO-3 shards to rank 0 and write a Hugging Face folder at `out`, ready for
    generation: use_cache on, the policy's generation config and original dropout values.

    With LoRA: the adapter at `out` (and the merged model in `out/merged` when lora.merge_on_export);
    `merged_at_top` puts the merged full model at `out` and the adapter in `out/adapter` instead, for
    a stage whose export must be a full model (SFT: the next stage's reference). Collective.

    Written to `out.tmp`, which replaces `out` once complete: a failure (a full disk: DiskFullError,
    on every rank) removes the partial folder and leaves the previous export as it was.
    """
    state = engine.full_state_dict()  # collective: every rank must call it
    on_main(dist, lambda: _write_export(engine, state, model_cfg, lora, policy_dir, out, tokenizer, merged_at_top))
    return out


def _write_export(engine: Engine, state: dict, model_cfg: ModelConfig, lora: LoraConfig, policy_dir: Path, out: Path,
                  tokenizer, merged_at_top: bool) -> None:
    """Rank 0's part of export_model."""
    from dpo_dist.models import load_model_config

    release_zero3()
    original = load_model_config(policy_dir, trust_remote_code=model_cfg.trust_remote_code)
    tmp = out.with_name(out.name + ".tmp")
    remove_tree(tmp, out.parent)
    try:
        _write_folder(engine, state, model_cfg, lora, policy_dir, tmp, tokenizer, merged_at_top, original)
    except Exception as e:
        full = disk_full(e, tmp)  # before the partial folder, which holds the space, is removed
        remove_tree(tmp, out.parent)
        if full:
            before = "the previous export there is intact" if out.exists() else "there was no earlier export"
            raise DiskFullError(f"{out}: {full} while writing this export; the partial {tmp.name} was removed and "
                                f"{before}; the checkpoints are untouched: free space, then rerun with --resume "
                                "to export again") from e
        raise
    remove_tree(out, out.parent)
    tmp.rename(out)


def _write_folder(engine: Engine, state: dict, model_cfg: ModelConfig, lora: LoraConfig, policy_dir: Path, tmp: Path,
                  tokenizer, merged_at_top: bool, original) -> None:
    import torch

    from dpo_dist.models import load_causal_lm, model_from_state_dict

    trust = model_cfg.trust_remote_code
    if lora.enabled:
        adapter_dir = tmp / "adapter" if merged_at_top else tmp
        engine.module.save_pretrained(str(adapter_dir), state_dict={k: v.cpu() for k, v in state.items()})
        if lora.merge_on_export or merged_at_top:
            from peft import PeftModel

            base = load_causal_lm(policy_dir, dtype=torch.bfloat16, attn_implementation=model_cfg.attn_implementation,
                                  trust_remote_code=trust)
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
            _ready_for_generation(merged, original)
            merged_dir = tmp if merged_at_top else tmp / "merged"
            merged.save_pretrained(str(merged_dir), safe_serialization=True)
            tokenizer.save_pretrained(str(merged_dir))
    else:
        model, missing, unexpected = model_from_state_dict(engine.module.config, {k: v.cpu() for k, v in state.items()},
                                                           dtype=torch.bfloat16, trust_remote_code=trust)
        if missing or unexpected:
            raise RuntimeError(f"export: gathered weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.generation_config = engine.module.generation_config
        _ready_for_generation(model, original)
        model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))


def _ready_for_generation(model, original) -> None:
    """The exported config as the user's model had it: use_cache on, dropout values restored (the
    trainer turned them off, models.disable_dropout; further fine-tuning may want them)."""
    from dpo_dist.models import random_in_training

    model.config.use_cache = True
    for key, value in original.to_dict().items():
        if random_in_training(key) and isinstance(value, (int, float)) and hasattr(model.config, key):
            setattr(model.config, key, value)


def usable_layout_noted(model_config, layout: str, speak: bool) -> str:
    """core.logps.usable_layout for the policy, its note printed (by the rank that `speak`s)."""
    from dpo_dist.core.logps import usable_layout

    layout, note = usable_layout(model_config, layout)
    if note and speak:
        print(f"[dpo-dist] {note}", flush=True)
    return layout
