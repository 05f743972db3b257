"""Pure tensor loss functions shared by the rlhfkit engine and trainers.

The names below are imported on first use, so that the config classes can read the variants' names
(:mod:`.names`) without loading torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# name -> the module that defines it
_HOMES = {
    "bradley_terry_loss": "bradley_terry",
    "preference_probability": "bradley_terry",
    "ranked_bradley_terry_loss": "bradley_terry",
    "reward_margin_for_probability": "bradley_terry",
    "DPOLossOutput": "dpo",
    "dpo_loss": "dpo",
    "masked_mean": "logprobs",
    "masked_sum": "logprobs",
    "selected_token_logprobs": "logprobs",
    "selected_token_logprobs_and_entropy": "logprobs",
    "sequence_logprob_sums": "logprobs",
    "token_logprobs": "logprobs",
    "DPO_LOSS_TYPES": "names",
    "GROUP_ADVANTAGE_TYPES": "names",
    "KL_ESTIMATORS": "names",
    "AdaptiveKLController": "rl",
    "PolicyLossOutput": "rl",
    "RunningMoments": "rl",
    "ValueLossOutput": "rl",
    "approx_kl": "rl",
    "clipped_policy_loss": "rl",
    "clipped_value_loss": "rl",
    "entropy_from_logits": "rl",
    "gae": "rl",
    "group_advantages": "rl",
    "kl_penalty": "rl",
    "whiten": "rl",
}

__all__ = sorted(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
