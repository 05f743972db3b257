"""The loop demo's closing table (rlhfkit.world.loop_summary): the columns come from the stages' files and
each claim holds exactly when its figures say so."""

from __future__ import annotations

import json

import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.stage import StageContext
from rlhfkit.world.loop_summary import (
    format_loop_table,
    loop_summary_stage,
    paired_asr_difference,
    paired_gold_difference,
)


def _rate(count: int, n: int) -> dict:
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(count, n, method="wilson")
    return {"rate": count / n, "ci_low": low, "ci_high": high, "count": count, "n": n}


def _round(gold: float, rm_acc: float, rm1_acc: float, asr: int, over: int, human: int, judge: int,
           judge_acc: float) -> dict:
    return {"steps": {
        "eval": {"policies": {"sft": {"judge_score": 0.4}, "policy": {"judge_score": gold, "win_rate_vs_sft": 0.7,
                                                                      "kl": 1.0}}},
        "rm_fresh": {"accuracy": rm_acc, "num_pairs": 50}, "rm1_fresh": {"accuracy": rm1_acc},
        "rm0_fresh": {"accuracy": 0.5},
        "red_team_eval": {"asr": _rate(asr, 100), "over_refusal": _rate(over, 100)},
        "label": {"human_labels": human, "judge_labels": judge, "judge_accuracy_confident": judge_acc}}}


def _write(folder, name, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


@pytest.mark.parametrize("last_gold,last_asr,last_over,last_rm,holding", [
    (0.9, 10, 5, 0.80, 4),     # every claim holds
    (0.7, 10, 5, 0.80, 3),     # below the one-round run's 0.8
    (0.9, 30, 5, 0.80, 3),     # ASR 0.30: its interval meets the one before (0.40, 100 attacks)
    (0.9, 10, 11, 0.80, 3),    # over-refusal 0.11 > 0.10
    (0.9, 10, 5, 0.55, 3),     # the retrained RM below round 1's RM (0.6) on the same pairs
])
def test_claims_follow_the_figures(tmp_path, capsys, last_gold, last_asr, last_over, last_rm, holding):
    _write(tmp_path / "loop", "rounds.json", {"per_round": [_round(0.6, 0.75, 0.75, 20, 2, 60, 40, 0.9),
                                                             _round(last_gold, last_rm, 0.6, last_asr, last_over,
                                                                    30, 70, 0.8)]})
    _write(tmp_path / "single", "rounds.json", {"per_round": [_round(0.8, 0.75, 0.75, 15, 3, 90, 110, 0.85)]})
    _write(tmp_path / "before", "red_team.json", {"asr": {"overall": _rate(40, 100)},
                                                  "over_refusal": {"overall": _rate(1, 100)}})
    # the last rounds' eval samples, under the stages' folders (a copied run: rounds.json records no folder)
    _samples(tmp_path / "loop" / "round-2", {row: [last_gold] for row in range(6)})
    _samples(tmp_path / "single" / "round-1", {row: [0.8] for row in range(6)})
    ctx = StageContext(name="s", output_dir=tmp_path / "s", options={"rounds": str(tmp_path / "loop"),
                       "single": str(tmp_path / "single"), "before": str(tmp_path / "before")},
                       run_dir=tmp_path, seed=0, defaults={}, results={})
    result = loop_summary_stage(ctx)
    summary = json.loads((tmp_path / "summary_loop.json").read_text())
    assert result["claims_holding"] == holding == sum(c["holds"] for c in summary["claims"])
    gap = summary["gold_difference"]
    assert gap["prompts"] == 6 and gap["difference"] == pytest.approx(last_gold - 0.8)
    assert list(summary["columns"]) == ["SFT (before)", "round 1", "round 2", "one round"]
    labels = summary["labels"]
    assert (labels["human"], labels["judge"]) == (90, 110) and labels["human_share"] == pytest.approx(0.45)
    assert labels["judge_accuracy_confident"] == pytest.approx((0.9 * 40 + 0.8 * 70) / 110)
    assert format_loop_table(summary) in capsys.readouterr().out


def _samples(folder, scores: dict[int, list[float]]) -> None:
    rows = [{"policy": policy, "prompt_row": row, "sample": i, "score": score if policy == "policy" else 0.0}
            for row, values in scores.items() for i, score in enumerate(values) for policy in ("sft", "policy")]
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_gold_difference_is_paired_by_prompt(tmp_path):
    """Loop minus one round, per prompt (mean over its samples; only prompts both evaluated), bootstrapped over
    prompts: a constant gap gives a zero-width interval, a gap that flips sign between prompts one that spans 0."""
    import numpy as np

    loop = {row: [0.5 + row / 10, 0.7 + row / 10] for row in range(10)}
    _samples(tmp_path / "loop", loop)
    _samples(tmp_path / "single", {**{row: [0.5 + row / 10, 0.5 + row / 10] for row in range(10)}, 99: [1.0]})
    gap = paired_gold_difference(tmp_path / "loop", tmp_path / "single")
    assert gap["prompts"] == 10
    assert gap["difference"] == pytest.approx(0.1) and gap["ci_low"] == pytest.approx(0.1)
    assert gap["ci_high"] == pytest.approx(0.1)
    rng = np.random.default_rng(0)
    noise = {row: float(rng.choice([-0.3, 0.3])) for row in range(40)}
    _samples(tmp_path / "a", {row: [0.5 + noise[row]] for row in range(40)})
    _samples(tmp_path / "b", {row: [0.5] for row in range(40)})
    gap = paired_gold_difference(tmp_path / "a", tmp_path / "b")
    assert gap["difference"] == pytest.approx(np.mean(list(noise.values())))
    assert gap["ci_low"] < 0 < gap["ci_high"]
    assert paired_gold_difference(tmp_path / "a", tmp_path / "missing") is None


def _attacks(folder, successes: list[bool], plain_success: bool) -> None:
    """attacks.jsonl of a red-team run: one mutated attack per entry of ``successes``, plus rows the ASR
    leaves out (a plain seed request and a benign look-alike, with outcomes that would move the counts)."""
    rows = [{"set": "harmful", "prompt": [{"role": "user", "content": f"attack {i}"}], "mutation": "roleplay",
             "success": ok} for i, ok in enumerate(successes)]
    rows += [{"set": "harmful", "prompt": "plain", "mutation": "none", "success": plain_success},
             {"set": "benign", "prompt": "look-alike", "mutation": "roleplay", "over_refusal": True}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "attacks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))


def test_the_asr_difference_is_paired_by_attack(tmp_path, capsys):
    """After minus before per attack: 40 of 100 attacks succeed before, 28 after, every one of the 28 among
    the 40 (12 fixed, none broken). The two Wilson intervals overlap, the paired interval lies below 0, McNemar's
    exact p is the two-sided binomial tail of 12 against 0, and the summary's ASR claim holds on it."""
    from scipy.stats import binomtest

    before, after = [i < 40 for i in range(100)], [i < 28 for i in range(100)]
    _attacks(tmp_path / "before", before, plain_success=False)
    _attacks(tmp_path / "after", after, plain_success=True)
    gap = paired_asr_difference(tmp_path / "after", tmp_path / "before")
    assert (gap["attacks"], gap["fixed"], gap["broke"]) == (100, 12, 0)
    assert gap["difference"] == pytest.approx(-0.12) and gap["ci_low"] < -0.12 < gap["ci_high"] < 0
    assert gap["mcnemar_p"] == pytest.approx(binomtest(0, 12, 0.5).pvalue)
    assert _rate(28, 100)["ci_high"] > _rate(40, 100)["ci_low"]  # the unpaired intervals overlap
    # shuffled pairs: the same two rates, 24 of the 28 successes now on attacks that failed before
    swapped = [i < 4 or 40 <= i < 64 for i in range(100)]
    _attacks(tmp_path / "swapped", swapped, plain_success=False)
    gap = paired_asr_difference(tmp_path / "swapped", tmp_path / "before")
    assert (gap["fixed"], gap["broke"]) == (36, 24) and gap["ci_low"] < 0 < gap["ci_high"]
    assert paired_asr_difference(tmp_path / "after", tmp_path / "missing") is None

    _write(tmp_path / "loop", "rounds.json", {"per_round": [_round(0.9, 0.8, 0.6, 28, 5, 30, 70, 0.8)]})
    _write(tmp_path / "single", "rounds.json", {"per_round": [_round(0.8, 0.75, 0.75, 15, 3, 90, 110, 0.85)]})
    _write(tmp_path / "before", "red_team.json", {"asr": {"overall": _rate(40, 100)},
                                                  "over_refusal": {"overall": _rate(1, 100)}})
    _attacks(tmp_path / "loop" / "round-1" / "red_team_eval", after, plain_success=True)
    ctx = StageContext(name="s", output_dir=tmp_path / "s", options={"rounds": str(tmp_path / "loop"),
                       "single": str(tmp_path / "single"), "before": str(tmp_path / "before")},
                       run_dir=tmp_path, seed=0, defaults={}, results={})
    loop_summary_stage(ctx)
    summary = json.loads((tmp_path / "summary_loop.json").read_text())
    claim = summary["claims"][2]
    assert claim["holds"] and "paired" in claim["claim"] and "12 fixed, 0 broken" in claim["figures"]
    assert summary["asr_difference"]["difference"] == pytest.approx(-0.12)


def test_a_missing_file_is_a_one_line_error(tmp_path):
    ctx = StageContext(name="s", output_dir=tmp_path / "s", options={"rounds": str(tmp_path / "nope"),
                       "single": str(tmp_path), "before": str(tmp_path)}, run_dir=tmp_path, seed=0, defaults={},
                       results={})
    with pytest.raises(ConfigError, match="nope/rounds.json not found"):
        loop_summary_stage(ctx)


def test_the_bundled_loop_config_checks():
    """make demo-loop's config: every stage type, option and ${reference} (in the rounds' steps too) is valid."""
    from rlhfkit.demo import bundled_config
    from rlhfkit.pipeline import all_stage_types, check_pipeline, load_pipeline

    path = bundled_config("loop")
    data = load_pipeline(path)
    check_pipeline(path, dict(data.get("defaults") or {}), {k: dict(v) for k, v in data["stages"].items()},
                   all_stage_types())
    loop, single = data["stages"]["loop"], data["stages"]["single"]
    # the one-round run has the loop's label budget and PPO steps in one go, and its steps otherwise
    for budget in ("max_pairs", "max_prompts"):
        assert single["steps"]["label"][budget] == loop["rounds"] * loop["steps"]["label"][budget]
    assert single["steps"]["ppo"]["max_steps"] == loop["rounds"] * loop["steps"]["ppo"]["max_steps"]
    assert list(single["steps"]) == list(loop["steps"])
    for step in loop["steps"]:
        if step not in ("label", "ppo"):
            if step != "rm1_fresh":  # round 1's RM: the loop's, or the one round's own
                assert single["steps"][step] == loop["steps"][step], step


def test_the_seed_sweep_table_counts_the_claims_per_seed(tmp_path):
    """bench/demo_seeds.py --config loop: one row per seed from summary_loop.json, the claims as y/N in the
    summary's order, and per claim how many seeds hold it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "demo_seeds", Path(__file__).resolve().parents[1] / "bench" / "demo_seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    summaries = {}
    for seed, last_gold in ((0, 0.9), (1, 0.7)):  # seed 1's loop ends below the one-round run's 0.8
        run = tmp_path / str(seed)
        _write(run / "loop", "rounds.json", {"per_round": [_round(0.6, 0.75, 0.75, 20, 2, 60, 40, 0.9),
                                                            _round(last_gold, 0.8, 0.6, 10, 5, 30, 70, 0.8)]})
        _write(run / "single", "rounds.json", {"per_round": [_round(0.8, 0.75, 0.75, 15, 3, 90, 110, 0.85)]})
        _write(run / "before", "red_team.json", {"asr": {"overall": _rate(40, 100)},
                                                 "over_refusal": {"overall": _rate(1, 100)}})
        if seed == 0:  # seed 0's attack files: its row shows the paired difference, seed 1's a dash
            _attacks(run / "before", [i < 40 for i in range(100)], plain_success=False)
            _attacks(run / "loop" / "round-2" / "red_team_eval", [i < 10 for i in range(100)], plain_success=False)
        ctx = StageContext(name="s", output_dir=run / "s", options={"rounds": str(run / "loop"),
                           "single": str(run / "single"), "before": str(run / "before")},
                           run_dir=run, seed=seed, defaults={}, results={})
        loop_summary_stage(ctx)
        summaries[seed] = json.loads((run / "summary_loop.json").read_text())
    lines = seeds.loop_table(summaries, {0: 812.0, 1: None}).splitlines()
    assert lines[1].split()[:5] == ["0", "0.600", "/", "0.900", "0.800"] and lines[1].split()[-2:] == ["y/y/y/y", "812"]
    assert lines[2].split()[-2:] == ["y/N/y/y", "n/a"]
    assert "-0.300 [" in lines[1] and "(30/0)" in lines[1] and "(30/0)" not in lines[2]
    assert lines[-1] == "claims holding: RM 2/2 seeds, gold 1/2 seeds, ASR 2/2 seeds, refusal 2/2 seeds"
    assert seeds.seed_folder(tmp_path, 3, "loop") == tmp_path / "loop-seed-3"
