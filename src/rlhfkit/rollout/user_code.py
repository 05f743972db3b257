"""Load the Python functions a user names on the command line: ``path/to/file.py:fn`` or ``package.module:fn``.

Reward functions (``--reward-fn``, a judge's ``fn:``), tools (``--tools file.py:fn1,fn2``) and environments
(``--env file.py:ClassName``) are named the same way; one loader gives them the same rules and the same
one-line ConfigErrors, each naming the file (or module) and the function or class.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from .scoring import _one_line

__all__ = ["load_functions"]


def _is_module_name(source: str) -> bool:
    """A dotted name such as ``mypkg.tools``, not a file (which may not exist yet: ``nope.py`` is a file)."""
    return (not source.endswith(".py") and all(part.isidentifier() for part in source.split("."))
            and not Path(source).expanduser().is_file())


def _import_file(source: str, what: str) -> ModuleType:
    """Import a .py file as a fresh module (its folder is not added to ``sys.path``)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} file '{source}' does not exist")
    module_name = f"_rlhfkit_user_code_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{what} file '{source}' cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so dataclasses / pickling inside the file work
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"{what} file '{source}' failed to import: {type(exc).__name__}: "
                          f"{_one_line(exc)}") from exc
    return module


def _import_module(source: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what} module '{source}' cannot be imported: {_one_line(exc)}") from exc
    except Exception as exc:
        raise ConfigError(f"{what} module '{source}' failed to import: {type(exc).__name__}: "
                          f"{_one_line(exc)}") from exc


def load_functions(spec: str, what: str, many: bool = False,
                   noun: str = "function") -> list[tuple[str, Callable[..., Any]]]:
    """``(name, function)`` for each function ``spec`` names, in its order; ``what`` ("reward function",
    "tool", "environment") starts every error message, ``noun`` ("function", "class") names what is looked up.

    ``spec`` is ``SOURCE:NAME`` (``many``: ``SOURCE:NAME1,NAME2``). SOURCE is a file when it ends in ``.py``
    or is not a dotted name (imported as a fresh module, once per call), else a module imported by name.
    """
    form = "fn1,fn2" if many else "ClassName" if noun == "class" else "function_name"
    source, sep, names_text = spec.strip().rpartition(":")
    source = source.strip()
    names = [n.strip() for n in names_text.split(",")] if many else [names_text.strip()]
    if not sep or not source or not all(names):
        raise ConfigError(f"{what} '{spec}': expected path/to/file.py:{form} or package.module:{form}")
    as_module = _is_module_name(source)
    module = _import_module(source, what) if as_module else _import_file(source, what)
    where = f"{what} {'module' if as_module else 'file'} '{source}'"
    functions = []
    for name in names:
        if not hasattr(module, name):
            raise ConfigError(f"{where} has no {noun} '{name}'")
        fn = getattr(module, name)
        if not callable(fn):
            raise ConfigError(f"'{name}' in {where} is a {type(fn).__name__}, not a {noun}")
        functions.append((name, fn))
    return functions
