"""The step-0 check's pure parts: the statistic, its bound, and a rank's sums over step 0.

At step 0 the policy has the reference's weights, so its log-probs must equal the cached ones up to
the dtypes' rounding (docs/DESIGN.md invariant 3). stages.train reduces the sums over the ranks and
raises before the first optimizer step when the statistic exceeds the bound.
"""
from __future__ import annotations

from dataclasses import dataclass

# The step-0 check (step0_bound): with a 16-bit side, sum |policy - cached| over the sequences of the
# first optimizer step (every micro-batch, every rank) may reach max(FLOOR x tokens, NOISE x sum of
# sqrt(tokens) per sequence). Rounding differences are not systematic, so a sequence's summed
# difference grows like sqrt(its tokens) (NOISE); a cache of other values shifts every token (FLOOR,
# which also covers the small per-token offset of a bf16 policy against a float32 cache). Measured
# on the real SmolLM2-135M-Instruct and HH pairs (bench/bench_step0_bound.py, BENCHMARKS.md "Step-0
# check on a real model"): correct runs reach at most 0.62 of this bound (0.38 from 4 pairs on),
# other weights, broken masks or positions, a maskless attention 1.4-18x (from 4 pairs on).
# float32 on both sides differs by summation order only (measured 1.6e-6 per token).
STEP0_FP32_TOLERANCE = 1e-4
STEP0_HALF_FLOOR = 0.02
STEP0_HALF_NOISE = 0.15


def step0_statistic(diff, tokens) -> float:
    """sum |policy - cached| / sum response tokens over sequences: diff, tokens (S,)."""
    return float(diff.abs().sum() / tokens.sum().clamp(min=1))


def step0_bound(cfg, policy_dtype: str, cache_dtype: str, tokens: float, sqrt_tokens: float) -> float:
    """The largest step0_statistic accepted for `tokens` response tokens in sequences whose
    sqrt(tokens) sum to `sqrt_tokens`: train.step0_tolerance, else the bound of the dtypes in play."""
    if cfg.train.step0_tolerance is not None:
        return cfg.train.step0_tolerance
    if policy_dtype == "float32" and cache_dtype == "float32":
        return STEP0_FP32_TOLERANCE
    return max(STEP0_HALF_FLOOR, STEP0_HALF_NOISE * sqrt_tokens / max(tokens, 1.0))


@dataclass
class Step0Sums:
    """This rank's |policy - cached| sums over the micro-batches of step 0."""

    abs_diff: float = 0.0
    tokens: float = 0.0
    sqrt_tokens: float = 0.0
    per_token_sum: float = 0.0  # sum over sequences of |diff| / tokens
    sequences: float = 0.0
    max_per_token: float = 0.0
    max_abs_diff: float = 0.0
    loss_sum: float = 0.0
    micro_batches: int = 0

    def add(self, out: dict, batch: dict) -> None:
        import torch

        seq = torch.cat([(out["chosen_logps"] - batch["ref_chosen_logps"]).abs(),
                         (out["rejected_logps"] - batch["ref_rejected_logps"]).abs()]).double()
        tokens = torch.cat([out["chosen_tokens"], out["rejected_tokens"]]).double()
        per_token = seq / tokens.clamp(min=1)
        self.abs_diff += float(seq.sum())
        self.tokens += float(tokens.sum())
        self.sqrt_tokens += float(tokens.sqrt().sum())
        self.per_token_sum += float(per_token.sum())
        self.sequences += seq.numel()
        self.max_per_token = max(self.max_per_token, float(per_token.max()))
        self.max_abs_diff = max(self.max_abs_diff, float(seq.max()))
        self.loss_sum += float(out["losses"].detach().float().mean())
        self.micro_batches += 1
