"""What one micro-batch of pairs computes in DPO training: the batch (pairs and their cached reference
values), the policy's log-probs and the loss, its metrics; and the eval pass over the cached eval split."""
from __future__ import annotations

from dpo_dist.config import Config
from dpo_dist.core import cache as cache_mod
from dpo_dist.engines.dist import Dist, all_reduce, rank_rounds


def collate(rows: list[dict], pad_id: int, device: str, layout: str = "shared", engine=None,
            first_step: bool = False) -> dict:
    """The micro-batch's pairs in `layout` (core.packing) with their cached reference values; one row
    with attention spans where `engine`'s model runs segment attention. `first_step`: a micro-batch of
    the first optimizer step, whose attention runs the scorer's kernels (`Spans.sdpa`): the step-0
    check then compares like with like (bit for bit where dtype and layout agree)."""
    import torch

    from dpo_dist.core.logps import segment_attention_on, to_device
    from dpo_dist.core.packing import on_ranks, pairs_layout

    segments = engine is not None and segment_attention_on(engine)
    sp = getattr(engine, "sp", None)  # sequence parallelism: this rank's slice of the row
    batch = pairs_layout(rows, layout, pad_id, segment_attention=segments, pad_to_multiple_of=sp.size if sp else None)
    batch = to_device(on_ranks(batch, sp), device)
    if first_step and batch.get("spans") is not None:
        batch["spans"].sdpa = True
    batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float32, device=device)
    batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float32, device=device)
    return batch


def dpo_forward(engine, batch: dict, cfg: Config) -> dict:
    """Policy log-probs of the pairs (chosen then rejected), the loss and its per-example pieces."""
    from dpo_dist.core.logps import layout_logps, split_chosen_rejected
    from dpo_dist.core.loss import preference_loss

    logps, counts = layout_logps(engine, batch, fused=cfg.model.fused_head)  # (2B,), (2B,)
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
    return {"loss": float(out["losses"].detach().float().mean()), "rewards/chosen": float(rc.mean()),
            "rewards/rejected": float(rr.mean()), "rewards/accuracies": float((rc > rr).float().mean()),
            "rewards/margins": float((rc - rr).mean()), "logps/chosen": float(out["chosen_logps"].float().mean()),
            "logps/rejected": float(out["rejected_logps"].float().mean())}


def eval_rewards(engine, split: cache_mod.CachedSplit, cfg: Config, dist: Dist, pad_id: int) -> dict[str, float]:
    """Reward metrics over the whole eval split; every rank runs the same number of forwards (ZeRO-3)."""
    import torch

    from dpo_dist.core.batching import length_batches

    if len(split) == 0:
        return {}
    batches = length_batches(split.lengths(), token_budget=10**12, max_items=cfg.train.micro_batch_size)
    sums = {k: 0.0 for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                             "rewards/margins", "logps/chosen", "logps/rejected", "pairs")}
    engine.eval()
    with torch.no_grad():
        for i in rank_rounds(len(batches), dist):
            batch = collate([split[j] for j in batches[i or 0]], pad_id, dist.device, cfg.model.layout, engine)
            out = dpo_forward(engine, batch, cfg)
            if i is None:
                continue  # a padding forward so that every rank joins ZeRO-3's gathers
            n = out["losses"].shape[0]
            for key, value in batch_metrics(out).items():
                sums[key] += value * n
            sums["pairs"] += n
    engine.train()
    total = all_reduce(sums, dist, op="sum")
    return {k: v / total["pairs"] for k, v in total.items() if k != "pairs"}
