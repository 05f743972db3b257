"""Pipeline stage types: what a stage function receives (:class:`StageContext`) and the list of types.

A stage type is ``fn(ctx) -> summary dict``, registered with :func:`stage`. The library's own steps live in
:mod:`rlhfkit.stages`; other packages add theirs as modules named in the ``rlhfkit.stages`` entry-point group
(the demo world's world, collect, cai_world and summary come in that way), loaded by :func:`stage_types`.
The trainers are stage types too, from :mod:`rlhfkit.registry`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "StageContext", "StageFn", "stage", "stage_options", "stage_types"]

ENTRY_POINT_GROUP = "rlhfkit.stages"


@dataclasses.dataclass
class StageContext:
    """What a stage function gets: its name, folder, resolved options and the pipeline around it."""

    name: str
    output_dir: Path
    options: dict[str, Any]
    run_dir: Path
    seed: int
    defaults: dict[str, Any]
    results: dict[str, dict[str, Any]]  # summaries of the stages run or loaded so far

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def require(self, *keys: str) -> None:
        for key in keys:
            if key not in self.options:
                raise ConfigError(f"stage '{self.name}': option '{key}' is required")


StageFn = Callable[[StageContext], dict[str, Any]]
_STAGES: dict[str, StageFn] = {}
# type -> the option names it reads (or a function giving them, imported late); None: not checked
_OPTIONS: dict[str, Iterable[str] | Callable[[], Iterable[str]] | None] = {}


def stage(type_name: str, options: Iterable[str] | Callable[[], Iterable[str]] | None = None
          ) -> Callable[[StageFn], StageFn]:
    """Register a stage type: ``fn(ctx) -> summary dict`` (written to the stage's stage_done.json).

    ``options``: the names it reads, so that a pipeline file with a misspelt one fails before any stage runs.
    """

    def register(fn: StageFn) -> StageFn:
        _STAGES[type_name] = fn
        _OPTIONS[type_name] = options
        return fn

    return register


def stage_options(type_name: str) -> set[str] | None:
    """The option names a registered stage type declared (None when it declared none)."""
    options = _OPTIONS.get(type_name)
    if options is None:
        return None
    return set(options() if callable(options) else options)


def stage_types(*modules: str) -> dict[str, StageFn]:
    """Every registered stage type, after importing ``modules`` and the ``rlhfkit.stages`` entry points."""
    for name in modules:
        importlib.import_module(name)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(point.value)
    return dict(_STAGES)
