"""What both judges share: their error, the two sides of a comparison, the identity of a
judgment's row, and the usage counts of a run."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dpo_dist.core.errors import UserError

ORDERS = ("generated", "reference")  # which response is shown first (as A)


class JudgeError(UserError):
    """A judge that cannot run as configured (missing key, refused key, unknown model, bad rows)."""


@dataclass
class Usage:
    """requests: HTTP requests sent (retries included); cached: comparisons answered by the cache."""
    requests: int = 0
    retries: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self, price_per_1k_input: float, price_per_1k_output: float) -> dict:
        """Counts plus cost_usd = prompt_tokens / 1000 * price_in + completion_tokens / 1000 * price_out."""
        cost = self.prompt_tokens / 1000 * price_per_1k_input + self.completion_tokens / 1000 * price_per_1k_output
        return {**asdict(self), "cost_usd": round(cost, 6)}


def other_side(side: str) -> str:
    return ORDERS[1] if side == ORDERS[0] else ORDERS[0]


def row_ident(row: dict) -> dict:
    return {k: row[k] for k in ("prompt_id", "model", "checkpoint_step", "temperature", "sample")}
