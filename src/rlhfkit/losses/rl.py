"""Building blocks for online RL fine-tuning (PPO, GRPO, RLOO): KL penalties, advantages, clipped losses.

Everything is a pure tensor function (plus two small stateful helpers, the adaptive KL controller and
running reward moments), so trainers only decide *what* to reduce and *how*, using `masked_mean` etc.
Nothing here reduces over tokens unless its docstring says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GROUP_ADVANTAGE_TYPES",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "PolicyLossOutput",
    "RunningMoments",
    "ValueLossOutput",
    "approx_kl",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_penalty",
    "whiten",
]

from .logprobs import _MAX_CHUNK_ELEMENTS, result_dtype  # the log-probs' chunk budget (see there why)
from .names import GROUP_ADVANTAGE_TYPES, KL_ESTIMATORS


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise (bf16/fp16/integer inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- KL


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (elementwise, no reduction).

    With d = logps - ref_logps = log pi(x) - log pi_ref(x), x ~ pi:
        k1 = d                                   unbiased, but single samples can be negative
        k2 = d^2 / 2                             biased, always >= 0, low variance
        k3 = exp(-d) - 1 + d = (r - 1) - log r,  r = pi_ref(x) / pi(x);  unbiased and always >= 0
    (Schulman, "Approximating KL divergence", 2020.) Computed in float32 at least: low-precision inputs
    are upcast, float64 stays float64.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    dtype = _compute_dtype(logps, ref_logps)
    d = logps.to(dtype) - ref_logps.to(dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    # expm1 keeps the (r - 1) part accurate when d is tiny, where exp(-d) - 1 would cancel.
    return torch.expm1(-d) + d


def approx_kl(logps: Tensor, old_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_old || pi_theta) from tokens sampled from pi_old (elementwise).

    With l = logps - old_logps (log ratio pi_theta / pi_old):
        approx_kl = (exp(l) - 1) - l      (>= 0, zero iff l = 0)
    Used for logging and PPO early stopping. Computed in float32 at least, like `kl_penalty`.
    """
    dtype = _compute_dtype(logps, old_logps)
    log_ratio = logps.to(dtype) - old_logps.to(dtype)
    return torch.expm1(log_ratio) - log_ratio


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), "Fine-Tuning LMs from Human Preferences".

    With target KL t and horizon H, after a batch with observed KL k covering n steps:
        e    = clip(k / t - 1, -0.2, 0.2)
        beta <- max(beta * (1 + e * n / H), min_beta)
    target=None gives a fixed beta (update is a no-op). The clip bounds how fast beta can move when the
    measured KL is far from the target, so one noisy batch cannot blow it up or collapse it. ``min_beta``
    (None = 0) is a floor: with ``min_beta = init_beta`` the controller only tightens the leash, so a run whose
    KL stays under the target is exactly the fixed-beta run, and the target acts as a KL budget.

    `state_dict` / `load_state_dict` make it checkpointable via `Accelerator.register_for_checkpointing`.
    """

    def __init__(self, init_beta: float, target: float | None = None, horizon: int = 10000,
                 min_beta: float | None = None) -> None:
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        min_beta = 0.0 if min_beta is None else float(min_beta)
        if not 0 <= min_beta <= init_beta:
            raise ValueError(f"min_beta must be in [0, init_beta = {init_beta}], got {min_beta}")
        if target is not None and target <= 0:
            raise ValueError(f"target must be > 0 (or None for a fixed beta), got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.beta = float(init_beta)
        self.target = None if target is None else float(target)
        self.horizon = int(horizon)
        self.min_beta = min_beta

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta towards keeping the KL at target; returns the new beta."""
        if self.target is None:
            return self.beta
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta = max(self.beta * (1.0 + error * n_steps / self.horizon), self.min_beta)
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon, "min_beta": self.min_beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.target = None if state.get("target") is None else float(state["target"])
        self.horizon = int(state.get("horizon", self.horizon))
        self.min_beta = float(state.get("min_beta", self.min_beta))


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask are [B, T]; mask is 1 on the valid tokens of each row. The episode ends at the last
    valid token, so V beyond it counts as 0; t+1 below is the NEXT VALID token, so the masked holes of a
    multi-turn episode (forced tool-turn tokens) are skipped, and a row's valid tokens form one sequence (as
    veRL / OpenRLHF multi-turn GAE): no reward, value or discount on the holes.
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}        (V_{t+1} = A_{t+1} = 0 past the last valid token)
        R_t     = A_t + V_t                               (the value-function targets)
    Returns (advantages, returns), both zero where mask is 0, in values' dtype. The recursion runs in
    float32 at least (bf16 accumulation over long responses loses too much), vectorised over B.
    """
    if not (rewards.shape == values.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            f"expected rewards, values, mask all [B, T], got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    dtype = _compute_dtype(rewards, values)
    valid = mask.bool()
    # where() rather than multiply: padding may hold NaN/inf garbage, and NaN * 0 is still NaN.
    r = torch.where(valid, rewards.to(dtype), 0.0)
    v = torch.where(valid, values.to(dtype), 0.0)

    seq_len = v.shape[1]
    next_value = v.new_zeros(v.shape[0])
    next_adv = v.new_zeros(v.shape[0])
    advs = [next_adv] * seq_len
    for t in reversed(range(seq_len)):
        # r and V are zeroed on padding, so V_{t+1}, A_{t+1} are 0 past the last valid token with no per-row
        # bookkeeping; a masked position passes them on unchanged (to the valid token before it) and gets 0.
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        next_adv = torch.where(valid[:, t], adv, next_adv)
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        advs[t] = torch.where(valid[:, t], adv, 0.0)
    advantages = torch.stack(advs, dim=1)
    returns = torch.where(valid, advantages + v, 0.0)
    return advantages.to(values.dtype), returns.to(values.dtype)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
           sum_across: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Masked whitening over all selected elements (one mean / variance for the whole tensor).

    With n = sum(mask), mu = sum(v * m) / n and the unbiased variance s2 = sum((v - mu)^2 * m) / (n - 1):
        out = (v - mu) / sqrt(s2 + eps)            shift_mean=True
        out = (v - mu) / sqrt(s2 + eps) + mu       shift_mean=False (rescale only, keep the mean)
    Positions with mask 0 come back as 0. With fewer than 2 selected elements the variance is undefined,
    so no division happens: out = v - mu (or v itself when shift_mean=False); with none selected, all 0.
    The statistics are computed in float32 at least; the result has values' dtype. No host sync.
    ``sum_across`` (e.g. an all-reduce over data-parallel ranks) turns the sums into sums over every
    rank's elements, so each rank whitens with the statistics of the whole batch.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    total = sum_across or (lambda t: t)
    dtype = _compute_dtype(values)
    valid = mask.bool()
    v = torch.where(valid, values.to(dtype), 0.0)
    n, v_sum = total(torch.stack([valid.sum().to(dtype), v.sum()]))
    mean = v_sum / n.clamp(min=1)
    centered = torch.where(valid, v - mean, 0.0)
    var = total(centered.square().sum()) / (n - 1).clamp(min=1)
    # Decided on-device with where() instead of an `if n < 2` that would force a GPU->CPU sync.
    denom = torch.where(n >= 2, torch.sqrt(var + eps), torch.ones_like(var))
    out = centered / denom
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0).to(values.dtype)


def group_advantages(rewards: Tensor, group_size: int, method: str = "grpo", eps: float = 1e-4) -> Tensor:
    """Critic-free advantages from G = group_size sampled completions per prompt.

    rewards is [N], N = num_prompts * G, the G samples of each prompt contiguous. Per group, with mean m
    and unbiased (n - 1) standard deviation s of its rewards:
        grpo    (Shao et al. 2024, DeepSeekMath):  A_i = (r_i - m) / (s + eps)
        dr_grpo (Liu et al. 2025, Dr. GRPO):       A_i = r_i - m   (dividing by s biases by difficulty)
        rloo    (Ahmadian et al. 2024):            A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - m)
    Output [N], float32 (float64 for float64 rewards). grpo and rloo need G >= 2.
    """
    if method not in GROUP_ADVANTAGE_TYPES:
        raise ValueError(
            f"unknown group advantage method {method!r}; valid: {', '.join(GROUP_ADVANTAGE_TYPES)}"
        )
    if rewards.dim() != 1:
        raise ValueError(f"expected rewards [N], got shape {tuple(rewards.shape)}")
    min_size = 1 if method == "dr_grpo" else 2
    if group_size < min_size:
        raise ValueError(f"{method} needs group_size >= {min_size}, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"number of rewards {rewards.numel()} is not divisible by group_size {group_size}")

    grouped = rewards.to(_compute_dtype(rewards)).view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if method == "grpo":
        adv = (grouped - mean) / (grouped.std(dim=1, keepdim=True, unbiased=True) + eps)
    elif method == "dr_grpo":
        adv = grouped - mean
    else:  # rloo: leave-one-out baseline, written in closed form instead of G separate means
        adv = (grouped - mean) * (group_size / (group_size - 1))
    return adv.reshape(-1)


class RunningMoments:
    """Running mean / unbiased std of everything passed to `update`, e.g. for reward normalisation.

    Batches are merged with the parallel algorithm of Chan et al. (1979) in float64: for a running
    (n_a, mean_a, M2_a) and a batch (n_b, mean_b, M2_b), with delta = mean_b - mean_a and n = n_a + n_b,
        mean = mean_a + delta * n_b / n,     M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,
    and std = sqrt(M2 / (n - 1)) (1.0 until two values were seen). Local to this process: gather
    across ranks before `update` if every rank should see the same statistics.
    """

    def __init__(self) -> None:
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0

    @property
    def count(self) -> int:
        return self._count

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        if self._count < 2:
            return 1.0
        return math.sqrt(self._m2 / (self._count - 1))

    def update(self, values: Tensor) -> None:
        """Fold a batch of values (any shape, flattened) into the statistics; empty batches are ignored."""
        batch = values.detach().reshape(-1).to(torch.float64)
        n_b = batch.numel()
        if n_b == 0:
            return
        mean_b = batch.mean()
        m2_b = (batch - mean_b).square().sum()
        mean_b, m2_b = float(mean_b), float(m2_b)

        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n
        self._count = n

    def normalize(self, values: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
        """(values - mean) / (std + eps), or values / (std + eps) when shift_mean is False."""
        if shift_mean:
            values = values - self._mean
        return values / (self.std + eps)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self._count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._count = int(state["count"])
        self._mean = float(state["mean"])
        self._m2 = float(state["m2"])


# ----------------------------------------------------------------------------- PPO losses


class PolicyLossOutput(NamedTuple):
    """Per-token clipped-surrogate losses, where the clipped term was taken (0/1 float), and the ratio."""

    losses: Tensor
    clipped: Tensor
    ratio: Tensor


def clipped_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate loss (Schulman et al. 2017), per token, no reduction.

    With rho = exp(logps - old_logps), A the advantages, eps_lo = clip_eps, eps_hi = clip_eps_high
    (defaults to clip_eps; a larger value is DAPO's "clip-higher", Yu et al. 2025):
        loss    = -min(rho * A, clip(rho, 1 - eps_lo, 1 + eps_hi) * A)
        clipped = 1 where clip(rho, ...) * A < rho * A strictly (the clip is what the min picked), else 0
    The gradient is zero exactly where clipped = 1, which is why its mean is the usual "clip fraction".
    """
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if eps_high <= 0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")

    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped_obj = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * advantages
    losses = -torch.minimum(unclipped, clipped_obj)
    clipped = (clipped_obj < unclipped).to(losses.dtype)
    return PolicyLossOutput(losses=losses, clipped=clipped, ratio=ratio)


class ValueLossOutput(NamedTuple):
    """Per-token value losses and where the clipped term was the larger one (0/1 float)."""

    losses: Tensor
    clipped: Tensor


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    clip_range: float | None = 0.2,
) -> ValueLossOutput:
    """Clipped value-function loss (as in OpenAI baselines' PPO2), per token, no reduction.

    With c = clip_range, R the returns and V_old the values at rollout time:
        V_clip  = V_old + clip(V - V_old, -c, c)
        loss    = 1/2 * max((V - R)^2, (V_clip - R)^2)
        clipped = 1 where clamp(V, V_old - c, V_old + c) != V (V left the range) and (V_clip - R)^2 > (V - R)^2
                  strictly (the clipped term is the larger one), else 0
    The gradient is zero exactly where clipped = 1. The range test is on the unrounded V: inside the range
    V_clip can differ from V by one rounding step, which alone once counted ~2% of unclipped tokens.
    clip_range=None disables clipping: loss = 1/2 (V - R)^2 and clipped is all zeros.
    """
    unclipped = (values - returns).square()
    if clip_range is None:
        return ValueLossOutput(losses=0.5 * unclipped, clipped=torch.zeros_like(unclipped))
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped_sq = (values_clipped - returns).square()
    losses = 0.5 * torch.maximum(unclipped, clipped_sq)
    outside = torch.clamp(values, old_values - clip_range, old_values + clip_range) != values
    return ValueLossOutput(losses=losses, clipped=(outside & (clipped_sq > unclipped)).to(losses.dtype))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, one value per position.

    Formula (z = logits[..., :], p = softmax(z)):
        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v
    Output shape logits.shape[:-1]; float32 for bf16/fp16 logits, the input dtype for float32/float64.
    Like `token_logprobs`, [B, T, V] logits are processed in chunks over T (over rows for [N, V]) so at
    most ~2**21 elements are upcast / exponentiated at once. Logits of -inf (e.g. top-k masked) are
    allowed: their 0 * -inf term is taken as 0.
    """
    if logits.dim() == 0:
        raise ValueError("expected logits with a vocabulary dimension, got a 0-dim tensor")
    out_dtype = result_dtype(logits.dtype)
    if logits.dim() == 1:
        return _entropy_chunk(logits.to(out_dtype))

    split_dim = 1 if logits.dim() >= 3 else 0
    steps = logits.shape[split_dim]
    per_step = logits.numel() // max(1, steps)
    chunk = max(1, min(steps, _MAX_CHUNK_ELEMENTS // max(1, per_step)))
    pieces = [
        _entropy_chunk(part.to(out_dtype))  # upcast only this chunk
        for part in torch.split(logits, chunk, dim=split_dim)
    ]
    return torch.cat(pieces, dim=split_dim)


def _entropy_chunk(z: Tensor) -> Tensor:
    probs = torch.softmax(z, dim=-1)
    # p = 0 exactly where z = -inf; zero those z so 0 * -inf does not turn the sum (or its grad) into NaN.
    safe_z = z.masked_fill(torch.isneginf(z), 0.0)
    return torch.logsumexp(z, dim=-1) - (probs * safe_z).sum(-1)
