"""The step-0 identity check of a DPO run (docs/DESIGN.md invariant 3): the sums of core.step0 reduced
over the ranks, logged, and a refusal beyond the bound when the policy has the reference's weights."""
from __future__ import annotations

import math

from dpo_dist.core.errors import UserError
from dpo_dist.core.step0 import Step0Sums
from dpo_dist.engines.dist import Dist, all_reduce


class Step0Error(UserError):
    """At step 0 the policy's log-probs differ from the cached reference values."""


def step0_stats(sums: Step0Sums, dist: Dist) -> dict[str, float]:
    """The step-0 figures over every rank (collective): the check statistic (abs_diff_per_token,
    pooled over tokens) and, for the logs, per sequence the mean and the worst."""
    total = all_reduce({"abs_diff": sums.abs_diff, "tokens": sums.tokens, "sqrt_tokens": sums.sqrt_tokens,
                        "per_token_sum": sums.per_token_sum, "sequences": sums.sequences, "loss_sum": sums.loss_sum,
                        "micro_batches": sums.micro_batches}, dist, op="sum")
    # the ranks of a sequence-parallel group hold the same pairs' sums: each pair counted once
    total = {k: v / dist.sp_size for k, v in total.items()}
    worst = all_reduce({"max_abs_diff_per_token": sums.max_per_token, "max_abs_diff": sums.max_abs_diff}, dist, op="max")
    return {"abs_diff_per_token": total["abs_diff"] / max(total["tokens"], 1.0), "tokens": total["tokens"],
            "sqrt_tokens": total["sqrt_tokens"], "mean_abs_diff_per_token": total["per_token_sum"] / max(total["sequences"], 1.0),
            "loss": total["loss_sum"] / max(total["micro_batches"], 1.0), **worst}


def check_step0(stats: dict, prepared, tolerance: float, dist: Dist, writer) -> None:
    """Log the step-0 differences (every run) and stop when the policy is the reference and they exceed the bound."""
    logged = {k: v for k, v in stats.items() if k != "sqrt_tokens"}
    writer.add_scalars_dict("step0", {**logged, "tolerance": tolerance, "applies": float(prepared.policy_is_reference)}, 0)
    if dist.is_main:
        what = (f"bound {tolerance:.3g}" if prepared.policy_is_reference
                else "not checked: the policy's weights are not the reference's")
        print(f"[dpo-dist] step-0 identity: loss {stats['loss']:.4f} (ln 2 = {math.log(2):.4f}), |policy - ref| "
              f"{stats['abs_diff_per_token']:.2e} per token over {int(stats['tokens'])} response tokens ({what}; "
              f"worst sequence {stats['max_abs_diff_per_token']:.2e} per token)", flush=True)
    if prepared.policy_is_reference and stats["abs_diff_per_token"] > tolerance:
        raise Step0Error(
            f"step-0 identity failed: the policy has the reference's weights, yet its log-probs differ from the cached "
            f"ones by {stats['abs_diff_per_token']:.4g} per token over the {int(stats['tokens'])} response tokens of the "
            f"first step (bound {tolerance:.3g}, train.step0_tolerance). The cache's values come from other weights, or "
            "the policy runs differently from the scorer (attention, mask, positions, dtype); see README troubleshooting")
