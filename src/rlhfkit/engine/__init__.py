"""The shared training engine: one loop on accelerate for every trainer."""

from .checkpoint import atomic_dir_write, atomic_write_text, latest_checkpoint, list_checkpoints
from .config import TrainConfig, arg
from .loop import Engine, MetricSums, StepResult, Task, TrainingError, resolve_precision

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
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_precision",
]
