"""Online RL against a reward source on a KL leash to the reference: PPO, GRPO, RLOO, GSPO and REINFORCE++
in one trainer.

One step = one rollout + one update phase:
  1. sample G responses for each of P prompts (KV-cache decode; the sampling log-probs are kept as the
     "old" log-probs, so the policy never re-scores its own rollout); with ``--tools`` a response is a
     multi-turn episode whose tool turns are forced tokens (no KL, advantage or loss on them);
  2. score them (reward model, function, HTTP, ensemble), optionally normalise / clip, penalise missing EOS;
  3. one reference forward gives per-token KL = estimator(log π − log π_ref);
  4. advantages: PPO -> GAE over per-token rewards r_t = −β·KL_t (+ score at the last token) with a critic;
     GRPO / RLOO -> a group baseline over the G samples of each prompt (no critic); REINFORCE++ -> the
     returns of r_t = −β·KL_t (+ score), whitened over the batch (no critic);
  5. ``ppo_epochs`` passes over ``num_minibatches`` minibatches, each one optimizer step of the shared engine
     (micro-batches of ``per_device_batch_size`` sequences, exact normalisation), stopping early when the
     approximate KL to the rollout policy passes ``approx_kl_stop``;
  6. the adaptive controller moves β toward ``kl_target``.
The algorithms differ only in configuration defaults, in step 4 and (GSPO: one ratio per response) in the
ratio of step 5: there is one loop.

Read in this order: ``config`` (the options), ``task`` (steps 1-3 and 5), ``experience`` (step 4),
``batches`` (collation and loss normalisation), ``variants`` (GSPO, REINFORCE++, GRPO's reward scaling, DAPO's
dynamic sampling and shaping, truncated importance sampling), ``watch`` (held-out evaluation, the
reward-hacking detector of ``hacking``, the best policy), ``run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy_exports

if TYPE_CHECKING:
    from .config import (
        GRPOConfig,
        GSPOConfig,
        PPOConfig,
        ReinforcePPConfig,
        RLConfig,
        RLOOConfig,
        check_config,
    )
    from .experience import Experience, build_experience
    from .hacking import RewardHackingDetector
    from .policy import ActorCritic, response_logps, tempered_logits
    from .run import run_rl, write_samples
    from .task import RLTask

# name -> its module, imported on first use: the configs load without torch (for --help)
_HOMES = {"GRPOConfig": "config", "GSPOConfig": "config", "PPOConfig": "config", "ReinforcePPConfig": "config",
          "RLConfig": "config", "RLOOConfig": "config", "check_config": "config", "Experience": "experience", "build_experience": "experience",
          "RewardHackingDetector": "hacking", "ActorCritic": "policy", "response_logps": "policy",
          "tempered_logits": "policy", "run_rl": "run", "write_samples": "run", "RLTask": "task"}

__all__ = ["ActorCritic", "Experience", "GRPOConfig", "GSPOConfig", "PPOConfig", "RLConfig", "RLOOConfig", "RLTask",
           "ReinforcePPConfig", "RewardHackingDetector", "build_experience", "check_config", "response_logps", "run_rl",
           "tempered_logits", "write_samples"]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
