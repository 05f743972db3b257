"""Evaluation: win-rate statistics, the length-controlled GLM, and `rlhfkit eval` end to end on tiny models."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from toy import save_e_heavy_policy

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.eval import (
    bootstrap_mean_ci,
    evaluate_policies,
    length_controlled_win_rate,
    pairwise_outcomes,
    win_rate,
)
from rlhfkit.eval.stats import lc_glm_fit
from rlhfkit.judges import load_judge
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.rewards import HTTPReward, ModelReward

# ----------------------------------------------------------------------------------------- statistics


def test_win_rate_known_counts_and_interval_width():
    wr = win_rate([1.0] * 70 + [0.0] * 30, n_boot=4000, seed=0)
    assert wr.rate == pytest.approx(0.70)
    assert (wr.n, wr.wins, wr.ties, wr.losses) == (100, 70, 0, 30)
    assert wr.ci_low < 0.70 < wr.ci_high
    # binomial standard error sqrt(0.7 * 0.3 / 100) = 0.0458 -> a 95% half-width of about 0.090
    assert (wr.ci_high - wr.ci_low) / 2 == pytest.approx(0.0898, abs=0.012)
    big = win_rate([1.0] * 700 + [0.0] * 300, n_boot=4000, seed=0)
    assert big.rate == pytest.approx(0.70)
    assert (big.ci_high - big.ci_low) == pytest.approx((wr.ci_high - wr.ci_low) / math.sqrt(10), rel=0.15)
    assert win_rate([1.0] * 70 + [0.0] * 30, n_boot=4000, seed=0) == wr  # deterministic given the seed
    assert win_rate([1.0] * 70 + [0.0] * 30, n_boot=4000, seed=1) != wr


def test_ties_count_half():
    wr = win_rate([1.0, 0.5, 0.5, 0.0, 0.5], n_boot=200)
    assert wr.rate == pytest.approx(0.5)
    assert (wr.wins, wr.ties, wr.losses) == (1, 3, 1)
    np.testing.assert_allclose(pairwise_outcomes([1.0, 2.0, 3.0], [1.0, 1.0, 4.0]), [0.5, 1.0, 0.0])
    # several samples: every (policy sample, baseline sample) pair of a prompt, ties 1/2
    np.testing.assert_allclose(pairwise_outcomes([[2.0, 3.0], [1.0, 3.0]], [[1.0, 2.0], [1.0, 3.0]]),
                               [(1 + 0.5 + 1 + 1) / 4, (0.5 + 0 + 1 + 0.5) / 4])
    # sample counts may differ between the sides; within tie_tol counts as a tie
    np.testing.assert_allclose(pairwise_outcomes([[1.0, 3.0]], [2.0]), [0.5])
    np.testing.assert_allclose(pairwise_outcomes([1.0 + 1e-9], [1.0]), [0.5])


def test_bootstrap_mean_ci_is_per_prompt():
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 1.0, size=400)
    mean, low, high = bootstrap_mean_ci(values, n_boot=4000)
    assert mean == pytest.approx(values.mean())
    assert (high - low) / 2 == pytest.approx(1.96 * values.std() / 20, rel=0.12)
    # [n, k]: averaged per prompt first, so the interval is that of the per-prompt means
    grid = np.stack([values, values + 1.0], axis=1)
    assert bootstrap_mean_ci(grid, n_boot=4000) == pytest.approx((mean + 0.5, low + 0.5, high + 0.5))
    assert bootstrap_mean_ci([3.0] * 5, n_boot=50) == (3.0, 3.0, 3.0)


def test_bad_statistics_input_raises():
    with pytest.raises(ValueError, match="outside"):
        win_rate([0.2, 1.5])
    with pytest.raises(ValueError, match="finite"):
        win_rate([0.2, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        win_rate([])
    with pytest.raises(ValueError, match="prompts"):
        pairwise_outcomes([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="lengths"):
        length_controlled_win_rate([1.0, 0.0], [1, 2], [1, 2, 3])


def _newton_logistic(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Independent float64 reference: Newton-Raphson on the fractional-logit likelihood."""
    design = np.column_stack([np.ones_like(x), x])
    theta = np.zeros(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-design @ theta))
        grad = design.T @ (y - p)
        hess = design.T @ (design * (p * (1 - p))[:, None])
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-13:
            break
    return theta


def test_lc_glm_matches_a_float64_newton_fit():
    rng = np.random.default_rng(3)
    n = 300
    delta = rng.normal(15.0, 40.0, size=n)
    x = np.tanh(delta / delta.std())
    p_win = 1.0 / (1.0 + np.exp(-(0.4 + 1.3 * x)))
    u = rng.random(n)
    y = np.where(u < 0.15, 0.5, (rng.random(n) < p_win).astype(float))  # 15% ties
    theta, how = lc_glm_fit(y, x)
    assert how == "glm"
    np.testing.assert_allclose(theta, _newton_logistic(y, x), atol=1e-6)
    rate, low, high = length_controlled_win_rate(y, delta, np.zeros(n), n_boot=100)
    assert rate == pytest.approx(1.0 / (1.0 + math.exp(-theta[0])), abs=1e-12)
    assert low < rate < high


def test_lc_equals_raw_when_lengths_are_equal():
    rng = np.random.default_rng(1)
    y = rng.choice([0.0, 0.5, 1.0], size=80, p=[0.3, 0.1, 0.6])
    lengths = rng.integers(5, 50, size=80)
    wr = win_rate(y, n_boot=300, seed=7)
    lc = length_controlled_win_rate(y, lengths, lengths, n_boot=300, seed=7)
    assert lc == pytest.approx((wr.rate, wr.ci_low, wr.ci_high), abs=1e-12)
    # a constant length difference has no spread: nothing to control for either
    shifted = length_controlled_win_rate(y, lengths + 7, lengths, n_boot=300, seed=7)
    assert shifted == pytest.approx((wr.rate, wr.ci_low, wr.ci_high), abs=1e-12)


def test_lc_removes_a_pure_length_effect():
    rng = np.random.default_rng(0)
    n = 400
    delta = rng.normal(40.0, 50.0, size=n)
    x = np.tanh(delta / delta.std())
    # the judge only rewards length: logit P(win) = 0 + 2.5 x, i.e. a coin flip at equal length
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-2.5 * x))).astype(float)
    wr = win_rate(y, n_boot=200)
    lc, low, high = length_controlled_win_rate(y, delta, np.zeros(n), n_boot=200)
    assert wr.rate > 0.7 and wr.ci_low > 0.65
    assert low < 0.5 < high and abs(lc - 0.5) < 0.05


def test_lc_separation_moves_toward_half_without_warnings():
    # The policy wins exactly when it is longer: perfect separation, no finite maximum-likelihood fit.
    # The data only say "the boundary is near equal length", so the LC rate should land near 1/2.
    distances = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        delta = rng.normal(40.0, 50.0, size=200)
        y = (delta > 0).astype(float)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            theta, how = lc_glm_fit(y, np.tanh(delta / delta.std()))
            lc, low, high = length_controlled_win_rate(y, delta, np.zeros(200), n_boot=10)
        assert how == "ridge" and np.isfinite(theta).all()
        assert y.mean() > 0.75 and low <= lc <= high
        assert abs(lc - 0.5) < 0.6 * abs(y.mean() - 0.5)
        distances.append(abs(lc - 0.5))
    assert np.mean(distances) < 0.1


def test_lc_degenerate_inputs_do_not_raise():
    lengths = np.arange(10.0)
    assert length_controlled_win_rate([1.0] * 10, lengths, np.zeros(10), n_boot=20) == (1.0, 1.0, 1.0)
    assert length_controlled_win_rate([0.0] * 10, lengths, np.zeros(10), n_boot=20) == (0.0, 0.0, 0.0)
    assert length_controlled_win_rate([0.5] * 10, lengths, np.zeros(10), n_boot=20) == (0.5, 0.5, 0.5)
    assert lc_glm_fit([1.0], [0.3])[1] == "constant"
    assert length_controlled_win_rate([1.0, 0.0], [3, 3], [1, 1], n_boot=20)[0] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------- runner

JUDGE_FILE = '''
def count_e(prompts, responses):
    return [r.count("e") for r in responses]

def describe(prompts, responses):
    return [{"has_e": "e" in r, "long_answer": (len(r) > 20) if "?" in p else None}
            for p, r in zip(prompts, responses)]

def broken(prompts, responses):
    return [float("nan")] * len(responses)
'''

N_PROMPTS = 8


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory, tiny_model_dir):
    """A policy ``better`` that is the tiny model with the token 'e' boosted, a tiny reward model, a judge
    file (counts 'e') and prompt / preference files."""
    from rlhfkit.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    better = root / "better"
    tok = save_e_heavy_policy(tiny_model_dir, better)
    rm = build_tiny_model(root / "rm", reward=True, tokenizer=tok, seed=3)
    (root / "judge.py").write_text(JUDGE_FILE)
    prompts = [{"prompt": f"Tell me about item {i}" + ("?" if i % 2 else "."), "category": ["a", "b"][i % 2]}
               for i in range(N_PROMPTS)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    pairs = [{"prompt": f"Question {i}?", "chosen": f"a good answer {i}", "rejected": f"bad {i}"} for i in range(6)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"root": root, "base": str(tiny_model_dir), "better": str(better), "rm": str(rm),
            "judge": f"fn:{root / 'judge.py'}:count_e", "prompts": prompts}


def test_same_policy_against_itself(eval_files):
    f = eval_files
    report = evaluate_policies({"base": f["base"], "copy": f["base"]}, "base", f["prompts"], f["judge"],
                               reference=f["base"], num_samples=2, sampling=SamplingConfig(max_new_tokens=10),
                               n_boot=200)
    for name in ("base", "copy"):
        m = report["policies"][name]
        assert abs(m["kl"]) < 1e-4
        assert m["win_rate_vs_base"] == 0.5 and m["win_rate_ci_low"] <= 0.5 <= m["win_rate_ci_high"]
        assert (m["wins"], m["ties"], m["losses"]) == (0, N_PROMPTS, 0)
        assert m["lc_win_rate"] == 0.5
    assert report["policies"]["copy"]["judge_score"] == report["policies"]["base"]["judge_score"]


def _independent_outcome(mine: list[float], theirs: list[float]) -> float:
    total = 0.0
    for a in mine:
        for b in theirs:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(mine) * len(theirs))


def test_better_policy_win_rate_matches_recomputed_scores(eval_files, tmp_path):
    f = eval_files
    out = tmp_path / "out"
    k = 2
    report = evaluate_policies({"base": f["base"], "better": f["better"]}, "base", f["prompts"], f["judge"],
                               reference=f["base"], reward_model=f["rm"], num_samples=k,
                               sampling=SamplingConfig(max_new_tokens=10), n_boot=100, output_dir=out,
                               pairs=str(f["root"] / "pairs.jsonl"))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["policies"]["better"]["win_rate_vs_base"] == report["policies"]["better"]["win_rate_vs_base"]
    assert (saved["judge"], saved["baseline"], saved["num_prompts"], saved["num_samples"]) == (
        f["judge"], "base", N_PROMPTS, k)
    assert saved["sampling"]["max_new_tokens"] == 10 and saved["sampling"]["temperature"] == 1.0
    assert saved["paths"] == {"base": f["base"], "better": f["better"]}
    for name, metrics in saved["policies"].items():  # a flat table of numbers (None = not measured)
        assert all(v is None or isinstance(v, int | float) for v in metrics.values()), name

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * N_PROMPTS * k
    by = {(s["policy"], s["prompt_row"], s["sample"]): s for s in samples}
    for s in samples:
        assert s["score"] == s["response"].count("e")  # the judge, recomputed from the text
        assert s["category"] == ["a", "b"][(s["prompt_row"] - 1) % 2]
    outcomes = [_independent_outcome([by["better", p, j]["response"].count("e") for j in range(k)],
                                     [by["base", p, j]["response"].count("e") for j in range(k)])
                for p in range(1, N_PROMPTS + 1)]
    m = report["policies"]["better"]
    assert m["win_rate_vs_base"] == pytest.approx(sum(outcomes) / N_PROMPTS, abs=1e-12)
    assert (m["wins"], m["ties"], m["losses"]) == (sum(o > 0.5 for o in outcomes), sum(o == 0.5 for o in outcomes),
                                                   sum(o < 0.5 for o in outcomes))
    assert m["win_rate_vs_base"] > 0.8 and m["win_rate_ci_low"] > 0.5
    assert m["win_rate_ci_low"] <= m["win_rate_vs_base"] <= m["win_rate_ci_high"]
    assert 0.0 <= m["lc_win_rate_ci_low"] <= m["lc_win_rate"] <= m["lc_win_rate_ci_high"] <= 1.0
    mine = [s for s in samples if s["policy"] == "better"]
    assert m["judge_score"] == pytest.approx(np.mean([s["score"] for s in mine]))
    assert m["mean_length"] == pytest.approx(np.mean([s["length"] for s in mine]))
    assert m["reward_mean"] == pytest.approx(np.mean([s["reward"] for s in mine]), abs=1e-6)
    assert m["kl"] == pytest.approx(np.mean([s["kl"] for s in mine])) and m["kl"] > 1.0
    assert abs(report["policies"]["base"]["kl"]) < 1e-4
    # describe() flags: a rate over the responses where the flag applies (None = not applicable)
    assert m["has_e_rate"] == pytest.approx(np.mean(["e" in s["response"] for s in mine]))
    asked = [s for s in mine if "?" in s["prompt"]]
    assert len(asked) == N_PROMPTS // 2 * k
    assert m["long_answer_rate"] == pytest.approx(np.mean([len(s["response"]) > 20 for s in asked]))
    cat = report["by_category"]["better"]["a"]
    assert cat["n"] == N_PROMPTS // 2
    assert cat["win_rate"] == pytest.approx(np.mean(outcomes[0::2]))
    rm = report["rm"]
    assert rm["num_pairs"] == 6 and 0.0 <= rm["ci_low"] <= rm["accuracy"] <= rm["ci_high"] <= 1.0
    assert rm["accuracy"] * 6 == pytest.approx(round(rm["accuracy"] * 6))  # whole pairs (no exact ties)


def test_cli_end_to_end(eval_files, tmp_path, capsys):
    f = eval_files
    out = tmp_path / "cli"
    rc = main(["eval", "--policy", f"base={f['base']},better={f['better']}", "--baseline", "base",
               "--prompts", str(f["root"] / "prompts.jsonl"), "--judge", f["judge"], "--max-new-tokens", "6",
               "--max-prompts", "4", "--n-boot", "100", "--output-dir", str(out), "--batch-size", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "win vs base [CI]" in text and "has_e_rate" in text
    assert text.splitlines()[3].startswith("better")
    report = json.loads((out / "eval.json").read_text())
    assert report["num_prompts"] == 4 and set(report["policies"]) == {"base", "better"}
    for key in ("judge_score", "win_rate_vs_base", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate",
                "mean_length", "has_e_rate"):
        assert isinstance(report["policies"]["better"][key], float), key
    assert report["policies"]["better"]["kl"] is None  # no --reference
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("args, message", [
    (["--judge", "bogus:thing"], "judge 'bogus:thing': expected gold:DIR"),
    (["--judge", "fn:/nonexistent/judge.py:f"], "does not exist"),
    (["--baseline", "nobody"], "--baseline 'nobody' is not one of the policies: base"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "/nonexistent/prompts.jsonl: file not found"),
    (["--policy", "=x"], "expected NAME=PATH"),
])
def test_cli_errors_are_one_line(eval_files, capsys, args, message):
    f = eval_files
    base = {"--policy": f"base={f['base']}", "--prompts": str(f["root"] / "prompts.jsonl"),
            "--judge": f["judge"], "--max-new-tokens": "4"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    rc = main(["eval"] + [x for kv in base.items() for x in kv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err
    assert len(err.splitlines()) == 1 and err.startswith("rlhfkit eval: error:")


def test_bad_prompt_rows_name_the_row(eval_files):
    f = eval_files
    with pytest.raises(DataError, match=r"^prompts.jsonl, row 3, field 'prompt': missing prompt$"):
        evaluate_policies({"base": f["base"]}, "base", [{"prompt": " "}, {"prompt": "hi"}, {"text": "x"}],
                          f["judge"], prompts_source="prompts.jsonl")
    with pytest.raises(DataError, match="no usable prompts"):
        evaluate_policies({"base": f["base"]}, "base", [{"prompt": ""}], f["judge"])


def test_non_finite_judge_scores_name_the_judge(eval_files):
    f = eval_files
    with pytest.raises(Exception, match="judge .*broken.* returned nan"):
        evaluate_policies({"base": f["base"]}, "base", f["prompts"][:2], f"fn:{f['root'] / 'judge.py'}:broken",
                          sampling=SamplingConfig(max_new_tokens=3), n_boot=10)


def test_load_judge_specs(eval_files, tiny_tokenizer):
    f = eval_files
    judge = load_judge(f["judge"], tiny_tokenizer)
    assert callable(judge.describe) and judge.describe(["x?"], ["eeeeeeeeeeeeeeeeeeeeeeeee"]) == [
        {"has_e": True, "long_answer": True}]
    assert isinstance(load_judge(f["rm"], tiny_tokenizer), ModelReward)
    assert isinstance(load_judge(f"model:{f['rm']}", tiny_tokenizer), ModelReward)
    assert isinstance(load_judge("http:http://127.0.0.1:9/score", tiny_tokenizer), HTTPReward)
    with pytest.raises(ConfigError, match="gold judge folder '/nonexistent' does not exist"):
        load_judge("gold:/nonexistent", tiny_tokenizer)
    with pytest.raises(ConfigError, match="expected gold:DIR"):
        load_judge("/nonexistent/dir", tiny_tokenizer)


def test_gold_judge_spec_gives_flag_rates(eval_files, tmp_path):
    from rlhfkit.world import build_world

    world = build_world(seed=0)
    world.save(tmp_path / "world" / "world.json")
    requests = world.split("eval")[:3]
    rows = [{"prompt": r.prompt, "category": r.category} for r in requests]
    report = evaluate_policies({"base": eval_files["base"]}, "base", rows, f"gold:{tmp_path / 'world'}",
                               sampling=SamplingConfig(max_new_tokens=4), n_boot=20)
    m = report["policies"]["base"]
    assert report["judge"] == f"gold:{tmp_path / 'world'}"
    assert {"harmful_refusal_rate", "benign_over_refusal_rate", "hallucination_rate"} <= set(m)
    assert m["win_rate_vs_base"] == 0.5 and isinstance(m["judge_score"], float)
