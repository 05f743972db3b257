"""Dropout off for RL and preference training (TRL's ``disable_dropout_in_model``, by default there too).

Why: PPO's ratio pi/pi_old, DPO's and GRPO's log-ratios to the reference, and a reward model's pairwise
margins all compare two forwards of the same weights; dropout makes them two random networks. A GPT-2-shaped
policy (dropout 0.1) starts GRPO at a ratio of ~1.01 and a ~0.03-0.05 nat gap to the sampler's log-probs
before any update; the clip then fires on noise. SFT keeps the model's dropout (its regulariser).

Only the modules change: the model's config keeps the user's dropout values, so a saved checkpoint trains
on (SFT, ``--keep-dropout``) as it was configured.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("rlhfkit")


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0; return how many were above 0.

    Covers ``nn.Dropout`` modules (GPT-2's, GPT-NeoX's, Phi-3's residual dropouts, LoRA's) and the float
    attributes the attention layers read at forward time (``attention_dropout`` of Llama, Qwen, Phi-3,
    Gemma, GPT-NeoX: transformers passes them to the attention kernel as ``dropout_p``).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def apply_dropout_setting(model: torch.nn.Module, keep: bool, role: str = "model") -> torch.nn.Module:
    """Switch ``model``'s dropout off unless ``keep`` (``--keep-dropout``); log once what was switched off."""
    if not keep:
        changed = disable_dropout(model)
        if changed:
            logger.info("dropout: %d dropout settings of the %s set to 0 (--keep-dropout keeps them)", changed, role)
    return model
