"""Kahneman-Tversky Optimisation (KTO): a loss on unpaired desirable / undesirable completions."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["KTO_RATIO_RANGE", "KTOLossOutput", "balanced_kto_weights", "kto_loss", "kto_weight_ratio"]

# The paper's rule for imbalanced data (Ethayarajh et al. 2024, section 4.2, eq. 9):
#   lambda_D * n_D / (lambda_U * n_U)  in  [1, 4/3]
KTO_RATIO_RANGE = (1.0, 4.0 / 3.0)


class KTOLossOutput(NamedTuple):
    """Per-row KTO losses [N], the implicit rewards beta·r (detached) [N] and the reference point z0 (0-dim)."""

    losses: Tensor
    rewards: Tensor
    z0: Tensor


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """Per-row KTO losses (no reduction) from summed completion log-probs.

    Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization" (arXiv 2402.01306), eq. 8. For row i with prompt x_i, completion y_i and label
    desirable[i]:

        r_i  = log pi(y_i | x_i) - log pi_ref(y_i | x_i)                      (policy_logps - ref_logps)
        z0   = max(0, (1/M) sum_j [log pi(y'_j | x_j) - log pi_ref(y'_j | x_j)])   detached
        v_i  = lambda_D * sigmoid(beta (r_i - z0))    if y_i is desirable
               lambda_U * sigmoid(beta (z0 - r_i))    if y_i is undesirable
        loss_i = lambda_y - v_i
               = lambda_D (1 - sigmoid(beta (r_i - z0)))  or  lambda_U (1 - sigmoid(beta (z0 - r_i)))

    z0 is the reference point: the paper's estimate of KL(pi || pi_ref) from MISMATCHED pairs (x_j, y'_j),
    y'_j the completion of another row of the batch; ``policy_kl_logps`` / ``ref_kl_logps`` [M] are their
    summed log-probs. It carries no gradient (the paper: "we do not back-propagate through z0"), and the
    clamp at 0 keeps a noisy negative estimate from rewarding every completion.

    TRL's ``KTOTrainer.kto_loss`` (loss_type "kto") computes the same: ``kl = mean(policy_KL -
    reference_KL).detach()``, gathered over processes, ``.clamp(min=0)``; chosen losses
    ``1 - sigmoid(beta (chosen_logratios - kl))``, rejected ``1 - sigmoid(beta (kl - rejected_logratios))``,
    times desirable_weight / undesirable_weight, and the trainer takes the mean over rows. Here the rows
    stay in their batch order (TRL concatenates desirable then undesirable), the mean is the engine's.

    Implicit rewards (detached, for logging / accuracy): beta · r_i.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"desirable/undesirable weights must be >= 0, got {desirable_weight}, {undesirable_weight}")
    if policy_kl_logps.numel() == 0:
        raise ValueError("z0 needs at least one mismatched (KL) pair")
    logratios = policy_logps - ref_logps
    kl = (policy_kl_logps - ref_kl_logps).mean()
    z0 = kl.detach().clamp(min=0)
    desirable = desirable.to(torch.bool)
    values = torch.where(desirable, torch.sigmoid(beta * (logratios - z0)), torch.sigmoid(beta * (z0 - logratios)))
    weights = torch.where(desirable, logratios.new_tensor(desirable_weight), logratios.new_tensor(undesirable_weight))
    return KTOLossOutput(losses=weights * (1 - values), rewards=(beta * logratios).detach(), z0=z0)


def kto_weight_ratio(num_desirable: int, num_undesirable: int, desirable_weight: float,
                     undesirable_weight: float) -> float:
    """lambda_D · n_D / (lambda_U · n_U): the paper recommends it in [1, 4/3] (inf with no undesirable rows)."""
    denominator = undesirable_weight * num_undesirable
    return float("inf") if denominator == 0 else desirable_weight * num_desirable / denominator


def balanced_kto_weights(num_desirable: int, num_undesirable: int, desirable_weight: float = 1.0,
                         undesirable_weight: float = 1.0) -> tuple[float, float]:
    """Weights whose ratio (:func:`kto_weight_ratio`) is in the paper's range: the rarer class's weight is
    raised until lambda_D n_D / (lambda_U n_U) = 1 (the ratio is left alone when already in range)."""
    if num_desirable == 0 or num_undesirable == 0:
        return desirable_weight, undesirable_weight  # one class only: no ratio can be set
    ratio = kto_weight_ratio(num_desirable, num_undesirable, desirable_weight, undesirable_weight)
    low, high = KTO_RATIO_RANGE
    if low <= ratio <= high:
        return desirable_weight, undesirable_weight
    if ratio < low:  # desirable side too light: raise lambda_D
        return undesirable_weight * num_undesirable / num_desirable, undesirable_weight
    return desirable_weight, desirable_weight * num_desirable / num_undesirable  # raise lambda_U
