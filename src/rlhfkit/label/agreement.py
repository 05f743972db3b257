"""Inter-annotator agreement: Krippendorff's alpha (``krippendorff``), Cohen's kappa (scikit-learn) and Fleiss'
kappa, generalised to units with unequal numbers of ratings (Gwet's formula, written out in :func:`fleiss`
because statsmodels' ``fleiss_kappa`` needs the same count per unit); percent agreement is a plain share.

Ratings are records ``(unit, coder, value)``; a unit a coder did not rate is missing (NaN in the
reliability matrix), which alpha handles natively and Fleiss' generalisation by per-unit counts.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np

Record = tuple[Hashable, Hashable, float]


def _clean(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def reliability_matrix(records: Iterable[Record]) -> tuple[list, list, np.ndarray]:
    """(coders, units, matrix coders × units with NaN for missing)."""
    records = list(records)
    coders = sorted({c for _, c, _ in records}, key=str)
    units = sorted({u for u, _, _ in records}, key=str)
    ci, ui = {c: i for i, c in enumerate(coders)}, {u: i for i, u in enumerate(units)}
    m = np.full((len(coders), len(units)), np.nan)
    for u, c, v in records:
        m[ci[c], ui[u]] = float(v)
    return coders, units, m


def krippendorff_alpha(records: Iterable[Record], level: str = "nominal") -> float | None:
    import krippendorff

    _, _, m = reliability_matrix(records)
    paired = (~np.isnan(m)).sum(axis=0) >= 2
    if m.size == 0 or not paired.any() or len(np.unique(m[:, paired][~np.isnan(m[:, paired])])) < 2:
        return None  # alpha is undefined without pairable values of at least two kinds
    return _clean(krippendorff.alpha(reliability_data=m, level_of_measurement=level))


def fleiss(records: Iterable[Record]) -> tuple[float | None, int]:
    """Fleiss' kappa over every unit, whatever its number of ratings; returns (kappa, units with >= 2 ratings).

    Gwet (2014), *Handbook of Inter-Rater Reliability*, 4th ed., Fleiss' generalised kappa for missing
    ratings (as in the R package irrCAC's ``fleiss.kappa.raw``). With r_ik ratings of unit i in category k,
    r_i = sum_k r_ik, over the n units rated at least once, n2 of them at least twice:

        p_a  = 1/n2 * sum_{i: r_i >= 2} sum_k r_ik (r_ik - 1) / (r_i (r_i - 1))   (observed agreement)
        pi_k = 1/n  * sum_i r_ik / r_i                                            (category shares)
        p_e  = sum_k pi_k^2                                                       (chance agreement)
        kappa = (p_a - p_e) / (1 - p_e)

    Each unit's agreement uses its own r_i, so no unit is dropped. With the same r for every unit this is
    exactly Fleiss (1971), i.e. statsmodels' ``fleiss_kappa``, which asserts equal counts and so cannot take
    unequal ones; the Python port of irrCAC pins ``scipy==1.12``, so the formula is written out here and
    tested against both (the unequal-count textbook example gives Gwet's 0.76117).
    """
    by_unit: dict[Hashable, list[float]] = defaultdict(list)
    for u, _, v in records:
        by_unit[u].append(float(v))
    if not by_unit:
        return None, 0
    col = {c: j for j, c in enumerate(sorted({v for vals in by_unit.values() for v in vals}))}
    table = np.zeros((len(by_unit), len(col)))
    for i, vals in enumerate(by_unit.values()):
        for v in vals:
            table[i, col[v]] += 1
    r = table.sum(axis=1)
    multi = r >= 2
    if not multi.any():
        return None, 0
    p_a = ((table * (table - 1)).sum(axis=1)[multi] / (r * (r - 1))[multi]).mean()
    pi = (table / r[:, None]).mean(axis=0)
    p_e = float((pi**2).sum())
    if p_e >= 1.0:
        return None, int(multi.sum())  # one category only: kappa is 0/0
    return _clean((p_a - p_e) / (1 - p_e)), int(multi.sum())


def cohen_pairs(records: Iterable[Record]) -> dict[tuple, tuple[float | None, int]]:
    """Cohen's kappa for every pair of coders with >= 2 shared units: {(a, b): (kappa, shared units)}."""
    from sklearn.metrics import cohen_kappa_score

    coders, _, m = reliability_matrix(records)
    categories = np.unique(m[~np.isnan(m)])
    out = {}
    for i, j in itertools.combinations(range(len(coders)), 2):
        both = ~np.isnan(m[i]) & ~np.isnan(m[j])
        if both.sum() < 2:
            continue
        a, b = m[i, both], m[j, both]
        if len(np.unique(np.concatenate([a, b]))) < 2:
            kappa = None  # both always gave the same single value: kappa is 0/0
        else:
            kappa = _clean(cohen_kappa_score(a, b, labels=categories))
        out[(coders[i], coders[j])] = (kappa, int(both.sum()))
    return out


def percent_agreement(records: Iterable[Record]) -> float | None:
    """Mean over units with >= 2 ratings of the share of agreeing rating pairs."""
    by_unit: dict[Hashable, list[float]] = defaultdict(list)
    for u, _, v in records:
        by_unit[u].append(v)
    shares = []
    for vals in by_unit.values():
        if len(vals) >= 2:
            pairs = list(itertools.combinations(vals, 2))
            shares.append(sum(a == b for a, b in pairs) / len(pairs))
    return sum(shares) / len(shares) if shares else None


def summary(records: list[Record], ordinal: bool) -> dict[str, Any]:
    """Every statistic for one measure."""
    kappa, fleiss_units = fleiss(records)
    pairs = cohen_pairs(records)
    kappas = [k for k, _ in pairs.values() if k is not None]
    units = defaultdict(int)
    for u, _, _ in records:
        units[u] += 1
    return {
        "ratings": len(records),
        "units": len(units),
        "units_multiply_rated": sum(1 for n in units.values() if n >= 2),
        "krippendorff_alpha_nominal": krippendorff_alpha(records, "nominal"),
        "krippendorff_alpha_ordinal": krippendorff_alpha(records, "ordinal") if ordinal else None,
        "fleiss_kappa": kappa,
        "fleiss_units": fleiss_units,
        "cohen_kappa_mean": sum(kappas) / len(kappas) if kappas else None,
        "percent_agreement": percent_agreement(records),
    }


# ---- from stored labels -----------------------------------------------------------------------------

# measure name -> (task, ordinal?)
MEASURES = {
    "pairwise": ("pairwise", True),  # unit = (item, pair); 0 = lower index better, 1 = tie, 2 = higher better
    "ranking_position": ("ranking", True),  # unit = (item, response); value = rank position
    "ranking_top": ("ranking", False),  # unit = item; value = index ranked first
    "binary": ("binary", False),  # unit = (item, response); 1 = accept
    "likert": ("likert", True),  # unit = (item, response); 1..5
}


def records_of(labels: list[dict[str, Any]]) -> dict[str, list[Record]]:
    """Labels ``{item_id, coder, answers}`` (original indices) -> records per measure."""
    out: dict[str, list[Record]] = defaultdict(list)
    for lab in labels:
        item, coder, answers = lab["item_id"], lab["coder"], lab["answers"]
        if "pairwise" in answers:
            a = answers["pairwise"]
            lo, hi = sorted(a["pair"])
            value = 1 if a["winner"] is None else (0 if a["winner"] == lo else 2)
            out["pairwise"].append(((item, lo, hi), coder, value))
        if "ranking" in answers:
            ranking = answers["ranking"]["ranking"]
            for pos, idx in enumerate(ranking):
                out["ranking_position"].append(((item, idx), coder, pos))
            out["ranking_top"].append((item, coder, ranking[0]))
        if "binary" in answers:
            for idx, v in enumerate(answers["binary"]["accept"]):
                out["binary"].append(((item, idx), coder, int(v)))
        if "likert" in answers:
            for idx, v in enumerate(answers["likert"]["ratings"]):
                out["likert"].append(((item, idx), coder, v))
    return dict(out)


def _item_of(unit: Hashable) -> Hashable:
    return unit[0] if isinstance(unit, tuple) else unit


def project_agreement(labels: list[dict[str, Any]], min_agreement: float = 0.5,
                      min_gold_accuracy: float = 0.6) -> dict[str, Any]:
    """Per-project and per-labeller agreement, with low-agreement items and labellers flagged.

    ``labels``: dicts with item_id, coder (labeller name), answers and gold_correct. The result also holds
    ``labels`` (how many) and ``notes``: tasks whose answers have no agreement measure (free-text critiques).
    """
    by_measure = records_of(labels)
    project = {name: summary(recs, MEASURES[name][1]) for name, recs in by_measure.items()}
    coders = sorted({lab["coder"] for lab in labels}, key=str)
    per_labeller: dict[Hashable, dict[str, Any]] = {}
    for coder in coders:
        mine = [lab for lab in labels if lab["coder"] == coder]
        gold = [lab["gold_correct"] for lab in mine if lab.get("gold_correct") is not None]
        row: dict[str, Any] = {"labels": len(mine), "gold_items": len(gold),
                               "gold_accuracy": sum(gold) / len(gold) if gold else None}
        agree_all, n_all = 0.0, 0
        for name, recs in by_measure.items():
            by_unit: dict[Hashable, dict] = defaultdict(dict)
            for u, c, v in recs:
                by_unit[u][c] = v
            hits = [other == vals[coder] for vals in by_unit.values() if coder in vals
                    for c, other in vals.items() if c != coder]
            if hits:
                row[f"{name}_agreement_with_others"] = sum(hits) / len(hits)
                agree_all += sum(hits)
                n_all += len(hits)
            kappas = [k for (a, b), (k, _) in cohen_pairs(recs).items() if coder in (a, b) and k is not None]
            row[f"{name}_cohen_kappa_mean"] = sum(kappas) / len(kappas) if kappas else None
        row["agreement_with_others"] = agree_all / n_all if n_all else None
        reasons = []
        if row["agreement_with_others"] is not None and row["agreement_with_others"] < min_agreement:
            reasons.append(f"agreement with others {row['agreement_with_others']:.2f} < {min_agreement}")
        if row["gold_accuracy"] is not None and row["gold_accuracy"] < min_gold_accuracy:
            reasons.append(f"gold accuracy {row['gold_accuracy']:.2f} < {min_gold_accuracy}")
        row["flag"] = "; ".join(reasons) or None
        per_labeller[coder] = row
    # items: the share of agreeing rating pairs over all the item's units and measures
    item_pairs: dict[Hashable, list[bool]] = defaultdict(list)
    for recs in by_measure.values():
        by_unit = defaultdict(list)
        for u, _, v in recs:
            by_unit[u].append(v)
        for u, vals in by_unit.items():
            item_pairs[_item_of(u)] += [a == b for a, b in itertools.combinations(vals, 2)]
    flagged_items = sorted(
        ({"item_id": item, "agreement": sum(h) / len(h), "rating_pairs": len(h)}
         for item, h in item_pairs.items() if h and sum(h) / len(h) < min_agreement),
        key=lambda r: (r["agreement"], str(r["item_id"])))
    critiques = sum("critique" in lab["answers"] for lab in labels)
    notes = [f"agreement is not defined for free-text critiques ({critiques} critique labels stored: exported, "
             "not compared)"] if critiques else []
    return {"labels": len(labels), "notes": notes, "project": project, "labellers": per_labeller,
            "flagged_items": flagged_items,
            "flagged_labellers": [c for c, r in per_labeller.items() if r["flag"]],
            "thresholds": {"min_agreement": min_agreement, "min_gold_accuracy": min_gold_accuracy}}
