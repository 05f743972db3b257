"""Direct Preference Optimisation losses and their common variants."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DPO_LOSS_TYPES", "DPOLossOutput", "dpo_loss"]

from .names import DPO_LOSS_TYPES


class DPOLossOutput(NamedTuple):
    """Per-pair DPO losses [N] and the implicit rewards (detached) of the chosen / rejected responses."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """Per-pair DPO-family losses (no reduction) from summed sequence log-probs, all shaped [N].

    With pi_c, pi_r, ref_c, ref_r the policy / reference log-probs of the chosen / rejected responses,
        h = (pi_c - ref_c) - (pi_r - ref_r)
    and eps = label_smoothing:
      sigmoid (Rafailov et al. 2023; eps > 0 is conservative DPO, cDPO):
          loss = -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)
      robust (Chowdhury et al. 2024, rDPO; unbiased under label-flip rate eps):
          loss = [ -(1 - eps) * log sigmoid(beta h) + eps * log sigmoid(-beta h) ] / (1 - 2 eps)
      hinge (SLiC, Zhao et al. 2023):
          loss = relu(1 - beta h)
      ipo (Azar et al. 2023):
          loss = (h - 1 / (2 beta))^2
    label_smoothing only affects "sigmoid" and "robust"; it is ignored by "hinge" and "ipo".

    Implicit rewards (detached, for logging / accuracy): chosen = beta (pi_c - ref_c),
    rejected = beta (pi_r - ref_r).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        # eps = 0.5 makes the data pure noise (and divides by zero in rDPO); eps > 0.5 flips the labels.
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios

    eps = label_smoothing
    if loss_type == "sigmoid":
        # logsigmoid rather than log(sigmoid(.)): no -inf when beta*h is very negative.
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo: regress the log-ratio gap onto 1/(2 beta) instead of pushing it to infinity
        losses = (h - 1 / (2 * beta)) ** 2

    return DPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )
