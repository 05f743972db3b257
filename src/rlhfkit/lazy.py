"""Package exports imported on first use (PEP 562), so that light commands (``rlhfkit sft --help``) do not
pay for torch and transformers.

A package lists where each public name lives and takes its ``__getattr__`` and ``__dir__`` from here::

    _HOMES = {"run_sft": "sft", "SFTConfig": "configs"}      # name -> submodule
    __getattr__, __dir__ = lazy_exports(__name__, _HOMES)

which behaves as ``from .sft import run_sft`` and ``from .configs import SFTConfig`` at the top of the
package, done the first time each name is looked up.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``homes`` maps each exported name to its submodule."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{home}", package), name)
        setattr(sys.modules[package], name, value)  # the next look-up skips this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__
