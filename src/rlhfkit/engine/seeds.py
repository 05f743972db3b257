"""Per-step and per-epoch seeds: the one home of the formulas every loop (local or on Ray) derives its
random streams from, so that a run's data order and sampling are pure functions of ``(seed, step)``."""

from __future__ import annotations


def step_seed(seed: int, step: int, stream: int) -> int:
    """The seed of random stream ``stream`` at optimizer step ``step`` (0-based) of a run seeded ``seed``.

    Streams: 1 = the rollout's sampling generator, 2 = the PPO minibatch order.
    """
    return seed * 1_000_003 + 7919 * step + stream


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the data order of epoch ``epoch`` (0-based) of a run seeded ``seed``."""
    return seed * 1_000_003 + epoch


__all__ = ["epoch_seed", "step_seed"]
