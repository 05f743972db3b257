"""Labels -> training data that ``rlhfkit rm`` / ``rlhfkit dpo`` / ``rlhfkit sft`` / ``rlhfkit kto`` read unchanged.

Preference export (``prompt``, ``chosen``, ``rejected`` + extra columns the trainers ignore): every label is
turned into pairwise votes (a ranking gives all its K(K-1)/2 pairs; a pairwise choice one vote or a tie;
optionally Likert ratings and accept/reject too), votes are pooled per item and response pair, then:

* ``majority``: the side with more votes is chosen; equal votes are a tie.
* ``soft``: as majority, plus ``label`` = the chosen side's vote share (a tie counts half to each side) and
  ``margin`` = 2·share − 1 (0 for a split vote, 1 for unanimity), which the Bradley–Terry loss reads.

Ties are dropped (default) or kept: a kept tie is written as both orientations (A over B and B over A,
``tie: true``, ``label`` 0.5), whose Bradley–Terry losses together pull the two rewards together rather than
teaching a preference. Extra columns: ``item_id``, ``votes`` {chosen, rejected, tie}, ``labellers``,
``timestamps`` (ISO 8601, UTC), ``gold``.

Adjudications (:mod:`.adjudication`) win: a response pair that a reviewer's live decision covers is decided
by that decision alone (``source: "adjudicated"``, ``adjudication`` {task, reviewer, at}; ``votes`` still
count the labels, so a row can show the reviewer overruling the majority); other rows have ``source:
"majority"``, raw labels and SFT rows ``source: "label"``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from .adjudication import live_by_item
from .db import Assignment, Database, Item, Label, User
from .service import LabelError
from .text import check_strings

VOTE_TASKS = ("pairwise", "ranking", "likert", "binary")


def stored_labels(db: Database, project_id: int) -> list[dict[str, Any]]:
    """Every label of a project with its labeller's name, in commit order."""
    with db.session() as s:
        rows = s.execute(sa.select(Label, User.name, Assignment.order)
                         .join(User, User.id == Label.user_id)
                         .join(Assignment, Assignment.id == Label.assignment_id)
                         .where(Label.project_id == project_id).order_by(Label.id)).all()
        return [{"label_id": lab.id, "idempotency_key": lab.idempotency_key, "assignment_id": lab.assignment_id,
                 "item_id": lab.item_id,
                 "coder": name, "answers": lab.answers, "gold_correct": lab.gold_correct,
                 "display_order": order, "duration_ms": lab.duration_ms, "guidelines_version": lab.guidelines_version,
                 "created_at": lab.created_at.isoformat() + "Z", "source": "label"} for lab, name, order in rows]


def check_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """``rows`` if every string in them can be written as UTF-8 (text stored before the input checks may
    not be); otherwise a one-line DataError naming the row (1-based) and field, before anything is written."""
    for n, row in enumerate(rows, start=1):
        check_strings(row, "", source=source, row=n, allow_nul=True)
    return rows


def _votes(answers: dict[str, Any], tasks: Iterable[str]) -> list[tuple[int, int, int | None]]:
    """(lo, hi, winner or None for a tie) votes from one label, in original indices."""
    out = []
    if "pairwise" in tasks and "pairwise" in answers:
        a = answers["pairwise"]
        lo, hi = sorted(a["pair"])
        out.append((lo, hi, a["winner"]))
    if "ranking" in tasks and "ranking" in answers:
        ranking = answers["ranking"]["ranking"]
        for i, j in itertools.combinations(range(len(ranking)), 2):
            better, worse = ranking[i], ranking[j]
            out.append((min(better, worse), max(better, worse), better))
    for task, key in (("likert", "ratings"), ("binary", "accept")):
        if task in tasks and task in answers:
            scores = [float(x) for x in answers[task][key]]
            for i, j in itertools.combinations(range(len(scores)), 2):
                out.append((i, j, None if scores[i] == scores[j] else (i if scores[i] > scores[j] else j)))
    return out


def preference_rows(db: Database, project_id: int, aggregate: str = "majority", ties: str = "drop",
                    tasks: Iterable[str] = ("pairwise", "ranking"), include_gold: bool = True) -> list[dict]:
    if aggregate not in ("majority", "soft"):
        raise LabelError(422, f"aggregate must be majority or soft, got {aggregate!r}")
    if ties not in ("drop", "keep"):
        raise LabelError(422, f"ties must be drop or keep, got {ties!r}")
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in VOTE_TASKS]
    if bad:
        raise LabelError(422, f"tasks {bad} give no preferences; choose from {', '.join(VOTE_TASKS)}")
    labels = stored_labels(db, project_id)
    with db.session() as s:
        items = {it.id: it for it in s.scalars(sa.select(Item).where(Item.project_id == project_id))}
    pooled: dict[tuple[int, int, int], list[tuple[int | None, str, str]]] = defaultdict(list)
    for lab in labels:
        for lo, hi, winner in _votes(lab["answers"], tasks):
            pooled[(lab["item_id"], lo, hi)].append((winner, lab["coder"], lab["created_at"]))
    decided: dict[tuple[int, int, int], list[tuple[int | None, dict]]] = defaultdict(list)
    for item_id, by_task in live_by_item(db, project_id).items():
        for task, adj in by_task.items():
            for lo, hi, winner in _votes({task: adj["answer"]}, tasks):
                decided[(item_id, lo, hi)].append((winner, adj))
                pooled.setdefault((item_id, lo, hi), [])
    rows = []
    for (item_id, lo, hi), votes in sorted(pooled.items()):
        item = items[item_id]
        if item.gold is not None and not include_gold:
            continue
        n_lo = sum(w == lo for w, _, _ in votes)
        n_hi = sum(w == hi for w, _, _ in votes)
        n_tie = len(votes) - n_lo - n_hi
        extra = {"item_id": item_id, "labellers": [c for _, c, _ in votes],
                 "timestamps": [t for _, _, t in votes], "gold": item.gold is not None, "source": "majority"}
        share = (max(n_lo, n_hi) + 0.5 * n_tie) / max(1, len(votes))
        d_lo, d_hi = n_lo, n_hi  # what decides: the label votes, or the reviewer's decision(s)
        final = decided.get((item_id, lo, hi))
        if final:
            d_lo, d_hi = sum(w == lo for w, _ in final), sum(w == hi for w, _ in final)
            adj = final[-1][1]
            extra.update(source="adjudicated", adjudication={"task": adj["task"], "reviewer": adj["reviewer"],
                                                             "at": adj["created_at"]})
            share = 1.0
        if d_lo == d_hi:
            if ties == "drop":
                continue
            for a, b in ((lo, hi), (hi, lo)):
                rows.append({"prompt": item.prompt, "chosen": item.responses[a], "rejected": item.responses[b],
                             "margin": 0.0, "label": 0.5, "tie": True,
                             "votes": {"chosen": n_lo, "rejected": n_hi, "tie": n_tie}, **extra})
            continue
        chosen, rejected = (lo, hi) if d_lo > d_hi else (hi, lo)
        n_c, n_r = (n_lo, n_hi) if chosen == lo else (n_hi, n_lo)  # label votes for / against the chosen side
        rows.append({"prompt": item.prompt, "chosen": item.responses[chosen],
                     "rejected": item.responses[rejected],
                     "margin": round(2 * share - 1, 6) if aggregate == "soft" else 0.0,
                     "label": round(share, 6) if aggregate == "soft" else 1.0, "tie": False,
                     "votes": {"chosen": n_c, "rejected": n_r, "tie": n_tie}, **extra})
    return rows


def sft_rows(db: Database, project_id: int) -> list[dict]:
    """Critiques with a rewrite -> ``prompt`` / ``completion`` (the rewrite), critique and provenance kept."""
    labels = stored_labels(db, project_id)
    with db.session() as s:
        items = {it.id: it for it in s.scalars(sa.select(Item).where(Item.project_id == project_id))}
    rows = []
    for lab in labels:
        c = lab["answers"].get("critique")
        if c and c.get("rewrite"):
            item = items[lab["item_id"]]
            rows.append({"prompt": item.prompt, "completion": c["rewrite"], "critique": c["critique"],
                         "original": item.responses[c["response"]], "item_id": item.id,
                         "labeller": lab["coder"], "timestamp": lab["created_at"], "source": "label"})
    return rows


def kto_rows(db: Database, project_id: int, include_gold: bool = True) -> list[dict]:
    """Binary accept/reject labels -> KTO rows ``prompt`` / ``completion`` / ``label`` that ``rlhfkit kto`` reads.

    Votes are pooled per item and response; the majority decides (``label`` true = accepted = desirable), and
    a response with as many accepts as rejects has no binary label and is left out. Extra columns:
    ``item_id``, ``response`` (its index in the item), ``votes`` {accept, reject}, ``labellers``,
    ``timestamps`` (ISO 8601, UTC), ``gold``.
    """
    with db.session() as s:
        items = {it.id: it for it in s.scalars(sa.select(Item).where(Item.project_id == project_id))}
    pooled: dict[tuple[int, int], list[tuple[bool, str, str]]] = defaultdict(list)
    for lab in stored_labels(db, project_id):
        binary = lab["answers"].get("binary")
        for index, accept in enumerate(binary["accept"] if binary else ()):
            pooled[(lab["item_id"], index)].append((bool(accept), lab["coder"], lab["created_at"]))
    decided = {item_id: by_task["binary"] for item_id, by_task in live_by_item(db, project_id).items()
               if "binary" in by_task}
    for item_id, adj in decided.items():
        for index in range(len(adj["answer"]["accept"])):
            pooled.setdefault((item_id, index), [])
    rows = []
    for (item_id, index), votes in sorted(pooled.items()):
        item = items[item_id]
        accepts = sum(a for a, _, _ in votes)
        rejects = len(votes) - accepts
        adj = decided.get(item_id)
        if (accepts == rejects and adj is None) or (item.gold is not None and not include_gold):
            continue
        extra = {"source": "majority"} if adj is None else {
            "source": "adjudicated", "adjudication": {"task": "binary", "reviewer": adj["reviewer"],
                                                      "at": adj["created_at"]}}
        label = accepts > rejects if adj is None else bool(adj["answer"]["accept"][index])
        rows.append({"prompt": item.prompt, "completion": item.responses[index], "label": label,
                     "item_id": item_id, "response": index, "votes": {"accept": accepts, "reject": rejects},
                     "labellers": [c for _, c, _ in votes], "timestamps": [t for _, _, t in votes],
                     "gold": item.gold is not None, **extra})
    return rows
