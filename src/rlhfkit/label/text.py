"""The one rule for text entering the labelling app, and how stored text is shown.

Every boundary (API JSON bodies, HTML form fields, import files, export rows) passes its strings through
:func:`check_text` / :func:`check_strings`: a string that cannot be encoded as UTF-8 (a lone UTF-16
surrogate such as JSON ``"\\ud800"``) or that holds a NUL (PostgreSQL cannot store it) is refused with a
one-line :class:`~rlhfkit.errors.DataError` naming the source, row and field, so nothing is stored that
would later break a page or an export. The API and the forms answer it with a 422, ``rlhfkit label
import`` with a one-line error and exit code 2.

Bidirectional-text controls (U+202A..U+202E embeddings / overrides, U+2066..U+2069 isolates) are stored as
they are (they are data), but pages show them inert: :func:`show_bidi` replaces each with a visible
``[U+202E]`` marker, and every element holding user text is also a ``dir="auto"`` bidi isolate.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import DataError

_SURROGATE = re.compile("[\ud800-\udfff]")
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_BIDI_MARKERS = {ord(c): f"[U+{ord(c):04X}]" for c in BIDI_CONTROLS}


def text_problem(value: str, allow_nul: bool = False) -> str | None:
    """Why ``value`` may not be stored (one line), or None; ``allow_nul``: only check that it is encodable."""
    bad = _SURROGATE.search(value)
    if bad:
        return (f"contains a lone UTF-16 surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}, "
                "which is not valid Unicode text")
    if not allow_nul and "\x00" in value:
        return f"contains a NUL character at character {value.index(chr(0))}"
    return None


def check_text(value: str, field: str, *, source: str | None = None, row: int | None = None,
               allow_nul: bool = False) -> str:
    """``value`` if it can be stored; otherwise a :class:`DataError` naming source, row and field."""
    problem = text_problem(value, allow_nul)
    if problem:
        raise DataError(problem, source=source, row=row, field=field)
    return value


def check_strings(value: Any, field: str, *, source: str | None = None, row: int | None = None,
                  allow_nul: bool = False) -> Any:
    """:func:`check_text` on every string (keys too) inside a JSON-like value; ``field`` names the path
    (``answers.critique.critique``, ``responses[1]``). Iterative, so deep nesting cannot exhaust the stack."""
    kw = {"source": source, "row": row, "allow_nul": allow_nul}
    stack = [(value, field)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path, **kw)
        elif isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                if isinstance(key, str) and text_problem(key, allow_nul):
                    check_text(key, f"{path}.{ascii(key)}" if path else ascii(key), **kw)
                stack.append((sub, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, f"{path}[{i}]") for i, sub in reversed(list(enumerate(item))))
    return value


def scrub(value: str) -> str:
    """Text stored before these checks existed, made displayable: lone surrogates become U+FFFD."""
    return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


def show_bidi(value: str) -> str:
    """Bidi embedding / override / isolate controls replaced by visible ``[U+XXXX]`` markers (plain text)."""
    return value.translate(_BIDI_MARKERS)
