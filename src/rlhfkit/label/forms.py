"""The label page's form fields -> the API's answers (display positions), with the same checks as the API.

Every form is read through :func:`read_form` (never ``request.form()``: Starlette replaces bytes that are not
UTF-8 with U+FFFD, or decodes a multipart field as latin-1, so the text rule would never see them), and every
field through :func:`form_text` (the text rule of :mod:`.text`) and numbers through
:func:`form_int`, which takes ASCII digits only: ``int()`` would also take (or choke on) other Unicode
digits such as ``"²"``. A bad field is a :class:`~.service.LabelError` 422 naming it, which the page shows.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_to_bytes

from python_multipart.multipart import MultipartParser, QuerystringParser, parse_options_header
from starlette.datastructures import FormData

from .rules import critique_problem
from .service import LabelError
from .text import text_problem

_INT = re.compile(r"-?[0-9]{1,9}")
_NUMBER = re.compile(r"-?(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")


MAX_FIELDS = 1000  # as Starlette's own form parser


class _RawFields:
    """python-multipart callbacks keeping each field's raw bytes: (name, value) of a urlencoded body, and of
    a multipart body's text parts (a part with a filename is an upload, checked by its importer)."""

    def __init__(self):
        self.fields: list[tuple[bytes, bytes]] = []
        self.name, self.data, self.header, self.value, self.disposition = b"", [], b"", b"", b""

    def callbacks(self) -> dict:
        return {n: getattr(self, n) for n in dir(self) if n.startswith("on_")}

    def on_field_start(self):
        self.name, self.data = b"", []

    def on_field_name(self, d, start, end):
        self.name += d[start:end]

    def on_field_data(self, d, start, end):
        self.data.append(d[start:end])

    def on_field_end(self):
        plus = b"".join(self.data).replace(b"+", b" ")
        self.fields.append((unquote_to_bytes(self.name.replace(b"+", b" ")), unquote_to_bytes(plus)))

    def on_part_begin(self):
        self.disposition, self.data = b"", []

    def on_header_field(self, d, start, end):
        self.header += d[start:end]

    def on_header_value(self, d, start, end):
        self.value += d[start:end]

    def on_header_end(self):
        if self.header.strip().lower() == b"content-disposition":
            self.disposition = self.value
        self.header = self.value = b""

    def on_part_data(self, d, start, end):
        self.data.append(d[start:end])

    def on_part_end(self):
        _, options = parse_options_header(self.disposition)
        if b"filename" not in options:
            self.fields.append((options.get(b"name", b""), b"".join(self.data)))


def _utf8(raw: bytes, name: bytes, strict: bool) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not strict:
            return raw.decode("utf-8", "replace")
        raise LabelError(422, f"field '{name.decode('utf-8', 'replace')}': not valid UTF-8 text "
                              f"(byte {exc.start})") from None


async def read_form(request, strict: bool = True) -> FormData:
    """The request's form. A field whose bytes are not UTF-8 is a 422 naming it, as invalid text is at every
    other input (a typed U+FFFD is valid and kept); ``strict=False`` replaces them instead (the CSRF check:
    a replaced value simply fails to match). Urlencoded fields are decoded here (Starlette would also read raw
    non-ASCII bytes as latin-1); multipart ones are checked here, then parsed by Starlette (uploads)."""
    body = await request.body()  # cached: request.form() below parses the same bytes
    ctype = request.headers.get("content-type", "")
    raw = _RawFields()
    if ctype.startswith("application/x-www-form-urlencoded"):
        parser = QuerystringParser(raw.callbacks())
    elif ctype.startswith("multipart/form-data") and strict:
        boundary = parse_options_header(ctype)[1].get(b"boundary")
        parser = MultipartParser(boundary, raw.callbacks()) if boundary else None
    else:
        parser = None
    if parser is not None:
        try:
            parser.write(body)
            parser.finalize()
        except ValueError:  # malformed: Starlette's parser below answers it (400)
            raw.fields = []
    if len(raw.fields) > MAX_FIELDS:
        raise LabelError(400, f"too many form fields (at most {MAX_FIELDS})")
    pairs = [(_utf8(name, name, strict), _utf8(value, name, strict)) for name, value in raw.fields]
    if ctype.startswith("application/x-www-form-urlencoded"):
        return FormData(pairs)
    return await request.form()


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
