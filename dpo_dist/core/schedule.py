"""The learning-rate schedule of SFT and DPO training, as a multiplier of the peak rate per step."""
from __future__ import annotations

import math


def lr_lambda(warmup: int, total: int, kind: str):
    """Multiplier of the peak lr: linear warmup, then linear / cosine decay to 0, or constant."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
