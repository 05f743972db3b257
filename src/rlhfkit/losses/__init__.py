"""Pure tensor loss functions shared by the rlhfkit engine and trainers."""

from rlhfkit.losses.dpo import DPO_LOSS_TYPES, DPOLossOutput, dpo_loss
from rlhfkit.losses.logprobs import masked_mean, masked_sum, sequence_logprob_sums, token_logprobs
from rlhfkit.losses.reward import (
    bradley_terry_loss,
    preference_probability,
    ranked_bradley_terry_loss,
    reward_margin_for_probability,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOLossOutput",
    "bradley_terry_loss",
    "dpo_loss",
    "masked_mean",
    "masked_sum",
    "preference_probability",
    "ranked_bradley_terry_loss",
    "reward_margin_for_probability",
    "sequence_logprob_sums",
    "token_logprobs",
]
