"""Unit tests for dpo_dist.core.winrate: hand-computed win rates and Wilson intervals.

The main group has W = 6 wins, T = 2 ties, L = 2 losses and E = 3 errors, so
    n = 6 + 2 + 2 = 10 (errors excluded),  win_rate = (6 + 2 / 2) / 10 = 0.7.
Wilson at z = 2 (round numbers): z^2 / n = 0.4,
    center = (0.7 + 0.2) / 1.4 = 9/14,  half = (2 / 1.4) * sqrt(0.7 * 0.3 / 10 + 4 / 400) = (10/7) sqrt(0.031),
    [lo, hi] = [9/14 - (10/7) sqrt(0.031), 9/14 + (10/7) sqrt(0.031)] = [0.391331, 0.894383].
At z = 1.96: center = 0.89208 / 1.38416, half = (1.96 / 1.38416) sqrt(0.021 + 0.009604), [0.39677, 0.89221]
(the textbook 95% Wilson interval of 7/10).
"""
import math

import pytest

from dpo_dist.core.winrate import (Tally, aggregate, combine_orders, score_verdict, single_order, summarize,
                                   wilson_interval, win_rate)


def _tally(w, t, l, e=0) -> Tally:
    tally = Tally()
    for verdict, k in (("win", w), ("tie", t), ("loss", l), ("error", e)):
        for _ in range(k):
            tally.add(verdict)
    return tally


def test_win_rate_counts_ties_as_half_and_excludes_errors():
    t = _tally(6, 2, 2, 3)
    assert (t.wins, t.ties, t.losses, t.errors, t.n) == (6, 2, 2, 3, 10)
    assert win_rate(t) == pytest.approx(0.7)
    assert win_rate(_tally(0, 4, 0)) == 0.5
    assert win_rate(_tally(0, 0, 0, 5)) is None  # only errors: nothing judged, not a 0% and never a win


def test_wilson_interval_hand_computed():
    half = 10 / 7 * math.sqrt(0.031)
    assert wilson_interval(0.7, 10, z=2) == pytest.approx((9 / 14 - half, 9 / 14 + half))
    assert wilson_interval(0.7, 10, z=2) == pytest.approx((0.391331, 0.894383), abs=1e-6)
    assert wilson_interval(0.7, 10) == pytest.approx((0.39677, 0.89221), abs=1e-5)


def test_wilson_interval_holds_the_rate_exactly_at_the_ends():
    """At p = 0 (or 1) the formula's end is 0 (1) only up to float error: the bounds are clipped to
    the rate, so 0 <= low <= p <= high <= 1 holds exactly (the report checks it)."""
    for n in range(1, 200):
        for p in (0.0, 1.0, 0.5):
            lo, hi = wilson_interval(p, n)
            assert 0.0 <= lo <= p <= hi <= 1.0, (p, n, lo, hi)


def test_wilson_interval_edges():
    # p = 0, n = 5, z = 2: center = 0.8 / 1.8 = 4/9, half = (2 / 1.8) * sqrt(4 / 100) = 4/9.
    lo, hi = wilson_interval(0.0, 5, z=2)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(4 / 9)
    assert wilson_interval(1.0, 5, z=2) == pytest.approx((5 / 9, 1.0))
    # p = 0.5, n = 1, z = 2: center = 2.5 / 5 = 0.5, half = (2 / 5) * sqrt(0.25 + 1) = 1 / sqrt(5).
    assert wilson_interval(0.5, 1, z=2) == pytest.approx((0.5 - 5 ** -0.5, 0.5 + 5 ** -0.5))
    with pytest.raises(ValueError, match="n must be > 0"):
        wilson_interval(0.5, 0)


def test_summarize():
    assert summarize(_tally(6, 2, 2, 3), z=2) == pytest.approx(
        {"n": 10, "wins": 6, "ties": 2, "losses": 2, "errors": 3, "win_rate": 0.7,
         "ci_low": 0.391331, "ci_high": 0.894383}, abs=1e-6)
    assert summarize(_tally(0, 0, 0, 2)) == {"n": 0, "wins": 0, "ties": 0, "losses": 0, "errors": 2,
                                             "win_rate": None, "ci_low": None, "ci_high": None}


def test_combine_orders():
    g, r = "generated", "reference"
    assert combine_orders(g, g) == "win"
    assert combine_orders(r, r) == "loss"
    assert combine_orders(g, r) == combine_orders(r, g) == "tie"
    for first, second in ((None, g), (g, None), (None, None), (r, None)):
        assert combine_orders(first, second) == "error"
    with pytest.raises(ValueError):
        combine_orders("A", g)
    assert (single_order(g), single_order(r), single_order(None)) == ("win", "loss", "error")
    assert (score_verdict(1.0, 0.5), score_verdict(-1.0, 0.5), score_verdict(0.25, 0.25)) == ("win", "loss", "tie")


def test_aggregate_groups_and_sorts():
    def j(model, step, temp, verdict):
        return {"model": model, "checkpoint_step": step, "temperature": temp, "verdict": verdict}

    judgments = ([j("sft", None, 1.0, v) for v in ("win", "loss")]
                 + [j("dpo", None, 0.5, v) for v in ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2 + ["error"] * 3]
                 + [j("step-20", 20, 0.5, "error")] + [j("step-10", 10, 0.5, "tie")]
                 + [j("dpo", None, 0.25, "win")])
    rows = aggregate(judgments, z=2)
    assert [(r["model"], r["checkpoint_step"], r["temperature"]) for r in rows] == [
        ("dpo", None, 0.25), ("dpo", None, 0.5), ("sft", None, 1.0), ("step-10", 10, 0.5), ("step-20", 20, 0.5)]
    dpo = rows[1]
    assert (dpo["n"], dpo["wins"], dpo["ties"], dpo["losses"], dpo["errors"]) == (10, 6, 2, 2, 3)
    assert (dpo["win_rate"], dpo["ci_low"], dpo["ci_high"]) == pytest.approx((0.7, 0.391331, 0.894383), abs=1e-6)
    assert rows[2]["win_rate"] == 0.5
    assert rows[4]["errors"] == 1 and rows[4]["wins"] == 0 and rows[4]["win_rate"] is None
    with pytest.raises(ValueError, match="verdict must be one of"):
        aggregate([j("dpo", None, 0.5, "won")])
