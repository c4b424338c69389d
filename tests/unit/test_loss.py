"""Unit tests for dpo_dist.core.loss: hand-computed values, gradients, rewards, validation.

Most tests use one batch of two pairs (B = 2):
    policy_chosen   = [-1.0, -4.0]    ref_chosen   = [-3.0, -5.0]
    policy_rejected = [-2.0, -3.0]    ref_rejected = [-2.5, -2.0]
so the chosen log-ratios are c = [2.0, 1.0], the rejected ones r = [0.5, -1.0] and the
margins c - r = [1.5, 2.0]. Response lengths: chosen [4, 8] tokens, rejected [5, 2].
"""
import math

import pytest
import torch

from dpo_dist.core.loss import LOSSES, preference_loss

PC, PR = [-1.0, -4.0], [-2.0, -3.0]
RC, RR = [-3.0, -5.0], [-2.5, -2.0]
NC, NR = [4, 8], [5, 2]
ALL_TYPES = list(LOSSES)
# Variants whose reward is the plain DPO one, beta * (policy - ref) summed log-probs.
DPO_REWARD_TYPES = [t for t in ALL_TYPES if t not in ("ipo", "sigmoid_norm", "simpo")]


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigma(x: float) -> float:
    return math.log(sigma(x))


def run(loss_type="sigmoid", pc=PC, pr=PR, rc=RC, rr=RR, lengths=True, **kw):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    if lengths:
        kw.setdefault("chosen_lengths", torch.tensor(NC))
        kw.setdefault("rejected_lengths", torch.tensor(NR))
    pc = t(pc).requires_grad_(True)
    pr = t(pr).requires_grad_(True)
    return preference_loss(pc, pr, t(rc), t(rr), loss_type=loss_type, **kw)


def check(losses, expected):
    assert losses.shape == (len(expected),)
    torch.testing.assert_close(losses.detach(), torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------- hand-computed values


def test_sigmoid_value():
    """beta = 0.1, z = 0.1 * (c - r) = [0.15, 0.2]; loss = -log sigma(z)."""
    losses, chosen, rejected = run("sigmoid", beta=0.1)
    expected = [
        -math.log(1 / (1 + math.exp(-0.1 * ((-1.0 - -3.0) - (-2.0 - -2.5))))),
        -math.log(1 / (1 + math.exp(-0.1 * ((-4.0 - -5.0) - (-3.0 - -2.0))))),
    ]
    check(losses, expected)
    check(chosen, [0.2, 0.1])
    check(rejected, [0.05, -0.1])


def test_sigmoid_label_smoothing_is_cdpo():
    """ls = 0.2, z = [0.15, 0.2]; loss = 0.8 * -log sigma(z) + 0.2 * -log sigma(-z)."""
    losses, _, _ = run("sigmoid", beta=0.1, label_smoothing=0.2)
    check(losses, [-0.8 * log_sigma(z) - 0.2 * log_sigma(-z) for z in (0.15, 0.2)])


def test_robust_value():
    """ls = 0.2, z = [0.15, 0.2]; loss = (-0.8 log sigma(z) + 0.2 log sigma(-z)) / (1 - 0.4)."""
    losses, _, _ = run("robust", beta=0.1, label_smoothing=0.2)
    check(losses, [(-0.8 * log_sigma(z) + 0.2 * log_sigma(-z)) / 0.6 for z in (0.15, 0.2)])
    # With no noise rDPO is plain DPO.
    check(run("robust", beta=0.1)[0], [-log_sigma(0.15), -log_sigma(0.2)])


def test_hinge_value():
    """beta = 0.4, z = 0.4 * [1.5, 2.0] = [0.6, 0.8]; loss = max(0, 1 - z) = [0.4, 0.2]; beta = 1: [0, 0]."""
    check(run("hinge", beta=0.4)[0], [0.4, 0.2])
    check(run("hinge", beta=1.0)[0], [0.0, 0.0])


def test_ipo_value():
    """Per-token log-ratios: c = [2/4, 1/8] = [0.5, 0.125], r = [0.5/5, -1/2] = [0.1, -0.5].

    beta = 0.1 so the target margin is 1 / (2 * 0.1) = 5:
    loss = (0.4 - 5)^2 = 21.16 and (0.625 - 5)^2 = 19.140625. Rewards are beta * per-token ratios.
    """
    losses, chosen, rejected = run("ipo", beta=0.1)
    check(losses, [21.16, 19.140625])
    check(chosen, [0.05, 0.0125])
    check(rejected, [0.01, -0.05])


def test_exo_pair_value():
    """z = [0.15, 0.2]; eps = 1e-3 when label_smoothing is 0 (EXO/TRL default), else eps = ls.

    loss = sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps).
    """
    def exo(z, eps):
        return sigma(z) * (log_sigma(z) - math.log(1 - eps)) + sigma(-z) * (log_sigma(-z) - math.log(eps))

    check(run("exo_pair", beta=0.1)[0], [exo(0.15, 1e-3), exo(0.2, 1e-3)])
    check(run("exo_pair", beta=0.1, label_smoothing=0.1)[0], [exo(0.15, 0.1), exo(0.2, 0.1)])


def test_nca_pair_value():
    """beta c = [0.2, 0.1], beta r = [0.05, -0.1];
    loss = -log sigma(bc) - 0.5 log sigma(-bc) - 0.5 log sigma(-br)."""
    expected = [
        -log_sigma(0.2) - 0.5 * log_sigma(-0.2) - 0.5 * log_sigma(-0.05),
        -log_sigma(0.1) - 0.5 * log_sigma(-0.1) - 0.5 * log_sigma(0.1),
    ]
    check(run("nca_pair", beta=0.1)[0], expected)


def test_bco_pair_value():
    """delta = 0.05: loss = -log sigma(beta c - 0.05) - log sigma(-(beta r - 0.05)).

    Row 1: -log sigma(0.15) - log sigma(0) = -log sigma(0.15) + ln 2.
    Row 2: -log sigma(0.05) - log sigma(0.15).
    With delta = 0 (default): -log sigma(beta c) - log sigma(-beta r).
    """
    check(run("bco_pair", beta=0.1, bco_delta=0.05)[0],
          [-log_sigma(0.15) + math.log(2), -log_sigma(0.05) - log_sigma(0.15)])
    check(run("bco_pair", beta=0.1)[0],
          [-log_sigma(0.2) - log_sigma(-0.05), -log_sigma(0.1) - log_sigma(0.1)])


def test_sppo_hard_value():
    """beta = 0.1 so 1 / (2 beta) = 5: (2 - 5)^2 + (0.5 + 5)^2 = 39.25; (1 - 5)^2 + (-1 + 5)^2 = 32."""
    check(run("sppo_hard", beta=0.1)[0], [39.25, 32.0])


# A batch where ranks differ between chosen and rejected, so the two AOT forms disagree:
# c = [-1 - -3, -4 - -5] = [2, 1], r = [-2 - -2.5, -3 - -6] = [0.5, 3].
AOT_BATCH = dict(pc=[-1.0, -4.0], pr=[-2.0, -3.0], rc=[-3.0, -5.0], rr=[-2.5, -6.0])


def test_aot_paired_value():
    """Policy margins pc - pr = [1, -1] sort to [-1, 1]; reference margins [-0.5, 1] sort to [-0.5, 1].

    d = [-1 - -0.5, 1 - 1] = [-0.5, 0]; beta = 0.1: loss = [-log sigma(-0.05), -log sigma(0)] = [.., ln 2].
    """
    check(run("aot", beta=0.1, **AOT_BATCH)[0], [-log_sigma(-0.05), math.log(2)])


def test_aot_unpaired_value():
    """c = [2, 1] sorts to [1, 2], r = [0.5, 3] sorts to [0.5, 3]; d = [0.5, -1].

    beta = 0.1, ls = 0.1: loss = 0.9 * -log sigma(0.1 d) + 0.1 * -log sigma(-0.1 d).
    """
    losses, _, _ = run("aot_unpaired", beta=0.1, label_smoothing=0.1, **AOT_BATCH)
    check(losses, [-0.9 * log_sigma(z) - 0.1 * log_sigma(-z) for z in (0.05, -0.1)])


def test_apo_zero_value():
    """beta c = [0.2, 0.1], beta r = [0.05, -0.1]; loss = 1 - sigma(beta c) + sigma(beta r)."""
    check(run("apo_zero", beta=0.1)[0], [1 - sigma(0.2) + sigma(0.05), 1 - sigma(0.1) + sigma(-0.1)])


def test_apo_down_value():
    """beta c = [0.2, 0.1], z = [0.15, 0.2]; loss = sigma(beta c) + 1 - sigma(z)."""
    check(run("apo_down", beta=0.1)[0], [sigma(0.2) + 1 - sigma(0.15), sigma(0.1) + 1 - sigma(0.2)])


def test_discopop_value():
    """z = [0.15, 0.2]; tau = 0.05 (default): m = sigma(z / tau) = sigma([3, 4]);
    loss = (1 - m) * -log sigma(z) + m * exp(-z). With tau = 1: m = sigma(z)."""
    def disco(z, tau):
        m = sigma(z / tau)
        return (1 - m) * -log_sigma(z) + m * math.exp(-z)

    check(run("discopop", beta=0.1)[0], [disco(0.15, 0.05), disco(0.2, 0.05)])
    check(run("discopop", beta=0.1, discopop_tau=1.0)[0], [disco(0.15, 1.0), disco(0.2, 1.0)])


def test_sigmoid_norm_value():
    """Per-token log-ratios c = [0.5, 0.125], r = [0.1, -0.5]; beta = 1:
    loss = -log sigma(0.4), -log sigma(0.625); rewards are the per-token ratios."""
    losses, chosen, rejected = run("sigmoid_norm", beta=1.0)
    check(losses, [-log_sigma(0.4), -log_sigma(0.625)])
    check(chosen, [0.5, 0.125])
    check(rejected, [0.1, -0.5])


def test_simpo_value():
    """Per-token policy log-probs: chosen [-1/4, -4/8] = [-0.25, -0.5], rejected [-2/5, -3/2] = [-0.4, -1.5].

    beta = 2, gamma = 0.5: z = 2 * [0.15, 1.0] - 0.5 = [-0.2, 1.5]; loss = -log sigma(z).
    Rewards are beta * per-token policy log-probs; the reference is ignored.
    """
    losses, chosen, rejected = run("simpo", beta=2.0, gamma=0.5)
    check(losses, [-log_sigma(-0.2), -log_sigma(1.5)])
    check(chosen, [-0.5, -1.0])
    check(rejected, [-0.8, -3.0])
    check(run("simpo", beta=2.0, gamma=0.5, rc=[0.0, 7.0], rr=[-9.0, 1.0])[0], losses.tolist())


def test_reference_free():
    """Reference treated as 0: margins pc - pr = [1, -1], beta = 0.1: -log sigma(0.1), -log sigma(-0.1)."""
    losses, chosen, rejected = run("sigmoid", beta=0.1, reference_free=True)
    check(losses, [-log_sigma(0.1), -log_sigma(-0.1)])
    check(chosen, [-0.1, -0.4])
    check(rejected, [-0.2, -0.3])


def test_rpo_alpha_adds_chosen_per_token_nll():
    """rpo_alpha = 0.5 adds 0.5 * (-pc / chosen_lengths) = 0.5 * [1/4, 4/8] = [0.125, 0.25] to DPO,
    and its gradient -0.5 / chosen_lengths to d loss / d policy_chosen_logps."""
    base, _, _ = run("sigmoid", beta=0.1)
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    losses, _, _ = preference_loss(
        pc, torch.tensor(PR).double(), torch.tensor(RC).double(), torch.tensor(RR).double(),
        beta=0.1, rpo_alpha=0.5, chosen_lengths=torch.tensor(NC),
    )
    check(losses, [-log_sigma(0.15) + 0.125, -log_sigma(0.2) + 0.25])
    losses.sum().backward()
    dpo_grad = [-0.1 * sigma(-0.15), -0.1 * sigma(-0.2)]  # d/dpc of -log sigma(beta * margin)
    torch.testing.assert_close(pc.grad, torch.tensor([dpo_grad[0] - 0.5 / 4, dpo_grad[1] - 0.5 / 8]).double())
    check(run("sigmoid", beta=0.1, rpo_alpha=0.0)[0], base.tolist())


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_gradcheck(loss_type):
    """Analytic gradients match finite differences (float64) w.r.t. both policy inputs."""
    g = torch.Generator().manual_seed(0)
    pc = (-10 * torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_(True)
    pr = (-10 * torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_(True)
    rc = -10 * torch.rand(4, generator=g, dtype=torch.float64)
    rr = -10 * torch.rand(4, generator=g, dtype=torch.float64)
    nc, nr = torch.tensor([3, 7, 1, 12]), torch.tensor([5, 2, 9, 4])
    kw = dict(chosen_lengths=nc, rejected_lengths=nr, rpo_alpha=0.3)

    def f(pc, pr):
        return preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.5, **kw)[0]

    assert torch.autograd.gradcheck(f, (pc, pr))


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_rewards_detached(loss_type):
    losses, chosen, rejected = run(loss_type)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    assert chosen.shape == rejected.shape == (2,)


@pytest.mark.parametrize("loss_type", DPO_REWARD_TYPES)
def test_rewards_are_beta_logratio(loss_type):
    """beta = 0.3: chosen = 0.3 * [2, 1], rejected = 0.3 * [0.5, -1]."""
    _, chosen, rejected = run(loss_type, beta=0.3)
    check(chosen, [0.6, 0.3])
    check(rejected, [0.15, -0.3])


def test_step0_policy_equals_reference():
    """Before any update the policy is the reference: rewards 0, sigmoid loss ln 2, grad -beta/2."""
    logps = -50 * torch.rand(8, dtype=torch.float64)
    rej = -50 * torch.rand(8, dtype=torch.float64)
    pc, pr = logps.clone().requires_grad_(True), rej.clone().requires_grad_(True)
    losses, chosen, rejected = preference_loss(pc, pr, logps, rej, beta=0.1)
    torch.testing.assert_close(losses, torch.full((8,), math.log(2), dtype=torch.float64))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, torch.full((8,), -0.05, dtype=torch.float64))


def test_zero_length_response_stays_finite():
    """A response truncated to 0 tokens has log-prob 0; its per-token average is 0, not NaN."""
    losses, chosen, _ = run("ipo", pc=[0.0, -4.0], rc=[0.0, -5.0], chosen_lengths=torch.tensor([0, 8]))
    assert torch.isfinite(losses).all() and chosen[0] == 0


def test_dtype_follows_inputs():
    x = torch.zeros(3, dtype=torch.bfloat16)
    n = torch.tensor([1, 2, 3])
    for loss_type in ALL_TYPES:
        losses, chosen, _ = preference_loss(
            x, x, x, x, loss_type=loss_type, chosen_lengths=n, rejected_lengths=n
        )
        assert losses.dtype == chosen.dtype == torch.bfloat16, loss_type


# ---------------------------------------------------------------- errors


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown loss_type 'dop'") as e:
        run("dop")
    assert all(t in str(e.value) for t in ALL_TYPES)


@pytest.mark.parametrize("loss_type", ["robust", "sigmoid", "aot"])
@pytest.mark.parametrize("ls", [-0.1, 0.5, 0.7])
def test_bad_label_smoothing(loss_type, ls):
    with pytest.raises(ValueError, match="label_smoothing"):
        run(loss_type, label_smoothing=ls)


@pytest.mark.parametrize("ls", [-0.1, 0.5])
def test_exo_pair_bad_label_smoothing(ls):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 0.5\) for exo_pair"):
        run("exo_pair", label_smoothing=ls)


def test_label_smoothing_rejected_where_unused():
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect for loss_type='hinge'"):
        run("hinge", label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "sigmoid_norm"])
def test_missing_lengths(loss_type):
    with pytest.raises(ValueError, match=f"chosen_lengths is required by loss_type='{loss_type}'"):
        run(loss_type, lengths=False)
    with pytest.raises(ValueError, match=f"rejected_lengths is required by loss_type='{loss_type}'"):
        run(loss_type, lengths=False, chosen_lengths=torch.tensor(NC))


def test_rpo_needs_chosen_lengths():
    with pytest.raises(ValueError, match="chosen_lengths is required by rpo_alpha"):
        run("sigmoid", lengths=False, rpo_alpha=1.0)


@pytest.mark.parametrize(
    "loss_type, params, name",
    [
        ("sigmoid", {"gamma": 1.0}, "gamma"),
        ("bco_pair", {"discopop_tau": 1.0}, "discopop_tau"),
        ("simpo", {"reference_free": True}, "reference_free"),
        ("ipo", {"bco_delta": 0.1}, "bco_delta"),
    ],
)
def test_unknown_variant_param(loss_type, params, name):
    with pytest.raises(ValueError, match=f"unknown parameter '{name}' for loss_type='{loss_type}'"):
        run(loss_type, **params)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
        (dict(loss_type="simpo", gamma=-0.1), "gamma"),
        (dict(rpo_alpha=-1.0), "rpo_alpha"),
        (dict(reference_free=1), "reference_free"),
    ],
)
def test_invalid_values(kw, name):
    with pytest.raises(ValueError, match=name):
        run(**kw)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(3,\)"):
        run(rr=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"rejected_lengths has shape \(1,\)"):
        run("ipo", rejected_lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \(B,\)"):
        run(pc=[[-1.0, -4.0]])


def test_sft_loss_is_token_mean_cross_entropy_over_the_responses():
    """sft_loss(sequence_logps(...)) == F.cross_entropy over response tokens only (prompt and padding
    ignored), by a naive loop in float64: sum of -log p(token) over response tokens / their count."""
    from dpo_dist.core.logps import sequence_batch, sequence_logps
    from dpo_dist.core.loss import sft_loss

    g = torch.Generator().manual_seed(0)
    seqs = [([5, 6, 7], [8, 9]), ([5], [3, 4, 2, 1]), ([1, 2, 3, 4], [6])]
    batch = sequence_batch(seqs, pad_token_id=0)
    logits = torch.randn(*batch["input_ids"].shape, 11, generator=g, dtype=torch.float64)
    got = sft_loss(*sequence_logps(logits, batch["labels"]))
    nll, n = 0.0, 0
    for row, (prompt, response) in enumerate(seqs):
        for j, token in enumerate(response):
            pos = len(prompt) + j - 1  # the logits at pos predict the token at pos + 1
            nll -= float(torch.log_softmax(logits[row, pos], -1)[token])
            n += 1
    assert math.isclose(float(got), nll / n, rel_tol=1e-12)
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert math.isclose(float(got), float(flat), rel_tol=1e-12)
