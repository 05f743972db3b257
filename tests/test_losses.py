"""Numerical tests for rlhfkit.losses against plain-Python float64 references."""

from __future__ import annotations

import math

import pytest
import torch

import rlhfkit.losses.logprobs as logprobs_mod
from rlhfkit.losses import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    masked_mean,
    masked_sum,
    preference_probability,
    ranked_bradley_terry_loss,
    reward_margin_for_probability,
    selected_token_logprobs,
    selected_token_logprobs_and_entropy,
    sequence_logprob_sums,
    token_logprobs,
)

# ----------------------------------------------------------------------------- plain-Python references


def _log_sigmoid(x: float) -> float:
    # Stable scalar log(sigmoid(x)).
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _ref_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> list[list[float]]:
    lg = logits.double().tolist()
    idl = ids.tolist()
    out = []
    for b in range(len(lg)):
        row = [0.0]
        for t in range(1, len(lg[b])):
            prev = lg[b][t - 1]
            mx = max(prev)
            lse = mx + math.log(sum(math.exp(v - mx) for v in prev))
            row.append(prev[idl[b][t]] - lse)
        out.append(row)
    return out


def _ref_bt(rc: float, rr: float, m: float = 0.0, c: float = 0.0) -> float:
    return -_log_sigmoid(rc - rr - m) + c * (rc + rr) ** 2


def _ref_dpo(pc: float, pr: float, rc: float, rr: float, beta: float, loss_type: str, eps: float) -> float:
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def _assert_matches(actual: torch.Tensor, expected: list[float] | float, dtype: torch.dtype) -> None:
    exp = torch.tensor(expected, dtype=torch.float64)
    assert actual.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(actual, exp, rtol=1e-9, atol=1e-9)
    else:
        torch.testing.assert_close(actual.double(), exp, rtol=1e-5, atol=1e-6)


DTYPES = [torch.float32, torch.float64]

# ----------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    out = token_logprobs(logits, ids)
    assert out.shape == (3, 7)
    _assert_matches(out, _ref_token_logprobs(logits, ids), dtype)
    assert torch.all(out[:, 0] == 0)


def test_token_logprobs_chunked_and_low_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    logits32 = torch.randn(2, 9, 13, generator=g)
    ids = torch.randint(0, 13, (2, 9), generator=g)
    full = token_logprobs(logits32, ids)
    # Force tiny chunks (1-3 positions): same numbers as the single-chunk path.
    for budget in (1, 2 * 13 * 3):
        monkeypatch.setattr(logprobs_mod, "_MAX_CHUNK_ELEMENTS", budget)
        torch.testing.assert_close(token_logprobs(logits32, ids), full, rtol=0, atol=1e-6)
    # bf16 logits: computed (and returned) in float32 from the bf16 values.
    bf = logits32.to(torch.bfloat16)
    out = token_logprobs(bf, ids)
    assert out.dtype == torch.float32
    ref = torch.tensor(_ref_token_logprobs(bf.float(), ids), dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_token_logprobs_single_token_and_gradcheck() -> None:
    assert torch.equal(
        token_logprobs(torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long)), torch.zeros(2, 1)
    )
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids), (logits,))
    # Gradient equals that of the log_softmax reference.
    w = torch.randn(2, 4, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((token_logprobs(logits, ids) * w).sum(), logits)
    ref = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (grad_ref,) = torch.autograd.grad((ref * w[:, 1:]).sum(), logits)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selected_token_logprobs_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(1, 10, 11, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.randint(0, 11, (1, 11), generator=g)
    # row n predicts ids[n + 1]: the full-tensor reference from positions 1..10 of a [1, 11] sequence
    full = torch.cat([logits, logits[:, :1]], dim=1)
    expected = _ref_token_logprobs(full.double(), ids)[0][1:]
    _assert_matches(selected_token_logprobs(logits[0], ids[0, 1:]), expected, dtype)
    tempered = _ref_token_logprobs(full.double() / 0.5, ids)[0][1:]
    _assert_matches(selected_token_logprobs(logits[0], ids[0, 1:], temperature=0.5), tempered, dtype)
    monkeypatch.setattr(logprobs_mod, "_MAX_CHUNK_ELEMENTS", 23)  # chunks of 2 rows give the same values
    _assert_matches(selected_token_logprobs(logits[0], ids[0, 1:]), expected, dtype)
    assert selected_token_logprobs(logits[0, :0], ids[0, :0]).shape == (0,)
    with pytest.raises(ValueError):
        selected_token_logprobs(logits, ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selected_token_logprobs_gradient_is_autograds(temperature: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # the gradient by hand, (1[v = y] - p_v) / T times the upstream gradient, equals autograd's through
    # log_softmax(z / T), in one chunk and in chunks of 2 rows (the last one short)
    g = torch.Generator().manual_seed(8)
    leaf = (torch.randn(7, 9, generator=g, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 9, (7,), generator=g)
    upstream = torch.randn(7, generator=g, dtype=torch.float64)
    naive = torch.log_softmax(leaf / temperature, -1).gather(-1, targets[:, None]).squeeze(-1)
    (expected,) = torch.autograd.grad((naive * upstream).sum(), leaf)
    for budget in (1 << 21, 2 * 9):
        monkeypatch.setattr(logprobs_mod, "_MAX_CHUNK_ELEMENTS", budget)
        out = selected_token_logprobs(leaf, targets, temperature)
        torch.testing.assert_close(out, naive, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad((out * upstream).sum(), leaf)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
        # the gradient of a row sums to 0 (softmax's shift invariance), the target's entry is (1 - p_y) g / T
        torch.testing.assert_close(grad.sum(-1), torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.autograd.gradcheck(lambda z: selected_token_logprobs(z, targets, temperature), (leaf,))
    # bf16 logits: float32 log-probs, a bf16 gradient equal to float32's up to bf16 rounding
    bf = leaf.detach().to(torch.bfloat16).requires_grad_()
    out = selected_token_logprobs(bf, targets, temperature)
    assert out.dtype == torch.float32
    (grad,) = torch.autograd.grad((out * upstream.float()).sum(), bf)
    ref = bf.detach().float().requires_grad_()
    (grad_ref,) = torch.autograd.grad((torch.log_softmax(ref / temperature, -1).gather(-1, targets[:, None])
                                       .squeeze(-1) * upstream.float()).sum(), ref)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), grad_ref, rtol=1e-2, atol=1e-2)


def test_logprob_and_entropy_low_precision_gradient() -> None:
    # bf16 logits: the log-probs and entropy in float32, the gradient bf16 and autograd's in float32 rounded
    g = torch.Generator().manual_seed(9)
    bf = (torch.randn(5, 11, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 11, (5,), generator=g)
    upstream = torch.randn(5, generator=g)
    logps, entropy = selected_token_logprobs_and_entropy(bf, targets)
    assert logps.dtype == entropy.dtype == torch.float32
    (grad,) = torch.autograd.grad((logps * upstream).sum(), bf)
    ref = bf.detach().float().requires_grad_()
    (grad_ref,) = torch.autograd.grad((torch.log_softmax(ref, -1).gather(-1, targets[:, None]).squeeze(-1)
                                       * upstream).sum(), ref)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), grad_ref, rtol=1e-2, atol=1e-2)


def test_token_logprobs_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        token_logprobs(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", DTYPES)
def test_selected_token_logprobs_and_entropy_match_plain_python(dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(7, 9, generator=g, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, 9, (7,), generator=g)
    rows = logits.double().tolist()
    expected_logps, expected_entropy = [], []
    for row, y in zip(rows, targets.tolist()):
        norm = math.log(sum(math.exp(z) for z in row))
        expected_logps.append(row[y] - norm)
        expected_entropy.append(-sum(math.exp(z - norm) * (z - norm) for z in row))
    logps, entropy = selected_token_logprobs_and_entropy(logits, targets)
    _assert_matches(logps, expected_logps, dtype)
    _assert_matches(entropy, expected_entropy, dtype)
    monkeypatch.setattr(logprobs_mod, "_MAX_CHUNK_ELEMENTS", 20)  # chunks of 2 rows give the same values
    chunked = selected_token_logprobs_and_entropy(logits, targets)
    _assert_matches(chunked[0], expected_logps, dtype)
    _assert_matches(chunked[1], expected_entropy, dtype)
    # the entropy is a statistic unless asked for its gradient (an entropy bonus): then it is d(-Σp·log p)
    leaf = logits.double().clone().requires_grad_()
    logps, entropy = selected_token_logprobs_and_entropy(leaf, targets)
    assert logps.requires_grad and not entropy.requires_grad
    # the log-probs' gradient (by hand: 1[v = y] - p_v, times the upstream gradient) is autograd's, in chunks of
    # 2 rows here and (gradcheck, below) in one chunk
    upstream = torch.randn(7, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad((torch.log_softmax(leaf, -1).gather(-1, targets[:, None]).squeeze(-1)
                                       * upstream).sum(), leaf)
    (grad,) = torch.autograd.grad((logps * upstream).sum(), leaf)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad((selected_token_logprobs_and_entropy(leaf, targets)[0] * upstream).sum(), leaf)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    monkeypatch.undo()
    assert torch.autograd.gradcheck(lambda z: selected_token_logprobs_and_entropy(z, targets)[0], (leaf,))
    _, entropy = selected_token_logprobs_and_entropy(leaf, targets, entropy_grad=True)
    (grad,) = torch.autograd.grad(entropy.sum(), leaf)
    probs = leaf.detach().softmax(-1)
    log_probs = probs.log()
    reference = -probs * (log_probs - (probs * log_probs).sum(-1, keepdim=True))  # dH/dz_v = -p_v(log p_v + H)
    torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- sequence sums / packing


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_equals_padded(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    vocab, lengths, prompt_lens = 17, [4, 6, 3], [2, 3, 2]  # third sequence: length-1 response
    T = max(lengths)
    seq_logits = [torch.randn(n, vocab, generator=g, dtype=torch.float64).to(dtype) for n in lengths]
    seq_ids = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    seq_masks = [torch.tensor([0.0] * p + [1.0] * (n - p), dtype=dtype) for n, p in zip(lengths, prompt_lens)]

    # Padded [3, T]: padding rows get random logits / ids but mask 0.
    pad_logits = torch.randn(3, T, vocab, generator=g, dtype=torch.float64).to(dtype)
    pad_ids = torch.randint(0, vocab, (3, T), generator=g)
    pad_mask = torch.zeros(3, T, dtype=dtype)
    for b, n in enumerate(lengths):
        pad_logits[b, :n], pad_ids[b, :n], pad_mask[b, :n] = seq_logits[b], seq_ids[b], seq_masks[b]
    padded = sequence_logprob_sums(token_logprobs(pad_logits, pad_ids), pad_mask)

    # Packed [1, N]: same rows concatenated; the first token of each sequence is never in the mask.
    packed_logits = torch.cat(seq_logits)[None]
    packed_ids = torch.cat(seq_ids)[None]
    packed_mask = torch.cat(seq_masks)[None]
    seq_index = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = sequence_logprob_sums(token_logprobs(packed_logits, packed_ids), packed_mask, seq_index, 3)
    inferred = sequence_logprob_sums(token_logprobs(packed_logits, packed_ids), packed_mask, seq_index)

    assert padded.shape == packed.shape == (3,)
    torch.testing.assert_close(packed, padded, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inferred, packed)
    # And both equal the float64 reference.
    expected = []
    for b, n in enumerate(lengths):
        ref = _ref_token_logprobs(seq_logits[b][None], seq_ids[b][None])[0]
        expected.append(sum(ref[t] * float(seq_masks[b][t]) for t in range(n)))
    _assert_matches(packed, expected, dtype)


def test_packed_sums_ignore_padding_index_and_are_differentiable() -> None:
    logps = torch.tensor([[0.0, -1.0, -2.0, -9.0, -3.0, -4.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1]], dtype=torch.float64)
    seq_index = torch.tensor([[0, 0, 0, -1, 1, 1]])  # -1: padding position, masked out
    out = sequence_logprob_sums(logps, mask, seq_index, num_sequences=2)
    torch.testing.assert_close(out, torch.tensor([-3.0, -4.0], dtype=torch.float64))
    out.sum().backward()
    torch.testing.assert_close(logps.grad, mask)


# ----------------------------------------------------------------------------- masked reductions


def test_masked_sum_mean_basic() -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = torch.tensor([1, 0, 1, 1])
    assert masked_sum(v, m).item() == pytest.approx(8.0)
    assert masked_mean(v, m).item() == pytest.approx(8.0 / 3)
    assert masked_mean(v, m, num_items=8).item() == pytest.approx(1.0)
    assert masked_mean(v, m, num_items=torch.tensor(4)).item() == pytest.approx(2.0)
    assert masked_mean(v, torch.zeros(4)).item() == 0.0  # clamp: no NaN on an empty mask


def test_gradient_accumulation_with_global_token_count() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    lengths = [8, 1, 3, 5, 2, 7]  # padded rows: unequal token counts per micro-batch
    mask = torch.tensor([[1.0] * n + [0.0] * (8 - n) for n in lengths], dtype=torch.float64)
    w0 = torch.randn(8, generator=g, dtype=torch.float64)

    def token_losses(w: torch.Tensor, rows: slice) -> torch.Tensor:
        return (x[rows] * w).tanh() ** 2  # any per-token loss depending on shared parameters

    w_full = w0.clone().requires_grad_()
    masked_mean(token_losses(w_full, slice(None)), mask).backward()

    micro = [slice(0, 1), slice(1, 3), slice(3, 6)]  # 8, 4 and 14 tokens
    n_global = mask.sum()
    w_acc = w0.clone().requires_grad_()
    for rows in micro:
        masked_mean(token_losses(w_acc, rows), mask[rows], num_items=n_global).backward()
    torch.testing.assert_close(w_acc.grad, w_full.grad, rtol=1e-6, atol=1e-10)

    # Naive accumulation (mean of per-micro-batch means) is a different objective.
    w_naive = w0.clone().requires_grad_()
    for rows in micro:
        (masked_mean(token_losses(w_naive, rows), mask[rows]) / len(micro)).backward()
    assert not torch.allclose(w_naive.grad, w_full.grad, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- Bradley-Terry


@pytest.mark.parametrize("dtype", DTYPES)
def test_bradley_terry_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    rc = (torch.randn(16, generator=g, dtype=torch.float64) * 4).to(dtype)
    rr = (torch.randn(16, generator=g, dtype=torch.float64) * 4).to(dtype)
    m = torch.rand(16, generator=g, dtype=torch.float64).to(dtype)
    c = 0.01
    out = bradley_terry_loss(rc, rr)
    _assert_matches(out, [_ref_bt(a, b) for a, b in zip(rc.tolist(), rr.tolist())], dtype)
    out = bradley_terry_loss(rc, rr, margin=m, center_rewards_coef=c)
    expected = [_ref_bt(a, b, mm, c) for a, b, mm in zip(rc.tolist(), rr.tolist(), m.tolist())]
    _assert_matches(out, expected, dtype)


def test_bradley_terry_is_stable_for_large_gaps() -> None:
    out = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.tensor([200.0, -200.0]))
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(400.0)
    assert out[1].item() == pytest.approx(0.0, abs=1e-30)


def test_bradley_terry_worked_example() -> None:
    # P(B > A) = 0.9  =>  r_B - r_A = logit(0.9) = log 9.
    margin = reward_margin_for_probability(0.9)
    assert margin == pytest.approx(2.1972, abs=1e-4)
    r_b, r_a = torch.tensor([margin], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    assert preference_probability(r_b, r_a).item() == pytest.approx(0.9, abs=1e-12)
    assert bradley_terry_loss(r_b, r_a).item() == pytest.approx(-math.log(0.9), abs=1e-5)
    assert -math.log(0.9) == pytest.approx(0.10536, abs=1e-5)
    with pytest.raises(ValueError):
        reward_margin_for_probability(1.0)


def _ref_ranked(rewards, ranks, groups, num_groups, margins=None, c=0.0):
    losses, correct, counts = [0.0] * num_groups, [0] * num_groups, [0] * num_groups
    for i in range(len(rewards)):
        for j in range(len(rewards)):
            if groups[i] == groups[j] and ranks[i] < ranks[j]:
                gidx = groups[i]
                m = 0.0 if margins is None else margins[gidx]
                losses[gidx] += _ref_bt(rewards[i], rewards[j], m, c)
                correct[gidx] += int(rewards[i] > rewards[j])
                counts[gidx] += 1
    return [s / n if n else 0.0 for s, n in zip(losses, counts)], correct, counts


@pytest.mark.parametrize("dtype", DTYPES)
def test_ranked_bradley_terry(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    # group 0: K=4 strict ranking (6 pairs); group 1: ranks [0, 0, 1] (2 pairs); group 2: all ties (0 pairs).
    # Responses are interleaved across groups to check nothing assumes contiguous groups.
    groups = [0, 1, 0, 2, 1, 0, 2, 1, 0]
    ranks = [0, 0, 1, 0, 0, 2, 0, 1, 3]
    rewards = (torch.randn(9, generator=g, dtype=torch.float64) * 2).to(dtype)
    margins = torch.tensor([0.5, 0.2, 1.0], dtype=dtype)
    for kwargs, ref_kwargs in (
        ({}, {}),
        ({"margins": margins, "center_rewards_coef": 0.05}, {"margins": margins.tolist(), "c": 0.05}),
    ):
        losses, correct, counts = ranked_bradley_terry_loss(
            rewards, torch.tensor(ranks), torch.tensor(groups), 3, **kwargs
        )
        ref_losses, ref_correct, ref_counts = _ref_ranked(rewards.tolist(), ranks, groups, 3, **ref_kwargs)
        _assert_matches(losses, ref_losses, dtype)
        assert counts.tolist() == ref_counts == [6, 2, 0]
        assert correct.tolist() == ref_correct
        assert losses[2].item() == 0.0

    # Gradient flows only through groups that have pairs.
    r = rewards.clone().requires_grad_()
    losses, _, _ = ranked_bradley_terry_loss(r, torch.tensor(ranks), torch.tensor(groups), 3)
    losses.sum().backward()
    assert r.grad[3].item() == 0.0 and r.grad[6].item() == 0.0
    assert r.grad[0].item() < 0  # best response of group 0: pushed up


def test_ranked_single_pair_equals_pairwise() -> None:
    rewards = torch.tensor([1.5, -0.3])
    losses, correct, counts = ranked_bradley_terry_loss(
        rewards, torch.tensor([1, 0]), torch.tensor([0, 0]), 1
    )
    torch.testing.assert_close(losses, bradley_terry_loss(rewards[1:], rewards[:1]))
    assert correct.tolist() == [0] and counts.tolist() == [1]


# ----------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("loss_type", "eps"),
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_dpo_matches_reference(dtype: torch.dtype, loss_type: str, eps: float) -> None:
    g = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (
        (torch.randn(12, generator=g, dtype=torch.float64) * 5 - 20).to(dtype) for _ in range(4)
    )
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    cols = [t.tolist() for t in (pc, pr, rc, rr)]
    expected = [_ref_dpo(a, b, c, d, beta, loss_type, eps) for a, b, c, d in zip(*cols)]
    _assert_matches(out.losses, expected, dtype)
    _assert_matches(out.chosen_rewards, [beta * (a - c) for a, _, c, _ in zip(*cols)], dtype)
    _assert_matches(out.rejected_rewards, [beta * (b - d) for _, b, _, d in zip(*cols)], dtype)


def test_dpo_rewards_detached_and_gradient_direction() -> None:
    pc = torch.tensor([-10.0, -3.0], requires_grad=True)
    pr = torch.tensor([-12.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -3.5]), torch.tensor([-11.5, -2.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, 0.05]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.05, 0.05]))
    out.losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # Raising the chosen log-prob lowers the loss; raising the rejected one raises it.
    with torch.no_grad():
        base = dpo_loss(pc, pr, rc, rr).losses
        assert (dpo_loss(pc + 1.0, pr, rc, rr).losses < base).all()
        assert (dpo_loss(pc, pr + 1.0, rc, rr).losses > base).all()


def test_dpo_special_values() -> None:
    zero = torch.zeros(1, dtype=torch.float64)
    # h = 0: sigmoid loss log 2, hinge 1, ipo 1/(4 beta^2).
    assert dpo_loss(zero, zero, zero, zero, beta=0.5).losses.item() == pytest.approx(math.log(2))
    assert dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type="hinge").losses.item() == pytest.approx(1.0)
    assert dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type="ipo").losses.item() == pytest.approx(1.0)
    # Stable for huge log-ratio gaps.
    big = torch.tensor([-1e4])
    assert torch.isfinite(dpo_loss(big, -big, torch.zeros(1), torch.zeros(1), beta=1.0).losses).all()


def test_dpo_invalid_arguments() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(x, x, x, x, loss_type="kto")
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError):
            dpo_loss(x, x, x, x, label_smoothing=eps)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, beta=0.0)
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "ipo", "hinge", "robust", "ipo_normalized", "sigmoid_norm", "apo_zero",
                                   "apo_down"}  # the new ones: tests/test_preference_losses.py
