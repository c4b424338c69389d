"""Win rates against a reference response, as in the DPO paper's GPT-4 evaluations (arXiv:2305.18290, Sec. 6).

A judge compares a generated response y with the dataset's chosen response y_ref for the same
prompt. Each comparison ends in one verdict: win (y preferred), loss (y_ref preferred), tie, or
error (the judge gave no usable answer). Per group of judgments, with W wins, T ties, L losses
and E errors:

    n        = W + T + L                  errors are counted apart and never enter n
    win_rate = (W + T / 2) / n            a tie counts as half a win

The interval is Wilson's score interval (Wilson 1927) on that tie-adjusted rate p = win_rate:

    center    = (p + z^2 / (2n)) / (1 + z^2 / n)
    half      = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    [lo, hi]  = [center - half, center + half]   (z = 1.96 for 95%)

Wilson assumes n Bernoulli trials; a tie scores 1/2, whose variance (0) is below a coin flip's (1/4),
so with ties the interval errs on the wide (conservative) side. Nothing here knows about judges,
files or configs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

VERDICTS = ("win", "tie", "loss", "error")
Z_95 = 1.959963984540054  # standard normal quantile at 0.975
GROUP_KEYS = ("model", "checkpoint_step", "temperature")


@dataclass
class Tally:
    """Verdict counts of one group."""
    wins: int = 0
    ties: int = 0
    losses: int = 0
    errors: int = 0

    def add(self, verdict: str) -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        field = {"win": "wins", "tie": "ties", "loss": "losses", "error": "errors"}[verdict]
        setattr(self, field, getattr(self, field) + 1)

    @property
    def n(self) -> int:
        """Judged comparisons: W + T + L (errors excluded)."""
        return self.wins + self.ties + self.losses


def combine_orders(first: Optional[str], second: Optional[str]) -> str:
    """One verdict from the judge's choice in both orders (position-bias cancellation).

    Each argument is the response the judge preferred in one order, "generated" or "reference",
    or None when that judgment failed. Both generated -> win, both reference -> loss, split ->
    tie, any failure -> error (a half-judged pair is never counted, let alone as a win).
    """
    for choice in (first, second):
        if choice not in ("generated", "reference", None):
            raise ValueError(f"choice must be 'generated', 'reference' or None, got {choice!r}")
    if first is None or second is None:
        return "error"
    if first == second:
        return "win" if first == "generated" else "loss"
    return "tie"


def single_order(choice: Optional[str]) -> str:
    """Verdict of one judgment in one order: generated -> win, reference -> loss, None -> error."""
    return {"generated": "win", "reference": "loss", None: "error"}[choice]


def score_verdict(generated: float, reference: float) -> str:
    """Verdict from two scalar rewards (a reward-model judge): higher wins, equal is a tie."""
    if generated > reference:
        return "win"
    return "loss" if generated < reference else "tie"


def win_rate(t: Tally) -> Optional[float]:
    """(W + T / 2) / n; None when nothing was judged (n = 0)."""
    return (t.wins + 0.5 * t.ties) / t.n if t.n else None


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a rate p observed over n trials (formula in the module docstring).

    Clipped against rounding so that 0 <= low <= p <= high <= 1 (at p = 0 the formula's lower end is
    0 only up to float error). n must be > 0.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    z2n = z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return max(0.0, min(center - half, p)), min(1.0, max(center + half, p))


def summarize(t: Tally, z: float = Z_95) -> dict:
    """Counts, win rate and interval of one group; rate and bounds are None when n = 0."""
    rate = win_rate(t)
    low, high = wilson_interval(rate, t.n, z) if rate is not None else (None, None)
    return {"n": t.n, "wins": t.wins, "ties": t.ties, "losses": t.losses, "errors": t.errors,
            "win_rate": rate, "ci_low": low, "ci_high": high}


def _group_order(key: tuple) -> tuple:
    """Sort groups by model, then checkpoint step (None first), then temperature."""
    model, step, temperature = key
    return (str(model), step is not None, step if step is not None else 0, temperature)


def aggregate(judgments: Iterable[dict], z: float = Z_95) -> list[dict]:
    """One summary row per (model, checkpoint_step, temperature), sorted by those.

    Each judgment is a dict with those three keys and `verdict` in VERDICTS. A row is
    {"model", "checkpoint_step", "temperature", **summarize(tally)}.
    """
    tallies: dict[tuple, Tally] = {}
    for j in judgments:
        key = tuple(j[k] for k in GROUP_KEYS)
        tallies.setdefault(key, Tally()).add(j["verdict"])
    return [{**dict(zip(GROUP_KEYS, key)), **summarize(tallies[key], z)}
            for key in sorted(tallies, key=_group_order)]
