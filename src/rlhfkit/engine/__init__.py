"""The shared training engine: one loop on accelerate for every trainer.

Read ``loop`` (the :class:`Engine` and the :class:`Task` a trainer supplies) first; ``setup`` (precision,
process groups, trackers), ``parallel`` (models on the ranks), ``checkpoint`` (crash-safe folders),
``metrics`` (step rows and JSONL logs), ``seeds`` (per-step and per-epoch seeds) and ``config`` serve it.
"""

from .checkpoint import atomic_dir_write, atomic_write_text, latest_checkpoint, list_checkpoints
from .config import TrainConfig, arg
from .loop import Engine, Task, TrainingError
from .metrics import MetricSums, StepResult
from .seeds import epoch_seed, step_seed
from .setup import resolve_precision, shutdown_distributed

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
