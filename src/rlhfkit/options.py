"""Options from YAML files and flags, for the trainers' commands and the pipeline's trainer stages; and the
launch of a registered trainer (on Ray when an online trainer's config asks for it)."""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, OneLineParser
from .registry import Trainer

__all__ = ["EarlierSummary", "OneLineParser", "build_parser", "check_before_loading", "closest", "coerce_options", "config_from_options",
           "load_yaml_config", "parse_trainer_args", "read_yaml", "run_trainer", "trainer_config_class"]


def trainer_config_class(trainer: Trainer) -> type:
    """The trainer's config class; an online trainer's gains the Ray launcher's options (``--ray`` ...)."""
    if not trainer.online:
        return trainer.config
    from .distributed import with_ray_options

    return with_ray_options(trainer.config)


def check_before_loading(config: Any) -> None:
    """Mistakes that would otherwise surface late or as the wrong error: a model path that does not exist
    (not a hub error), a model folder without its tokenizer, a precision the device cannot run fast (bf16 on
    a CPU without bf16 units)."""
    from .engine.setup import resolve_precision
    from .models.loading import check_model_path, check_tokenizer_folder

    for name in ("model", "ref_model", "reward_model"):
        value = getattr(config, name, None)
        if isinstance(value, str):  # --reward-model may list an ensemble
            for part in value.split(",") if name == "reward_model" else [value]:
                if part.strip():
                    check_model_path(part.strip(), f"--{name.replace('_', '-')}")
                    check_tokenizer_folder(part.strip())
    if isinstance(getattr(config, "precision", None), str):
        resolve_precision(config.precision, bool(getattr(config, "force_precision", False)))


def run_trainer(trainer: Trainer, config: Any) -> dict[str, Any]:
    """Run ``config`` with the trainer: on Ray when it is online and ``config.ray`` is set."""
    check_before_loading(config)
    from .engine.run_folder import RunFinished

    try:
        if trainer.online and getattr(config, "ray", False):
            from .distributed import run_ray_rl

            return run_ray_rl(config)
        return trainer.run(config)
    except RunFinished as finished:  # --resume on a finished run: its summary, nothing trained
        import logging

        logging.getLogger("rlhfkit").info("%s", finished)
        return EarlierSummary(finished.summary)


class EarlierSummary(dict):
    """The summary.json of a run that had already finished: ``--resume`` found nothing to train."""


def config_from_options(trainer: Trainer, options: dict[str, Any], where: str) -> Any:
    """The trainer's config from a mapping of options (dashes or underscores); unknown ones are an error."""
    config_cls = trainer_config_class(trainer)
    known = {f.name for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in known:
            hint = closest(str(key), _spelt_like(str(key), known), quote="'")
            raise ConfigError(f"{where}: unknown {trainer.name} option '{key}'{hint} "
                              f"(see rlhfkit {trainer.name} --help)")
        out[name] = value
    return config_cls(**coerce_options(config_cls, out, where))


def _spelt_like(key: str, names: set[str]) -> list[str]:
    """Option names spelt as the user spells them (dashes or underscores), for suggestions."""
    return sorted(n.replace("_", "-") for n in names) if "-" in key else sorted(names)


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
                    value = _to_bool(value) if kind is bool else kind(value)
                    break
                except (ValueError, argparse.ArgumentTypeError):
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
        if key == "_run":  # the provenance block of a run's config.yaml, not an option
            continue
        name = str(key).replace("-", "_")
        if name not in known:
            hint = closest(str(key), _spelt_like(str(key), known), quote="'") or " (see --help for the list)"
            raise ConfigError(f"{path}: unknown option '{key}'{hint}")
        out[name] = value
    return coerce_options(config_cls, out, path)


def closest(name: str, known: Sequence[str], quote: str = "") -> str:
    """``"; did you mean X?"`` with the known name nearest to a misspelt one (difflib), or ``""``."""
    import difflib

    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {quote}{match[0]}{quote}?" if match else ""


def _to_bool(text: str | bool) -> bool:
    """``--flag true|false`` as transformers' HfArgumentParser reads it (yes/no, t/f, y/n, 1/0 too)."""
    if isinstance(text, bool):
        return text
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not '{text}'")


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, kind: Any) -> None:
    """One config field as flags, spelt ``--name-with-dashes`` and ``--name_with_underscores``; a bool also
    takes ``--name false`` and ``--no-name``; a list takes several values; the help shows the default."""
    import typing

    names = [f"--{field.name.replace('_', '-')}"] + ([f"--{field.name}"] if "_" in field.name else [])
    kwargs = dict(field.metadata)
    aliases = kwargs.pop("aliases", [])
    names += [aliases] if isinstance(aliases, str) else list(aliases)
    args = [k for k in typing.get_args(kind) if k is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X] -> X (X | str -> the other)
        kind = next((k for k in args if k is not str), str) if str in args and len(args) > 1 else args[0]
    default = field.default
    if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    origin = typing.get_origin(kind)
    if kind is bool:
        kwargs.update(type=_to_bool, nargs="?", const=True, metavar="true|false")
        kwargs.setdefault("default", False)
    elif origin is typing.Literal:
        kwargs["choices"] = typing.get_args(kind)
        kwargs["type"] = type(kwargs["choices"][0])
    elif origin in (list, tuple) or kind in (list, tuple):
        kwargs.update(type=(typing.get_args(kind) or (str,))[0], nargs="+")
    else:
        kwargs["type"] = kind
    parser.add_argument(*names, dest=field.name, **kwargs)
    if kind is bool:
        negative = dict.fromkeys([f"--no-{field.name.replace('_', '-')}", f"--no_{field.name}"])
        parser.add_argument(*negative, dest=field.name, action="store_false", default=argparse.SUPPRESS,
                            help=f"Same as {names[0]} false." if default is True else argparse.SUPPRESS)


def build_parser(config_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """The flags of a config dataclass: every field, its help and default (torch is not imported)."""
    import typing

    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.init:
            _add_field(parser, field, hints[field.name])
    parser.add_argument("--config", help="YAML file of options (flags given on the command line override it).")
    return parser


def _unknown_flag(parser: argparse.ArgumentParser, extra: Sequence[str]) -> ConfigError:
    """The error for flags the parser does not know: the first, with the closest known flag."""
    flags = [a for a in extra if a.startswith("-")]
    if not flags:
        return ConfigError(f"unexpected argument '{extra[0]}' (options are given as --name value)")
    flag = flags[0].split("=", 1)[0]
    known = [s for action in parser._actions for s in action.option_strings
             if s.startswith("--") and action.help is not argparse.SUPPRESS]
    dashed = sorted({s.replace("_", "-") for s in known})
    hint = closest(flag.replace("_", "-"), dashed) or f" (see {parser.prog} --help)"
    return ConfigError(f"unknown option {flag}{hint}")


def parse_trainer_args(config_cls: type, argv: Sequence[str], prog: str, description: str):
    """Build the config dataclass from ``--config FILE`` and flags (flags win)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = build_parser(config_cls, prog, description)
    if known.config:
        parser.set_defaults(**load_yaml_config(known.config, config_cls))
    namespace, extra = parser.parse_known_args(list(rest))
    if extra:
        raise _unknown_flag(parser, extra)
    options = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_cls)
               if f.init and hasattr(namespace, f.name)}
    return config_cls(**options)
