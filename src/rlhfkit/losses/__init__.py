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
    "length_desensitised_logps": "dpo",
    "cpo_loss": "preference",
    "orpo_loss": "preference",
    "simpo_loss": "preference",
    "KTO_RATIO_RANGE": "kto",
    "KTOLossOutput": "kto",
    "balanced_kto_weights": "kto",
    "kto_loss": "kto",
    "kto_weight_ratio": "kto",
    "masked_mean": "logprobs",
    "masked_sum": "logprobs",
    "selected_token_logprobs": "logprobs",
    "selected_token_logprobs_and_entropy": "logprobs",
    "sequence_logprob_sums": "logprobs",
    "token_logprobs": "logprobs",
    "DPO_LOSS_TYPES": "names",
    "LENGTH_NORMALISED_DPO_LOSS_TYPES": "names",
    "GROUP_ADVANTAGE_TYPES": "names",
    "KL_ESTIMATORS": "names",
    "KTO_WEIGHT_BALANCE": "names",
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
    "IMPORTANCE_SAMPLING_LEVELS": "names",
    "REINFORCE_PP_TYPES": "names",
    "SCALE_REWARDS": "names",
    "group_reward_spread": "rl_variants",
    "overlong_penalty": "rl_variants",
    "reinforce_pp_advantages": "rl_variants",
    "scaled_group_advantages": "rl_variants",
    "sequence_policy_loss": "rl_variants",
    "truncated_importance_weights": "rl_variants",
}

__all__ = sorted(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
