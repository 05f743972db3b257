"""The one list of trainers. The CLI's commands and usage text, the pipeline's trainer stage types, the
report's stage order and its notion of an RL run, and the Ray launch all derive from it.

Adding an algorithm = a pure loss (``rlhfkit.losses``) + a trainer file + one line in ``TRAINERS``.
Entries name their module instead of importing it, so that ``rlhfkit sft`` loads only the SFT trainer and
the report reads this list without loading any.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TRAINERS", "Trainer", "online_trainers"]


@dataclass(frozen=True)
class Trainer:
    """One trainer: its command / stage type name and where its config class and run function live."""

    name: str          # the command (`rlhfkit NAME`), pipeline stage type and run folder name
    module: str        # the module holding the config class and the run function
    config_name: str   # the config dataclass (every field is a flag)
    run_name: str      # run(config) -> summary dict
    help: str          # one line for the usage text and --help
    online: bool = False  # samples from the policy while training (RL): reward/KL curves; --ray applies
    config_module: str = ""  # where the config class lives when not in ``module`` (torch-free, for --help)

    @property
    def config(self) -> type:
        return getattr(importlib.import_module(self.config_module or self.module), self.config_name)

    @property
    def run(self) -> Callable[[Any], dict[str, Any]]:
        return getattr(importlib.import_module(self.module), self.run_name)


_OFFLINE_CONFIGS, _RL_CONFIGS = "rlhfkit.trainers.configs", "rlhfkit.trainers.rl.config"
TRAINERS: dict[str, Trainer] = {t.name: t for t in (
    Trainer("sft", "rlhfkit.trainers.sft", "SFTConfig", "run_sft", "supervised fine-tuning of a causal LM",
            config_module=_OFFLINE_CONFIGS),
    Trainer("rm", "rlhfkit.trainers.reward_model", "RewardConfig", "run_reward",
            "reward model (Bradley–Terry) on preference or ranked data", config_module=_OFFLINE_CONFIGS),
    Trainer("ppo", "rlhfkit.trainers.rl", "PPOConfig", "run_rl",
            "PPO (policy + critic) against a reward model, function or endpoint, on a KL leash", online=True,
            config_module=_RL_CONFIGS),
    Trainer("grpo", "rlhfkit.trainers.rl", "GRPOConfig", "run_rl",
            "GRPO: group-relative advantages over several samples per prompt (no critic)", online=True,
            config_module=_RL_CONFIGS),
    Trainer("rloo", "rlhfkit.trainers.rl", "RLOOConfig", "run_rl",
            "RLOO: REINFORCE with a leave-one-out baseline over the group (no critic)", online=True,
            config_module=_RL_CONFIGS),
    Trainer("gspo", "rlhfkit.trainers.rl", "GSPOConfig", "run_rl",
            "GSPO: GRPO with one clipped importance ratio per response", online=True, config_module=_RL_CONFIGS),
    Trainer("reinforce_pp", "rlhfkit.trainers.rl", "ReinforcePPConfig", "run_rl",
            "REINFORCE++: KL-penalised returns whitened over the batch (no critic)", online=True,
            config_module=_RL_CONFIGS),
    Trainer("dpo", "rlhfkit.trainers.dpo", "DPOConfig", "run_dpo",
            "direct preference optimisation (sigmoid, ipo, hinge, robust, ipo_normalized, sigmoid_norm, APO; "
            "LD-DPO, TR-DPO)", config_module=_OFFLINE_CONFIGS),
    Trainer("simpo", "rlhfkit.trainers.reference_free", "SimPOConfig", "run_reference_free",
            "SimPO: length-averaged log-prob margin, no reference model", config_module=_OFFLINE_CONFIGS),
    Trainer("orpo", "rlhfkit.trainers.reference_free", "ORPOConfig", "run_reference_free",
            "ORPO: SFT loss plus an odds-ratio preference term, no reference model", config_module=_OFFLINE_CONFIGS),
    Trainer("cpo", "rlhfkit.trainers.reference_free", "CPOConfig", "run_reference_free",
            "CPO: reference-free DPO plus a behaviour-cloning NLL term", config_module=_OFFLINE_CONFIGS),
    Trainer("kto", "rlhfkit.trainers.kto", "KTOConfig", "run_kto",
            "KTO on unpaired desirable/undesirable rows (or split preference pairs)", config_module=_OFFLINE_CONFIGS),
)}


def online_trainers() -> set[str]:
    """Names of the trainers that sample while they learn (their runs log reward and KL)."""
    return {name for name, t in TRAINERS.items() if t.online}
