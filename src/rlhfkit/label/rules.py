"""Per-project settings, columns of ``projects`` where NULL means the default: the minimum critique length
(``min_critique_chars``), the review page's "very fast" threshold (``fast_seconds``) and how long an item
stays held by a labeller before it goes to whoever asks next (``hold_minutes``; NULL: the app's
``--hold-minutes``). Reading and checking only: :func:`.projects.set_settings` stores them."""

from __future__ import annotations

from typing import Any

from ..errors import DataError

MIN_CRITIQUE_DEFAULT = 1  # a project whose setting is NULL (created before migration 3) uses this
FAST_SECONDS_DEFAULT = 2.0  # the review page's threshold before it was a setting (migration 6)
MAX_FAST_SECONDS = 3600.0
MAX_HOLD_MINUTES = 30 * 24 * 60.0  # a month: bounded, so the cutoff's timedelta cannot overflow


def min_critique(project) -> int:
    value = getattr(project, "min_critique_chars", None)
    return MIN_CRITIQUE_DEFAULT if value is None else int(value)


def fast_seconds(project) -> float:
    value = getattr(project, "fast_seconds", None)
    return FAST_SECONDS_DEFAULT if value is None else float(value)


def hold_minutes(project, default: float) -> float:
    """The project's hold timeout, or ``default`` (the app's ``--hold-minutes``) when it sets none."""
    value = getattr(project, "hold_minutes", None)
    return default if value is None else float(value)


def critique_problem(text: str, minimum: int) -> str | None:
    """Why a critique is too short (characters not counting leading/trailing whitespace), or None."""
    if len(text.strip()) < minimum:
        return f"write a critique of at least {minimum} character{'s' if minimum != 1 else ''}"
    return None


def check_min_critique(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 50_000:
        raise DataError(f"must be a whole number 0..50000, got {value!r}", field="min_critique_chars")
    return value


def check_positive(value, field: str, most: float) -> float:
    """A number above 0 and at most ``most`` (NaN and infinities fail the comparison)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= most:
        raise DataError(f"must be a number above 0 and at most {most:g}, got {value!r}", field=field)
    return float(value)


CHECKS = {"min_critique_chars": check_min_critique,
          "fast_seconds": lambda v: check_positive(v, "fast_seconds", MAX_FAST_SECONDS),
          "hold_minutes": lambda v: check_positive(v, "hold_minutes", MAX_HOLD_MINUTES)}


def checked(values: dict[str, Any]) -> dict[str, Any]:
    """Settings by name, each checked; None stays None (back to the default). Checked before anything is
    stored, so a bad value never leaves a half-made project behind."""
    return {name: None if value is None else CHECKS[name](value) for name, value in values.items()}


def settings_of(project) -> dict[str, Any]:
    """The project's settings as in effect (``hold_minutes`` None: the app's default)."""
    return {"min_critique_chars": min_critique(project), "fast_seconds": fast_seconds(project),
            "hold_minutes": project.hold_minutes}
