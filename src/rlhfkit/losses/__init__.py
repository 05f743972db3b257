"""Pure tensor loss functions shared by the rlhfkit engine and trainers."""

from rlhfkit.losses.bradley_terry import (
    bradley_terry_loss,
    preference_probability,
    ranked_bradley_terry_loss,
    reward_margin_for_probability,
)
from rlhfkit.losses.dpo import DPO_LOSS_TYPES, DPOLossOutput, dpo_loss
from rlhfkit.losses.logprobs import (
    masked_mean,
    masked_sum,
    selected_token_logprobs,
    selected_token_logprobs_and_entropy,
    sequence_logprob_sums,
    token_logprobs,
)
from rlhfkit.losses.rl import (
    GROUP_ADVANTAGE_TYPES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    PolicyLossOutput,
    RunningMoments,
    ValueLossOutput,
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    whiten,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "GROUP_ADVANTAGE_TYPES",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "DPOLossOutput",
    "PolicyLossOutput",
    "RunningMoments",
    "ValueLossOutput",
    "approx_kl",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "preference_probability",
    "ranked_bradley_terry_loss",
    "reward_margin_for_probability",
    "sequence_logprob_sums",
    "selected_token_logprobs",
    "selected_token_logprobs_and_entropy",
    "token_logprobs",
    "whiten",
]
