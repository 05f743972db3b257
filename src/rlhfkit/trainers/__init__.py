"""Thin trainers: each prepares batches and calls a loss; the engine owns the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .configs import DPOConfig, RewardConfig, SFTConfig
    from .dpo import run_dpo
    from .reward_model import run_reward
    from .sft import run_sft

# name -> its module, imported on first use: the configs load without torch (for --help)
_HOMES = {"DPOConfig": "configs", "RewardConfig": "configs", "SFTConfig": "configs", "run_dpo": "dpo",
          "run_reward": "reward_model", "run_sft": "sft"}

__all__ = ["DPOConfig", "RewardConfig", "SFTConfig", "run_dpo", "run_reward", "run_sft"]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
