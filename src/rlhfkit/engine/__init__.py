"""The shared training engine: one loop on accelerate for every trainer.

Read ``loop`` (the :class:`Engine` and the :class:`Task` a trainer supplies) first; ``setup`` (precision,
process groups, trackers), ``parallel`` (models on the ranks), ``checkpoint`` (crash-safe folders),
``metrics`` (step rows and JSONL logs), ``seeds`` (per-step and per-epoch seeds) and ``config`` serve it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import atomic_dir_write, atomic_write_text, latest_checkpoint, list_checkpoints
    from .config import TrainConfig, arg
    from .loop import Engine, Task, TrainingError
    from .metrics import MetricSums, StepResult
    from .seeds import epoch_seed, step_seed
    from .setup import resolve_precision, shutdown_distributed

# name -> the module that defines it; imported on first use, so that the config classes (``config``, no
# torch) serve ``--help`` without loading torch and accelerate
_HOMES = {"atomic_dir_write": "checkpoint", "atomic_write_text": "checkpoint", "latest_checkpoint": "checkpoint",
          "list_checkpoints": "checkpoint", "TrainConfig": "config", "arg": "config", "Engine": "loop",
          "Task": "loop", "TrainingError": "loop", "MetricSums": "metrics", "StepResult": "metrics",
          "epoch_seed": "seeds", "step_seed": "seeds", "resolve_precision": "setup",
          "shutdown_distributed": "setup"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rlhfkit.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # the next look-up skips this function
    return value


__all__ = [
    "Engine",
    "MetricSums",
    "StepResult",
    "Task",
    "TrainingError",
    "TrainConfig",
    "arg",
    "atomic_dir_write",
    "atomic_write_text",
    "epoch_seed",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_precision",
    "shutdown_distributed",
    "step_seed",
]
