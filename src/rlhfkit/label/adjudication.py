"""Reviewers' adjudications: the final answer for one task of one item, stored apart from the labels.

An answer has the shape of a stored label's answer for that task, in original response indices:
``pairwise`` {pair: [i, j], winner: i | j | null}, ``ranking`` {ranking: permutation}, ``binary``
{accept: [bool] * K}, ``likert`` {ratings: [1..5] * K}. Re-adjudicating an (item, task) marks the live
decision superseded (kept, with its time) and stores the new one, so the history is never lost; labels are
never changed or deleted.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .db import Adjudication, Database, Item, Project, User, utcnow
from .service import LabelError
from .text import check_strings, check_text

ADJUDICABLE = ("pairwise", "ranking", "binary", "likert")
MAX_NOTE = 5000


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_answer(task: str, answer: Any, k: int) -> dict[str, Any]:
    """A valid final answer for ``task`` on an item with ``k`` responses (original indices), or a 422."""
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise LabelError(422, f"{task}: {message}")

    need(task in ADJUDICABLE, f"cannot adjudicate this task; choose from {', '.join(ADJUDICABLE)}")
    need(isinstance(answer, dict), "the answer must be an object")
    check_strings(answer, "answer")
    if task == "pairwise":
        pair, winner = answer.get("pair"), answer.get("winner")
        need(isinstance(pair, list) and len(pair) == 2 and all(_int_in(x, 0, k - 1) for x in pair)
             and pair[0] != pair[1], f"pair must be two different indices 0..{k - 1}")
        need(winner is None or winner in pair, "winner must be one of the pair or null (a tie)")
        return {"pair": sorted(pair), "winner": winner}
    if task == "ranking":
        ranking = answer.get("ranking")
        need(isinstance(ranking, list) and sorted(ranking) == list(range(k))
             and all(_int_in(x, 0, k - 1) for x in ranking), f"ranking must be a permutation of 0..{k - 1}")
        return {"ranking": list(ranking)}
    if task == "binary":
        accept = answer.get("accept")
        need(isinstance(accept, list) and len(accept) == k and all(isinstance(x, bool) for x in accept),
             f"accept must be a list of {k} booleans")
        return {"accept": list(accept)}
    ratings = answer.get("ratings")
    need(isinstance(ratings, list) and len(ratings) == k and all(_int_in(x, 1, 5) for x in ratings),
         f"ratings must be a list of {k} integers 1..5")
    return {"ratings": list(ratings)}


def adjudicate(db: Database, reviewer: User, project_id: int, item_id: int, task: Any, answer: Any,
               note: Any = "") -> Adjudication:
    """Store the reviewer's final answer for (item, task); an earlier live decision is superseded (kept)."""
    if not isinstance(task, str):
        raise LabelError(422, "task must be a string")
    check_text(task, "task")
    note = "" if note is None else note
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise LabelError(422, f"note must be text of at most {MAX_NOTE} characters")
    check_text(note, "note")
    with db.session() as s:
        item = s.get(Item, item_id, with_for_update=True)  # concurrent decisions on one item queue (PostgreSQL)
        if item is None or item.project_id != project_id:
            raise LabelError(404, f"no item {item_id} in project {project_id}")
        if task not in s.get(Project, project_id).tasks:
            raise LabelError(422, f"project {project_id} does not ask {task!r}")
        final = check_answer(task, answer, len(item.responses))
        now = utcnow()
        s.execute(sa.update(Adjudication).where(Adjudication.item_id == item_id, Adjudication.task == task,
                                                Adjudication.superseded_at.is_(None)).values(superseded_at=now))
        row = Adjudication(item_id=item_id, project_id=project_id, task=task, answer=final,
                           reviewer_id=reviewer.id, created_at=now, note=note.strip())
        s.add(row)
        s.flush()
    return row


def adjudications(db: Database, project_id: int, history: bool = False) -> list[dict[str, Any]]:
    """The project's live decisions (``history``: every decision, superseded ones too), oldest first."""
    with db.session() as s:
        query = (sa.select(Adjudication, User.name).join(User, User.id == Adjudication.reviewer_id)
                 .where(Adjudication.project_id == project_id).order_by(Adjudication.id))
        if not history:
            query = query.where(Adjudication.superseded_at.is_(None))
        return [{"id": a.id, "item_id": a.item_id, "task": a.task, "answer": a.answer, "reviewer": name,
                 "note": a.note, "created_at": a.created_at.isoformat() + "Z",
                 "superseded_at": a.superseded_at.isoformat() + "Z" if a.superseded_at else None}
                for a, name in s.execute(query)]


def live_by_item(db: Database, project_id: int) -> dict[int, dict[str, dict[str, Any]]]:
    """{item id: {task: live decision}}."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for a in adjudications(db, project_id):
        out.setdefault(a["item_id"], {})[a["task"]] = a
    return out
