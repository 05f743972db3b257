"""Direct Preference Optimisation losses and their common variants, and LD-DPO's token weighting."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DPO_LOSS_TYPES", "DPOLossOutput", "dpo_loss", "length_desensitised_logps"]

from .names import DPO_LOSS_TYPES, LENGTH_NORMALISED_DPO_LOSS_TYPES


class DPOLossOutput(NamedTuple):
    """Per-pair losses [N] of the DPO family (reference-free ones too) and the implicit rewards (detached) of
    the chosen / rejected responses."""

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
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> DPOLossOutput:
    """Per-pair DPO-family losses (no reduction) from summed sequence log-probs, all shaped [N].

    With pi_c, pi_r, ref_c, ref_r the policy / reference log-probs of the chosen / rejected responses,
        u_c = pi_c - ref_c,   u_r = pi_r - ref_r,   h = u_c - u_r
    and eps = label_smoothing:
      sigmoid (Rafailov et al. 2023; eps > 0 is conservative DPO, cDPO):
          loss = -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)
      robust (Chowdhury et al. 2024, rDPO; unbiased under label-flip rate eps):
          loss = [ -(1 - eps) * log sigmoid(beta h) + eps * log sigmoid(-beta h) ] / (1 - 2 eps)
      hinge (SLiC, Zhao et al. 2023):
          loss = relu(1 - beta h)
      ipo (Azar et al. 2023, Eq. 17, on summed log-probs as the paper writes it):
          loss = (h - 1 / (2 beta))^2
      ipo_normalized (IPO as TRL computes it: each log-ratio divided by its response's token count |y|):
          h_n = u_c / |y_c| - u_r / |y_r|,    loss = (h_n - 1 / (2 beta))^2
      sigmoid_norm (TRL's length-normalised sigmoid; cDPO's eps as for sigmoid):
          loss = -(1 - eps) * log sigmoid(beta h_n) - eps * log sigmoid(-beta h_n)
      apo_zero (D'Oosterlinck et al. 2024, APO Eq. 7: chosen better than the model's own outputs):
          loss = (1 - sigmoid(beta u_c)) + sigmoid(beta u_r)
      apo_down (APO Eq. 8: chosen worse than the model's own outputs; both go down, rejected more):
          loss = sigmoid(beta u_c) + (1 - sigmoid(beta h))
    label_smoothing affects "sigmoid", "sigmoid_norm" and "robust" only. The length-normalised types need
    ``chosen_lengths`` / ``rejected_lengths`` (response tokens, [N]).

    Implicit rewards (detached, for logging / accuracy): chosen = beta u_c, rejected = beta u_r; for the
    length-normalised types beta u_c / |y_c| and beta u_r / |y_r|, the quantities their loss compares.
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
    if loss_type in LENGTH_NORMALISED_DPO_LOSS_TYPES:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
        chosen_logratios = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_logratios = rejected_logratios / rejected_lengths.clamp(min=1)
    h = chosen_logratios - rejected_logratios

    eps = label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm"):
        # logsigmoid rather than log(sigmoid(.)): no -inf when beta*h is very negative.
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type in ("ipo", "ipo_normalized"):  # regress the log-ratio gap onto 1/(2 beta)
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    else:  # apo_down
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * h))

    return DPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def length_desensitised_logps(token_logps: Tensor, token_sequence: Tensor, num_pairs: int, alpha: float) -> Tensor:
    """LD-DPO's sequence log-probs (Liu et al. 2024, "Length Desensitization in DPO"): [2 num_pairs].

    Sequences come in pairs (chosen 2i, rejected 2i + 1) and ``token_logps`` [n] holds their response tokens in
    order, ``token_sequence`` [n] the sequence of each. With l_p = min(|y_c|, |y_r|) the pair's shared
    ("public") length and t = 1..|y| a token's position in its response:
        log pi_LD(y | x) = sum_{t <= l_p} log p(y_t | x, y_<t) + alpha * sum_{t > l_p} log p(y_t | x, y_<t)
    so only the longer response's excess tokens are down-weighted (alpha = 1: plain DPO). As in TRL (ld_alpha),
    the weighting applies to the policy's and the reference's log-probs alike.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")
    num_sequences = 2 * num_pairs
    lengths = torch.bincount(token_sequence, minlength=num_sequences)
    starts = torch.cumsum(lengths, 0) - lengths  # flat index of each sequence's first token (tokens in order)
    position = torch.arange(token_sequence.numel(), device=token_sequence.device) - starts[token_sequence]
    public = torch.minimum(lengths[0::2], lengths[1::2]).repeat_interleave(2)
    weights = torch.where(position < public[token_sequence], token_logps.new_ones(()), token_logps.new_full((), alpha))
    return token_logps.new_zeros(num_sequences).index_add(0, token_sequence, token_logps * weights)
