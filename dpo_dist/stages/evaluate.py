"""`dpo-dist eval`: held-out preference accuracy and reward margins of any model against the cache.

    dpo-dist eval --config CFG --model outputs/run/export              # an exported model (or LoRA adapter)
    dpo-dist eval --config CFG --checkpoint 200                        # a DeepSpeed checkpoint of the run

The eval split's reference log-probs come from the cache (no reference model is loaded); the model's
own log-probs are computed in one process (GPU when there is one). Rewards follow the config's loss:
r = beta * (policy - reference) log-ratio (Eq. 5, arXiv:2305.18290), accuracy = share of pairs with
r_chosen > r_rejected. Writes OUTPUT_DIR/eval/<label>.json, the form `dpo-dist report` reads.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dpo_dist.config import Config
from dpo_dist.core.atomic import atomic_write_bytes
from dpo_dist.core import cache as cache_mod
from dpo_dist.core.errors import UserError
from dpo_dist.core.tokenize import pad_token_id


def _load_model(cfg: Config, model: str | None, checkpoint: int | None, dtype):
    """(model, label, source path, step) for an exported folder, a LoRA adapter folder, or a checkpoint."""
    from dpo_dist.models import load_causal_lm, load_model_config, model_from_state_dict, resolve_model_dir

    trust = cfg.model.trust_remote_code
    if checkpoint is not None:
        ckpt = Path(cfg.output_dir) / "checkpoints"
        if not (ckpt / f"step-{checkpoint}" / "COMPLETE").is_file():
            raise UserError(f"{ckpt}/step-{checkpoint}: no complete checkpoint of step {checkpoint}")
        if cfg.model.lora.enabled:
            raise UserError("--checkpoint reads full-weight runs; for a LoRA run evaluate an export (--model)")
        from dpo_dist.engines.deepspeed_engine import consolidated_state_dict

        policy_dir = resolve_model_dir(cfg.policy_model(), trust_remote_code=trust)
        net, missing, unexpected = model_from_state_dict(load_model_config(policy_dir, trust_remote_code=trust),
                                                         consolidated_state_dict(ckpt, f"step-{checkpoint}"), dtype=dtype,
                                                         trust_remote_code=trust)
        if missing or unexpected:
            raise UserError(f"{ckpt}/step-{checkpoint}: its weights do not fit {policy_dir} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return net.to(dtype), f"step-{checkpoint}", str(ckpt / f"step-{checkpoint}"), checkpoint
    path = Path(model).expanduser()
    if (path / "adapter_config.json").is_file():  # a LoRA export: the adapter on its base model
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        net = PeftModel.from_pretrained(load_causal_lm(resolve_model_dir(base, trust_remote_code=trust), dtype=dtype,
                                                       attn_implementation=cfg.model.attn_implementation,
                                                       trust_remote_code=trust), str(path))
        return net, path.name, str(path), None
    folder = resolve_model_dir(model, trust_remote_code=trust)
    net = load_causal_lm(folder, dtype=dtype, attn_implementation=cfg.model.attn_implementation, trust_remote_code=trust)
    step = int(path.name[5:]) if path.name.startswith("step-") and path.name[5:].isdigit() else None
    return net, path.name, str(folder), step


def evaluate_model(cfg: Config, model: str | None = None, checkpoint: int | None = None, dtype: str = "auto",
                   label: str | None = None, batch_size: int = 8) -> dict:
    """Preference metrics of one model over the cached eval split; writes OUTPUT_DIR/eval/<label>.json."""
    import torch
    from tqdm import tqdm

    from dpo_dist.identity import training_cache
    from dpo_dist.core.logps import layout_logps, segment_attention_on, split_chosen_rejected, to_device
    from dpo_dist.core.packing import pairs_layout
    from dpo_dist.core.loss import preference_loss

    if (model is None) == (checkpoint is None):
        raise UserError("give exactly one of --model PATH and --checkpoint STEP")
    manifest = cache_mod.open_cache(cfg.resolved_cache_dir(), training_cache(cfg).identity)
    split = cache_mod.CachedSplit(cfg.resolved_cache_dir(), "eval", manifest)
    if len(split) == 0:
        raise UserError(f"{cfg.resolved_cache_dir()}: the cache has no eval pairs (set data.eval or data.eval_fraction)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    net, default_label, source, step = _load_model(cfg, model, checkpoint, torch_dtype)
    net = net.to(device).eval()
    from dpo_dist.core.logps import usable_layout

    layout, note = usable_layout(getattr(net, "config", None), cfg.model.layout)
    if note:
        print(f"[dpo-dist] {note}", flush=True)
    from dpo_dist.models import load_tokenizer

    tokenizer = load_tokenizer(training_cache(cfg).tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    loss_cfg = cfg.loss
    sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "margin": 0.0, "accuracy": 0.0}
    started = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, len(split), batch_size), desc="eval", unit="batch", mininterval=5):
            rows = [split[i] for i in range(start, min(start + batch_size, len(split)))]
            batch = to_device(pairs_layout(rows, layout, pad_id, segment_attention=segment_attention_on(net)), device)
            logps, counts = layout_logps(net, batch, fused=cfg.model.fused_head)
            chosen, rejected = split_chosen_rejected(logps.float())
            n_chosen, n_rejected = split_chosen_rejected(counts)
            losses, rc, rr = preference_loss(
                chosen, rejected, torch.tensor([r["ref_chosen_logps"] for r in rows], device=device),
                torch.tensor([r["ref_rejected_logps"] for r in rows], device=device),
                loss_type=loss_cfg.loss_type, beta=loss_cfg.beta, label_smoothing=loss_cfg.label_smoothing,
                chosen_lengths=n_chosen, rejected_lengths=n_rejected, **loss_cfg.params)
            sums["loss"] += float(losses.sum())
            sums["chosen_reward"] += float(rc.sum())
            sums["rejected_reward"] += float(rr.sum())
            sums["margin"] += float((rc - rr).sum())
            sums["accuracy"] += float((rc > rr).float().sum())
    n = len(split)
    from dpo_dist.identity import model_identity

    result = {"model": label or default_label, "model_path": source, "step": step, "n": n,
              **{k: v / n for k, v in sums.items()}, "loss_type": loss_cfg.loss_type, "beta": loss_cfg.beta,
              "dtype": str(torch_dtype).removeprefix("torch."), "seconds": round(time.perf_counter() - started, 2)}
    if checkpoint is None and not Path(source, "adapter_config.json").is_file():
        result["model_identity"] = model_identity(source)
    out = Path(cfg.output_dir) / "eval" / f"{result['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    result["path"] = str(out)
    return result


def add_eval_args(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="PATH", help="an exported model or LoRA adapter folder (or hub id)")
    what.add_argument("--checkpoint", type=int, metavar="STEP", help="a complete DeepSpeed checkpoint of OUTPUT_DIR")
    p.add_argument("--label", help="name of the result (default: the folder name, or step-N)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward")


def print_result(r: dict) -> None:
    print(f"{r['model']}: held-out reward accuracy {r['accuracy']:.3f}, margin {r['margin']:.3f} "
          f"(chosen {r['chosen_reward']:.3f}, rejected {r['rejected_reward']:.3f}), loss {r['loss']:.4f} "
          f"over {r['n']} pairs ({r['loss_type']}, beta {r['beta']:g}); {r['path']}")
