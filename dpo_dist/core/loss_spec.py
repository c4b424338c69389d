"""What each preference loss type accepts, and the checks of its arguments: the standard library only.

core.loss holds the formulas (torch); this holds their parameters, defaults and ranges, so that the
config can refuse a bad loss setting at load time without importing torch (`dpo-dist train` checks
its config before it starts any process).
"""
from __future__ import annotations

import difflib
from typing import NamedTuple


class Spec(NamedTuple):
    params: dict | None = None  # variant-only parameters and their defaults
    scores: str = "logratio"  # "logratio" | "avg_logratio" | "avg_policy" (see core.loss._scores)
    label_smoothing: bool = False  # whether the variant reads label_smoothing


SPECS: dict[str, Spec] = {
    "sigmoid": Spec(label_smoothing=True),
    "robust": Spec(label_smoothing=True),
    "hinge": Spec(),
    "ipo": Spec(scores="avg_logratio"),
    "exo_pair": Spec(label_smoothing=True),
    "nca_pair": Spec(),
    "bco_pair": Spec(params={"bco_delta": 0.0}),
    "sppo_hard": Spec(),
    "aot": Spec(label_smoothing=True),
    "aot_unpaired": Spec(label_smoothing=True),
    "apo_zero": Spec(),
    "apo_down": Spec(),
    "discopop": Spec(params={"discopop_tau": 0.05}),
    # Length-normalized DPO (Tulu 3's dpo_norm, arXiv:2411.15124): DPO on per-token log-ratios.
    "sigmoid_norm": Spec(scores="avg_logratio", label_smoothing=True),
    "simpo": Spec(params={"gamma": 0.5}, scores="avg_policy"),
}

# Accepted by every loss type (reference_free only where a reference is used at all).
COMMON_PARAMS = {"reference_free": False, "rpo_alpha": None}


def spec_of(loss_type: str) -> Spec:
    spec = SPECS.get(loss_type)
    if spec is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(SPECS)}")
    return spec


def resolve_params(loss_type: str, given: dict) -> dict:
    """Defaults overlaid with the caller's variant params; unknown names are errors."""
    spec = spec_of(loss_type)
    allowed = dict(COMMON_PARAMS, **(spec.params or {}))
    if spec.scores == "avg_policy":
        del allowed["reference_free"]  # simpo never uses a reference
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(allowed), n=1)
        raise ValueError(
            f"unknown parameter {unknown[0]!r} for loss_type={loss_type!r}; "
            + (f"did you mean {close[0]!r}? " if close else "") + f"accepted: {', '.join(sorted(allowed))}"
        )
    return {**allowed, **given}


def check_scalars(loss_type: str, beta, label_smoothing, params: dict) -> float:
    """Validate beta, label_smoothing and variant params; returns the label_smoothing to use."""
    spec = spec_of(loss_type)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta} (loss_type={loss_type!r})")
    if not spec.label_smoothing and label_smoothing != 0:
        users = ", ".join(k for k, v in SPECS.items() if v.label_smoothing)
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect for loss_type={loss_type!r}; "
            f"set it to 0 (it applies to: {users})"
        )
    if loss_type == "exo_pair":
        if label_smoothing == 0:
            label_smoothing = 1e-3  # EXO needs eps > 0: log(eps) is part of the loss
        if not 0 < label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in (0, 0.5) for exo_pair, got {label_smoothing}")
    elif not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for {loss_type}, got {label_smoothing}")
    if "discopop_tau" in params and not params["discopop_tau"] > 0:
        raise ValueError(f"discopop_tau must be > 0, got {params['discopop_tau']}")
    if "gamma" in params and not params["gamma"] >= 0:
        raise ValueError(f"gamma (SimPO target margin) must be >= 0, got {params['gamma']}")
    if params["rpo_alpha"] is not None and not params["rpo_alpha"] >= 0:
        raise ValueError(f"rpo_alpha must be >= 0 or None, got {params['rpo_alpha']}")
    if not isinstance(params.get("reference_free", False), bool):
        raise ValueError(f"reference_free must be True or False, got {params['reference_free']!r}")
    return label_smoothing


def check_loss_args(loss_type: str, beta: float, label_smoothing: float, params: dict) -> None:
    """Raise ValueError, naming the argument, if preference_loss would refuse these arguments.

    The config calls this at load time, so a bad loss setting fails before any work starts.
    """
    check_scalars(loss_type, beta, label_smoothing, resolve_params(loss_type, dict(params)))
