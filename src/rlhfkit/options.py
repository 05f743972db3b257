"""Options from YAML files and flags, for the trainers' commands and the pipeline's trainer stages; and the
launch of a registered trainer (on Ray when an online trainer's config asks for it)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .registry import Trainer

__all__ = ["coerce_options", "config_from_options", "load_yaml_config", "parse_trainer_args", "read_yaml",
           "run_trainer", "trainer_config_class"]


def trainer_config_class(trainer: Trainer) -> type:
    """The trainer's config class; an online trainer's gains the Ray launcher's options (``--ray`` ...)."""
    if not trainer.online:
        return trainer.config
    from .distributed import with_ray_options

    return with_ray_options(trainer.config)


def run_trainer(trainer: Trainer, config: Any) -> dict[str, Any]:
    """Run ``config`` with the trainer: on Ray when it is online and ``config.ray`` is set."""
    if trainer.online and getattr(config, "ray", False):
        from .distributed import run_ray_rl

        return run_ray_rl(config)
    return trainer.run(config)


def config_from_options(trainer: Trainer, options: dict[str, Any], where: str) -> Any:
    """The trainer's config from a mapping of options (dashes or underscores); unknown ones are an error."""
    config_cls = trainer_config_class(trainer)
    known = {f.name for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}: unknown {trainer.name} option '{key}' (see rlhfkit {trainer.name} --help)")
        out[name] = value
    return config_cls(**coerce_options(config_cls, out, where))


def coerce_options(config_cls: type, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Values converted to the config field's type: YAML reads ``5e-5`` as a string (it wants ``5.0e-5``)."""
    import typing

    hints = typing.get_type_hints(config_cls)
    out = {}
    for name, value in options.items():
        kinds = typing.get_args(hints.get(name)) or (hints.get(name),)
        if isinstance(value, str) and str not in kinds:
            for kind in (int, float, bool):
                if kind not in kinds:
                    continue
                try:
                    value = {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
                    break
                except (ValueError, KeyError):
                    continue
            else:
                raise ConfigError(f"{where}: option '{name}' = {value!r} is not a "
                                  f"{' or '.join(k.__name__ for k in kinds if k is not type(None))}")
        elif isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds:
            value = float(value)
        out[name] = value
    return out


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's contents ({} when empty); a missing file or bad YAML is a one-line ConfigError."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None


def load_yaml_config(path: str, config_cls: type) -> dict[str, Any]:
    """Read a YAML config; keys may use dashes or underscores; unknown keys are an error."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    known = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown option '{key}' (see --help for the list)")
        out[name] = value
    return coerce_options(config_cls, out, path)


def parse_trainer_args(config_cls: type, argv: Sequence[str], prog: str, description: str):
    """Build the config dataclass from ``--config FILE`` and flags (flags win)."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(config_cls, prog=prog, description=description)
    parser.add_argument("--config", help="YAML file of options (flags given on the command line override it).")
    if known.config:
        parser.set_defaults(**load_yaml_config(known.config, config_cls))
    # the extra --config attribute comes back as a second namespace, which we ignore
    config = parser.parse_args_into_dataclasses(args=list(rest), look_for_args_file=False)[0]
    return config
