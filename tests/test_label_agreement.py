"""Agreement figures equal the reference packages' on textbook examples, missing ratings included."""

from __future__ import annotations

import math

import krippendorff  # noqa: E402
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score  # noqa: E402
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa  # noqa: E402

from rlhfkit.label import agreement  # noqa: E402

NAN = math.nan
# Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders x 12 units, values 1..5, missing
KRIPP = [[1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
         [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
         [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
         [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN]]


def records(matrix):
    return [(u, c, v) for c, row in enumerate(matrix) for u, v in enumerate(row) if not math.isnan(v)]


def test_krippendorff_textbook_with_missing():
    recs = records(KRIPP)
    nominal = agreement.krippendorff_alpha(recs, "nominal")
    assert nominal == pytest.approx(0.743, abs=5e-4)
    assert nominal == pytest.approx(krippendorff.alpha(reliability_data=np.array(KRIPP),
                                                       level_of_measurement="nominal"))
    ordinal = agreement.krippendorff_alpha(recs, "ordinal")
    assert ordinal == pytest.approx(krippendorff.alpha(reliability_data=np.array(KRIPP),
                                                       level_of_measurement="ordinal"))
    assert ordinal == pytest.approx(0.815, abs=5e-3)


def test_cohen_pairs_match_sklearn_on_shared_units():
    recs = records(KRIPP)
    pairs = agreement.cohen_pairs(recs)
    m = np.array(KRIPP)
    for (a, b), (kappa, n) in pairs.items():
        both = ~np.isnan(m[a]) & ~np.isnan(m[b])
        assert n == both.sum()
        ref = cohen_kappa_score(m[a, both], m[b, both], labels=np.unique(m[~np.isnan(m)]))
        assert kappa == pytest.approx(ref)
    # Cohen (1960)-style 2 x 2 textbook case: kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    two = [(u, "a", v) for u, v in enumerate(a)] + [(u, "b", v) for u, v in enumerate(b)]
    assert agreement.cohen_pairs(two)[("a", "b")][0] == pytest.approx(0.4)


def test_fleiss_matches_statsmodels_on_equal_counts():
    # Fleiss (1971) as on Wikipedia: 10 subjects, 14 raters, 5 categories; kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    recs = []
    for u, counts in enumerate(table):
        coder = 0
        for category, n in enumerate(counts):
            for _ in range(n):
                recs.append((u, coder, category))
                coder += 1
    kappa, units = agreement.fleiss(recs)
    assert units == 10
    assert kappa == pytest.approx(0.2099, abs=1e-4)
    assert kappa == pytest.approx(fleiss_kappa(np.array(table)))
    # random complete designs: the generalisation reduces to statsmodels' Fleiss whenever counts are equal
    rng = np.random.default_rng(0)
    for raters in (2, 3, 5):
        m = rng.integers(0, 4, size=(30, raters))
        recs = [(u, c, v) for u, row in enumerate(m) for c, v in enumerate(row)]
        assert agreement.fleiss(recs)[0] == pytest.approx(fleiss_kappa(aggregate_raters(m)[0]))


def test_fleiss_unequal_rating_counts_textbook():
    # Krippendorff's 4 coders x 12 units with missing ratings, Gwet (2014) / irrCAC's raw_4raters example:
    # Fleiss' generalised kappa 0.76117 (p_a 0.81818, p_e 0.23872); every unit with >= 2 ratings counts (11)
    kappa, units = agreement.fleiss(records(KRIPP))
    assert units == 11
    assert kappa == pytest.approx(0.76117, abs=5e-6)
    # nothing dropped: the units rated by all 4 coders alone give statsmodels' (different) value
    full = [u for u in range(12) if sum(not math.isnan(r[u]) for r in KRIPP) == 4]
    subset = fleiss_kappa(aggregate_raters(np.array([[r[u] for r in KRIPP] for u in full]))[0])
    assert abs(kappa - subset) > 0.01
    # by hand: units [1,1,1], [1,2], [2,2,2,1]: p_a = (1 + 0 + 1/2)/3 = 1/2; pi = (7/12, 5/12),
    # p_e = 74/144 = 37/72; kappa = (36/72 - 37/72) / (35/72) = -1/35
    hand = [("a", c, 1) for c in range(3)] + [("b", 0, 1), ("b", 1, 2)] + [("c", c, 2) for c in range(3)] + [("c", 3, 1)]
    assert agreement.fleiss(hand) == (pytest.approx(-1 / 35), 3)
    assert agreement.fleiss([("a", 0, 1), ("b", 0, 2)]) == (None, 0)  # nothing rated twice
    assert agreement.fleiss([("a", 0, 1), ("a", 1, 1)]) == (None, 1)  # one category: 0/0


def test_percent_agreement_with_missing():
    recs = records(KRIPP)
    # by hand over the units with >= 2 ratings: share of agreeing pairs
    shares = []
    for u in range(12):
        vals = [r[u] for r in KRIPP if not math.isnan(r[u])]
        if len(vals) >= 2:
            pairs = [(x, y) for i, x in enumerate(vals) for y in vals[i + 1:]]
            shares.append(sum(x == y for x, y in pairs) / len(pairs))
    assert agreement.percent_agreement(recs) == pytest.approx(sum(shares) / len(shares))


def test_project_agreement_from_stored_labels_equals_packages():
    """Likert labels as the app stores them -> the same alpha as the package on the equivalent matrix."""
    labels = []
    for c, row in enumerate(KRIPP):
        for item in range(6):  # item i holds units 2i and 2i+1 (two responses); skip if both missing
            r = [row[2 * item], row[2 * item + 1]]
            if any(math.isnan(x) for x in r):
                continue
            labels.append({"item_id": item, "coder": f"c{c}", "answers": {"likert": {"ratings": [int(x) for x in r]}},
                           "gold_correct": None})
    result = agreement.project_agreement(labels)["project"]["likert"]
    m = np.full((4, 12), np.nan)
    for lab in labels:
        c = int(lab["coder"][1:])
        m[c, 2 * lab["item_id"]: 2 * lab["item_id"] + 2] = lab["answers"]["likert"]["ratings"]
    assert result["krippendorff_alpha_nominal"] == pytest.approx(krippendorff.alpha(m, level_of_measurement="nominal"))
    assert result["krippendorff_alpha_ordinal"] == pytest.approx(krippendorff.alpha(m, level_of_measurement="ordinal"))
