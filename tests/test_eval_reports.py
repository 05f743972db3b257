"""Numbers of the verifiable-task metrics (pass@k, best@k, maj@k) and of the reward-model report (eval-rm)."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.eval.rm_report import calibration, length_bias, main, pair_outcomes, reliability
from rlhfkit.eval.verifiable import (
    best_at_k,
    format_verifiable_table,
    maj_at_k,
    pass_at_k,
    verifiable_report,
)

# ------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_equals_closed_form():
    for n in (1, 2, 5, 10, 30):
        for c in sorted({0, 1, n // 2, n - 1, n} - {-1}):
            for k in sorted({1, 2, n // 2, n} - {0}):
                if k > n:
                    continue
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(200, 3, 100) == pytest.approx(1.0 - math.comb(197, 100) / math.comb(200, 100), abs=1e-12)


def test_pass_at_k_monte_carlo_and_bad_k():
    rng = np.random.default_rng(0)
    flags = np.array([1] * 3 + [0] * 9)
    hits = [flags[rng.choice(12, size=4, replace=False)].any() for _ in range(20000)]
    assert pass_at_k(12, 3, 4) == pytest.approx(np.mean(hits), abs=0.01)
    with pytest.raises(ValueError, match="k = 5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


# ------------------------------------------------------------------------------------------- best@k / maj@k


def test_best_at_k_equals_enumeration():
    for rewards in ([3.0, 1.0, 2.0, 5.0], [0.1, -2.0, 0.1, 7.5, 0.3, 0.3], [1.0]):
        for k in range(1, len(rewards) + 1):
            brute = np.mean([max(s) for s in itertools.combinations(rewards, k)])
            assert best_at_k(rewards, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        best_at_k([1.0, 2.0], 3)


def _maj_brute(answers, flags, k):
    worth = {a: np.mean([f for b, f in zip(answers, flags) if b == a]) for a in set(answers)}
    values = []
    for subset in itertools.combinations(range(len(answers)), k):
        counts = Counter(answers[i] for i in subset)
        top = max(counts.values())
        winners = [a for a, c in counts.items() if c == top]
        values.append(np.mean([worth[a] for a in winners]))  # a tie broken uniformly
    return float(np.mean(values))


@pytest.mark.parametrize("answers,right", [(list("aabbbcdda"), "a"), (list("xyxyzz"), "z"), (list("pqrs"), "q")])
def test_maj_at_k_equals_enumeration_with_ties(answers, right):
    flags = [a == right for a in answers]
    for k in range(1, len(answers) + 1):
        brute = _maj_brute(answers, flags, k)
        assert maj_at_k(answers, flags, k) == pytest.approx(brute, abs=1e-12)
        assert maj_at_k(answers, right, k) == pytest.approx(brute, abs=1e-12)  # a reference answer
        # the Monte Carlo path (forced) agrees within its standard error (<= 0.5 / sqrt(20000))
        assert maj_at_k(answers, flags, k, exact_cap=0, seed=1) == pytest.approx(brute, abs=0.015)


def test_maj_at_k_normalises_answers():
    answers = [" 42", "42 ", "Forty", "forty", "7"]
    assert maj_at_k(answers, "42", 5) == 0.5  # "42" and "forty" tie 2-2: half the time right
    assert maj_at_k(answers, "42", 3, answer_fn=lambda a: a) == pytest.approx(
        _maj_brute(answers, [a == "42" for a in answers], 3))


def test_verifiable_report():
    pids = ["p1"] * 4 + ["p2"] * 4 + ["p3"] * 2
    samples = ["4", "4", "5", "4", "x", "y", "y", "x", "1", "2"]
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.2, 0.2, 0.0, True, False]
    report = verifiable_report(pids, samples, rewards, ks=[1, 4], n_boot=200)
    p1, p2, p3 = report["per_prompt"]
    assert (p1["n"], p1["correct"], p2["correct"], p3["correct"]) == (4, 3, 0, 1)
    assert p1["pass@1"] == pytest.approx(0.75) and p1["pass@4"] == 1.0 and p2["pass@4"] == 0.0
    assert p1["maj@4"] == 1.0 and p2["maj@4"] == 0.0 and p3["maj@4"] is None and p3["pass@4"] is None
    assert p2["best@4"] == pytest.approx(0.2) and p2["best@1"] == pytest.approx(0.1)
    overall = report["overall"]
    assert overall["pass@1"]["mean"] == pytest.approx((0.75 + 0 + 0.5) / 3)
    assert overall["pass@4"]["n"] == 2 and overall["pass@4"]["mean"] == pytest.approx(0.5)
    assert overall["pass@1"]["ci_low"] <= overall["pass@1"]["mean"] <= overall["pass@1"]["ci_high"]
    json.dumps(report)
    table = format_verifiable_table(report)
    assert "pass@k" in table and table.count("\n") == 4


# ------------------------------------------------------------------------------------------- calibration


def test_ece_of_calibrated_and_miscalibrated_judges():
    rng = np.random.default_rng(0)
    n = 100_000
    conf = rng.uniform(0.5, 1.0, n)
    good = reliability(conf, rng.random(n) < conf, bins=10)
    assert good["ece"] < 0.02
    assert sum(b["n"] for b in good["bins"]) == n and len(good["bins"]) == 10
    bad = reliability(np.full(n, 0.95), rng.random(n) < 0.6, bins=10)
    assert bad["ece"] == pytest.approx(0.35, abs=0.02)
    assert sum(b["n"] for b in bad["bins"]) == n and bad["bins"][-1]["n"] == n
    with pytest.raises(ValueError):
        reliability([0.3], [1.0])


def test_calibration_of_margins():
    # p = sigmoid(m) with labels "chosen preferred" drawn with probability p: calibrated, in folded form
    rng = np.random.default_rng(1)
    m = rng.normal(0.0, 2.0, 50_000)
    p = 1.0 / (1.0 + np.exp(-m))
    m = np.where(rng.random(m.size) < p, m, -m)  # a pair with the label flipped shows the margin reversed
    cal = calibration(m, bins=10)
    assert cal["ece"] < 0.02 and sum(b["n"] for b in cal["bins"]) == m.size
    p_chosen = 1.0 / (1.0 + np.exp(-m))
    assert cal["brier"] == pytest.approx(np.mean((1.0 - p_chosen) ** 2))
    assert calibration([0.0, 0.0])["accuracy"] == 0.5  # ties count half
    assert list(pair_outcomes([1.0, 0.0, -2.0])) == [1.0, 0.5, 0.0]


def test_length_bias_on_constructed_pairs():
    # 10 pairs with the chosen shorter (7 right), 5 with it longer (all right), 2 of equal length (1 tie, 1 wrong)
    margins = [1.0] * 7 + [-1.0] * 3 + [0.5] * 5 + [0.0, -0.2]
    chosen = [3] * 10 + [9] * 5 + [4, 4]
    rejected = [6] * 10 + [2] * 5 + [4, 4]
    lb = length_bias(margins, chosen, rejected, n_boot=200)
    assert lb["chosen_shorter"]["n"] == 10 and lb["chosen_shorter"]["accuracy"] == pytest.approx(0.7)
    assert lb["chosen_longer"]["n"] == 5 and lb["chosen_longer"]["accuracy"] == 1.0
    assert lb["same_length"]["n"] == 2 and lb["same_length"]["accuracy"] == pytest.approx(0.25)
    # the longer response wins in 3 of the 10 shorter-chosen pairs and all 5 longer-chosen ones
    assert lb["prefers_longer"]["n"] == 15 and lb["prefers_longer"]["accuracy"] == pytest.approx(8 / 15)
    assert lb["chosen_shorter"]["ci_low"] <= 0.7 <= lb["chosen_shorter"]["ci_high"]


# ------------------------------------------------------------------------------------------- eval-rm


@pytest.fixture(scope="module")
def rm_files(tmp_path_factory, tiny_tokenizer):
    from rlhfkit.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("eval_rm")
    rm = build_tiny_model(root / "rm", reward=True, tokenizer=tiny_tokenizer, layers=1, hidden=32, heads=2, seed=3)
    rows = [{"prompt": f"Question {i}?", "chosen": "a good answer " * (1 + i % 3), "rejected": f"bad {i}",
             "subset": ["chat", "safety"][i % 2]} for i in range(12)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "nochosen.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "rejected": r["rejected"]})
                                                 + "\n" for r in rows))
    return root, str(rm), rows


def test_eval_rm_end_to_end(rm_files, capsys):
    root, rm, rows = rm_files
    out = root / "out"
    assert main(["--reward-model", rm, "--pairs", str(root / "pairs.jsonl"), "--output-dir", str(out),
                 "--n-boot", "200", "--bins", "5", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "chat" in table and "safety" in table and "ECE" in table and "longer" in table
    report = json.loads((out / "rm_report.json").read_text())
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert report["subset_column"] == "subset" and set(report["subsets"]) == {"chat", "safety"}
    assert sum(s["n"] for s in report["subsets"].values()) == len(rows) == len(pairs)
    acc = report["overall"]["accuracy"]
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(np.mean([(p["margin"] > 0) + 0.5 * (p["margin"] == 0) for p in pairs]))
    for name, s in report["subsets"].items():
        mine = [p for p in pairs if p["subset"] == name]
        assert s["accuracy"] == pytest.approx(np.mean([p["margin"] > 0 for p in mine]))
        assert s["ci_low"] <= s["accuracy"] <= s["ci_high"]
    assert [p["line"] for p in pairs if p["subset"] == "chat"] == [1, 3, 5, 7, 9, 11]
    assert sum(b["n"] for b in report["calibration"]["bins"]) == len(pairs)
    lb = report["length_bias"]
    assert lb["chosen_shorter"]["n"] + lb["chosen_longer"]["n"] + lb["same_length"]["n"] == len(pairs)


def test_eval_rm_rows_without_a_subset_are_their_own_subset_not_the_string_none(rm_files, tmp_path):
    root, rm, rows = rm_files
    mixed = [{**r, "subset": None} if i in (2, 5) else r for i, r in enumerate(rows[:6])]
    mixed.append({**rows[0], "subset": "None"})  # a subset literally named None stays apart
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    main(["--reward-model", rm, "--pairs", str(path), "--output-dir", str(tmp_path / "out"), "--n-boot", "50"])
    report = json.loads((tmp_path / "out" / "rm_report.json").read_text())
    assert {name: s["n"] for name, s in report["subsets"].items()} == {"chat": 2, "(missing)": 2, "safety": 2,
                                                                       "None": 1}


def test_eval_rm_never_writes_over_its_input_or_files_it_did_not_write(rm_files, tmp_path, capsys):
    root, rm, rows = rm_files
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text((root / "pairs.jsonl").read_text())
    before = (data / "pairs.jsonl").read_bytes()
    # the input pairs.jsonl sits where the report's pairs.jsonl would go
    with pytest.raises(ConfigError, match="would replace the input"):
        main(["--reward-model", rm, "--pairs", str(data / "pairs.jsonl"), "--output-dir", str(data)])
    assert (data / "pairs.jsonl").read_bytes() == before and not (data / "rm_report.json").exists()
    # someone else's pairs.jsonl (no rm_report.json beside it)
    other = tmp_path / "other"
    other.mkdir()
    (other / "pairs.jsonl").write_text("mine\n")
    with pytest.raises(ConfigError, match="holds pairs.jsonl with no rm_report.json"):
        main(["--reward-model", rm, "--pairs", str(root / "pairs.jsonl"), "--output-dir", str(other)])
    assert (other / "pairs.jsonl").read_text() == "mine\n"
    # an earlier report of this command is replaced: running it again asks for that
    out = tmp_path / "out"
    for _ in range(2):
        main(["--reward-model", rm, "--pairs", str(root / "pairs.jsonl"), "--output-dir", str(out), "--n-boot", "20"])
    assert len((out / "pairs.jsonl").read_text().splitlines()) == len(rows)


def test_eval_rm_bad_input(rm_files):
    root, rm, _ = rm_files
    missing = root / "nope.jsonl"
    with pytest.raises(ConfigError) as err:
        main(["--reward-model", rm, "--pairs", str(missing)])
    assert str(missing) in str(err.value) and "--pairs" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        main(["--reward-model", rm, "--pairs", str(root / "nochosen.jsonl")])
    message = str(err.value)
    assert "nochosen.jsonl" in message and "'chosen'" in message and "\n" not in message
    with pytest.raises(ConfigError, match="'category'"):
        main(["--reward-model", rm, "--pairs", str(root / "pairs.jsonl"), "--subset-column", "category"])
