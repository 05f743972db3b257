"""The DPO variants (ipo_normalized, sigmoid_norm, APO, LD-DPO) and the reference-free losses (SimPO, ORPO,
CPO), each against a direct transcription of its paper's equation: a per-pair Python loop over ragged
per-token log-probs, fed to the library through padded (masked) and packed layouts, values and gradients in
float64."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses import cpo_loss, dpo_loss, length_desensitised_logps, orpo_loss, simpo_loss

TOL = {"atol": 1e-12, "rtol": 1e-12}
PAD_VALUE = 123.0  # garbage in padded positions: the mask must keep it out


class Pairs:
    """N pairs of ragged responses: per-token log-probs of the policy (a float64 leaf) and of a reference."""

    def __init__(self, seed: int = 0, num_pairs: int = 6):
        gen = torch.Generator().manual_seed(seed)
        self.num_pairs = num_pairs
        lengths = torch.randint(1, 10, (2 * num_pairs,), generator=gen)
        lengths[0], lengths[1] = 4, 4  # one pair of equal lengths
        self.lengths = lengths.tolist()
        n = int(lengths.sum())
        # log-probs of plausible tokens: in [-3, -0.05] (averages stay away from 0, where ORPO's odds blow up)
        self.tokens = (-0.05 - 2.95 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_()
        self.ref_tokens = -0.05 - 2.95 * torch.rand(n, generator=gen, dtype=torch.float64)
        self.sequence = torch.repeat_interleave(torch.arange(2 * num_pairs), lengths)

    # --- the paper side: lists of per-token scalars, one response at a time
    def response(self, k: int, ref: bool = False) -> list[torch.Tensor]:
        source = self.ref_tokens if ref else self.tokens
        start = sum(self.lengths[:k])
        return [source[start + t] for t in range(self.lengths[k])]

    # --- the library side: summed log-probs and lengths from a padded or a packed layout
    def sums(self, layout: str, ref: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.ref_tokens if ref else self.tokens
        if layout == "packed":
            sums = source.new_zeros(2 * self.num_pairs).index_add(0, self.sequence, source)
            return sums, torch.bincount(self.sequence).to(torch.float64)
        width = max(self.lengths)
        mask = torch.arange(width)[None] < torch.tensor(self.lengths)[:, None]
        padded = torch.full((2 * self.num_pairs, width), PAD_VALUE, dtype=torch.float64)
        padded = padded.masked_scatter(mask, source)  # differentiable in source
        return torch.where(mask, padded, 0.0).sum(1), mask.sum(1).to(torch.float64)


def _log_sigmoid(z):
    return -torch.log(1 + torch.exp(-z))


def _sigmoid(z):
    return 1 / (1 + torch.exp(-z))


def _check(pairs: Pairs, got: torch.Tensor, expected: list[torch.Tensor]) -> None:
    """Values per pair and the gradient of their sum w.r.t. every policy token log-prob."""
    want = torch.stack(expected)
    torch.testing.assert_close(got, want, **TOL)
    (g_got,) = torch.autograd.grad(got.sum(), pairs.tokens)
    (g_want,) = torch.autograd.grad(want.sum(), pairs.tokens)
    assert g_want.abs().sum() > 0
    torch.testing.assert_close(g_got, g_want, **TOL)


LAYOUTS = ["padded", "packed"]


# ----------------------------------------------------------------------------- DPO with a reference
def _dpo_inputs(pairs: Pairs, layout: str):
    pol, lengths = pairs.sums(layout)
    ref, _ = pairs.sums(layout, ref=True)
    return pol[0::2], pol[1::2], ref[0::2], ref[1::2], lengths[0::2], lengths[1::2]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("loss_type", "eps"), [("ipo_normalized", 0.0), ("sigmoid_norm", 0.0), ("sigmoid_norm", 0.1)])
def test_length_normalised_dpo_matches_trl_formula(layout, loss_type, eps):
    """TRL's IPO / sigmoid_norm: each log-ratio divided by its response's length, then IPO Eq. 17 (Azar et al.
    2023) or the DPO sigmoid: (h_n - 1/(2 beta))^2 and -log sigmoid(beta h_n) (cDPO-smoothed by eps: TRL
    has no smoothing here, eps = 0 is its formula)."""
    pairs, beta = Pairs(1), 0.3
    pc, pr, rc, rr, lc, lr = _dpo_inputs(pairs, layout)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=lc,
                   rejected_lengths=lr)
    expected = []
    for i in range(pairs.num_pairs):
        c, r = 2 * i, 2 * i + 1
        h_c = (sum(pairs.response(c)) - sum(pairs.response(c, ref=True))) / pairs.lengths[c]
        h_r = (sum(pairs.response(r)) - sum(pairs.response(r, ref=True))) / pairs.lengths[r]
        h = h_c - h_r
        if loss_type == "ipo_normalized":
            expected.append((h - 1 / (2 * beta)) ** 2)
        else:
            expected.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
    _check(pairs, out.losses, expected)
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc).detach() / lc, **TOL)


def test_ipo_normalized_differs_from_the_papers_ipo_on_unequal_lengths():
    pairs = Pairs(2)
    pc, pr, rc, rr, lc, lr = _dpo_inputs(pairs, "packed")
    plain = dpo_loss(pc, pr, rc, rr, loss_type="ipo").losses
    normal = dpo_loss(pc, pr, rc, rr, loss_type="ipo_normalized", chosen_lengths=lc, rejected_lengths=lr).losses
    assert not torch.allclose(plain, normal)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss_type", ["apo_zero", "apo_down"])
def test_apo_matches_paper(layout, loss_type):
    """APO (D'Oosterlinck et al. 2024), Eq. 7 (zero) and Eq. 8 (down), with r = beta log(pi / pi_ref):
    zero: 1 - sigma(r_c) + sigma(r_r);   down: sigma(r_c) + 1 - sigma(r_c - r_r)."""
    pairs, beta = Pairs(3), 0.2
    pc, pr, rc, rr, _, _ = _dpo_inputs(pairs, layout)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    expected = []
    for i in range(pairs.num_pairs):
        c, r = 2 * i, 2 * i + 1
        r_c = beta * (sum(pairs.response(c)) - sum(pairs.response(c, ref=True)))
        r_r = beta * (sum(pairs.response(r)) - sum(pairs.response(r, ref=True)))
        if loss_type == "apo_zero":
            expected.append(1 - _sigmoid(r_c) + _sigmoid(r_r))
        else:
            expected.append(_sigmoid(r_c) + 1 - _sigmoid(r_c - r_r))
    _check(pairs, out.losses, expected)
    zero = torch.zeros(1)
    assert dpo_loss(zero, zero, zero, zero, loss_type=loss_type).losses.item() == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_ld_dpo_matches_paper(alpha):
    """LD-DPO (Liu et al. 2024): log pi_LD(y) = sum_{t <= l_p} log p_t + alpha sum_{t > l_p} log p_t with
    l_p = min(|y_c|, |y_r|), for policy and reference alike (as TRL's ld_alpha), then the DPO sigmoid."""
    pairs, beta = Pairs(4), 0.5
    pol = length_desensitised_logps(pairs.tokens, pairs.sequence, pairs.num_pairs, alpha)
    ref = length_desensitised_logps(pairs.ref_tokens, pairs.sequence, pairs.num_pairs, alpha)
    out = dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=beta)

    def ld(tokens: list, public: int):
        return sum(tokens[:public]) + alpha * sum(tokens[public:], torch.zeros((), dtype=torch.float64))

    expected = []
    for i in range(pairs.num_pairs):
        c, r = 2 * i, 2 * i + 1
        public = min(pairs.lengths[c], pairs.lengths[r])
        u_c = ld(pairs.response(c), public) - ld(pairs.response(c, ref=True), public)
        u_r = ld(pairs.response(r), public) - ld(pairs.response(r, ref=True), public)
        expected.append(-_log_sigmoid(beta * (u_c - u_r)))
    _check(pairs, out.losses, expected)
    if alpha == 1.0:  # no down-weighting: plain summed log-probs
        torch.testing.assert_close(pol, pairs.sums("packed")[0], **TOL)
    with pytest.raises(ValueError, match="ld_alpha"):
        length_desensitised_logps(pairs.tokens, pairs.sequence, pairs.num_pairs, 1.5)


# ----------------------------------------------------------------------------- reference-free
def _free_inputs(pairs: Pairs, layout: str):
    pol, lengths = pairs.sums(layout)
    return pol[0::2], pol[1::2], lengths[0::2], lengths[1::2]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("eps", "nll_weight"), [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5)])
def test_simpo_matches_paper(layout, eps, nll_weight):
    """SimPO (Meng et al. 2024, Eq. 6): -log sigma(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma),
    cDPO-smoothed by eps, plus nll_weight * (-log pi(y_c) / |y_c|) (CPO-SimPO)."""
    pairs, beta, gamma = Pairs(5), 2.0, 0.8
    out = simpo_loss(*_free_inputs(pairs, layout), beta=beta, gamma=gamma, label_smoothing=eps, nll_weight=nll_weight)
    expected = []
    for i in range(pairs.num_pairs):
        yc, yr = pairs.response(2 * i), pairs.response(2 * i + 1)
        z = beta / len(yc) * sum(yc) - beta / len(yr) * sum(yr) - gamma
        expected.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z) + nll_weight * (-sum(yc) / len(yc)))
    _check(pairs, out.losses, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_orpo_matches_paper(layout):
    """ORPO (Hong et al. 2024, Eqs. 2-7): P = exp(log pi(y) / |y|), odds = P / (1 - P),
    loss = -log pi(y_c) / |y_c| - lambda log sigma(log(odds_c / odds_r))."""
    pairs, lam = Pairs(6), 0.25
    out = orpo_loss(*_free_inputs(pairs, layout), beta=lam)
    expected = []
    for i in range(pairs.num_pairs):
        yc, yr = pairs.response(2 * i), pairs.response(2 * i + 1)
        p_c, p_r = torch.exp(sum(yc) / len(yc)), torch.exp(sum(yr) / len(yr))
        odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
        expected.append(-sum(yc) / len(yc) - lam * torch.log(_sigmoid(torch.log(odds_c / odds_r))))
    _check(pairs, out.losses, expected)
    torch.testing.assert_close(out.chosen_rewards, lam * _free_inputs(pairs, layout)[0].detach()
                               / _free_inputs(pairs, layout)[2], **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("eps", "alpha"), [(0.0, 1.0), (0.2, 0.0), (0.1, 0.7)])
def test_cpo_matches_paper(layout, eps, alpha):
    """CPO (Xu et al. 2024, Eqs. 6-7): -log sigma(beta log pi(y_c) - beta log pi(y_r)) (cDPO-smoothed by eps)
    + alpha * (-log pi(y_c) / |y_c|)."""
    pairs, beta = Pairs(7), 0.1
    out = cpo_loss(*_free_inputs(pairs, layout), beta=beta, alpha=alpha, label_smoothing=eps)
    expected = []
    for i in range(pairs.num_pairs):
        yc, yr = pairs.response(2 * i), pairs.response(2 * i + 1)
        z = beta * sum(yc) - beta * sum(yr)
        expected.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z) - alpha * sum(yc) / len(yc))
    _check(pairs, out.losses, expected)


def test_reference_free_losses_prefer_the_chosen_response_and_refuse_bad_settings():
    lengths = torch.tensor([5.0])
    low, high = torch.tensor([-10.0]), torch.tensor([-4.0])
    for loss in (lambda c, r: simpo_loss(c, r, lengths, lengths), lambda c, r: orpo_loss(c, r, lengths, lengths),
                 lambda c, r: cpo_loss(c, r, lengths, lengths)):
        assert loss(high, low).losses.item() < loss(low, high).losses.item()
    # ORPO at P -> 1 (average log-prob -> 0) stays finite
    near_one = torch.tensor([-1e-9 * 5])
    assert math.isfinite(orpo_loss(near_one, low, lengths, lengths).losses.item())
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(low, high, lengths, lengths, beta=0.0)
    with pytest.raises(ValueError, match="alpha"):
        cpo_loss(low, high, lengths, lengths, alpha=-1.0)
