"""What a reviewer sees of a project: every item with its labels and disagreements, per-labeller quality,
and progress. Pure reads (no HTTP); adjudication itself is :mod:`.adjudication`.

Disagreement per item: ``pairwise`` (the same pair given different outcomes), ``binary`` (a response both
accepted and rejected), ``ranking_top`` (different responses ranked first) and the ``likert`` spread (the
largest max - min rating of one response; flagged at ``likert_spread`` or more, default 2).

Quality per labeller: labels, median seconds per label (stored durations), agreement with the other
labellers on shared items (the share of agreeing (labeller, other) rating pairs over pairwise and binary
units), agreement with adjudications (the share of the labeller's pairwise / ranking-top / binary / Likert
ratings equal to the live decision of the same unit) and "very fast" labels (duration below the project's
``fast_seconds`` setting, default 2 s, which a one-off view may override; a label without a duration is not
counted).
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from . import rules, service
from .adjudication import live_by_item
from .agreement import records_of
from .db import Assignment, Database, Item, Label, Project, User, utcnow
from .export import stored_labels
from .flow import marks
from .text import scrub

LIKERT_SPREAD = 2
JUDGE = "\x00adjudication"  # the pseudo-coder of decisions (no user name may hold a NUL)


def _by_unit(records) -> dict:
    out: dict = defaultdict(dict)
    for unit, coder, value in records:
        out[unit][coder] = value
    return out


def scrubbed(value: Any) -> Any:
    """Every string inside ``value`` displayable (rows stored before the input checks may hold lone
    surrogates, which JSON responses could not encode)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrubbed(k): scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    return value


def disagreements(labels: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """{item id: {"pairwise": bool, "binary": bool, "ranking_top": bool, "likert_spread": int | None}}."""
    recs = records_of(labels)
    out: dict[int, dict[str, Any]] = defaultdict(lambda: {"pairwise": False, "binary": False,
                                                          "ranking_top": False, "likert_spread": None})
    for lab in labels:
        out[lab["item_id"]]  # noqa: B018 - every labelled item gets a row
    for measure in ("pairwise", "binary", "ranking_top"):
        for unit, values in _by_unit(recs.get(measure, [])).items():
            item = unit[0] if isinstance(unit, tuple) else unit
            if len(set(values.values())) > 1:
                out[item][measure] = True
    for unit, values in _by_unit(recs.get("likert", [])).items():
        if len(values) >= 2:
            spread = max(values.values()) - min(values.values())
            row = out[unit[0]]
            row["likert_spread"] = max(spread, row["likert_spread"] or 0)
    return dict(out)


def is_disputed(d: dict[str, Any], likert_spread: int = LIKERT_SPREAD) -> bool:
    return bool(d["pairwise"] or d["binary"] or d["ranking_top"]
                or (d["likert_spread"] is not None and d["likert_spread"] >= likert_spread))


def quality(labels: list[dict[str, Any]], decisions: dict[int, dict[str, dict]],
            fast_seconds: float = rules.FAST_SECONDS_DEFAULT) -> dict[str, dict[str, Any]]:
    """Per labeller name: labels, median_seconds, agreement_with_others (+ pairs compared),
    agreement_with_adjudications (+ ratings compared), very_fast (count below ``fast_seconds``)."""
    recs = records_of(labels)
    judged = records_of([{"item_id": item, "coder": JUDGE, "answers": {t: a["answer"] for t, a in by.items()}}
                         for item, by in decisions.items()])
    out: dict[str, dict[str, Any]] = {}
    for coder in sorted({lab["coder"] for lab in labels}):
        mine = [lab for lab in labels if lab["coder"] == coder]
        secs = [lab["duration_ms"] / 1000 for lab in mine if lab.get("duration_ms") is not None]
        hits = [other == vals[coder] for m in ("pairwise", "binary") for vals in _by_unit(recs.get(m, [])).values()
                if coder in vals for c, other in vals.items() if c != coder]
        adj_hits = []
        for m in ("pairwise", "ranking_top", "binary", "likert"):
            final = {u: v for u, _, v in judged.get(m, [])}
            adj_hits += [v == final[u] for u, c, v in recs.get(m, []) if c == coder and u in final]
        out[coder] = {"labels": len(mine), "median_seconds": statistics.median(secs) if secs else None,
                      "agreement_with_others": sum(hits) / len(hits) if hits else None, "pairs_compared": len(hits),
                      "agreement_with_adjudications": sum(adj_hits) / len(adj_hits) if adj_hits else None,
                      "adjudicated_ratings": len(adj_hits),
                      "very_fast": sum(s < fast_seconds for s in secs)}
    return out


def project_review(db: Database, project_id: int, fast_seconds: float | None = None,
                   likert_spread: int = LIKERT_SPREAD, only_disputed: bool = False) -> dict[str, Any]:
    """Items (prompt, responses, labels, disagreement, live decisions), quality per labeller; ``fast_seconds``
    None: the project's setting."""
    with db.session() as s:
        project = service.get_project(s, project_id)
        fast_seconds = rules.fast_seconds(project) if fast_seconds is None else fast_seconds
        info = {"id": project.id, "name": project.name, "tasks": list(project.tasks), "overlap": project.overlap}
        items = list(s.scalars(sa.select(Item).where(Item.project_id == project_id).order_by(Item.position)))
    labels = stored_labels(db, project_id)
    decisions = live_by_item(db, project_id)
    dis = disagreements(labels)
    flagged = marks(db, project_id)
    by_item: dict[int, list] = defaultdict(list)
    for lab in labels:
        by_item[lab["item_id"]].append({k: lab[k] for k in ("label_id", "coder", "answers", "duration_ms",
                                                            "created_at")})
    rows = []
    for it in items:
        d = dis.get(it.id, {"pairwise": False, "binary": False, "ranking_top": False, "likert_spread": None})
        disputed = is_disputed(d, likert_spread)
        if only_disputed and not disputed:
            continue
        rows.append({"item_id": it.id, "position": it.position, "prompt": it.prompt, "responses": it.responses,
                     "gold": it.gold, "labels": by_item.get(it.id, []), "disagreement": d, "disputed": disputed,
                     "adjudications": decisions.get(it.id, {}), "flags": flagged["flags"].get(it.id, []),
                     "skips": flagged["skips"].get(it.id, [])})
    qual = quality(labels, decisions, fast_seconds)
    for name in flagged["skipped"]:  # a labeller who only skipped still gets a row
        qual.setdefault(name, {"labels": 0, "median_seconds": None, "agreement_with_others": None,
                               "pairs_compared": 0, "agreement_with_adjudications": None,
                               "adjudicated_ratings": 0, "very_fast": 0})
    for name, row in qual.items():
        row["skipped"] = flagged["skipped"].get(name, 0)
    return {"project": scrubbed(info), "items": scrubbed(rows),
            "quality": scrubbed(qual),
            "thresholds": {"fast_seconds": fast_seconds, "likert_spread": likert_spread}}


def progress(db: Database, project_id: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """Items done (at least ``overlap`` labels) / in progress (an open assignment, not done) / left, per
    project and per labeller (done = labels, in progress = open assignments, left = items still available
    to them), and labels per hour over the last 24 h: the mean and ``labels_by_hour`` (24 counts, oldest
hour first, the last one ending now)."""
    now = now or utcnow()
    with db.session() as s:
        project = service.get_project(s, project_id)
        counts = dict(s.execute(sa.select(Label.item_id, sa.func.count(Label.id))
                                .where(Label.project_id == project_id).group_by(Label.item_id)).all())
        open_items = set(s.scalars(sa.select(Assignment.item_id).where(
            Assignment.project_id == project_id, Assignment.done.is_(False))))
        item_ids = list(s.scalars(sa.select(Item.id).where(Item.project_id == project_id)))
        done = {i for i in item_ids if counts.get(i, 0) >= project.overlap}
        busy = {i for i in item_ids if i in open_items and i not in done}
        since = now - dt.timedelta(hours=24)
        times = list(s.scalars(sa.select(Label.created_at).where(Label.project_id == project_id,
                                                                 Label.created_at >= since)))
        by_hour = [0] * 24
        for t in times:
            by_hour[min(23, int((t - since).total_seconds() // 3600))] += 1
        recent = len(times)
        with_work = set(s.scalars(sa.select(Assignment.user_id).where(Assignment.project_id == project_id)))
        users = s.scalars(sa.select(User).where(sa.or_(User.id.in_(with_work), sa.and_(
            User.role == "labeller", User.active.is_(True)))).order_by(User.id)).all()
        per = {}
        for u in users:
            mine = service.progress(s, u, project)
            open_n = s.scalar(sa.select(sa.func.count(Assignment.id)).where(
                Assignment.project_id == project_id, Assignment.user_id == u.id, Assignment.done.is_(False)))
            mine_recent = s.scalar(sa.select(sa.func.count(Label.id)).where(
                Label.project_id == project_id, Label.user_id == u.id,
                Label.created_at >= now - dt.timedelta(hours=24)))
            per[u.name] = {"done": mine["done"], "in_progress": int(open_n),
                           "left": mine["remaining"] - int(open_n), "labels_last_24h": int(mine_recent),
                           "labels_per_hour": round(mine_recent / 24, 4)}
    return {"project_id": project_id, "items": len(item_ids), "done": len(done), "in_progress": len(busy),
            "left": len(item_ids) - len(done) - len(busy), "labels": sum(counts.values()),
            "labels_last_24h": int(recent), "labels_per_hour": round(recent / 24, 4), "labels_by_hour": by_hour,
            "labellers": per}


def projects(db: Database) -> list[dict[str, Any]]:
    with db.session() as s:
        return [{"id": p.id, "name": p.name, "tasks": list(p.tasks)}
                for p in s.scalars(sa.select(Project).order_by(Project.id))]
