"""Reference-free preference losses: SimPO, ORPO and CPO. No reference model appears in any of them.

Every function takes the policy's summed response log-probs and the responses' token counts, all [N] (one
entry per pair), and returns per-pair losses with implicit rewards (:class:`~.dpo.DPOLossOutput`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dpo import DPOLossOutput

__all__ = ["cpo_loss", "orpo_loss", "simpo_loss"]


def _check(beta: float, label_smoothing: float, nll_weight: float, nll_name: str) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if nll_weight < 0:
        raise ValueError(f"{nll_name} must be >= 0, got {nll_weight}")


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
               beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0,
               nll_weight: float = 0.0) -> DPOLossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6).

    The reward is the length-averaged log-prob r(y) = (beta / |y|) log pi(y | x); with a target margin gamma:
        loss = -log sigmoid( beta / |y_c| * log pi(y_c | x) - beta / |y_r| * log pi(y_r | x) - gamma )
    gamma is TRL's ``simpo_gamma``; the SimPO code's ``gamma_beta_ratio`` is gamma / beta. eps =
    label_smoothing > 0 smooths it as cDPO does (TRL's CPOTrainer does the same):
        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z),   z = the argument above
    nll_weight = lambda > 0 adds lambda * (-log pi(y_c | x) / |y_c|), the chosen response's per-token NLL
    (TRL's "CPO-SimPO" with cpo_alpha = lambda). Rewards: beta log pi(y | x) / |y|.
    """
    _check(beta, label_smoothing, nll_weight, "nll_weight")
    chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)
    losses = _smoothed_sigmoid(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    if nll_weight:
        losses = losses - nll_weight * chosen_avg
    return DPOLossOutput(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
              beta: float = 0.1) -> DPOLossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eqs. 2-7).

    With P(y | x) = exp( log pi(y | x) / |y| ) the length-averaged likelihood, odds(y | x) = P / (1 - P) and
    lambda = beta:
        L_SFT = -log pi(y_c | x) / |y_c|
        L_OR  = -log sigmoid( log odds(y_c | x) - log odds(y_r | x) )
        loss  = L_SFT + lambda * L_OR
    log odds is computed as a - log(-expm1(a)), a = log P, which stays accurate as P -> 1. Rewards (as TRL
    logs them): beta log pi(y | x) / |y|. TRL averages the SFT term over all chosen tokens of its batch; the
    paper's per-example average is used here (equal when chosen lengths are equal).
    """
    _check(beta, 0.0, 0.0, "")
    chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (chosen_avg - torch.log(-torch.expm1(chosen_avg))) - (
        rejected_avg - torch.log(-torch.expm1(rejected_avg)))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return DPOLossOutput(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def cpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
             beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> DPOLossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", Eq. 7 with its BC regulariser, Eq. 6).

    The DPO loss with a uniform reference (summed log-probs), plus a behaviour-cloning NLL term on the chosen
    response weighted by alpha (TRL's ``cpo_alpha``):
        L_prefer = -log sigmoid( beta log pi(y_c | x) - beta log pi(y_r | x) )
        L_NLL    = -log pi(y_c | x) / |y_c|
        loss     = L_prefer + alpha * L_NLL
    eps = label_smoothing > 0 smooths L_prefer as cDPO does (as TRL's CPOTrainer). L_NLL is per token, as TRL's
    cross-entropy is (the paper writes -log pi(y_c | x); per token keeps alpha independent of length). Rewards:
    beta log pi(y | x).
    """
    _check(beta, label_smoothing, alpha, "alpha")
    losses = _smoothed_sigmoid(beta * (chosen_logps - rejected_logps), label_smoothing)
    if alpha:
        losses = losses - alpha * chosen_logps / chosen_lengths.clamp(min=1)
    return DPOLossOutput(losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach())
