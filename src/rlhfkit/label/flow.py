"""The labeller's flow around a label (issue 23): skip an item with a reason, flag it for reviewers, go back to
a recent label and edit it (history kept), and release items held too long. No HTTP here (:mod:`.flow_web`).

* Skip: one of :data:`SKIP_REASONS` and an optional note (the text rule of :mod:`.text`). The assignment is
  closed and *released* (``released_at`` set, its slot freed), so the item is never served to that labeller
  again but another labeller can take the slot; a skip is not a label (no export counts it).
* Flag: one of :data:`FLAG_REASONS` and an optional note, shown on the review page; the labeller keeps the item.
  The same flag again (same reason and note, e.g. a re-posted form) answers the first one; nothing is added.
* Edit: a labeller's own label only (others' are 404). The replaced answers are copied into
  ``label_revisions`` (``superseded_at``), then the ``labels`` row holds the new ones: exports read the current
  label only, and nothing is deleted.
* Timeout: an open assignment older than the project's ``hold_minutes`` (unset: the app's ``--hold-minutes``,
  default :data:`HOLD_MINUTES`) is released, so the item goes to whoever asks next; a late submit of it is a 409.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from typing import Any

import sqlalchemy as sa

from . import service
from .db import Assignment, Database, Item, ItemMark, Label, LabelRevision, Project, User, utcnow
from .rules import hold_minutes, min_critique
from .text import check_text

SKIP_REASONS = {"unclear": "unclear or ambiguous", "expertise": "needs expertise I lack",
                "language": "language I cannot read", "broken": "broken item", "other": "other"}
FLAG_REASONS = {"harmful": "harmful content", "broken": "broken item", "personal": "personal data",
                "other": "other"}
RECENT = 20
HOLD_MINUTES = 30.0
MAX_NOTE = 2000


def _note(note: Any) -> str:
    if note is None:
        return ""
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise service.LabelError(422, f"note must be a string of at most {MAX_NOTE} characters")
    check_text(note, "note")
    return note.strip()


def _mark(db: Database, user: User, assignment_id: int, kind: str, reason: Any, note: Any) -> ItemMark:
    reasons = SKIP_REASONS if kind == "skip" else FLAG_REASONS
    if reason not in reasons:
        raise service.LabelError(422, f"{kind} reason must be one of: {', '.join(reasons)}")
    note = _note(note)
    with db.session() as s:
        assignment = service.own_assignment(s, user, assignment_id)
        if assignment.done:
            raise service.LabelError(409, f"assignment {assignment_id} is closed (labelled, skipped or timed out)")
        if kind == "skip":
            assignment.done, assignment.released_at, assignment.slot = True, utcnow(), None
        else:  # a re-posted flag (a refresh, a double click) is the first one again, not a second row
            same = s.scalar(sa.select(ItemMark).where(
                ItemMark.item_id == assignment.item_id, ItemMark.user_id == user.id, ItemMark.kind == kind,
                ItemMark.reason == reason, ItemMark.note == note).order_by(ItemMark.id).limit(1))
            if same is not None:
                return same
        mark = ItemMark(item_id=assignment.item_id, project_id=assignment.project_id, user_id=user.id, kind=kind,
                        reason=reason, note=note)
        s.add(mark)
        s.flush()
        return mark


def skip(db: Database, user: User, assignment_id: int, reason: Any, note: Any = None) -> ItemMark:
    return _mark(db, user, assignment_id, "skip", reason, note)


def flag(db: Database, user: User, assignment_id: int, reason: Any, note: Any = None) -> ItemMark:
    return _mark(db, user, assignment_id, "flag", reason, note)


def release_stale(db: Database, project_id: int, default_minutes: float = HOLD_MINUTES,
                  now: dt.datetime | None = None) -> int:
    """Release open assignments of the project held longer than its ``hold_minutes`` (``default_minutes``, the
    app's ``--hold-minutes``, when it sets none); returns how many. One conditional UPDATE: a row a labeller
    closed meanwhile (``done``) is left alone on every backend."""
    with db.session() as s:
        minutes = hold_minutes(service.get_project(s, project_id), default_minutes)
        cutoff = (now or utcnow()) - dt.timedelta(minutes=minutes)
        return release(s, Assignment.project_id == project_id, Assignment.created_at < cutoff)


def release(s, *where) -> int:
    """Close and release the open assignments matching ``where`` (their slots free again)."""
    result = s.execute(sa.update(Assignment).where(Assignment.done.is_(False), *where)
                       .values(done=True, released_at=utcnow(), slot=None).execution_options(synchronize_session=False))
    return int(result.rowcount or 0)


def recent_labels(db: Database, user: User, project_id: int, n: int = RECENT) -> list[dict[str, Any]]:
    """The user's last ``n`` labels in the project, newest first, with the item's prompt and edit count."""
    with db.session() as s:
        service.get_project(s, project_id)
        rows = s.execute(sa.select(Label, Item.prompt).join(Item, Item.id == Label.item_id).where(
            Label.user_id == user.id, Label.project_id == project_id).order_by(Label.id.desc()).limit(n)).all()
        ids = [lab.id for lab, _ in rows]
        edits = Counter(s.scalars(sa.select(LabelRevision.label_id).where(LabelRevision.label_id.in_(ids))))
        return [{"label_id": lab.id, "assignment_id": lab.assignment_id, "item_id": lab.item_id,
                 "prompt": prompt, "answers": lab.answers, "edits": edits.get(lab.id, 0),
                 "created_at": lab.created_at.isoformat() + "Z"} for lab, prompt in rows]


def own_label(s, user: User, label_id: int) -> Label:
    label = s.get(Label, label_id)
    if label is None or label.user_id != user.id:
        raise service.LabelError(404, f"no label {label_id}")
    return label


def edit_label(db: Database, user: User, label_id: int, key: Any, answers: Any,
               duration_ms: int | None = None) -> tuple[Label, bool]:
    """Replace the answers of the user's label (display positions of its assignment, as when labelling);
    returns (label, changed). The same ``key`` again changes nothing (a retried edit)."""
    key = service.check_key(key)
    with db.session() as s:
        label = own_label(s, user, label_id)
        done = s.scalar(sa.select(LabelRevision).where(LabelRevision.edit_key == key))
        if done is not None:
            if done.label_id != label.id:
                raise service.LabelError(409, "idempotency_key already used for another edit")
            return label, False
        if s.scalar(sa.select(Label.id).where(Label.idempotency_key == key)) is not None:
            raise service.LabelError(409, "idempotency_key already used for a submission")
        assignment = s.get(Assignment, label.assignment_id)
        project = s.get(Project, label.project_id)
        item = s.get(Item, label.item_id)
        stored = service.map_answers(list(project.tasks), list(assignment.order), answers, min_critique(project))
        s.add(LabelRevision(label_id=label.id, answers=label.answers, gold_correct=label.gold_correct,
                            duration_ms=label.duration_ms, created_at=label.created_at, edit_key=key,
                            guidelines_version=label.guidelines_version))
        label.answers, label.gold_correct = stored, service.gold_score(item.gold, stored)
        label.guidelines_version = project.guidelines_version or 1  # made under the guidelines of now
        if duration_ms is not None:
            label.duration_ms = duration_ms
        s.flush()
        return label, True


def form_values(answers: dict[str, Any], tasks: list[str], order: list[int]) -> dict[str, str]:
    """A stored label (original indices) as the label form's field values (display positions), so the edit
    page opens with the current answers checked. The ranking opens in its stored order with "this order is
    right" ticked: the labeller confirmed that order once, so saving it unchanged is no untouched ranking."""
    shown = service.shown_order(tasks, order)
    out: dict[str, str] = {}
    ranking = (answers.get("ranking") or {}).get("ranking") or []
    if sorted(ranking) == sorted(shown):
        out["ranking_order"] = ",".join(str(shown.index(i)) for i in ranking)
        out["ranking_confirmed"] = "yes"
    a = answers.get("pairwise")
    if a:
        winner = a.get("winner")
        out["pairwise_choice"] = "tie" if winner is None else ("A" if winner == order[0] else "B")
        out["pairwise_strength"] = str(a.get("strength") or 1)
    for task, key, field in (("likert", "ratings", "likert_%d"), ("binary", "accept", "binary_%d")):
        values = (answers.get(task) or {}).get(key) or []
        for p, i in enumerate(shown):
            if i < len(values):
                v = values[i]
                out[field % p] = ("accept" if v else "reject") if task == "binary" else str(v)
    c = answers.get("critique")
    if c:
        out["critique_text"], out["critique_rewrite"] = c.get("critique") or "", c.get("rewrite") or ""
        if c.get("response") in shown:
            out["critique_target"] = str(shown.index(c["response"]))
    return out


def revisions(db: Database, label_id: int) -> list[dict[str, Any]]:
    with db.session() as s:
        return [{"answers": r.answers, "created_at": r.created_at.isoformat() + "Z",
                 "superseded_at": r.superseded_at.isoformat() + "Z", "guidelines_version": r.guidelines_version}
                for r in s.scalars(sa.select(LabelRevision).where(LabelRevision.label_id == label_id)
                                   .order_by(LabelRevision.id))]


def marks(db: Database, project_id: int) -> dict[str, Any]:
    """``skipped`` {labeller name: count}, ``flags`` {item id: [{labeller, reason, note, at}]} and
    ``skips`` {item id: [...]} of a project."""
    out: dict[str, Any] = {"skipped": Counter(), "flags": defaultdict(list), "skips": defaultdict(list)}
    with db.session() as s:
        rows = s.execute(sa.select(ItemMark, User.name).join(User, User.id == ItemMark.user_id)
                         .where(ItemMark.project_id == project_id).order_by(ItemMark.id)).all()
        for m, name in rows:
            reasons = SKIP_REASONS if m.kind == "skip" else FLAG_REASONS
            row = {"labeller": name, "reason": m.reason, "reason_text": reasons.get(m.reason, m.reason),
                   "note": m.note, "at": m.created_at.isoformat() + "Z"}
            if m.kind == "skip":
                out["skipped"][name] += 1
                out["skips"][m.item_id].append(row)
            else:
                out["flags"][m.item_id].append(row)
    return {k: dict(v) for k, v in out.items()}
