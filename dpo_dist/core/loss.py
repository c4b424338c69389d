"""Preference losses of the DPO family, as pure functions of per-example log-probs.

Every input is a (B,) tensor: summed response log-probs for the policy (with grad) and the
reference (constants, usually read from the cache), plus response token counts for the
length-normalized variants. `preference_loss` returns per-example losses (the caller reduces)
and detached implicit rewards. Nothing here knows about models, engines or configs.

Notation used in the docstrings below, per example:
    c = policy_chosen_logps - ref_chosen_logps        chosen log-ratio
    r = policy_rejected_logps - ref_rejected_logps    rejected log-ratio
    z = beta * (c - r)                                scaled margin
    ls = label_smoothing, sigma = logistic function, log sigma = F.logsigmoid
Length-normalized variants first divide c and r by the response token counts.
"""
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_dist.core.loss_spec import SPECS, check_scalars, resolve_params


class Scores(NamedTuple):
    """What a variant sees: one score per response and the reference margin.

    chosen, rejected: (B,) log-ratios c and r (per-token averages for ipo and sigmoid_norm,
        averaged policy log-probs for simpo). The rewards returned are beta * these, detached.
    ref_margin: (B,) ref_chosen_logps - ref_rejected_logps (zeros when reference-free);
        only the paired AOT loss needs it.
    """
    chosen: Tensor
    rejected: Tensor
    ref_margin: Tensor


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """(1 - ls) * -log sigma(z) + ls * -log sigma(-z): logistic loss with a flip probability ls."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _sigmoid(s: Scores, beta: float, label_smoothing: float) -> Tensor:
    """DPO, Eq. 7 of arXiv:2305.18290: -log sigma(z).

    With ls > 0 this is conservative DPO (cDPO; E. Mitchell's 2023 note, discussed in
    arXiv:2403.00409): the label is assumed flipped with probability ls,
    loss = -(1 - ls) log sigma(z) - ls log sigma(-z). Returns (B,).
    """
    return _smoothed_logistic(beta * (s.chosen - s.rejected), label_smoothing)


def _robust(s: Scores, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (rDPO), arXiv:2403.00409: an unbiased loss under label noise ls.

    loss = [-(1 - ls) log sigma(z) + ls log sigma(-z)] / (1 - 2 ls). Returns (B,).
    """
    z = beta * (s.chosen - s.rejected)
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )


def _hinge(s: Scores, beta: float) -> Tensor:
    """SLiC-HF calibration loss, arXiv:2305.10425, on log-ratios: max(0, 1 - z).

    beta plays the role of 1 / margin. Returns (B,).
    """
    return torch.relu(1 - beta * (s.chosen - s.rejected))


def _ipo(s: Scores, beta: float) -> Tensor:
    """IPO, Eq. 17 of arXiv:2310.12036 with tau = beta: (c - r - 1 / (2 beta))^2.

    c and r are per-token averaged log-ratios (as the IPO authors and TRL do), so the target
    margin does not scale with response length. Returns (B,).
    """
    return (s.chosen - s.rejected - 1 / (2 * beta)) ** 2


def _exo_pair(s: Scores, beta: float, label_smoothing: float) -> Tensor:
    """EXO-pref for K=2, Eq. 16 of arXiv:2402.00856: KL(p_theta || p_data) over {chosen, rejected}.

    p_theta = (sigma(z), sigma(-z)), p_data = (1 - eps, eps) with eps = ls in (0, 0.5):
    loss = sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps).
    Returns (B,).
    """
    z = beta * (s.chosen - s.rejected)
    eps = label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(s: Scores, beta: float) -> Tensor:
    """Pairwise NCA, arXiv:2402.05369: absolute rewards, not only their difference.

    loss = -log sigma(beta c) - 0.5 log sigma(-beta c) - 0.5 log sigma(-beta r). Returns (B,).
    """
    rc, rr = beta * s.chosen, beta * s.rejected
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def _bco_pair(s: Scores, beta: float, bco_delta: float | Tensor) -> Tensor:
    """BCO on pairs, arXiv:2404.04656: each response classified against a shift delta.

    loss = -log sigma(beta c - delta) - log sigma(-(beta r - delta)). The paper's delta is a
    running mean of the rewards; this function keeps no state, so the caller passes it as
    `bco_delta` (float or 0-d tensor, default 0.0). Returns (B,).
    """
    return -F.logsigmoid(beta * s.chosen - bco_delta) - F.logsigmoid(-(beta * s.rejected - bco_delta))


def _sppo_hard(s: Scores, beta: float) -> Tensor:
    """SPPO with hard win probabilities, Eq. 4.7 of arXiv:2405.00675 (P = 1 winner, 0 loser).

    loss = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2, with eta = 1 / beta. Returns (B,).
    """
    half = 0.5 / beta
    return (s.chosen - half) ** 2 + (s.rejected + half) ** 2


def _aot(s: Scores, beta: float, label_smoothing: float) -> Tensor:
    """AOT, paired, arXiv:2406.05882: first-order stochastic dominance in the batch.

    Sort the policy margins (policy_chosen - policy_rejected) and the reference margins
    separately, pair them by rank, and apply the (smoothed) logistic loss to
    d_i = beta * (sorted policy margin_i - sorted ref margin_i). TRL calls this "aot".
    The loss of row i belongs to rank i, not to example i. Returns (B,).
    """
    policy_margin = s.chosen - s.rejected + s.ref_margin
    d = torch.sort(policy_margin).values - torch.sort(s.ref_margin).values
    return _smoothed_logistic(beta * d, label_smoothing)


def _aot_unpaired(s: Scores, beta: float, label_smoothing: float) -> Tensor:
    """AOT, unpaired, arXiv:2406.05882: chosen rewards should dominate rejected ones.

    Sort the chosen log-ratios c and the rejected log-ratios r separately, pair them by rank,
    and apply the (smoothed) logistic loss to beta * (sorted c_i - sorted r_i). TRL calls this
    "aot_unpaired" (older TRL: "aot_pair"). Row i belongs to rank i. Returns (B,).
    """
    d = torch.sort(s.chosen).values - torch.sort(s.rejected).values
    return _smoothed_logistic(beta * d, label_smoothing)


def _apo_zero(s: Scores, beta: float) -> Tensor:
    """APO-zero, Eq. 7 of arXiv:2408.06266: raise chosen, lower rejected likelihood.

    For data whose chosen answers beat the model's own. loss = 1 - sigma(beta c) + sigma(beta r).
    Returns (B,).
    """
    return 1 - torch.sigmoid(beta * s.chosen) + torch.sigmoid(beta * s.rejected)


def _apo_down(s: Scores, beta: float) -> Tensor:
    """APO-down, Eq. 8 of arXiv:2408.06266: lower both, rejected more.

    For data whose chosen answers are worse than the model's own.
    loss = sigma(beta c) + 1 - sigma(z). Returns (B,).
    """
    return torch.sigmoid(beta * s.chosen) + 1 - torch.sigmoid(beta * (s.chosen - s.rejected))


def _discopop(s: Scores, beta: float, discopop_tau: float) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), Eq. 5 of arXiv:2406.08414.

    m = sigma(z / tau); loss = (1 - m) * -log sigma(z) + m * exp(-z). tau = `discopop_tau`
    (default 0.05, the paper's). Returns (B,).
    """
    z = beta * (s.chosen - s.rejected)
    m = torch.sigmoid(z / discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


def _simpo(s: Scores, beta: float, gamma: float) -> Tensor:
    """SimPO, Eq. 6 of arXiv:2405.14734: reference-free, length-normalized, with a margin.

    loss = -log sigma(beta (avg_c - avg_r) - gamma), avg = policy log-prob / token count.
    gamma is the paper's absolute target margin (not TRL's gamma/beta ratio). Returns (B,).
    """
    return -F.logsigmoid(beta * (s.chosen - s.rejected) - gamma)


class _Variant(NamedTuple):
    fn: Callable[..., Tensor]
    params: dict | None  # variant-only parameters and their defaults
    scores: str  # "logratio" | "avg_logratio" | "avg_policy" (see _scores)
    label_smoothing: bool  # whether the variant reads label_smoothing


_FUNCTIONS = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair,
              "nca_pair": _nca_pair, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot,
              "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
              "sigmoid_norm": _sigmoid, "simpo": _simpo}
# Each loss type: its function here, its parameters and checks in loss_spec (which loads no torch).
LOSSES: dict[str, _Variant] = {name: _Variant(_FUNCTIONS[name], *spec) for name, spec in SPECS.items()}


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **variant_params,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example preference loss and implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs, with grad.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference (constants;
            ignored by simpo and when reference_free=True).
        loss_type: a key of LOSSES (see each function's docstring for its formula and paper).
        beta: inverse temperature / KL strength, > 0.
        label_smoothing: assumed label-flip rate for sigmoid, sigmoid_norm, robust, aot and
            aot_unpaired, in [0, 0.5); for exo_pair the target probability eps in (0, 0.5),
            where 0 means 1e-3 (the EXO paper's and TRL's default). Must be 0 elsewhere.
        chosen_lengths, rejected_lengths: (B,) response token counts, required by ipo,
            sigmoid_norm and simpo (and chosen_lengths by rpo_alpha); clamped to >= 1.
        **variant_params:
            reference_free (bool, False): treat reference log-probs as 0 (not for simpo).
            rpo_alpha (float | None, None): RPO, arXiv:2404.19733: add
                rpo_alpha * (-policy_chosen_logps / chosen_lengths), the chosen per-token NLL.
            bco_delta (bco_pair, 0.0), discopop_tau (discopop, 0.05), gamma (simpo, 0.5).

    Returns:
        losses (B,) with grad; chosen_rewards, rejected_rewards (B,) detached, equal to
        beta * the variant's scores: beta * log-ratio by default, beta * per-token log-ratio
        for ipo and sigmoid_norm, beta * per-token policy log-prob for simpo.
    """
    variant = LOSSES.get(loss_type)
    if variant is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSSES)}")
    params = resolve_params(loss_type, variant_params)
    label_smoothing = check_scalars(loss_type, beta, label_smoothing, params)
    _check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    rpo_alpha = params.pop("rpo_alpha")
    if variant.scores != "logratio":
        needer = f"loss_type={loss_type!r}"
        _require_lengths(needer, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if rpo_alpha:
        _require_lengths("rpo_alpha", chosen_lengths=chosen_lengths)

    if params.pop("reference_free", False) or variant.scores == "avg_policy":
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    scores = _scores(
        variant.scores, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps, chosen_lengths, rejected_lengths,
    )
    if variant.label_smoothing:
        params["label_smoothing"] = label_smoothing
    losses = variant.fn(scores, beta, **params)
    if rpo_alpha:
        # RPO (arXiv:2404.19733): per-token NLL of the chosen response, with its gradient.
        nll = -policy_chosen_logps / _per_token(chosen_lengths, policy_chosen_logps)
        losses = losses + rpo_alpha * nll
    return losses, (beta * scores.chosen).detach(), (beta * scores.rejected).detach()


def _require_lengths(needer: str, **lengths: Tensor | None) -> None:
    for name, value in lengths.items():
        if value is None:
            raise ValueError(f"{name} is required by {needer}: pass the (B,) response token counts")


def _per_token(lengths: Tensor, like: Tensor) -> Tensor:
    # A response truncated to 0 tokens has summed log-prob 0; dividing by 1 keeps it 0, not NaN.
    return lengths.to(like.dtype).clamp(min=1)


def _scores(kind, pc, pr, rc, rr, chosen_lengths, rejected_lengths) -> Scores:
    """Build the (B,) scores a variant works on; see Scores."""
    c, r = pc - rc, pr - rr
    if kind == "avg_logratio":
        c, r = c / _per_token(chosen_lengths, c), r / _per_token(rejected_lengths, r)
    elif kind == "avg_policy":
        c, r = pc / _per_token(chosen_lengths, pc), pr / _per_token(rejected_lengths, pr)
    return Scores(c, r, rc - rr)


def _check_shapes(**tensors: Tensor | None) -> None:
    """All given tensors must be 1-D with the same length B."""
    first = tensors["policy_chosen_logps"]
    if first.dim() != 1:
        raise ValueError(f"policy_chosen_logps must have shape (B,), got {tuple(first.shape)}")
    expected = first.shape
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 1 or t.shape != expected:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected (B,) = {tuple(expected)} "
                "like policy_chosen_logps"
            )


def sft_loss(logps_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """Supervised fine-tuning loss: mean negative log-likelihood per response token of the batch.

    logps_sum: (B,) summed log-probs of each response (prompt tokens masked out, logps.sequence_logps);
    num_tokens: (B,) response token counts. Returns the scalar -sum_b logps_sum_b / sum_b num_tokens_b,
    so every token weighs the same whatever the length of its sequence (the DPO paper's SFT stage
    maximises the likelihood of the preferred responses y_w given x).
    """
    return -logps_sum.sum() / num_tokens.sum().clamp(min=1)
