"""The label page's form fields -> the API's answers (display positions), with the same checks as the API.

Every field is read through :func:`form_text` (the text rule of :mod:`.text`) and numbers through
:func:`form_int`, which takes ASCII digits only: ``int()`` would also take (or choke on) other Unicode
digits such as ``"²"``. A bad field is a :class:`~.service.LabelError` 422 naming it, which the page shows.
"""

from __future__ import annotations

import re
from typing import Any

from .rules import critique_problem
from .service import LabelError
from .text import text_problem

_INT = re.compile(r"-?[0-9]{1,9}")
_NUMBER = re.compile(r"-?(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")


def form_text(form, name: str, required: bool = True) -> str | None:
    """A form field's text (None when absent and not ``required``); missing / invalid text is a 422."""
    value = form.get(name)
    if not isinstance(value, str) or value == "":
        if required:
            raise LabelError(422, f"please answer every question (missing: {name})")
        return None
    problem = text_problem(value)
    if problem:
        raise LabelError(422, f"field '{name}': {problem}")
    return value


def parse_int(value: str, name: str) -> int:
    if not _INT.fullmatch(value):
        raise LabelError(422, f"field '{name}' must be a whole number written with the digits 0-9")
    return int(value)


def form_int(form, name: str, required: bool = True) -> int | None:
    value = form_text(form, name, required)
    return None if value is None else parse_int(value, name)


def form_number(form, name: str, required: bool = True) -> float | None:
    """A decimal number (ASCII digits, one optional point), as :func:`form_int` for whole numbers."""
    value = form_text(form, name, required)
    if value is None:
        return None
    if not _NUMBER.fullmatch(value.strip()):
        raise LabelError(422, f"field '{name}' must be a number written with the digits 0-9 and a point")
    return float(value)


def form_answers(form, tasks: list[str], k: int, min_critique_chars: int = 0) -> dict[str, Any]:
    """The label form's fields -> the API's answers (display positions); missing fields are a 422.

    The page must show that the labeller looked at the ranking: ``ranking_touched=moved`` (set by the
    script on any move) or the "this order is right" box ``ranking_confirmed=yes``; a critique shorter than
    the project's ``min_critique_chars`` is a 422 naming ``critique_text``."""
    answers: dict[str, Any] = {}
    if "pairwise" in tasks:
        answers["pairwise"] = {"choice": form_text(form, "pairwise_choice"),
                               "strength": form_int(form, "pairwise_strength")}
    if "ranking" in tasks:
        answers["ranking"] = {"order": [parse_int(part.strip(), "ranking_order")
                                        for part in form_text(form, "ranking_order").split(",")]}
        if form.get("ranking_touched") != "moved" and form.get("ranking_confirmed") != "yes":
            raise LabelError(422, "field 'ranking_confirmed': move a response in the ranking, or tick "
                                  "'this order is right'")
    if "binary" in tasks:
        answers["binary"] = {"accept": [form_text(form, f"binary_{p}") == "accept" for p in range(k)]}
    if "likert" in tasks:
        answers["likert"] = {"ratings": [form_int(form, f"likert_{p}") for p in range(k)]}
    if "critique" in tasks:
        rewrite = form_text(form, "critique_rewrite", required=False)
        problem = critique_problem(form_text(form, "critique_text", required=False) or "", min_critique_chars)
        if problem:
            raise LabelError(422, f"field 'critique_text': {problem}")
        answers["critique"] = {"critique": form_text(form, "critique_text", required=False) or "",
                               "rewrite": rewrite if rewrite and rewrite.strip() else None,
                               "target": form_int(form, "critique_target")}
    return answers
