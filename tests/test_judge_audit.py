"""The judge audit (rlhfkit audit-judge): each bias is flagged for a judge built to have it, and only then."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.eval.audit_stats import KAPPA_LABELS, _kappa_rows, cohen_kappa, excludes_zero, logit_slope
from rlhfkit.eval.judge_audit import _ci, audit_html, audit_judge, format_audit_table, main
from rlhfkit.judges.backends import FunctionJudge
from rlhfkit.judges.spec import build_judge
from rlhfkit.report import build_report

JUDGES = '''
import hashlib, random

def _h(text):
    return int(hashlib.sha256(str(text).encode()).hexdigest()[:8], 16) / 16 ** 8

def first(prompt, a, b):
    return 1.0

def longer(prompt, a, b):
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5

def likes_x(prompt, a, b):
    if a.endswith("~X") != b.endswith("~X"):
        return 1.0 if a.endswith("~X") else 0.0
    return 1.0 if _h(a) > _h(b) else 0.0  # order-free coin for the pairs without X

def length_score(prompts, responses):  # a scoring judge (fn:), used pairwise
    return [float(len(r)) for r in responses]

def mute_on_3(prompt, a, b):
    return None if prompt.endswith("3") else 1.0

_rng = random.Random(0)

def noisy(prompt, a, b):
    return _rng.random()
'''

BOOT = {"n_boot": 300}


def _h(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16 ** 8


def _pairs(n: int, seed: int = 0, models: bool = False) -> list[dict]:
    """n pairs whose label is independent of the responses' lengths (both 20..600 characters)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"prompt": f"question {i}", "chosen": f"good {i} " + "c" * rng.randint(20, 600),
               "rejected": f"bad {i} " + "r" * rng.randint(20, 600)}
        if models:
            row["chosen_model"], row["rejected_model"] = rng.sample(["X", "Y", "Z"], 2)
            row["chosen"] += " ~" + row["chosen_model"]
            row["rejected"] += " ~" + row["rejected_model"]
        rows.append(row)
    return rows


@pytest.fixture()
def judges_file(tmp_path):
    path = tmp_path / "judges.py"
    path.write_text(JUDGES, encoding="utf-8")
    return path


def test_a_first_slot_judge_is_flagged_for_position(judges_file):
    judge = build_judge(f"pairfn:{judges_file}:first")
    report = audit_judge(judge, _pairs(60), **BOOT)
    pos = report["position"]
    assert pos["first_slot_share"]["value"] == 1.0 and pos["first_slot_share"]["n"] == 120
    assert pos["flip_share"]["value"] == 1.0 and pos["p_value"] < 1e-10
    assert pos["towards"] == "first"
    assert report["accuracy"]["value"] == 0.5 and report["accuracy"]["ties"] == 60
    assert report["kappa"]["value"] == 0.0  # every verdict a tie: no agreement beyond chance
    assert report["flagged"] == ["position"]
    json.dumps(report)  # JSON-able as it is


def test_a_length_judge_is_flagged_and_the_labels_are_not(judges_file):
    judge = build_judge(f"pairfn:{judges_file}:longer")
    report = audit_judge(judge, _pairs(200), **BOOT)
    length = report["length"]
    js, ls = length["judge_slope"], length["label_slope"]
    assert js["fit"] == "firth"  # always the longer one: separated, the ML slope is infinite
    assert js["slope"] > 0 and js["ci_low"] > 0 and js["p_value"] < 0.01
    assert ls["fit"] == "logit" and ls["ci_low"] < 0 < ls["ci_high"]
    assert length["judge_prefers_longer"]["value"] == 1.0
    assert 0.4 < length["labels_prefer_longer"]["value"] < 0.6
    assert length["accuracy_winner_longer"]["value"] == 1.0 and length["accuracy_winner_shorter"]["value"] == 0.0
    assert length["direction"] == "longer"
    assert report["flagged"] == ["length"]
    assert report["position"]["flip_share"]["value"] == 0.0


def test_an_unbiased_judge_is_not_flagged():
    rows = _pairs(200, seed=1)
    chosen = {r["chosen"] for r in rows}

    def fair(prompt, a, b):  # right on 85% of the prompts, whatever the order and the lengths
        right = _h(prompt) < 0.85
        return 1.0 if (a in chosen) == right else 0.0

    report = audit_judge(FunctionJudge(fair, name="fair"), rows, **BOOT)
    truth = np.mean([_h(r["prompt"]) < 0.85 for r in rows])
    acc = report["accuracy"]
    assert acc["value"] == pytest.approx(truth) and acc["ci_low"] <= 0.85 <= acc["ci_high"]
    assert report["kappa"]["value"] > 0.5 and report["kappa"]["n"] == 200
    assert report["kappa"]["label_in_a"] == 100
    assert report["position"]["first_slot_share"]["value"] == 0.5
    assert report["position"]["flip_share"]["value"] == 0.0
    assert report["flagged"] == []
    assert report["consistency"] is None  # one repeat: not measured


def test_self_preference_is_flagged_for_its_own_model_only(judges_file):
    judge = build_judge(f"pairfn:{judges_file}:likes_x")
    rows = _pairs(200, seed=2, models=True)
    mine = audit_judge(judge, rows, self_model="X", **BOOT)
    sp = mine["self_preference"]
    assert sp["pairs"] == sum(("X" in (r["chosen_model"], r["rejected_model"])) for r in rows)
    assert sp["judge_rate"]["value"] == 1.0 and 0.35 < sp["label_rate"]["value"] < 0.65
    assert sp["difference"]["ci_low"] > 0 and sp["error_asymmetry"]["value"] == 1.0
    assert "self_preference" in mine["flagged"]
    other = audit_judge(judge, rows, self_model="Y", **BOOT)
    assert other["self_preference"]["difference"]["value"] < 0
    assert "self_preference" not in other["flagged"]
    with pytest.raises(ConfigError, match=r"pairs, row 1, field 'chosen_model'"):
        audit_judge(judge, _pairs(5), self_model="X", **BOOT)


def test_consistency_over_repeats(judges_file):
    noisy = build_judge(f"pairfn:{judges_file}:noisy")
    report = audit_judge(noisy, _pairs(40), repeats=3, **BOOT)
    assert report["repeats"] == 3 and report["consistency"]["n"] == 40
    assert report["consistency"]["value"] < 0.6  # a coin per ask: the same pick 3 times is rare (1/4)
    assert report["position"]["first_slot_share"]["n"] == 240
    steady = audit_judge(build_judge(f"pairfn:{judges_file}:longer"), _pairs(40), repeats=2, **BOOT)
    assert steady["consistency"]["value"] == 1.0


def test_scoring_judges_and_unreadable_replies(judges_file):
    scoring = audit_judge(build_judge(f"fn:{judges_file}:length_score"), _pairs(100), **BOOT)
    assert scoring["position"]["flip_share"]["value"] == 0.0
    assert scoring["position"]["first_slot_share"]["value"] == 0.5
    assert scoring["flagged"] == ["length"] and scoring["length"]["direction"] == "longer"
    mute = audit_judge(build_judge(f"pairfn:{judges_file}:mute_on_3"), _pairs(30), **BOOT)
    assert mute["pairs"] == 27 and mute["skipped"] == 3  # questions 3, 13, 23: counted, not fatal
    assert [s["row"] for s in mute["skipped_rows"]] == [4, 14, 24]
    with pytest.raises(ConfigError, match="no verdict on any of the 1 pairs"):
        audit_judge(build_judge(f"pairfn:{judges_file}:mute_on_3"), _pairs(4)[3:], **BOOT)


def test_interval_helpers():
    assert excludes_zero({"ci_low": 2.0, "ci_high": None}) and not excludes_zero({"ci_low": None, "ci_high": None})
    assert not excludes_zero({"ci_low": -1.0, "ci_high": 1.0}) and excludes_zero({"ci_low": None, "ci_high": -1})
    assert _ci({"ci_low": 0.5, "ci_high": None}) == "[0.500, inf]" and _ci({"ci_low": None}) == "-"


def test_kappa_bootstrap_formula_and_logit_slope():
    rng = np.random.default_rng(0)
    refs = list(rng.choice(["a", "b"], 50))
    preds = list(rng.choice(KAPPA_LABELS, 50))
    codes = {k: i for i, k in enumerate(KAPPA_LABELS)}
    rows = _kappa_rows(np.array([[codes[x] for x in refs]]), np.array([[codes[x] for x in preds]]))
    assert rows[0] == pytest.approx(cohen_kappa(refs, preds))
    x = rng.normal(size=2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-x))).astype(float)
    fit = logit_slope(y, x)
    assert fit["fit"] == "logit" and fit["ci_low"] < 1.0 < fit["ci_high"] and fit["p_value"] < 1e-6
    assert logit_slope(y[:10], np.zeros(10))["slope"] is None


def test_the_command_end_to_end(judges_file, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in _pairs(30, models=True)), encoding="utf-8")
    out = tmp_path / "audit"
    assert main(["--judge", f"pairfn:{judges_file}:first", "--pairs", str(pairs), "--self-model", "X",
                 "--repeats", "2", "--max-pairs", "20", "--n-boot", "200", "--output-dir", str(out)]) == 0
    report = json.loads((out / "judge_audit.json").read_text())
    assert report["pairs"] == 20 and report["pairs_file"] == str(pairs) and report["flagged"] == ["position"]
    assert report["consistency"]["value"] == 1.0
    table = capsys.readouterr().out
    assert "first-slot win share" in table and "flagged: position" in table
    assert format_audit_table(report) in table
    fragment = audit_html({**report, "judge": "<x>"})
    assert fragment.startswith('<table class="judge-audit">') and "&lt;x&gt;" in fragment and "<x>" not in fragment
    page = build_report(tmp_path / "audit").read_text(encoding="utf-8")  # the HTML report shows the audit
    assert 'id="audit-audit"' in page and "Judge audit" in page and "first-slot win share" in page

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.jsonl.*field 'rejected'") as err:
        main(["--judge", f"pairfn:{judges_file}:first", "--pairs", str(broken)])
    assert "\n" not in str(err.value)
    holes = tmp_path / "holes.jsonl"
    holes.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                     + json.dumps({"prompt": "p", "chosen": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"holes\.jsonl, row 2, field 'rejected': empty"):
        main(["--judge", f"pairfn:{judges_file}:first", "--pairs", str(holes)])
    with pytest.raises(ConfigError, match="--repeats"):
        main(["--judge", f"pairfn:{judges_file}:first", "--pairs", str(pairs), "--repeats", "0"])
