"""A command's flags as a mapping of options: what lets a pipeline stage run ``rlhfkit eval-rm``,
``audit-judge`` or ``grade`` with the options of its command line, by their names with underscores, and the
same defaults (the parser is the one list of options and defaults; :mod:`rlhfkit.stages`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["option_names", "options_namespace"]


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option a parser takes, by its ``dest`` (underscored), help left out."""
    return {a.dest for a in parser._actions if a.dest != "help"}


def options_namespace(parser: argparse.ArgumentParser, options: Mapping[str, Any]) -> argparse.Namespace:
    """``options`` over the parser's defaults, as the parsed flags would be; an unknown option or a missing
    required one is a one-line ConfigError named as on the command line (``--reward-model``)."""
    known = option_names(parser)
    values = {str(k).replace("-", "_"): v for k, v in options.items()}
    for key in values:
        if key not in known:
            raise ConfigError(f"{parser.prog}: unknown option '{key}'")
    merged = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    merged.update(values)
    for action in parser._actions:
        if action.required and merged.get(action.dest) in (None, "", []):
            raise ConfigError(f"{parser.prog}: {action.option_strings[0]} is required")
    return argparse.Namespace(**merged)
