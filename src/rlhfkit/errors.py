"""Errors that the CLI turns into one-line messages instead of tracebacks."""

from __future__ import annotations

import argparse
from typing import Any


class RlhfkitError(Exception):
    """Base class for user-facing errors: the message is one line that says what to fix."""


class DataError(RlhfkitError):
    """Bad input data; the message names the file, the row (1-based line for JSONL) and the field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.source, self.row, self.field = source, row, field


class ConfigError(RlhfkitError):
    """Bad configuration file or flag value."""


class ModelError(RlhfkitError):
    """A model or tokenizer cannot be used as asked (e.g. mismatched tokenizers)."""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are one-line ConfigErrors (the CLI prints them, exit 2), not usage
    text; ``error_prefix`` starts each message (a subcommand's name)."""

    def __init__(self, *args: Any, error_prefix: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.error_prefix = error_prefix

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.error_prefix}{message}")
