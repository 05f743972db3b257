"""JSON Lines, read and written one way everywhere in rlhfkit: one JSON object per line, UTF-8.

:func:`read_jsonl` and :func:`numbered_rows` parse line by line, so that a bad line is reported as
"file, row N: malformed JSON" (a ``DataError``) instead of failing the whole file anonymously; blank lines
are skipped and a byte-order mark on the first line is tolerated. Readers that must survive damaged files
(the report) pass ``on_bad`` to skip such lines and count them instead. :func:`write_jsonl` writes
atomically (a ``.tmp`` file renamed over the target), keeps non-ASCII text as it is and creates the
folder; it takes the path first, then the rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["json_kind", "numbered_rows", "read_jsonl", "write_jsonl"]


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, for messages: "a string", "a list", "null", ..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number" if not (isinstance(value, float) and math.isnan(value)) else "NaN"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


def numbered_rows(path: str | Path, source: str | None = None, *, errors: str = "strict",
                  on_bad: Callable[[int], None] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file, with precise errors.

    A line that is not UTF-8 (with ``errors="strict"``), not JSON or not a JSON object raises a
    ``DataError`` naming ``source`` (default: the path) and the line; with ``on_bad`` given, it is
    called with the line number instead and the line is skipped. ``errors`` is the UTF-8 decoding's
    error handler (``"replace"`` keeps lines with stray bytes).
    """
    path = Path(path)
    source = str(path) if source is None else source
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as fh:  # bytes, so one bad line is reported instead of failing the whole file
        for line_no, raw in enumerate(fh, start=1):
            try:
                try:
                    text = raw.decode("utf-8", errors)
                except UnicodeDecodeError:
                    raise DataError("not valid UTF-8", source=source, row=line_no) from None
                if line_no == 1:
                    text = text.lstrip("\ufeff")  # tolerate a byte-order mark
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", source=source,
                                    row=line_no) from None
                if not isinstance(obj, dict):
                    raise DataError(f"expected a JSON object, got {json_kind(obj)}", source=source, row=line_no)
            except DataError:
                if on_bad is None:
                    raise
                on_bad(line_no)
                continue
            rows.append((line_no, obj))
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file, in order (see :func:`numbered_rows` for the errors)."""
    return [row for _, row in numbered_rows(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write ``rows`` (any iterable) to ``path``, one JSON object per line; returns the number of rows.

    Atomic: the rows go to ``<path>.tmp``, which then replaces ``path``, so a reader never sees half a
    file. Parent folders are created; non-ASCII text is written as it is (``ensure_ascii=False``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
