"""Reference-free preference optimisation: SimPO, ORPO and CPO. One model, no reference loaded; batching,
LoRA, packing and evaluation are DPO's (:class:`~rlhfkit.trainers.dpo.DPOTask` with another objective)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..losses import DPOLossOutput, cpo_loss, orpo_loss, simpo_loss
from .common import prompt_sharing
from .configs import CPOConfig, ORPOConfig, ReferenceFreeConfig, SimPOConfig
from .dpo import DPOTask, PairObjective, start_preference_run


def _objective(config: ReferenceFreeConfig) -> tuple[str, PairObjective]:
    """The trainer's name and its loss on (policy log-probs, response lengths), both [2N], pairs interleaved."""
    if config.beta <= 0:
        raise ConfigError(f"--beta must be > 0, not {config.beta}")
    smoothing = getattr(config, "label_smoothing", 0.0)
    if not 0.0 <= smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5), not {smoothing}")
    if getattr(config, "cpo_alpha", 0.0) < 0:
        raise ConfigError(f"--cpo-alpha must be >= 0, not {config.cpo_alpha}")

    def pairs(logps, lengths) -> tuple:
        return logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]

    if isinstance(config, SimPOConfig):
        def simpo(logps, lengths, _ref) -> DPOLossOutput:
            return simpo_loss(*pairs(logps, lengths), beta=config.beta, gamma=config.simpo_gamma,
                              label_smoothing=config.label_smoothing, nll_weight=config.cpo_alpha)
        return "simpo", simpo
    if isinstance(config, ORPOConfig):
        return "orpo", lambda logps, lengths, _ref: orpo_loss(*pairs(logps, lengths), beta=config.beta)
    if isinstance(config, CPOConfig):
        def cpo(logps, lengths, _ref) -> DPOLossOutput:
            return cpo_loss(*pairs(logps, lengths), beta=config.beta, alpha=config.cpo_alpha,
                            label_smoothing=config.label_smoothing)
        return "cpo", cpo
    raise ConfigError(f"no reference-free objective for {type(config).__name__}")


def run_reference_free(config: ReferenceFreeConfig) -> dict[str, Any]:
    """Train a policy with SimPO, ORPO or CPO (chosen by the config's class) on preference or ranked data."""
    name, objective = _objective(config)
    run = start_preference_run(config)
    task = DPOTask(config, run.tokenizer.pad_token_id, run.packed, None, run.eval_records, objective=objective,
                   uses_reference=False, name=name, share_prompts=prompt_sharing(config, run.packed, run.model))
    return run.finish(task)
