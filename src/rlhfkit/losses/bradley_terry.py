"""Bradley-Terry reward-model losses (pairwise and ranked lists)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bradley_terry_loss",
    "preference_probability",
    "ranked_bradley_terry_loss",
    "reward_margin_for_probability",
]


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coef: float = 0.0,
) -> Tensor:
    """Per-pair Bradley-Terry negative log-likelihood (no reduction), shape [N].

    Formula, with r_c / r_r the chosen / rejected rewards, m the optional margin and c the centring coef:
        loss = -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2

    Under Bradley-Terry, P(chosen > rejected) = sigmoid(r_c - r_r); the margin m (e.g. derived from a
    preference strength) asks the model to separate the pair by at least m (Llama 2). The centring term is
    the auxiliary loss of Eisenstein et al. 2023 ("Helping or Herding?"): the BT likelihood is invariant to
    adding a constant to all rewards, so we pin the free offset by penalising the squared pair sum
    (r_c + r_r)^2 (= 4 * the pair's squared mean reward), which keeps rewards centred around 0.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    # logsigmoid is stable for large |diff|; log(sigmoid(x)) underflows to -inf for x << 0.
    losses = -F.logsigmoid(diff)
    if center_rewards_coef:
        losses = losses + center_rewards_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def ranked_bradley_terry_loss(
    rewards: Tensor,
    ranks: Tensor,
    group_index: Tensor,
    num_groups: int,
    margins: Tensor | None = None,
    center_rewards_coef: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bradley-Terry loss over ranked lists of K responses per prompt (InstructGPT-style).

    rewards [M]: scores of M responses; ranks [M]: 0 = best, equal ranks are ties and form no pair;
    group_index [M] in 0..G-1 (G = num_groups) says which prompt each response answers; margins: None or a
    per-group tensor [G] applied to every pair of that group.

    For group g, P_g = {(i, j) : group(i) = group(j) = g, rank_i < rank_j} (i preferred), and
        loss_ij = -log sigmoid(r_i - r_j - m_g) + c * (r_i + r_j)^2
        group_loss[g] = (1 / |P_g|) * sum_{(i, j) in P_g} loss_ij        (0 if P_g is empty)
    InstructGPT treats all K(K-1)/2 comparisons of a prompt as one batch element and averages them, so a
    prompt with many responses does not dominate the batch or overfit through repeated reuse of a response.

    Returns (group_losses [G], pair_correct_counts [G] = #pairs with r_i > r_j, pair_counts [G]).
    Pairs are built with an [M, M] mask, which is fine for the small M (<= a few hundred) of one batch.
    """
    if not (rewards.shape == ranks.shape == group_index.shape) or rewards.dim() != 1:
        raise ValueError("rewards, ranks and group_index must all be 1-D tensors of the same length")
    group_index = group_index.long()
    pair_mask = (group_index[:, None] == group_index[None, :]) & (ranks[:, None] < ranks[None, :])
    better, worse = pair_mask.nonzero(as_tuple=True)
    pair_group = group_index[better]

    pair_margin = None if margins is None else margins.to(rewards.dtype)[pair_group]
    pair_losses = bradley_terry_loss(rewards[better], rewards[worse], pair_margin, center_rewards_coef)

    pair_counts = torch.bincount(pair_group, minlength=num_groups)
    correct = (rewards[better] > rewards[worse]).long()
    pair_correct_counts = torch.zeros(num_groups, dtype=torch.long, device=rewards.device).index_add(
        0, pair_group, correct
    )
    loss_sums = rewards.new_zeros(num_groups).index_add(0, pair_group, pair_losses)
    # clamp: groups without pairs have a 0 sum, so they get 0 loss rather than 0/0.
    group_losses = loss_sums / pair_counts.clamp(min=1).to(rewards.dtype)
    return group_losses, pair_correct_counts, pair_counts


def preference_probability(reward_a: Tensor, reward_b: Tensor) -> Tensor:
    """Bradley-Terry probability that a is preferred to b: P(a > b) = sigmoid(r_a - r_b)."""
    return torch.sigmoid(reward_a - reward_b)


def reward_margin_for_probability(p: float) -> float:
    """Reward gap that makes P(a > b) = p under Bradley-Terry: r_a - r_b = logit(p) = log(p / (1 - p)).

    E.g. p = 0.9 gives log 9 ~= 2.1972; a reward model scoring the pair that far apart has BT loss
    -log 0.9 ~= 0.1054 on it.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return math.log(p / (1.0 - p))
