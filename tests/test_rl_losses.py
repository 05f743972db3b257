"""Numerical tests for rlhfkit.losses.rl against hand-computed numbers and plain-Python float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import rlhfkit.losses.rl as rl_mod
from rlhfkit.losses import (
    GROUP_ADVANTAGE_TYPES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    RunningMoments,
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    whiten,
)

# ----------------------------------------------------------------------------- GAE


def _ref_gae(
    rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float, lam: float
):
    # Sum form A_t = sum_l (gamma lam)^l delta_{t+l}: a different route from the recursion under test.
    advs, rets = [], []
    for r, v, length in zip(rewards, values, lengths):
        deltas = []
        for t in range(length):
            next_v = v[t + 1] if t + 1 < length else 0.0
            deltas.append(r[t] + gamma * next_v - v[t])
        row_a, row_r = [], []
        for t in range(len(r)):
            if t >= length:
                row_a.append(0.0)
                row_r.append(0.0)
                continue
            a = sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t))
            row_a.append(a)
            row_r.append(a + v[t])
        advs.append(row_a)
        rets.append(row_r)
    return torch.tensor(advs, dtype=torch.float64), torch.tensor(rets, dtype=torch.float64)


def test_gae_hand_computed() -> None:
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.
    # Row 0 (3 valid): delta_2 = 2 - 1.5 = 0.5;  delta_1 = 0 + 0.9*1.5 - 1 = 0.35;
    #   delta_0 = 1 + 0.9*1 - 0.5 = 1.4
    #   A_2 = 0.5,  A_1 = 0.35 + 0.72*0.5 = 0.71,  A_0 = 1.4 + 0.72*0.71 = 1.9112
    # Row 1 (2 valid, the 7.0 / 9.0 padding must be ignored): delta_1 = 3 + 0 - 1 = 2;
    #   delta_0 = 0.5 + 0.9*1 - 2 = -0.6
    #   A_1 = 2,  A_0 = -0.6 + 0.72*2 = 0.84
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected_adv = torch.tensor([[1.9112, 0.71, 0.5], [0.84, 2.0, 0.0]], dtype=torch.float64)
    expected_ret = torch.tensor([[2.4112, 1.71, 2.0], [2.84, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_naive_reference(gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, seq_len = 7, 9
    lengths = [1, seq_len, 4, 1, 6, 0, 2]
    mask = torch.zeros(batch, seq_len, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    rewards = torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)
    exp_adv, exp_ret = _ref_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    # Padding holds garbage (NaN included) that must not leak into the valid prefix.
    rewards = rewards.masked_fill(mask == 0, float("nan"))
    values = values.masked_fill(mask == 0, 1e6)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float64
    torch.testing.assert_close(adv, exp_adv, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, exp_ret, rtol=0, atol=1e-10)


def test_gae_dtype_and_shape_errors() -> None:
    values = torch.randn(2, 4).bfloat16()
    adv, ret = gae(torch.ones(2, 4), values, torch.ones(2, 4))
    assert adv.dtype == ret.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        gae(torch.ones(2, 4), torch.ones(2, 3), torch.ones(2, 4))


# ----------------------------------------------------------------------------- whiten


def _masked_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    sel = [v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]
    mean = sum(sel) / len(sel)
    std = math.sqrt(sum((v - mean) ** 2 for v in sel) / (len(sel) - 1))
    return mean, std


def test_whiten_masked_statistics() -> None:
    gen = torch.Generator().manual_seed(1)
    values = 3.0 + 5.0 * torch.randn(4, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=gen) > 0.4
    values_garbage = values.masked_fill(~mask, 1e9)  # padding must not enter the statistics
    mean, std = _masked_stats(values, mask)

    out = whiten(values_garbage, mask)
    out_mean, out_std = _masked_stats(out, mask)
    assert abs(out_mean) < 1e-12
    assert out_std == pytest.approx(1.0, abs=1e-8)
    assert torch.all(out[~mask] == 0)
    expected = torch.where(mask, (values - mean) / math.sqrt(std**2 + 1e-8), torch.zeros_like(values))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    scaled = whiten(values_garbage, mask, shift_mean=False)
    s_mean, s_std = _masked_stats(scaled, mask)
    assert s_mean == pytest.approx(mean, abs=1e-10)
    assert s_std == pytest.approx(1.0, abs=1e-8)
    assert torch.all(scaled[~mask] == 0)


def test_whiten_fewer_than_two_elements() -> None:
    values = torch.tensor([[5.0, 2.0, -1.0]])
    one = torch.tensor([[False, True, False]])
    torch.testing.assert_close(whiten(values, one), torch.zeros_like(values))  # v - mean, no division
    torch.testing.assert_close(whiten(values, one, shift_mean=False), torch.tensor([[0.0, 2.0, 0.0]]))
    none = torch.zeros_like(one)
    assert torch.all(whiten(values, none) == 0)
    assert torch.all(torch.isfinite(whiten(values, none, shift_mean=False)))


def test_whiten_keeps_low_precision_dtype() -> None:
    values = torch.randn(3, 5).bfloat16()
    assert whiten(values, torch.ones(3, 5)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- PPO policy / value losses


def test_clipped_policy_loss_matches_formula() -> None:
    gen = torch.Generator().manual_seed(2)
    n, eps = 400, 0.2
    old = torch.randn(n, generator=gen, dtype=torch.float64) - 2.0
    logps = old + 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)

    out = clipped_policy_loss(logps, old, adv, clip_eps=eps)
    exp_loss, exp_clip, cases = [], [], set()
    for lp, o, a in zip(logps.tolist(), old.tolist(), adv.tolist()):
        rho = math.exp(lp - o)
        clipped_rho = min(max(rho, 1 - eps), 1 + eps)
        exp_loss.append(-min(rho * a, clipped_rho * a))
        exp_clip.append(1.0 if clipped_rho * a < rho * a else 0.0)
        region = "high" if rho > 1 + eps else "low" if rho < 1 - eps else "inside"
        cases.add((a > 0, region))
    # All four "sign of A x side of the trust region" cases, plus ratios inside it, are exercised.
    for sign in (True, False):
        for region in ("high", "low", "inside"):
            assert (sign, region) in cases
    torch.testing.assert_close(out.losses, torch.tensor(exp_loss, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.ratio, torch.exp(logps - old), rtol=0, atol=1e-12)
    assert out.clipped.dtype == torch.float64
    assert out.clipped.tolist() == exp_clip
    # The clip is active exactly for (A > 0, rho > 1 + eps) and (A < 0, rho < 1 - eps).
    rho = out.ratio
    expected_mask = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))
    assert torch.equal(out.clipped.bool(), expected_mask)
    assert 0 < out.clipped.sum() < n


def test_clipped_policy_loss_gradient_zero_where_clipped() -> None:
    gen = torch.Generator().manual_seed(3)
    old = torch.randn(200, generator=gen, dtype=torch.float64)
    logps = (old + 0.5 * torch.randn(200, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(200, generator=gen, dtype=torch.float64)
    out = clipped_policy_loss(logps, old, adv)
    out.losses.sum().backward()
    clipped = out.clipped.bool()
    assert torch.all(logps.grad[clipped] == 0)
    # Elsewhere d(-rho A)/d logp = -rho A.
    torch.testing.assert_close(logps.grad[~clipped], (-out.ratio * adv)[~clipped].detach())


def test_clipped_policy_loss_clip_higher() -> None:
    logps = torch.log(torch.tensor([1.25, 1.25, 0.7, 0.9], dtype=torch.float64))
    old = torch.zeros(4, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -2.0, 1.0], dtype=torch.float64)
    sym = clipped_policy_loss(logps, old, adv, clip_eps=0.2)
    high = clipped_policy_loss(logps, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    # rho = 1.25, A = 1: symmetric clip takes 1.2, clip-higher (1.28) leaves rho alone.
    torch.testing.assert_close(sym.losses, torch.tensor([-1.2, 1.25, 1.6, -0.9], dtype=torch.float64))
    torch.testing.assert_close(high.losses, torch.tensor([-1.25, 1.25, 1.6, -0.9], dtype=torch.float64))
    assert sym.clipped.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert high.clipped.tolist() == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        clipped_policy_loss(logps, old, adv, clip_eps=0.0)
    with pytest.raises(ValueError):
        clipped_policy_loss(logps, old, adv, clip_eps_high=-0.1)


@pytest.mark.parametrize("clip_range", [0.2, 0.05, None])
def test_clipped_value_loss_matches_reference(clip_range: float | None) -> None:
    gen = torch.Generator().manual_seed(4)
    n = 300
    old = torch.randn(n, generator=gen, dtype=torch.float64)
    values = old + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    returns = torch.randn(n, generator=gen, dtype=torch.float64)
    out = clipped_value_loss(values, old, returns, clip_range=clip_range)

    exp_loss, exp_clip = [], []
    for v, o, r in zip(values.tolist(), old.tolist(), returns.tolist()):
        plain = (v - r) ** 2
        if clip_range is None:
            exp_loss.append(0.5 * plain)
            exp_clip.append(0.0)
            continue
        v_clip = o + min(max(v - o, -clip_range), clip_range)
        clipped = (v_clip - r) ** 2
        exp_loss.append(0.5 * max(plain, clipped))
        exp_clip.append(1.0 if clipped > plain else 0.0)
    torch.testing.assert_close(out.losses, torch.tensor(exp_loss, dtype=torch.float64), rtol=0, atol=1e-12)
    assert out.clipped.tolist() == exp_clip
    if clip_range is not None:
        assert 0 < sum(exp_clip) < n  # both branches are exercised


def test_clipped_value_loss_hand_example() -> None:
    # old 0, new 1, return 0.5, c = 0.2: V_clip = 0.2; (1 - 0.5)^2 = 0.25 vs (0.2 - 0.5)^2 = 0.09 -> 0.125.
    # old 0, new 1, return 2:            (1 - 2)^2 = 1 vs (0.2 - 2)^2 = 3.24 -> 1.62, clipped.
    out = clipped_value_loss(torch.tensor([1.0, 1.0]), torch.zeros(2), torch.tensor([0.5, 2.0]), 0.2)
    torch.testing.assert_close(out.losses, torch.tensor([0.125, 1.62]))
    assert out.clipped.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        clipped_value_loss(torch.ones(2), torch.zeros(2), torch.zeros(2), clip_range=0.0)


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_expectations_match_exact_kl() -> None:
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        p = torch.softmax(torch.randn(5, generator=gen, dtype=torch.float64) * 1.5, dim=0)
        q = torch.softmax(torch.randn(5, generator=gen, dtype=torch.float64) * 1.5, dim=0)
        exact = kl_divergence(Categorical(probs=p), Categorical(probs=q)).item()
        assert exact > 1e-3
        logp, logq = p.log(), q.log()
        for est in ("k1", "k3"):
            expectation = (p * kl_penalty(logp, logq, est)).sum().item()
            assert expectation == pytest.approx(exact, abs=1e-6)
        k2 = kl_penalty(logp, logq, "k2")
        half_sq = sum(pi * 0.5 * (a - b) ** 2 for pi, a, b in zip(p.tolist(), logp.tolist(), logq.tolist()))
        assert (p * k2).sum().item() == pytest.approx(half_sq, abs=1e-12)
        assert (p * k2).sum().item() >= 0
        assert torch.all(kl_penalty(logp, logq, "k3") >= 0)
        # k1 is an unbiased but not a pointwise-positive estimator.
        assert torch.any(kl_penalty(logp, logq, "k1") < 0)


def test_kl_penalty_values_dtype_and_errors() -> None:
    logps = torch.tensor([math.log(0.5), math.log(0.2)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25), math.log(0.4)], dtype=torch.float64)
    d = [math.log(2.0), math.log(0.5)]
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), torch.tensor(d, dtype=torch.float64))
    torch.testing.assert_close(
        kl_penalty(logps, ref, "k2"), torch.tensor([x * x / 2 for x in d], dtype=torch.float64)
    )
    # k3 = (r - 1) - log r with r = pi_ref / pi: r = 0.5 and r = 2.
    k3 = [(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2.0)]
    torch.testing.assert_close(kl_penalty(logps, ref, "k3"), torch.tensor(k3, dtype=torch.float64))
    for est in KL_ESTIMATORS:
        assert kl_penalty(logps.bfloat16(), ref.bfloat16(), est).dtype == torch.float32
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logps, ref, "k4")


def test_approx_kl() -> None:
    logps = torch.randn(3, 6, dtype=torch.float64)
    assert torch.all(approx_kl(logps, logps) == 0)
    other = logps + torch.linspace(-1, 1, 6, dtype=torch.float64)  # no zero shift among the 6
    kl = approx_kl(other, logps)
    assert torch.all(kl > 0)
    # l = log 2: (2 - 1) - log 2.
    val = approx_kl(torch.tensor([math.log(2.0)], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert val.item() == pytest.approx(1 - math.log(2.0), abs=1e-15)
    assert approx_kl(logps.half(), other.half()).dtype == torch.float32


# ----------------------------------------------------------------------------- adaptive KL controller


def test_adaptive_kl_controller_direction_and_clip() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 6.6 vs target 6: error 0.1, inside the clip.
    assert ctl.update(6.6, 256) == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000), rel=1e-12)
    assert ctl.beta > 0.1

    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(5.4, 256)  # error -0.1
    assert ctl.beta == pytest.approx(0.1 * (1 - 0.1 * 256 / 10000), rel=1e-12)
    assert ctl.beta < 0.1

    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(600.0, 512) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000), rel=1e-12)  # 100x: clipped
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(0.0, 512) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000), rel=1e-12)

    fixed = AdaptiveKLController(0.05)
    assert fixed.update(1000.0, 512) == 0.05
    assert fixed.beta == 0.05


def test_adaptive_kl_controller_floor_makes_the_target_a_budget() -> None:
    # under the target a floored controller keeps beta where it started (the fixed-beta run) ...
    floored = AdaptiveKLController(0.15, target=1.0, horizon=100, min_beta=0.15)
    free = AdaptiveKLController(0.15, target=1.0, horizon=100)
    for kl in (0.2, 0.5, 0.1):
        floored.update(kl, 32)
        free.update(kl, 32)
    assert floored.beta == 0.15
    assert free.beta == pytest.approx(0.15 * (1 - 0.2 * 0.32) ** 3, rel=1e-12)  # each error clipped at -0.2
    # ... and over it tightens as the free one does: KL 1.1 (error 0.1), then 3.0 (clipped at 0.2)
    assert floored.update(1.1, 32) == pytest.approx(0.15 * (1 + 0.1 * 0.32), rel=1e-12)
    assert floored.update(3.0, 32) == pytest.approx(0.15 * (1 + 0.1 * 0.32) * (1 + 0.2 * 0.32), rel=1e-12)
    # then falls back to the floor, never below it
    for _ in range(50):
        floored.update(0.0, 32)
    assert floored.beta == 0.15
    assert AdaptiveKLController(1.0).load_state_dict(floored.state_dict()) is None
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, min_beta=0.2)


def test_adaptive_kl_controller_state_and_validation(tmp_path) -> None:
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=500)
    for kl in (10.0, 1.0, 4.0):
        ctl.update(kl, 64)
    path = tmp_path / "ctl.pt"
    torch.save(ctl.state_dict(), path)
    restored = AdaptiveKLController(1.0)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.beta == ctl.beta != 0.2
    assert (restored.target, restored.horizon) == (3.0, 500)
    assert restored.update(5.0, 10) == ctl.update(5.0, 10)

    with pytest.raises(ValueError):
        AdaptiveKLController(-0.1)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


# ----------------------------------------------------------------------------- entropy


def test_entropy_matches_categorical() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = 3.0 * torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    out = entropy_from_logits(logits)
    assert out.shape == (2, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, Categorical(logits=logits).entropy(), rtol=0, atol=1e-12)
    # Uniform over V has entropy log V.
    assert entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7), abs=1e-6)


def test_entropy_low_precision_and_masked_logits() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 9, generator=gen).bfloat16()
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, Categorical(logits=logits.float()).entropy(), rtol=0, atol=1e-5)

    # -inf logits (top-k style masking) contribute nothing, and neither value nor gradient is NaN.
    finite = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    masked = torch.cat(
        [finite, torch.full((4, 3), float("-inf"), dtype=torch.float64)], dim=-1
    ).requires_grad_()
    h = entropy_from_logits(masked)
    torch.testing.assert_close(h.detach(), Categorical(logits=finite).entropy(), rtol=0, atol=1e-12)
    h.sum().backward()
    assert torch.all(torch.isfinite(masked.grad))


@pytest.mark.parametrize("budget", [1, 9, 30, 1 << 24])
def test_entropy_chunking_is_exact(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    gen = torch.Generator().manual_seed(8)
    logits3 = torch.randn(2, 13, 9, generator=gen)
    logits2 = torch.randn(17, 9, generator=gen)
    full3, full2 = entropy_from_logits(logits3), entropy_from_logits(logits2)
    monkeypatch.setattr(rl_mod, "_MAX_CHUNK_ELEMENTS", budget)
    torch.testing.assert_close(entropy_from_logits(logits3), full3, rtol=0, atol=0)
    torch.testing.assert_close(entropy_from_logits(logits2), full2, rtol=0, atol=0)
    torch.testing.assert_close(full3, Categorical(logits=logits3).entropy(), rtol=0, atol=1e-5)


def test_entropy_chunks_bound_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a budget of 2 positions' worth of [B, V], bf16 logits are upcast in pieces of <= budget elements.
    seen: list[int] = []
    real = rl_mod._entropy_chunk

    def spy(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.numel())
        return real(z)

    monkeypatch.setattr(rl_mod, "_entropy_chunk", spy)
    monkeypatch.setattr(rl_mod, "_MAX_CHUNK_ELEMENTS", 2 * 3 * 10)
    entropy_from_logits(torch.randn(3, 7, 10).bfloat16())
    assert seen == [60, 60, 60, 30]


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_hand_examples() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # Groups [1, 2] (mean 1.5, unbiased std sqrt(0.5)) and [3, 6] (mean 4.5, unbiased std sqrt(4.5)).
    s1, s2 = math.sqrt(0.5), math.sqrt(4.5)
    grpo = [-0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), -1.5 / (s2 + 1e-4), 1.5 / (s2 + 1e-4)]
    assert grpo[1] == pytest.approx(0.70700, abs=1e-5) and grpo[3] == pytest.approx(0.70707, abs=1e-5)
    torch.testing.assert_close(group_advantages(rewards, 2, "grpo"), torch.tensor(grpo))
    torch.testing.assert_close(group_advantages(rewards, 2, "dr_grpo"), torch.tensor([-0.5, 0.5, -1.5, 1.5]))
    # G = 2 leave-one-out: r_i minus the other sample.
    torch.testing.assert_close(group_advantages(rewards, 2, "rloo"), torch.tensor([-1.0, 1.0, -3.0, 3.0]))
    torch.testing.assert_close(
        group_advantages(rewards, 2, "grpo", eps=0.0), torch.tensor([-s1 * 1.0, s1, -s2 / 3, s2 / 3])
    )


def test_group_advantages_rloo_group_of_three() -> None:
    rewards = torch.tensor([1.0, 4.0, 10.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    # 1 - (4 + 10)/2 = -6;  4 - (1 + 10)/2 = -1.5;  10 - (1 + 4)/2 = 7.5;  0 - 1.5;  0 - 1.5;  3 - 0.
    expected = torch.tensor([-6.0, -1.5, 7.5, -1.5, -1.5, 3.0], dtype=torch.float64)
    out = group_advantages(rewards, 3, "rloo")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # Each group's grpo advantages have mean 0 and (eps aside) unbiased std 1.
    grpo = group_advantages(rewards, 3, "grpo", eps=0.0).view(2, 3)
    torch.testing.assert_close(grpo.mean(1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(grpo.std(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_group_advantages_dtype_and_errors() -> None:
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2, "grpo").dtype == torch.float32
    assert group_advantages(torch.randn(6).bfloat16(), 3, "dr_grpo").dtype == torch.float32
    assert torch.all(group_advantages(torch.randn(4), 1, "dr_grpo") == 0)
    assert set(GROUP_ADVANTAGE_TYPES) == {"grpo", "dr_grpo", "rloo"}
    with pytest.raises(ValueError):
        group_advantages(torch.randn(4), 1, "grpo")
    with pytest.raises(ValueError):
        group_advantages(torch.randn(4), 1, "rloo")
    with pytest.raises(ValueError):
        group_advantages(torch.randn(5), 2, "dr_grpo")
    with pytest.raises(ValueError):
        group_advantages(torch.randn(4), 2, "ppo")
    with pytest.raises(ValueError):
        group_advantages(torch.randn(2, 2), 2, "grpo")


# ----------------------------------------------------------------------------- running moments


def test_running_moments_matches_concatenation() -> None:
    gen = torch.Generator().manual_seed(9)
    rm = RunningMoments()
    assert (rm.count, rm.mean, rm.std) == (0, 0.0, 1.0)
    batches = [100.0 + 3.0 * torch.randn(n, generator=gen, dtype=torch.float64) for n in (1, 7, 0, 3, 20)]
    batches.append(torch.randn(2, 5, generator=gen).bfloat16())  # other shapes / dtypes are flattened, upcast
    seen = []
    for i, batch in enumerate(batches):
        rm.update(batch)
        seen.append(batch.double().reshape(-1))
        if i == 0:
            assert rm.std == 1.0  # a single value has no unbiased std
        allv = torch.cat(seen)
        assert rm.count == allv.numel()
        assert rm.mean == pytest.approx(allv.mean().item(), abs=1e-10)
        if allv.numel() >= 2:
            assert rm.std == pytest.approx(allv.std(unbiased=True).item(), abs=1e-10)


def test_running_moments_state_and_normalize() -> None:
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # mean 2.5, unbiased var 5/3
    std = math.sqrt(5 / 3)
    assert (rm.mean, rm.std) == (pytest.approx(2.5), pytest.approx(std))
    x = torch.tensor([2.5, 5.0], dtype=torch.float64)
    torch.testing.assert_close(rm.normalize(x), torch.tensor([0.0, 2.5 / (std + 1e-8)], dtype=torch.float64))
    torch.testing.assert_close(
        rm.normalize(x, shift_mean=False),
        torch.tensor([2.5 / (std + 1e-8), 5.0 / (std + 1e-8)], dtype=torch.float64),
    )
    assert rm.normalize(torch.ones(3).bfloat16()).dtype == torch.bfloat16

    restored = RunningMoments()
    restored.load_state_dict(rm.state_dict())
    assert (restored.count, restored.mean, restored.std) == (rm.count, rm.mean, rm.std)
    more = torch.tensor([10.0, -3.0])
    rm.update(more)
    restored.update(more)
    assert (restored.count, restored.mean, restored.std) == (rm.count, rm.mean, rm.std)
    assert rm.count == 6
    assert restored.mean == pytest.approx(17 / 6)
