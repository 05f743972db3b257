"""The shared training engine: one loop on accelerate for every trainer.

Read ``loop`` (the :class:`Engine` and the :class:`Task` a trainer supplies) first; ``setup`` (precision,
process groups, trackers), ``parallel`` (models on the ranks), ``checkpoint`` (crash-safe folders),
``metrics`` (step rows and JSONL logs), ``seeds`` (per-step and per-epoch seeds) and ``config`` serve it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .checkpoint import atomic_dir_write, atomic_write_text, latest_checkpoint, list_checkpoints
    from .config import SharedPromptOptions, TrainConfig, arg
    from .loop import Engine, Task, TrainingError
    from .metrics import MetricSums, StepResult
    from .seeds import epoch_seed, step_seed
    from .setup import resolve_precision, shutdown_distributed

# name -> the module that defines it; imported on first use, so that the config classes (``config``, no
# torch) serve ``--help`` without loading torch and accelerate
_HOMES = {"atomic_dir_write": "checkpoint", "atomic_write_text": "checkpoint", "latest_checkpoint": "checkpoint",
          "list_checkpoints": "checkpoint", "SharedPromptOptions": "config", "TrainConfig": "config",
          "arg": "config", "Engine": "loop",
          "Task": "loop", "TrainingError": "loop", "MetricSums": "metrics", "StepResult": "metrics",
          "epoch_seed": "seeds", "step_seed": "seeds", "resolve_precision": "setup",
          "shutdown_distributed": "setup"}


__all__ = [
    "Engine",
    "MetricSums",
    "SharedPromptOptions",
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

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
