"""What a step measured and where it is written: the per-step metric sums, the progress-bar keys, the
summary, and the per-step JSONL logs (metrics.jsonl, samples.jsonl) that a resume cuts back and a fresh run starts afresh.

Shared by the engine's loop and by loops owned elsewhere (the Ray driver), so every run writes the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, truncate_jsonl

MetricSums = dict[str, tuple[float, float]]  # name -> (sum, count), averaged over a whole optimizer step


@dataclass
class StepResult:
    """What one optimizer update measured: the loss and metric sums over all its micro-batches."""

    total_weight: float
    loss_sum: float = 0.0
    tokens: int = 0
    grad_norm: float | None = None
    sums: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, float]:
        """Step averages: the loss over the step's weight, every metric over its own count."""
        out = {"loss": self.loss_sum / self.total_weight}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out.update({name: s / max(c, 1e-12) for name, (s, c) in self.sums.items()})
        return out


def task_postfix(task: Any, row: dict[str, Any]) -> list[str]:
    """Keys shown on the progress bar: the task's choice (``progress_keys``) or the loss."""
    keys = getattr(task, "progress_keys", ("loss",)) + ("tokens_per_s",)
    return [k for k in keys if isinstance(row.get(k), int | float)]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON object as a line of the JSONL log ``path`` (flushed: a crash loses no finished step)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    """OUTPUT_DIR/summary.json: the run's final metrics (written atomically)."""
    atomic_write_text(Path(output_dir) / "summary.json", json.dumps(summary, indent=2, default=str))


def restart_logs(paths: Iterable[Path], resume_step: int | None) -> None:
    """Per-step JSONL logs at the start of a run: cut back to ``resume_step`` on a resume (the later rows are
    written again), deleted when the run starts fresh (``None``)."""
    for path in paths:
        if resume_step is None:
            Path(path).unlink(missing_ok=True)
        else:
            truncate_jsonl(Path(path), resume_step)


def logged_row(path: Path, step: int) -> dict[str, Any]:
    """The first row logged for ``step`` in a JSONL log (without its ``step`` key); {} when there is none.
    A resumed run reads its starting evaluation (step 0) back from metrics.jsonl for its summary."""
    if not path.exists():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step") == step:
            return {k: v for k, v in row.items() if k != "step"}
    return {}
