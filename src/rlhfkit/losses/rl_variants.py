"""Later online-RL variants as pure tensor functions: GSPO's sequence ratio, REINFORCE++ advantages, GRPO's
reward scaling, DAPO's group filter and overlong shaping, and truncated importance sampling (TIS).

They sit beside :mod:`.rl` (PPO's building blocks) and reuse it: the trainers in ``trainers/rl`` choose
between them by configuration. Flat per-token tensors are in (sequence, position) order, with
``sequence_ids`` saying which sequence each token belongs to, so packed, padded and ragged batches
(flattened through their masks) all use the same call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .names import REINFORCE_PP_TYPES, SCALE_REWARDS
from .rl import PolicyLossOutput, _compute_dtype, group_advantages, whiten

__all__ = [
    "group_reward_spread",
    "overlong_penalty",
    "reinforce_pp_advantages",
    "scaled_group_advantages",
    "sequence_policy_loss",
    "truncated_importance_weights",
]


def sequence_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    sequence_ids: Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    mask: Tensor | None = None,
) -> PolicyLossOutput:
    """GSPO's clipped objective with one importance ratio per sequence (Zheng et al. 2025, "Group Sequence
    Policy Optimization", eq. 5-7), per token, no reduction.

    For response y_i with |y_i| tokens (the tokens whose ``sequence_ids`` equal i):
        s_i     = exp( 1/|y_i| * sum_t (log pi(y_i,t) - log pi_old(y_i,t)) )      (the length-normalised ratio)
        loss_t  = -min(s_i * A_t, clip(s_i, 1 - eps_lo, 1 + eps_hi) * A_t)        for every token t of y_i
        clipped = 1 where the clipped term is what the min picked (strictly), else 0
    s_i is not detached: its gradient s_i / |y_i| * sum_t grad log pi(y_i,t) is the paper's eq. 10. The loss is
    broadcast to the tokens as TRL's ``importance_sampling_level="sequence"`` does, so averaging a response's
    tokens (``sequence_mean``) gives the paper's per-sequence term -min(s_i A_i, clip(s_i) A_i) exactly.
    The paper's clip ranges are small (3e-4 / 4e-4): s_i is a geometric mean, far nearer 1 than token ratios.
    ``mask`` (flat [n], 1 = counts) limits y_i to the policy's own tokens (a tool episode's forced tokens have
    no sampling log-prob); None = every token.
    """
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if eps_high <= 0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")
    if not (logps.shape == old_logps.shape == sequence_ids.shape) or logps.dim() != 1:
        raise ValueError("expected flat [n] logps, old_logps and sequence_ids")
    ids = sequence_ids.long()
    count = int(ids.max()) + 1 if ids.numel() else 0
    log_ratio = logps - old_logps
    weight = torch.ones_like(log_ratio) if mask is None else mask.to(log_ratio.dtype)
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, 0.0)
    sums = log_ratio.new_zeros(count).index_add(0, ids, log_ratio)
    lengths = log_ratio.new_zeros(count).index_add(0, ids, weight)
    ratio = torch.exp(sums / lengths.clamp(min=1))[ids]
    unclipped = ratio * advantages
    clipped_obj = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * advantages
    losses = -torch.minimum(unclipped, clipped_obj)
    return PolicyLossOutput(losses=losses, clipped=(clipped_obj < unclipped).to(losses.dtype), ratio=ratio)


def reinforce_pp_advantages(
    scores: Tensor,
    kl: Tensor,
    mask: Tensor,
    beta: float,
    method: str = "reinforce_pp",
    group_size: int = 1,
    gamma: float = 1.0,
    sum_across: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++", eq. 8-10), [B, T] in, [B, T] out (0 where mask is 0).

    scores [B] are the sequence rewards, kl [B, T] the per-token KL estimates to the reference, mask [B, T]
    1 on the response tokens (the score goes on the last one; masked holes, a tool episode's forced tokens,
    are skipped: no reward and no discount there). With r_i the score (``reinforce_pp``), or the score minus its
    group's mean over the G = group_size samples of a prompt (``reinforce_pp_baseline``, OpenRLHF's
    "reinforce_baseline": no division by the group's std), the KL goes into the reward per token:
        A_{i,t} = gamma^(T_i - 1 - t) * r_i - beta * sum_{s >= t} gamma^(s - t) * KL_{i,s}     (eq. 8)
    then every token of the global batch is whitened with one mean and std (eq. 10; :func:`whiten`, unbiased
    variance, ``sum_across`` an all-reduce over data-parallel ranks so the statistics are the whole batch's).
    """
    if method not in REINFORCE_PP_TYPES:
        raise ValueError(f"unknown REINFORCE++ variant {method!r}; valid: {', '.join(REINFORCE_PP_TYPES)}")
    if kl.shape != mask.shape or kl.dim() != 2 or scores.shape != kl.shape[:1]:
        raise ValueError(f"expected scores [B] and kl, mask [B, T], got {tuple(scores.shape)}, "
                         f"{tuple(kl.shape)}, {tuple(mask.shape)}")
    dtype = _compute_dtype(scores, kl)
    r = scores.to(dtype)
    if method == "reinforce_pp_baseline":
        if group_size < 1 or r.numel() % group_size:
            raise ValueError(f"{r.numel()} scores do not split into groups of {group_size}")
        grouped = r.view(-1, group_size)
        r = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    valid = mask.bool()
    rewards = torch.where(valid, -beta * kl.to(dtype), 0.0)
    last = (valid * torch.arange(1, valid.shape[1] + 1, device=valid.device)).argmax(-1)  # last valid position
    rows = torch.arange(len(r))
    has_tokens = valid.any(-1)
    rewards[rows[has_tokens], last[has_tokens]] += r[has_tokens]
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(len(r))
    for t in reversed(range(rewards.shape[1])):  # return-to-go; masked positions pass it on unchanged
        running = torch.where(valid[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return whiten(torch.where(valid, returns, 0.0), mask, sum_across=sum_across)


def scaled_group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """GRPO advantages with TRL's ``scale_rewards`` choice of denominator, [N] in, [N] out.

    With m_g the mean of the G rewards of r_i's group:
        group  A_i = (r_i - m_g) / (std_g + eps)      std over the group (Shao et al. 2024): = group_advantages
        batch  A_i = (r_i - m_g) / (std_B + eps)      std over every reward of the batch (``gather``: all ranks')
        none   A_i = r_i - m_g                         no scaling (Liu et al. 2025, Dr. GRPO)
    Standard deviations are unbiased (n - 1), as torch.std and TRL compute them.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
    if scale_rewards == "group":
        return group_advantages(rewards, group_size, "grpo", eps)
    centred = group_advantages(rewards, group_size, "dr_grpo")
    if scale_rewards == "none":
        return centred
    everyone = (gather or (lambda t: t))(rewards.to(centred.dtype))
    return centred / (everyone.std() + eps)


def group_reward_spread(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, eq. 11: 0 < |{o_i correct}| < G): [N] rewards ->
    [N / G] bool, True for the groups whose rewards are not all equal (a group of equal rewards has zero
    group-relative advantage everywhere, so it gives no policy gradient)."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"expected [N] rewards in groups of {group_size}, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) > grouped.amin(dim=1)


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward: [N] lengths -> [N].

    With L_max = max_length and L_cache = cache_length:
        R(y) = 0                                       |y| <= L_max - L_cache
        R(y) = ((L_max - L_cache) - |y|) / L_cache     L_max - L_cache < |y| <= L_max
        R(y) = -1                                      |y| > L_max
    times ``factor``. The penalty falls linearly from 0 to -1 over the last L_cache tokens.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"cache_length must be in (0, max_length={max_length}], got {cache_length}")
    n = lengths.to(torch.float64 if lengths.dtype == torch.float64 else torch.float32)
    free = max_length - cache_length
    ramp = (free - n) / cache_length
    penalty = torch.where(n <= free, torch.zeros_like(n), torch.where(n <= max_length, ramp, -torch.ones_like(n)))
    return factor * penalty


def truncated_importance_weights(trainer_logps: Tensor, rollout_logps: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Truncated importance sampling (TIS) for a rollout engine whose log-probs differ from the trainer's
    (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; TRL's
    ``vllm_importance_sampling_correction``), per token, detached:
        rho_t = exp(log pi_trainer_old(y_t) - log pi_rollout(y_t))        (the samples came from pi_rollout)
        w_t   = min(rho_t, C)
    The policy-gradient loss of token t is multiplied by w_t. Returns (w, rho).
    """
    if not cap > 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    ratio = torch.exp(trainer_logps.detach() - rollout_logps.detach())
    return ratio.clamp(max=cap), ratio
