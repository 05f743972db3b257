"""``rlhfkit label merge``: the judge's confident labels and the app's human labels, one training file.

Inputs are what ``rlhfkit judge --route-threshold`` wrote (:mod:`rlhfkit.judges.routing`): ``--judge-labels``
(OUT: the confident pairs, ``pair_id``, ``audit``) and ``--routed`` (OUT.routed.jsonl: the pairs sent to
people), and the app's database, whose items carry the ``pair_id`` in their metadata. One row per pair:

* a routed or audited pair takes the people's label (the app's aggregated export,
  :func:`.export.preference_rows`): ``source: "human"``;
* the other confident pairs keep the judge's: ``source: "judge"``;
* a routed or audited pair nobody has labelled yet is *pending* (counted, and listed in ``--pending-out``),
  one whose votes are tied is a *tie* (counted, listed there too): neither is written, neither is lost, and
  the judge's label never stands in for a human one.

Rows keep ``prompt`` / ``chosen`` / ``rejected`` (what ``rlhfkit rm`` / ``dpo`` read) plus ``source`` and
``pair_id`` (``votes`` for human rows; ``confidence``, ``margin`` / ``label`` when the judge wrote them). The
summary (printed, and written as OUT's ``.summary.json``) counts pairs by source, pending and ties, the human
and judge shares, and the judge's accuracy on the audited confident pairs against the human labels (Wilson
95% interval, statsmodels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..data.jsonl import numbered_rows, write_jsonl
from ..errors import DataError
from .db import Database, Item, Project
from .export import preference_rows

__all__ = ["human_labels_by_pair", "merge_labels", "service_poster", "summary_path"]

JUDGE_KEEP = ("confidence", "orders_agree", "margin", "label")  # judge columns kept in the merged rows


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name((out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name) + ".summary.json")


def service_poster(db: Database, project: str, overlap: int | None = None):
    """A poster for :func:`rlhfkit.judges.routing.route_judged` that imports into ``db`` in-process, through
    the same checks as the app's ``POST /api/admin/projects`` (:func:`.service.check_item`, chat prompts as
    :func:`.render.chat_row` stores them, :func:`.service.import_items`)."""
    from .render import chat_row
    from .service import check_item, import_items

    def post(items: list[dict[str, Any]]) -> dict[str, int]:
        checked = [check_item(chat_row(it), "routed pairs", n) for n, it in enumerate(items, start=1)]
        _, added, skipped = import_items(db, project, checked, ["pairwise"], overlap)
        return {"items_added": added, "duplicates_skipped": skipped}

    return post


def human_labels_by_pair(db: Database, project: str, aggregate: str = "majority") -> dict[str, dict[str, Any]]:
    """{pair_id: the app's aggregated label} for the project's items that carry a ``pair_id``: ``chosen`` /
    ``rejected`` texts and ``votes``, or ``tie: True`` for a tied vote; {} when there is no such project."""
    with db.session() as s:
        project_id = s.scalar(sa.select(Project.id).where(Project.name == project))
        if project_id is None:
            return {}
        ids = {item_id: (meta or {}).get("pair_id") for item_id, meta in
               s.execute(sa.select(Item.id, Item.meta).where(Item.project_id == project_id))}
    out: dict[str, dict[str, Any]] = {}
    for row in preference_rows(db, project_id, aggregate, ties="keep"):
        pid = ids.get(row["item_id"])
        if pid is None:
            continue
        if row["tie"]:
            out[pid] = {"tie": True, "votes": row["votes"]}
        else:
            out[pid] = {"tie": False, **{k: row[k] for k in ("chosen", "rejected", "votes", "margin", "label")}}
    return out


def _read(path: str | Path, fields: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    rows = numbered_rows(path)
    for n, row in rows:
        for field in fields:
            if row.get(field) is None:
                raise DataError("missing (not written by rlhfkit judge --route-threshold?)", source=str(path),
                                row=n, field=field)
    return rows


def merge_labels(judge_labels: str | Path, routed: str | Path, db: Database | str, project: str,
                 out: str | Path, aggregate: str = "majority", pending_out: str | Path | None = None
                 ) -> dict[str, Any]:
    """Merge (see the module docstring); writes ``out`` and its summary, returns the summary."""
    from statsmodels.stats.proportion import proportion_confint

    judged = _read(judge_labels, ("pair_id", "prompt", "chosen", "rejected"))
    sent = _read(routed, ("pair_id", "prompt", "responses"))
    own = isinstance(db, str)
    database = Database(db) if isinstance(db, str) else db
    try:
        human = human_labels_by_pair(database, project, aggregate)
    finally:
        if own:
            database.dispose()
    rows: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    seen: set[str] = set()
    counts = {"judge": 0, "human": 0, "pending": 0, "ties": 0, "duplicates": 0}
    audit_hits: list[bool] = []

    def from_people(pid: str, prompt: Any, responses: list[str], why: str) -> dict[str, Any] | None:
        label = human.get(pid)
        if label is None or label["tie"]:
            counts["ties" if label else "pending"] += 1
            waiting.append({"pair_id": pid, "prompt": prompt, "responses": responses, "sent_as": why,
                            "status": "tie" if label else "pending", **({"votes": label["votes"]} if label else {})})
            return None
        if {label["chosen"], label["rejected"]} != set(responses):
            raise DataError(f"pair {pid}: the app's item does not hold the routed responses", source=str(routed))
        counts["human"] += 1
        extra = {"margin": label["margin"], "label": label["label"]} if aggregate == "soft" else {}
        return {"prompt": prompt, "chosen": label["chosen"], "rejected": label["rejected"], "source": "human",
                "pair_id": pid, "sent_as": why, "votes": label["votes"], **extra}

    def from_judge(row: dict[str, Any]) -> dict[str, Any] | None:
        """A confident pair: the judge's label, or the people's where it was also sent to them (audit)."""
        pid = row["pair_id"]
        if row.get("audit"):
            merged = from_people(pid, row["prompt"], sorted([row["chosen"], row["rejected"]]), "audit")
            if merged is not None:
                audit_hits.append(merged["chosen"] == row["chosen"])
            return merged
        counts["judge"] += 1
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "source": "judge",
                "pair_id": pid, **{k: row[k] for k in JUDGE_KEEP if k in row}}

    for read, source in ((from_judge, judged), (lambda r: from_people(r["pair_id"], r["prompt"],
                                                                      list(r["responses"]), "routed"), sent)):
        for _, row in source:
            if row["pair_id"] in seen:
                counts["duplicates"] += 1
                continue
            seen.add(row["pair_id"])
            merged = read(row)
            if merged is not None:
                rows.append(merged)
    write_jsonl(out, rows)
    if pending_out is not None:
        write_jsonl(pending_out, waiting)
    decided = counts["judge"] + counts["human"]
    audit: dict[str, Any] = {"audited": sum(1 for _, r in judged if r.get("audit")), "compared": len(audit_hits),
                             "agree": sum(audit_hits), "accuracy": None, "ci_low": None, "ci_high": None}
    if audit_hits:
        low, high = proportion_confint(sum(audit_hits), len(audit_hits), alpha=0.05, method="wilson")
        audit.update(accuracy=sum(audit_hits) / len(audit_hits), ci_low=float(low), ci_high=float(high))
    asked = {r["pair_id"] for _, r in sent} | {r["pair_id"] for _, r in judged if r.get("audit")}
    summary = {"pairs": len(seen), "rows": len(rows), "by_source": {"judge": counts["judge"], "human": counts["human"]},
               "pending": counts["pending"], "ties": counts["ties"], "duplicates_dropped": counts["duplicates"],
               "app_labels_not_asked_here": len(set(human) - asked),  # pairs the app holds from another run
               "human_share": counts["human"] / decided if decided else None,
               "judge_share": counts["judge"] / decided if decided else None,
               "judge_vs_human_on_audited": audit, "project": project, "aggregate": aggregate, "out": str(out),
               **({"pending_out": str(pending_out)} if pending_out is not None else {})}
    assert len(seen) == len(rows) + counts["pending"] + counts["ties"]  # every pair once: written or counted
    summary_path(out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
