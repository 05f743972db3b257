"""Project set-up in the browser (issue 23), independent of HTTP (:mod:`.project_web`): uploaded item files
(JSONL, CSV, Parquet) parsed into checked import rows, versioned guidelines, archiving.

* Upload: JSONL (one object a line), CSV (``prompt``; ``responses`` as a JSON list or ``response_1`` ..
  ``response_N`` columns; optional ``gold``; other columns kept as metadata) or Parquet (same columns; needs
  pyarrow). Every row passes :func:`.service.check_item` (the text rule of :mod:`.text`); a prompt given as a
  list of ``{role, content}`` messages is a chat transcript (:func:`.render.chat_row`). Duplicates are
  skipped by :func:`.service.content_hash`, as in every import.
* Guidelines: each change adds a ``guidelines_versions`` row and bumps ``projects.guidelines_version``; each
  label records the version it was made under (:mod:`.db`). The text before the first change is version 1.
* Archive: an archived project serves no items (open assignments are released) and still exports.
* Settings: the per-project values of :mod:`.rules` (minimum critique, "very fast" threshold, hold timeout).
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import sqlalchemy as sa

from ..errors import DataError
from . import rules, service
from .db import Assignment, Database, GuidelinesVersion, Project, User, utcnow
from .flow import release
from .render import chat_row
from .text import check_text

FORMATS = ("jsonl", "csv", "parquet")
MAX_GUIDELINES = 200_000
_RESPONSE_COL = re.compile(r"response_(\d{1,2})")


def upload_format(filename: str | None) -> str:
    name = (filename or "").lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"),
                     (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(ext):
            return fmt
    raise service.LabelError(422, "upload a .jsonl, .csv or .parquet file")


def _text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start})", source=source) from None


def _csv_row(row: dict[str, str], source: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in row.items()  # an empty cell is no metadata (same content hash)
                           if k and v not in (None, "") and not _RESPONSE_COL.fullmatch(k)}
    if isinstance(out.get("responses"), str):
        try:
            out["responses"] = json.loads(out["responses"])
        except ValueError:
            raise DataError("responses: expected a JSON list of strings", source=source, row=n) from None
    else:
        cols = sorted((int(m.group(1)), k) for k in row if k and (m := _RESPONSE_COL.fullmatch(k)))
        out["responses"] = [row[k] for _, k in cols if row[k] not in (None, "")]
    gold = out.pop("gold", None)
    if gold not in (None, ""):
        if not re.fullmatch(r"[0-9]{1,2}", gold):
            raise DataError(f"gold: expected a response index, got {gold!r}", source=source, row=n)
        out["gold"] = int(gold)
    return out


def parse_upload(filename: str | None, data: bytes) -> list[dict[str, Any]]:
    """The checked import rows of an uploaded file; a bad row is a one-line DataError (file, row, field)."""
    fmt = upload_format(filename)
    source = f"upload.{fmt}"
    rows: list[tuple[int, Any]] = []
    if fmt == "jsonl":
        for n, line in enumerate(_text(data, source).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as exc:
                    raise DataError(f"invalid JSON ({exc})", source=source, row=n) from None
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(_text(data, source), newline=""))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise DataError("expected a header row with a 'prompt' column", source=source)
        rows = [(n, _csv_row(row, source, n)) for n, row in enumerate(reader, start=2)]
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise service.LabelError(422, "Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"not a Parquet file ({exc})", source=source) from None
        rows = list(enumerate(table.to_pylist(), start=1))
    items = [service.check_item(chat_row(row), source, n) for n, row in rows]
    if not items:
        raise DataError("no rows", source=source)
    return items


def guidelines_history(db: Database, project_id: int) -> list[dict[str, Any]]:
    """Every version, oldest first (version 1 is the text before the first change, stored with it)."""
    with db.session() as s:
        project = service.get_project(s, project_id)
        rows = list(s.execute(sa.select(GuidelinesVersion, User.name).outerjoin(User, User.id == GuidelinesVersion.author_id)
                              .where(GuidelinesVersion.project_id == project_id).order_by(GuidelinesVersion.version)))
        if not rows:
            return [{"version": 1, "text": project.guidelines, "author": None, "created_at": None}]
        return [{"version": g.version, "text": g.text, "author": name, "created_at": g.created_at.isoformat() + "Z"}
                for g, name in rows]


def set_guidelines(db: Database, author: User, project_id: int, text: Any) -> int:
    """Store ``text`` as the project's next guidelines version (unchanged text: no new version); returns the
    current version number."""
    if not isinstance(text, str) or len(text) > MAX_GUIDELINES:
        raise service.LabelError(422, f"guidelines must be text of at most {MAX_GUIDELINES} characters")
    check_text(text, "guidelines")
    with db.session() as s:
        project = s.scalar(sa.select(Project).where(Project.id == project_id).with_for_update())
        if project is None:
            raise service.LabelError(404, f"no project {project_id}")
        current = project.guidelines_version or 1
        if text == project.guidelines:
            return current
        if current == 1 and s.scalar(sa.select(sa.func.count(GuidelinesVersion.id))
                                     .where(GuidelinesVersion.project_id == project_id)) == 0:
            s.add(GuidelinesVersion(project_id=project_id, version=1, text=project.guidelines,
                                    created_at=project.created_at))
        project.guidelines, project.guidelines_version = text, current + 1
        s.add(GuidelinesVersion(project_id=project_id, version=current + 1, text=text, author_id=author.id))
        return current + 1


def set_archived(db: Database, project_id: int, archived: bool) -> dict[str, Any]:
    """Archive (serves no items from now on; open assignments released) or restore a project."""
    with db.session() as s:
        project = service.get_project(s, project_id)
        released = 0
        if archived and project.archived_at is None:
            project.archived_at = utcnow()
            released = release(s, Assignment.project_id == project_id)
        elif not archived:
            project.archived_at = None
        return {"id": project.id, "archived": project.archived_at is not None, "released": released}


def set_settings(db: Database, project_id: int, values: dict[str, Any]) -> dict[str, Any]:
    """Set the named settings of a project (a value None: back to the default; names left out: unchanged, so
    no names just reads them); returns the settings in effect. A bad value is a one-line DataError naming it,
    and nothing is stored."""
    values = rules.checked(values)
    with db.session() as s:
        project = service.get_project(s, project_id)
        for name, value in values.items():
            setattr(project, name, value)
        return rules.settings_of(project)
