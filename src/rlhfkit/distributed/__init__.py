"""Distributed RL on Ray (extra ``distributed``): PPO / GRPO / RLOO with one actor group per role.

Ray is imported only when a run asks for it (``rlhfkit ppo --ray``); without it the error names the extra.
An online trainer's config gains the ``--ray`` options with :func:`with_ray_options`; :func:`run_ray_rl` runs it.

Read ``options`` (the flags and their checks), then ``driver`` (the run and its step loop), ``cluster``
(placement, the actors, bounded waits) and ``workers`` (what each role's actor does).


Roles and what runs in them (all the math is the single-process trainer's, ``trainers/rl/``):
  policy    training group: N actors, each an :class:`~rlhfkit.engine.Engine` (accelerate) with
            torch.distributed env vars set, so data parallelism inside the group is the code path of
            ``accelerate launch``; each step it runs ``RLTask.update`` (clipped policy loss) on its share.
  critic    training group (PPO with GAE): a value model (from ``--reward-model`` with ``--critic
            reward_model``, else the policy checkpoint with a zeroed score head); values for the rollout,
            then ``RLTask.update`` with the clipped value loss.
  reference inference group: reference log-probs of the responses.
  reward    inference group: the reward source (model, function, HTTP, ensemble) of ``build_reward_source``.
  rollout   sampling workers: ``HFGenerationBackend`` over their copy of the policy, which policy rank 0
            refreshes before every rollout with a collective broadcast (gloo, or NCCL on GPUs) over a process
            group of {policy rank 0, rollout workers}: no state dict pickled through the object store.
The driver gathers the pieces and calls ``RLTask.shape_scores`` and ``RLTask.experience`` (missing-EOS
penalty, reward normalisation, per-token KL, GAE, whitening) and the adaptive KL controller, writes
metrics.jsonl / samples.jsonl with the single-process keys, and saves checkpoints (each training group's
accelerate state + the driver's KL controller and reward statistics) that ``--resume`` continues.

Every wait is bounded (``--ray-timeout-s`` on calls and collectives, ``--ray-startup-timeout-s`` on placement
and start-up): a worker that dies ends the run with a :class:`TrainingError` naming its role and the last
checkpoint; when its process held no training rank, the training groups are intact and a checkpoint of the
last finished step is saved first.

Placement: ``per_role`` gives every (role, rank) an actor and a bundle of its own; ``colocated`` runs rank i of
every role in actor i (one bundle: on GPUs, one device), where a rollout worker copies the weights of the
policy rank beside it instead of receiving the broadcast.
"""

from __future__ import annotations

from typing import Any

from .options import RayOptions, with_ray_options


def run_ray_rl(config: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``config`` (a PPO/GRPO/RLOO config with the Ray options, ``with_ray_options(PPOConfig)(...)``) on
    Ray; see :func:`.driver.run_ray_rl`."""
    from .driver import run_ray_rl as run

    return run(config, **kwargs)


__all__ = ["RayOptions", "run_ray_rl", "with_ray_options"]
