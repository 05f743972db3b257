"""Per-project answer rules that are settings: the minimum critique length (``min_critique_chars``)."""

from __future__ import annotations

from ..errors import DataError

MIN_CRITIQUE_DEFAULT = 1  # a project whose setting is NULL (created before migration 3) uses this


def min_critique(project) -> int:
    value = getattr(project, "min_critique_chars", None)
    return MIN_CRITIQUE_DEFAULT if value is None else int(value)


def critique_problem(text: str, minimum: int) -> str | None:
    """Why a critique is too short (characters not counting leading/trailing whitespace), or None."""
    if len(text.strip()) < minimum:
        return f"write a critique of at least {minimum} character{'s' if minimum != 1 else ''}"
    return None


def check_min_critique(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 50_000:
        raise DataError(f"must be a whole number 0..50000, got {value!r}", field="min_critique_chars")
    return value


def set_min_critique(db, project_id: int, value) -> None:
    """Set a project's minimum critique length (import / CLI / API)."""
    from .db import Project

    value = check_min_critique(value)
    with db.session() as s:
        s.get(Project, project_id).min_critique_chars = value
