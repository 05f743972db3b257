"""Thin trainers: each prepares batches and calls a loss; the engine owns the loop."""

from .dpo import DPOConfig, run_dpo
from .reward_model import RewardConfig, run_reward
from .sft import SFTConfig, run_sft

__all__ = ["DPOConfig", "RewardConfig", "SFTConfig", "run_dpo", "run_reward", "run_sft"]
