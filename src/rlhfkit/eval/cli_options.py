"""The evaluation commands' shared flag handling: one-line flag errors, ``--policy NAME=PATH`` lists, and a
command's flags as a mapping of options (what lets a pipeline stage run ``rlhfkit eval-rm``, ``audit-judge``
or ``grade`` with the options of its command line, by their names with underscores, and the same defaults:
the parser is the one list of options and defaults; :mod:`rlhfkit.stages`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OneLineParser

__all__ = ["OneLineParser", "option_names", "options_namespace", "parse_policies", "policies_of"]


def parse_policies(values: Sequence[str]) -> dict[str, str]:
    """``--policy`` values (repeatable, each may be a comma-separated list) as {name: path}; a bare PATH is
    named after its folder. A malformed item, a name given twice or no policy at all is a ConfigError."""
    policies: dict[str, str] = {}
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            name, sep, path = item.partition("=")
            if not sep:
                name, path = Path(item.rstrip("/")).name, item
            name, path = name.strip(), path.strip()
            if not name or not path:
                raise ConfigError(f"--policy '{item}': expected NAME=PATH")
            if name in policies:
                raise ConfigError(f"--policy: the name '{name}' is given twice")
            policies[name] = path
    if not policies:
        raise ConfigError("give at least one --policy NAME=PATH")
    return policies


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


def policies_of(policies: Any, policy: Any) -> dict[str, str]:
    """The policies of a command's options: a stage's ``policies`` mapping {name: path}, or ``policy`` as on
    the command line (NAME=PATH items, :func:`parse_policies`; one string or a list); never both."""
    if policies is not None:
        if policy:
            raise ConfigError("give policies or policy, not both")
        if not isinstance(policies, Mapping) or not policies:
            raise ConfigError("policies must be a mapping {name: model folder}")
        return {str(k): str(v) for k, v in policies.items()}
    return parse_policies([policy] if isinstance(policy, str) else policy or [])
