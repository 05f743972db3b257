"""Find and read what training runs and evaluations left on disk, tolerating missing keys and bad lines.

A *run* is a folder holding ``metrics.jsonl`` (written by every trainer): rows with a ``step`` and metric
keys; keys starting with ``eval_`` are evaluation metrics, the others training metrics. ``summary.json``
and, for online RL, ``samples.jsonl`` sit beside it. A *pipeline* folder holds several runs (one or two
levels down), a pipeline ``summary.json`` and an ``eval/`` folder with ``eval.json`` + ``samples.jsonl``; a
``rounds`` stage's folder holds ``rounds.json`` (its figures round by round) and its rounds' runs below it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.jsonl import numbered_rows
from ..errors import RlhfkitError
from ..registry import TRAINERS, online_trainers

logger = logging.getLogger("rlhfkit")

MAX_DEPTH = 3  # how many folder levels below RUN_DIR are searched for runs and evaluations


def is_number(value: Any) -> bool:
    """A real number worth plotting (bools are flags, not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Notes:
    """Problems met while reading (malformed lines, unreadable files): logged and shown in the report."""

    messages: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.messages.append(message)


def read_jsonl(path: Path, notes: Notes) -> list[dict[str, Any]]:
    """Rows of a JSONL file; malformed lines and non-object rows are skipped with one counted warning."""
    bad: list[int] = []
    try:
        rows = [row for _, row in numbered_rows(path, errors="replace", on_bad=bad.append)]
    except OSError as exc:
        notes.warn(f"{path}: cannot read ({exc.strerror or exc}), skipped")
        return []
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        notes.warn(f"{path}: skipped {len(bad)} malformed line{'s' if len(bad) > 1 else ''} (line {shown})")
    return rows


def read_json(path: Path, notes: Notes) -> dict[str, Any] | None:
    """A JSON object file, or None (with a warning) when it is unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        notes.warn(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg}), skipped")
        return None
    except OSError as exc:
        notes.warn(f"{path}: cannot read ({exc.strerror or exc}), skipped")
        return None
    if not isinstance(data, dict):
        notes.warn(f"{path}: expected a JSON object, found {type(data).__name__}, skipped")
        return None
    return data


@dataclass
class Series:
    """One metric over steps."""

    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def thinned(self, max_points: int) -> Series:
        """Every k-th point (the last one kept) so that a long run's plot stays light in the page."""
        if len(self.steps) <= max_points:
            return self
        stride = -(-len(self.steps) // max_points)
        keep = list(range(0, len(self.steps), stride))
        if keep[-1] != len(self.steps) - 1:
            keep.append(len(self.steps) - 1)
        return Series([self.steps[i] for i in keep], [self.values[i] for i in keep])


# where a run or pipeline summary keeps its wall-clock time in seconds (rlhfkit's own key first)
WALL_KEYS = ("wall_seconds", "wall_time_s", "wall_s", "runtime_s", "train_runtime", "elapsed_s", "total_time_s")


@dataclass
class Run:
    """One training run folder."""

    name: str  # path relative to the report's root ("ppo", "hacking/beta0"); the folder name for a lone run
    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    samples: list[dict[str, Any]]
    series: dict[str, Series] = field(default_factory=dict)  # metric key (eval_ prefix kept) -> values

    def __post_init__(self) -> None:
        last_step: float = 0
        for index, row in enumerate(self.rows):
            step = row.get("step")
            step = step if is_number(step) else (last_step if index else 0)
            last_step = step
            for key, value in row.items():
                if key == "step" or not is_number(value):
                    continue
                series = self.series.setdefault(key, Series())
                series.steps.append(step)
                series.values.append(float(value))

    @property
    def task(self) -> str:
        for key in ("algorithm", "task"):
            if isinstance(self.summary.get(key), str):
                return self.summary[key]
        if "reward_mean" in self.series and "kl" in self.series:
            return "rl"
        return ""

    @property
    def is_rl(self) -> bool:
        return self.task in online_trainers() or self.task == "rl" or ("kl" in self.series and "beta" in self.series)

    @property
    def train_rows(self) -> int:
        return sum(1 for r in self.rows if any(k != "step" and not k.startswith("eval_") for k in r))

    @property
    def eval_rows(self) -> int:
        return sum(1 for r in self.rows if any(k.startswith("eval_") for k in r))

    @property
    def wall_seconds(self) -> float | None:
        """How long the run took: summary.json's wall time, else the one the pipeline recorded for its stage
        (stage_done.json beside it)."""
        stage_done = read_json(self.path / "stage_done.json", Notes()) or {}
        for summary in (self.summary, stage_done.get("summary") or {}):
            value = next((summary[k] for k in WALL_KEYS if is_number(summary.get(k))), None)
            if value is not None:
                return float(value)
        return None

    @property
    def last_step(self) -> float | None:
        steps = [r["step"] for r in self.rows if is_number(r.get("step"))]
        if is_number(self.summary.get("steps")):
            return self.summary["steps"]
        return max(steps) if steps else None

    def hacking(self) -> dict[str, Any]:
        """The reward-hacking detector's verdict: summary.json's ``hacking`` dict, else the first step
        whose metrics row carries a true (or 1.0) ``hacking_detected`` / ``eval_hacking_detected``."""
        info = self.summary.get("hacking")
        result: dict[str, Any] = dict(info) if isinstance(info, dict) else {}
        if result.get("fired_step") is None:
            fired = [r.get("step") for r in self.rows if is_number(r.get("step"))
                     and (r.get("hacking_detected") or r.get("eval_hacking_detected"))]
            if fired:
                result["fired_step"] = fired[0]
        return result


@dataclass
class Evaluation:
    """An ``eval.json`` (+ its ``samples.jsonl``) written by the evaluation stage."""

    name: str
    path: Path
    data: dict[str, Any]
    samples: list[dict[str, Any]]

    @property
    def policies(self) -> dict[str, dict[str, Any]]:
        policies = self.data.get("policies")
        if not isinstance(policies, dict):
            return {}
        return {str(k): v for k, v in policies.items() if isinstance(v, dict)}


@dataclass
class ReportData:
    root: Path
    runs: list[Run]
    evaluations: list[Evaluation]
    pipeline_summary: dict[str, Any] | None
    notes: Notes
    audits: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (folder name, judge_audit.json)
    rounds: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (folder name, rounds.json)


def _order(name: str) -> tuple[int, str]:
    """Runs in the order a pipeline makes them (the registry lists the trainers so); others alphabetically."""
    order = ("pretrain", *TRAINERS, "hacking")
    head = name.split("/")[0]
    return (order.index(head) if head in order else len(order), name)


def _walk(root: Path) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    """Folders (root included, at most MAX_DEPTH below it) that hold metrics.jsonl / eval.json /
    judge_audit.json / rounds.json. A run folder is not searched further (its subfolders are checkpoints)."""
    runs, evals, audits, rounds = [], [], [], []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        depth = len(here.relative_to(root).parts)
        if "metrics.jsonl" in files:
            runs.append(here)
            dirs[:] = []
        if "eval.json" in files:
            evals.append(here)
        if "judge_audit.json" in files:
            audits.append(here)
        if "rounds.json" in files:
            rounds.append(here)
        dirs[:] = sorted(d for d in dirs if depth < MAX_DEPTH and not d.startswith((".", "checkpoint-", "__")))
    return runs, evals, audits, rounds


def load(run_dir: str | Path, summary_file: str = "summary.json") -> ReportData:
    """Everything the report shows, read from RUN_DIR (a run, a pipeline, or an evaluation folder);
    ``summary_file`` names the pipeline's summary (a folder shared by several configs has one per config)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RlhfkitError(f"{root}: no such directory")
    notes = Notes()
    run_dirs, eval_dirs, audit_dirs, round_dirs = _walk(root)
    runs = []
    for folder in run_dirs:
        name = folder.relative_to(root).as_posix()
        name = root.resolve().name if name == "." else name
        summary = read_json(folder / "summary.json", notes) or {}
        samples_file = folder / "samples.jsonl"
        samples = read_jsonl(samples_file, notes) if samples_file.is_file() else []
        runs.append(Run(name, folder, read_jsonl(folder / "metrics.jsonl", notes), summary, samples))
    runs.sort(key=lambda r: _order(r.name))
    evaluations = []
    for folder in eval_dirs:
        data = read_json(folder / "eval.json", notes)
        if data is None:
            continue
        samples_file = folder / "samples.jsonl"
        samples = read_jsonl(samples_file, notes) if samples_file.is_file() else []
        name = folder.relative_to(root).as_posix()
        evaluations.append(Evaluation(root.resolve().name if name == "." else name, folder, data, samples))
    audits, rounds = _named_files(root, audit_dirs, "judge_audit.json", notes), \
        _named_files(root, round_dirs, "rounds.json", notes)
    if not runs and not evaluations and not audits and not rounds:
        raise RlhfkitError(f"{root}: no metrics.jsonl, eval.json, judge_audit.json or rounds.json found here or in "
                           f"its subfolders (expected an --output-dir of a training run, an evaluation or a judge "
                           f"audit, or a pipeline folder)")
    pipeline_summary = None
    if not (root / "metrics.jsonl").is_file():
        pipeline_summary = read_json(root / summary_file, notes)
    return ReportData(root, runs, evaluations, pipeline_summary, notes, audits, rounds)


def _named_files(root: Path, folders: list[Path], file: str, notes: Notes) -> list[tuple[str, dict[str, Any]]]:
    """(folder name relative to root, its ``file`` read as JSON) for each folder whose file reads."""
    out = []
    for folder in folders:
        data = read_json(folder / file, notes)
        if data is not None:
            name = folder.relative_to(root).as_posix()
            out.append((root.resolve().name if name == "." else name, data))
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys; lists are kept whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def sqrt_kl(kl: float) -> float:
    """√KL for the hacking plot; KL estimates a little below zero (estimator noise) count as zero."""
    return math.sqrt(max(kl, 0.0)) if math.isfinite(kl) else math.nan
