"""Thin trainers: each prepares batches and calls a loss; the engine owns the loop."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configs import DPOConfig, RewardConfig, SFTConfig
    from .dpo import run_dpo
    from .reward_model import run_reward
    from .sft import run_sft

# name -> its module, imported on first use: the configs load without torch (for --help)
_HOMES = {"DPOConfig": "configs", "RewardConfig": "configs", "SFTConfig": "configs", "run_dpo": "dpo",
          "run_reward": "reward_model", "run_sft": "sft"}

__all__ = ["DPOConfig", "RewardConfig", "SFTConfig", "run_dpo", "run_reward", "run_sft"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # the next look-up skips this function
    return value
