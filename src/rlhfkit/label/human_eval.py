"""Human evaluation of policies from the labelling app's labels, in the shape of ``rlhfkit eval``'s report for
an AI judge, so that human and AI verdicts can be read side by side (:mod:`.human_vs_ai`).

Which policy wrote a response. Items carry it in their metadata (every key of an import row besides
``prompt``, ``responses`` and ``gold`` is kept as the item's ``meta``; no schema change): ``policies``, a
list of one name per response, or ``policy`` / ``model``, one name for all of them (``rlhfkit label
generate`` stores ``model``). An item without either is left out of the per-policy figures and counted.

Statistics (all from :mod:`rlhfkit.eval.stats`, seeded, percentile bootstrap):

* pairwise (A/B) labels on an item whose compared responses come from policy P and the baseline B give P's
  outcome 1 (P chosen), ½ (tie) or 0; the labellers of one item are averaged first, so each item is one
  observation and the intervals resample items (as ``rlhfkit eval`` resamples prompts). The per-policy keys
  are eval.json's: ``win_rate_vs_<B>``, ``win_rate_ci_low/high``, ``wins``/``ties``/``losses`` (items), plus
  ``n_items`` and ``n_labels``.
* likert (1..5) ratings: per policy the mean over items of each item's mean rating of that policy's
  responses (``likert_mean`` + CI); binary accept labels likewise (``success_rate`` + CI).
* agreement among labellers per task: Krippendorff's α (:mod:`.agreement`) over all the project's labels.

Adjudications are not read (this measures what the labellers said); ranking and critique labels give no
figure here (counted in ``notes``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from ..errors import ConfigError, DataError, OneLineParser
from ..eval.stats import bootstrap_mean_ci, win_rate
from .agreement import MEASURES, krippendorff_alpha, records_of
from .db import Database, Item
from .export import stored_labels
from .human_vs_ai import compare_with_ai, read_ai_eval
from .service import LabelError, project_by_name

logger = logging.getLogger("rlhfkit")

__all__ = ["compare_with_ai", "format_human_eval_table", "human_eval_report", "item_policies", "main"]

def item_policies(item_id: int, responses: list[str], meta: dict | None, project: str) -> list[str] | None:
    """One policy name per response from the item's metadata, or None when it names none. A malformed
    ``policies`` is a one-line DataError naming the project, item and field (a guess could credit the wrong
    policy)."""
    meta = meta or {}
    if "policies" in meta:
        names = meta["policies"]
        if not (isinstance(names, list) and len(names) == len(responses)
                and all(isinstance(n, str) and n.strip() for n in names)):
            raise DataError(f"expected a list of {len(responses)} policy names (one per response), got "
                            f"{json.dumps(names)[:80]}", source=f"project '{project}', item {item_id}",
                            field="policies")
        return [n.strip() for n in names]
    for key in ("policy", "model"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return [meta[key].strip()] * len(responses)
    return None


def _load(db: str | Database, project: str) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]], list[int]]:
    """(items by id with their policies, labels, ids of items without policy names). A missing SQLite file
    is an error here: opening it would create an empty database."""
    if not isinstance(db, Database) and "://" not in str(db) and not Path(db).expanduser().is_file():
        raise ConfigError(f"{db}: no such database file")
    database = db if isinstance(db, Database) else Database(str(db))
    try:
        with database.session() as s:
            pid = project_by_name(s, project).id
            rows = s.execute(sa.select(Item.id, Item.prompt, Item.responses, Item.meta)
                             .where(Item.project_id == pid).order_by(Item.position)).all()
        labels = stored_labels(database, pid)
    except LabelError as exc:
        raise ConfigError(exc.detail) from None
    finally:
        if database is not db:
            database.dispose()
    items, unnamed = {}, []
    for item_id, prompt, responses, meta in rows:
        names = item_policies(item_id, list(responses), meta, project)
        items[item_id] = {"prompt": prompt, "responses": list(responses), "policies": names}
        if names is None:
            unnamed.append(item_id)
    if not labels:
        raise ConfigError(f"project '{project}' has no labels yet: nothing to evaluate")
    if len(unnamed) == len(items):
        raise ConfigError(f"project '{project}': no item names the policies of its responses (field 'policies': "
                          "one name per response in each import row; or 'policy' / 'model' for all)")
    return items, labels, unnamed


def _pick_baseline(items: dict[int, dict[str, Any]]) -> str:
    """The policy in the most items (ties: the first seen): the default baseline."""
    counts = Counter(name for it in items.values() for name in dict.fromkeys(it["policies"] or ()))
    return max(counts, key=counts.get)


def _item_means(per_item: dict[int, list[float]]) -> list[float]:
    """Each item's mean over its labels (in item order): one observation per item."""
    return [float(np.mean(per_item[k])) for k in sorted(per_item)]


def _win_block(per_item: dict[int, list[float]], baseline: str, is_baseline: bool, boot: tuple) -> dict[str, Any]:
    """eval.json's win-rate keys for one policy, plus ``n_items`` and ``n_labels``."""
    key = f"win_rate_vs_{baseline}"
    if is_baseline or not per_item:  # as eval.json, the baseline against itself is an even 0.5
        v = 0.5 if is_baseline else None
        return {key: v, "win_rate_ci_low": v, "win_rate_ci_high": v, "wins": 0, "ties": 0, "losses": 0, "n": 0,
                "n_items": 0, "n_labels": 0}
    wr = win_rate(_item_means(per_item), *boot)
    return {key: wr.rate, "win_rate_ci_low": wr.ci_low, "win_rate_ci_high": wr.ci_high, "wins": wr.wins,
            "ties": wr.ties, "losses": wr.losses, "n": wr.n, "n_items": wr.n,
            "n_labels": sum(len(v) for v in per_item.values())}


def _mean_block(per_item: dict[int, list[float]], name: str, task: str, boot: tuple) -> dict[str, Any]:
    """``name`` (mean over items of each item's mean) with its interval over items, and the counts."""
    counts = {f"{task}_n_items": len(per_item), f"{task}_n_ratings": sum(len(v) for v in per_item.values())}
    mean, low, high = bootstrap_mean_ci(_item_means(per_item), *boot) if per_item else (None, None, None)
    return {name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high, **counts}


def _collect(items: dict[int, dict[str, Any]], labels: list[dict[str, Any]], baseline: str) -> tuple:
    """Per policy and item: outcomes against the baseline, Likert ratings, accepts; per (item, lo, hi) the
    outcome of response lo (every pairwise label, for the comparison with an AI judge); what was skipped."""
    wins, likert, success = (defaultdict(lambda: defaultdict(list)) for _ in range(3))
    units: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    skipped = {"items_without_policies": sum(it["policies"] is None for it in items.values()),
               "labels_on_items_without_policies": 0, "pairwise_same_policy": 0, "pairwise_without_baseline": 0}
    for lab in labels:
        item_id, answers = lab["item_id"], lab["answers"]
        pols, pair = items[item_id]["policies"], answers.get("pairwise")
        if pair:
            lo, hi = sorted(pair["pair"])
            units[(item_id, lo, hi)].append(0.5 if pair["winner"] is None else float(pair["winner"] == lo))
        if pols is None:
            skipped["labels_on_items_without_policies"] += 1
            continue
        if pair:
            i, j = pair["pair"]
            if pols[i] == pols[j]:
                skipped["pairwise_same_policy"] += 1
            elif baseline not in (pols[i], pols[j]):
                skipped["pairwise_without_baseline"] += 1
            else:
                mine = j if pols[i] == baseline else i
                wins[pols[mine]][item_id].append(0.5 if pair["winner"] is None else float(pair["winner"] == mine))
        for task, key, into in (("likert", "ratings", likert), ("binary", "accept", success)):
            for idx, value in enumerate(answers.get(task, {}).get(key, ())):
                into[pols[idx]][item_id].append(float(value))
    return wins, likert, success, units, skipped


def human_eval_report(db: str | Database, project: str, baseline: str | None = None, n_boot: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The human evaluation of a project's policies against ``baseline`` (default: the policy in the most
    items); see the module docstring for every figure. Bad input is a one-line ConfigError / DataError."""
    if int(n_boot) < 1 or not 0 < confidence < 1:
        raise ConfigError("--n-boot must be >= 1 and --confidence in (0, 1)")
    items, labels, unnamed = _load(db, project)
    names = list(dict.fromkeys(n for it in items.values() for n in it["policies"] or ()))
    baseline = baseline or _pick_baseline(items)
    if baseline not in names:
        raise ConfigError(f"--baseline '{baseline}' wrote no response in project '{project}'; its policies: "
                          f"{', '.join(names)}")
    if unnamed:
        logger.warning("project '%s': %d item(s) name no policy (field 'policies'), left out of the per-policy "
                       "figures: item ids %s", project, len(unnamed), ", ".join(map(str, unnamed[:10])))
    wins, likert, success, units, skipped = _collect(items, labels, baseline)
    boot = (int(n_boot), confidence, seed)
    policies = {name: {**_win_block(wins.get(name, {}), baseline, name == baseline, boot),
                       **_mean_block(likert.get(name, {}), "likert_mean", "likert", boot),
                       **_mean_block(success.get(name, {}), "success_rate", "binary", boot)} for name in names}
    per_item_labels = Counter(lab["item_id"] for lab in labels)
    return {
        "project": project, "baseline": baseline, "n_boot": int(n_boot), "confidence": confidence, "seed": seed,
        "num_items": len(items), "num_labels": len(labels), "labellers": len({lab["coder"] for lab in labels}),
        "items_with_2_labels": sum(n >= 2 for n in per_item_labels.values()),
        "policies": policies, "agreement": _agreement(labels), "skipped": skipped, "unnamed_item_ids": unnamed,
        "notes": [f"{n} {task} labels give no figure here" for task in ("ranking", "critique")
                  if (n := sum(task in lab["answers"] for lab in labels))],
        "pairwise_items": [{"item_id": i, "prompt": items[i]["prompt"],
                            "responses": [items[i]["responses"][lo], items[i]["responses"][hi]],
                            "policies": [items[i]["policies"][k] for k in (lo, hi)] if items[i]["policies"] else None,
                            "outcome": float(np.mean(v)), "labels": len(v)} for (i, lo, hi), v in sorted(units.items())],
    }


def _agreement(labels: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Krippendorff's α per task (pairwise, likert, binary, ranking) over every label of the project."""
    out = {}
    for measure, recs in records_of(labels).items():
        per_unit = Counter(unit for unit, _, _ in recs)
        item_coders: dict[Any, set] = defaultdict(set)
        for unit, coder, _ in recs:
            item_coders[unit[0] if isinstance(unit, tuple) else unit].add(coder)
        out[measure] = {"krippendorff_alpha_nominal": krippendorff_alpha(recs, "nominal"),
                        "krippendorff_alpha_ordinal": krippendorff_alpha(recs, "ordinal")
                        if MEASURES[measure][1] else None,
                        "ratings": len(recs), "units": len(per_unit),
                        "units_multiply_rated": sum(n >= 2 for n in per_unit.values()),
                        "items_with_2_labels": sum(len(c) >= 2 for c in item_coders.values())}
    return out


# ---- table and command ------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(value: Any, low: Any, high: Any) -> str:  # "value [low, high]"
    return "-" if value is None else f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def format_human_eval_table(report: dict[str, Any], ai: dict[str, Any] | None = None) -> str:
    """The report as a plain-text table, one row per policy; with ``ai`` (:func:`compare_with_ai`) the AI
    judge's win rate in a column beside the human one, and κ between the two below."""
    base, policies = report["baseline"], report["policies"]
    cols = [(f"human win vs {base} [CI]", lambda m: _ci(m[f"win_rate_vs_{base}"], m["win_rate_ci_low"],
                                                      m["win_rate_ci_high"])),
            ("items", lambda m: str(m["n_items"])), ("labels", lambda m: str(m["n_labels"]))]
    for key, head in (("likert_mean", "likert [CI]"), ("success_rate", "success [CI]")):
        if any(m[key] is not None for m in policies.values()):  # the project asks this task
            cols.append((head, lambda m, k=key: _ci(m[k], m[f"{k}_ci_low"], m[f"{k}_ci_high"])))
    header = ["policy", *(head for head, _ in cols)] + ([f"AI win vs {ai['ai_baseline']} [CI]"] if ai else [])
    lines = [header]
    for name in dict.fromkeys([*policies, *(ai["policies"] if ai else ())]):
        m, r = policies.get(name), ai["policies"][name] if ai else None
        lines.append([name, *(cell(m) if m else "-" for _, cell in cols)]
                     + ([_ci(r["ai"], r["ai_ci_low"], r["ai_ci_high"])] if r else []))
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"{report['num_items']} items, {report['num_labels']} labels by {report['labellers']} labellers "
                f"({report['items_with_2_labels']} items with >= 2 labels); {100 * report['confidence']:.0f}% "
                "bootstrap intervals over items, each item's labellers averaged first")
    alphas = [f"{task} {_fmt(a['krippendorff_alpha_ordinal'] if MEASURES[task][1] else a['krippendorff_alpha_nominal'])}"
              for task, a in report["agreement"].items()]
    if alphas:
        text.append("labellers' agreement, Krippendorff's alpha (ordinal for ordered answers): " + ", ".join(alphas))
    sk = report["skipped"]
    if sk["items_without_policies"]:
        text.append(f"{sk['items_without_policies']} items name no policy (field 'policies'): left out "
                    f"({sk['labels_on_items_without_policies']} labels)")
    if sk["pairwise_same_policy"] or sk["pairwise_without_baseline"]:
        text.append(f"pairwise labels not counted: {sk['pairwise_same_policy']} between two responses of one "
                    f"policy, {sk['pairwise_without_baseline']} between two policies other than {base}")
    text += report.get("notes") or []
    if ai is not None:
        if ai["cohen_kappa"] is not None:
            text.append(f"human vs AI ({ai['ai_judge']}): Cohen's kappa {_fmt(ai['cohen_kappa'])}, agreement "
                        f"{_fmt(ai['percent_agreement'])} on {ai['matched_items']} matched items (of "
                        f"{ai['human_items']} human pairwise items)")
        if ai["note"]:
            text.append(f"human vs AI: {ai['note']}")
    return "\n".join(text)


def main(argv: Sequence[str]) -> int:
    """``rlhfkit label human-eval``: print the table; with ``--output-dir`` also write human_eval.json."""
    p = OneLineParser(prog="rlhfkit label human-eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      error_prefix="human-eval: ",
                       description="Per-policy human win rate vs a baseline, Likert mean and success rate (bootstrap "
                                   "intervals over items), labeller agreement; beside an 'rlhfkit eval' run.")
    p.add_argument("--db", default="labels.db", help="SQLite file or SQLAlchemy URL")
    p.add_argument("--project", required=True)
    p.add_argument("--baseline", help="policy the others are compared with (None: the one in the most items)")
    p.add_argument("--ai-eval", help="output folder (or eval.json) of 'rlhfkit eval' on the same policies: its "
                                     "win rates beside the human ones, and Cohen's kappa between the two")
    p.add_argument("--output-dir", help="write human_eval.json here")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(list(argv))
    if a.ai_eval:
        read_ai_eval(a.ai_eval)  # a wrong --ai-eval fails before the report is computed
    report = human_eval_report(a.db, a.project, a.baseline, a.n_boot, a.confidence, a.seed)
    ai = compare_with_ai(report, a.ai_eval) if a.ai_eval else None
    print(format_human_eval_table(report, ai))
    if a.output_dir:
        out = Path(a.output_dir) / "human_eval.json"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**report, "ai": ai}, indent=2, default=str) + "\n", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
        print(f"wrote {out}")
    return 0
