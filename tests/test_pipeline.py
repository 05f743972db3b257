"""`rlhfkit pipeline`: a whole demo-shaped chain on a tiny model, skipping, forcing, and config errors."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import run_pipeline

TINY = """
output_dir: {out}
seed: 3
defaults: {{num_threads: 0, progress_bar: false, max_length: 64, eval_on_start: false}}
stages:
  world: {{type: world, sft_demonstrations: 60, rl_prompts: 64}}
  base: {{type: tiny_model, corpus: "${{world}}/tokenizer_corpus.txt", vocab: 400, layers: 1, hidden: 32}}
  pretrain: {{type: sft, model: "${{base}}", dataset: "${{world}}/pretrain.jsonl", max_steps: 12,
             per_device_batch_size: 16, learning_rate: 3.0e-3}}
  sft: {{type: sft, model: "${{pretrain}}", dataset: "${{world}}/sft.jsonl", max_steps: 6, learning_rate: 1.0e-3}}
  preferences: {{type: collect, policy: "${{sft}}", world: "${{world}}", num_samples: 3, max_prompts: 24,
                heldout_samples: 2, max_new_tokens: 12, explore_samples: 1, explore_temperature: 1.6,
                off_prompt_samples: 1}}
  rm: {{type: rm, model: "${{sft}}", dataset: "${{preferences}}/ranked.jsonl",
       eval_dataset: "${{preferences}}/gold_pairs.jsonl", max_steps: 4}}
  rm_judge: {{type: judge, judge: "model:${{rm}}", pairs: "${{preferences}}/gold_pairs.jsonl", max_pairs: 6}}
  ppo: {{type: ppo, model: "${{sft}}", reward_model: "${{rm}}", dataset: "${{world}}/prompts_train.jsonl",
        eval_dataset: "${{world}}/prompts_eval.jsonl", heldout_judge: "gold:${{world}}", eval_steps: 1,
        eval_on_start: true, max_steps: 2, prompts_per_step: 4, num_generations: 2, max_new_tokens: 10, learning_rate: 1.0e-4}}
  dpo: {{type: dpo, model: "${{sft}}", dataset: "${{preferences}}/ranked.jsonl", max_steps: 3}}
  eval: {{type: eval, policies: {{sft: "${{sft}}", ppo: "${{ppo}}", dpo: "${{dpo}}"}}, baseline: sft,
         prompts: "${{world}}/prompts_eval.jsonl", judge: "gold:${{world}}", reference: "${{sft}}",
         reward_model: "${{rm}}", pairs: "${{preferences}}/gold_pairs.jsonl", num_samples: 1,
         max_new_tokens: 10, n_boot: 200}}
  summary: {{type: summary, eval: "${{eval}}"}}
  report: {{type: report}}
"""


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    config = root / "tiny.yaml"
    config.write_text(TINY.format(out=root / "run"))
    lines: list[str] = []
    results = run_pipeline(config, log=lines.append)
    return config, root / "run", results, lines


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_a_stable_summary(tiny_pipeline):
    _, run, results, lines = tiny_pipeline
    assert [line.split("]")[1].split("(")[0].strip() for line in lines if line.startswith("[")] == [
        "world", "base", "pretrain", "sft", "preferences", "rm", "rm_judge", "ppo", "dpo", "eval", "summary",
        "report"]
    summary = json.loads((run / "summary.json").read_text())
    for policy in ("sft", "ppo", "dpo"):
        for key in ("win_rate_vs_sft", "win_rate_ci_low", "harmful_refusal_rate", "benign_over_refusal_rate",
                    "kl_to_sft", "judge_score", "mean_length"):
            assert isinstance(summary[policy][key], float) and math.isfinite(summary[policy][key]), (policy, key)
    assert summary["sft"]["win_rate_vs_sft"] == 0.5
    assert abs(summary["sft"]["kl_to_sft"]) < 1e-4
    assert 0.0 <= summary["rm"]["gold_accuracy"] <= 1.0
    assert summary["wall_seconds"] > 0 and summary["annotators"]["prompts_labelled"] > 0
    # the policy's hot samples are ranked beside its own, never put in the on-policy file DPO reads
    ranked = _rows(run / "preferences" / "ranked.jsonl")
    sources = Counter(s for r in ranked for s in r["sources"])
    assert sources["explore"] > 0 and sources["policy"] > 0 and sources["off_prompt"] > 0, sources
    own = {(json.dumps(r["prompt"]), x) for r in ranked for x, s in zip(r["responses"], r["sources"]) if s == "policy"}
    on_policy = _rows(run / "preferences" / "ranked_policy.jsonl")
    assert on_policy and all((json.dumps(r["prompt"]), x) in own for r in on_policy for x in r["responses"])
    # the PPO run was watched by the held-out gold judge
    ppo_rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    held = [r["eval_heldout_reward"] for r in ppo_rows if "eval_heldout_reward" in r]
    assert len(held) >= 2 and all(math.isfinite(h) for h in held)
    # its standard error (the detector's noise floor): positive, below the gold judge's score range
    assert all(0 < r["eval_heldout_reward_se"] < 1.6 for r in ppo_rows if "eval_heldout_reward" in r)
    assert (run / "ppo" / "best_heldout" / "config.json").exists()
    # evaluations at steps 0 (eval_on_start), 1 and 2; the best policy is named by its metrics row's step
    assert [r["step"] for r in ppo_rows if "eval_heldout_reward" in r] == [0, 1, 2]
    best = max((r for r in ppo_rows if "eval_heldout_reward" in r), key=lambda r: r["eval_heldout_reward"])
    assert int((run / "ppo" / "best_heldout" / "step.txt").read_text()) == best["step"]
    assert "hacking" in json.loads((run / "ppo" / "summary.json").read_text())
    assert (run / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_pipeline_skips_done_stages_and_force_reruns(tiny_pipeline):
    config, run, _, _ = tiny_pipeline
    lines: list[str] = []
    run_pipeline(config, log=lines.append)
    assert sum("skipped" in line for line in lines) == 12
    assert not any("warning" in line for line in lines)  # nothing changed since the stages ran
    # a finished stage whose options changed since is still skipped, but not silently: the log names them
    lines.clear()
    changed = config.with_name("changed.yaml")
    changed.write_text(config.read_text().replace("max_steps: 3}", "max_steps: 5}").replace(
        "type: world, sft_demonstrations: 60", "type: world, sft_demonstrations: 61"))
    run_pipeline(changed, log=lines.append)
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 2, lines
    assert "world was done with other options (sft_demonstrations: 60 -> 61)" in warnings[0]
    assert "dpo was done with other options (max_steps: 3 -> 5)" in warnings[1]
    assert "--force dpo reruns it" in warnings[1]
    # a run folder copied whole is the same run: its stages' paths into the old folder count as the new one's
    copy = run.with_name("copied")
    shutil.copytree(run, copy)
    lines.clear()
    run_pipeline(config, output_dir=str(copy), log=lines.append)
    assert sum("skipped" in line for line in lines) == 12 and not any("warning" in line for line in lines), lines
    stamp = (run / "dpo" / "stage_done.json").stat().st_mtime_ns
    lines.clear()
    run_pipeline(config, force="dpo", only="dpo", log=lines.append)
    assert (run / "dpo" / "stage_done.json").stat().st_mtime_ns > stamp
    assert any(line.startswith("[9/12] dpo (dpo) ->") for line in lines)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_judge_stage_agreement_is_a_recount_of_its_files(tiny_pipeline):
    """The AI judge (the reward model) vs the gold labels of the held-out pairs, recounted by hand."""
    _, run, results, _ = tiny_pipeline
    gold = _rows(run / "preferences" / "gold_pairs.jsonl")
    assert len(gold) > 6  # max_pairs: 6 labels the first six only
    gold = gold[:6]
    labelled = _rows(run / "rm_judge" / "pairs.jsonl")
    s = results["rm_judge"]
    assert s["pairs"] == len(gold) > 0 and s["compared"] == len(labelled) == len(gold) - s["ties"] - s["unlabelled"]
    # row i was shown with the gold-chosen reply in slot a when i is even (the labeller alternates)
    refs, preds = [], []
    for row in labelled:
        i = row["source_row"] - 1
        ref = "a" if i % 2 == 0 else "b"
        agrees = row["chosen"] == gold[i]["chosen"] and row["rejected"] == gold[i]["rejected"]
        refs.append(ref)
        preds.append(ref if agrees else {"a": "b", "b": "a"}[ref])
    accuracy = sum(r == p for r, p in zip(refs, preds)) / len(refs)
    assert s["accuracy"] == pytest.approx(accuracy)
    expected = sum((refs.count(x) / len(refs)) * (preds.count(x) / len(preds)) for x in "ab")
    if expected < 1:
        assert s["cohen_kappa"] == pytest.approx((accuracy - expected) / (1 - expected))
    # a scoring judge gives the same verdict in both orders: no inconsistency, no position bias
    assert s["inconsistent"] == 0 and s["position_biased"] is False
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ai_judges"]["rm_judge"]["accuracy"] == pytest.approx(accuracy)
    from rlhfkit.world.stages import format_summary

    assert f"AI judge model:{run / 'rm'} vs gold on {len(labelled)} held-out pairs: accuracy {accuracy:.3f}" \
        in format_summary(summary)


TINY_CAI = """
  cai_data: {{type: cai_world, world: "${{world}}", demonstrations: 40, teaching: 40}}
  sft_helpful: {{type: sft, model: "${{pretrain}}", dataset: "${{cai_data}}/sft_helpful.jsonl", max_length: 192,
                max_steps: 4, learning_rate: 1.0e-3}}
  cai: {{type: cai, policy: "${{sft_helpful}}", prompts: "${{cai_data}}/red_team.jsonl",
        constitution: "${{cai_data}}/constitution.yaml", samples_per_prompt: 2, max_new_tokens: 8}}
  cai_gold: {{type: revision_preference, cai: "${{cai}}", judge: "gold:${{world}}", n_boot: 200}}
  cai_dpo: {{type: dpo, model: "${{sft_helpful}}", dataset: "${{cai}}/pairs.jsonl", max_steps: 2}}
  cai_eval: {{type: eval, policies: {{helpful: "${{sft_helpful}}", cai_dpo: "${{cai_dpo}}"}}, baseline: helpful,
             prompts: "${{world}}/prompts_eval.jsonl", judge: "gold:${{world}}", num_samples: 1,
             max_new_tokens: 8, n_boot: 200}}
  cai_summary: {{type: summary, eval: "${{cai_eval}}", file: summary_cai.json}}
"""


@pytest.mark.slow
def test_cai_stages_on_a_tiny_config(tiny_pipeline, tmp_path):
    """world -> helpful-only SFT with critique/revision teaching -> cai -> gold comparison -> DPO -> eval, in
    the tiny pipeline's folder (its world/base/pretrain are reused, as cai.yaml reuses the demo's)."""
    from rlhfkit.world import load_gold_judge

    config, run, _, _ = tiny_pipeline
    head = config.read_text().split("  sft:")[0]  # output_dir, seed, defaults, world, base, pretrain
    cai_config = tmp_path / "cai.yaml"
    cai_config.write_text(head + TINY_CAI.format())
    demo_summary = (run / "summary.json").read_text()
    lines: list[str] = []
    results = run_pipeline(cai_config, log=lines.append)
    assert sum("skipped" in line for line in lines) == 3  # world, base, pretrain
    data = results["cai_data"]
    red = _rows(run / "cai_data" / "red_team.jsonl")
    assert data["red_team_prompts"] == len(red) > 0 and all(r["category"] == "harmful" for r in red)
    red_prompts = {r["prompt"][0]["content"] for r in red}
    taught = {r["messages"][0]["content"] for r in _rows(run / "cai_data" / "sft_helpful.jsonl")
              if len(r["messages"]) == 6}
    held_out = {r["prompt"][0]["content"] for r in _rows(run / "world" / "prompts_eval.jsonl")}
    assert taught and not red_prompts & taught and not red_prompts & held_out

    trace = _rows(run / "cai" / "trace.jsonl")
    assert len(trace) == 2 * len(red)
    pairs = _rows(run / "cai" / "pairs.jsonl")
    changed = [t for t in trace if t["final"].strip() != t["initial"].strip()]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == \
        [(t["final"], t["initial"]) for t in changed]
    # the gold preference for the revisions, recounted from the trace: per prompt, then over prompts
    gold = load_gold_judge(run / "world")
    by_prompt: dict[str, list[float]] = {}
    for t in trace:
        final, initial = (gold.judge(t["prompt"], x).total for x in (t["final"], t["initial"]))
        by_prompt.setdefault(t["prompt"][0]["content"], []).append(
            1.0 if final > initial else 0.5 if final == initial else 0.0)
    s = results["cai_gold"]
    assert s["n_prompts"] == len(by_prompt) == len(red) and s["n_revisions"] == len(trace)
    assert s["revision_preferred"] == pytest.approx(sum(sum(v) / len(v) for v in by_prompt.values()) / len(red))
    assert s["wins"] == sum(v.count(1.0) for v in by_prompt.values())
    assert s["ci_low"] <= s["revision_preferred"] <= s["ci_high"]

    summary = json.loads((run / "summary_cai.json").read_text())
    assert summary["baseline"] == "helpful" and summary["cai"]["cai_gold"]["revision_preferred"] == \
        s["revision_preferred"]
    for policy in ("helpful", "cai_dpo"):
        for key in ("harmful_refusal_rate", "benign_over_refusal_rate", "win_rate_vs_helpful"):
            assert isinstance(summary[policy][key], float), (policy, key)
    assert (run / "summary.json").read_text() == demo_summary  # the other config's summary is left alone


def test_revision_preference_counts_wins_ties_and_losses_per_prompt(tmp_path):
    """A tiny model's revisions all tie with gold; here scripted revisions win, tie and lose."""
    import random

    from rlhfkit.world import build_world

    world = build_world(0)
    world.save(tmp_path / "world" / "world.json")
    rng = random.Random(0)
    harmful = world.split("train", "harmful")[:2]
    benign = world.split("train", "benign")[0]

    def reply(req, style):
        return world.respond(req, style, rng)

    # prompt 1: win, tie, loss -> 0.5; prompt 2: win, win -> 1; prompt 3 (benign): wrong -> right: win -> 1
    script = [(harmful[0], "comply", "redirect"), (harmful[0], "redirect", "redirect"),
              (harmful[0], "redirect", "comply"), (harmful[1], "comply", "over_refusal"),
              (harmful[1], "comply", "redirect"), (benign, "wrong", "concise")]
    (tmp_path / "cai").mkdir()
    (tmp_path / "cai" / "trace.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": req.prompt}], "initial": reply(req, a),
                    "final": reply(req, b)}) + "\n" for req, a, b in script))
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  pref: {{type: revision_preference, "
                      f"cai: {tmp_path / 'cai'}, judge: 'gold:{tmp_path / 'world'}', n_boot: 500}}\n")
    s = run_pipeline(config, log=lambda _: None)["pref"]
    assert (s["wins"], s["ties"], s["losses"], s["n_prompts"], s["n_revisions"]) == (4, 1, 1, 3, 6)
    assert s["revision_preferred"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert 0.5 <= s["ci_low"] < s["revision_preferred"] < s["ci_high"] == pytest.approx(1.0)  # over prompts
    outcomes = [r["outcome"] for r in _rows(tmp_path / "run" / "pref" / "outcomes.jsonl")]
    assert outcomes == [1.0, 0.5, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("stages, message", [
    ("a: {type: sft, model: '${nowhere}'}", r"stage 'a': unknown reference \$\{nowhere\}"),
    ("a: {type: judge, judge: 'gold:x', pairs: /no/pairs.jsonl}", "stage 'a': pairs file /no/pairs.jsonl not found"),
    ("a: {type: cai, policy: x}", "stage 'a': option 'prompts' is required"),
    ("a: {type: revision_preference, cai: /no/cai, judge: 'gold:x'}", r"stage 'a': /no/cai/trace.jsonl not found"),
    ("a: {type: teleport}", "stage 'a': unknown type 'teleport'"),
    ("a: {type: sft, learning_rat: 0.1}", "stage 'a': unknown sft option 'learning_rat'"),
    ("a: [1, 2]", "stage 'a' needs a mapping with a 'type'"),
    ("a: {type: rm, seed_offset: 1.5}", "stage 'a': seed_offset takes a whole number"),
    ("a: {type: rm, seed: 3, seed_offset: 1}", "stage 'a': seed_offset .* give one of them"),
])
def test_pipeline_config_errors_are_one_line(tmp_path, stages, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  {stages}\n")
    with pytest.raises(ConfigError, match=message):
        run_pipeline(config, log=lambda _: None)


def test_seed_offset_keeps_an_ensemble_member_apart_on_every_pipeline_seed(tmp_path, monkeypatch):
    """hacking.yaml's second proxy RM once had ``seed: 1``: on pipeline seed 1 it was the first RM again, and the
    "ensemble" one model. ``seed_offset`` adds to the pipeline's seed instead."""
    import rlhfkit.pipeline as pipeline

    seen: dict[str, int] = {}
    monkeypatch.setattr(pipeline, "run_trainer", lambda trainer, config: seen.update({config.output_dir: config.seed}))
    config = tmp_path / "ens.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  rm_a: {{type: rm, model: m, dataset: d}}\n"
                      "  rm_b: {type: rm, model: m, dataset: d, seed_offset: 1000}\n")
    for seed in (0, 1, 7):
        seen.clear()
        run_pipeline(config, seed=seed, force="rm_a,rm_b", log=lambda _: None)
        assert sorted(seen.values()) == [seed, seed + 1000]


def test_pipeline_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["pipeline", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pipeline config not found" in err


@pytest.mark.parametrize("name", ["demo", "hacking", "cai", "compare", "tools", "eval", "loop"])
def test_every_bundled_config_checks(name):
    """Each config `rlhfkit demo --config NAME` runs: every stage type, option and ${reference} is valid (a
    misspelt option would otherwise fail only minutes into `make demo`)."""
    from rlhfkit.demo import bundled_config
    from rlhfkit.pipeline import all_stage_types, check_pipeline, load_pipeline

    path = bundled_config(name)
    data = load_pipeline(path)
    check_pipeline(path, dict(data.get("defaults") or {}), {k: dict(v) for k, v in data["stages"].items()},
                   all_stage_types())


def test_bundled_configs_share_their_common_stages():
    """The other bundled configs reuse the demo's folder: a stage both define must be defined the same way, or
    whichever config ran first would silently decide the other's world / models."""
    from importlib.resources import files

    from rlhfkit.options import read_yaml

    configs = files("rlhfkit") / "configs"
    demo = read_yaml(str(configs / "demo.yaml"))
    for other_name, common in (("hacking", {"world", "base", "pretrain", "sft"}),
                               ("cai", {"world", "base", "pretrain"}),
                               ("compare", {"world", "base", "pretrain", "sft", "preferences", "rm", "ppo", "dpo"}),
                               ("eval", {"world", "base", "pretrain", "sft", "preferences", "rm", "rm2", "ppo", "dpo",
                                         "eval"})):
        other = read_yaml(str(configs / f"{other_name}.yaml"))
        assert demo["output_dir"] == other["output_dir"] and demo["seed"] == other["seed"]
        # (a shared name means "done before": a report stage shared with the demo would never rebuild)
        shared = set(demo["stages"]) & set(other["stages"])
        assert common <= shared, other_name
        for name in shared:
            assert demo["stages"][name] == other["stages"][name], (other_name, name)
        assert demo["defaults"] == other["defaults"], other_name
    # the comparison evaluates as the demo does, over more policies (its own stage: the demo's eval is done)
    compare = read_yaml(str(configs / "compare.yaml"))["stages"]
    assert {k: v for k, v in compare["compare_eval"].items() if k != "policies"} == \
        {k: v for k, v in demo["stages"]["eval"].items() if k != "policies"}
    assert demo["stages"]["eval"]["policies"].items() <= compare["compare_eval"]["policies"].items()


# -------------------------------------------------- the methods comparison (compare.yaml, issue 22)

# compare.yaml's stages, shrunk: option overrides by stage name (every trainer capped by max_steps)
COMPARE_SHRINK: dict[str, dict] = {
    "world": {"sft_demonstrations": 60, "rl_prompts": 64, "num_countries": 6},
    "base": {"vocab": 400, "layers": 1, "hidden": 32},
    "pretrain": {"max_steps": 12, "per_device_batch_size": 16},
    "sft": {"max_steps": 6, "num_epochs": 1},
    "preferences": {"num_samples": 3, "rounds": 1, "max_prompts": 16, "heldout_samples": 2, "max_new_tokens": 12,
                    "other_samples": 1, "explore_samples": 1},
    **{name: {"max_steps": 4} for name in ("rm", "rm2")},
    "ppo": {"max_steps": 2, "prompts_per_step": 4, "max_new_tokens": 10},
    "grpo": {"max_steps": 2, "prompts_per_step": 2, "max_new_tokens": 10},
    **{name: {"max_steps": 2} for name in ("dpo", "kto", "simpo", "orpo")},
    "compare_eval": {"num_samples": 1, "max_new_tokens": 10, "n_boot": 100, "batch_size": 32, "max_prompts": 24},
}


@pytest.mark.slow
def test_compare_config_shrunk_runs_every_method_into_one_summary(tmp_path):
    """compare.yaml itself, every stage shrunk to a tiny size: each method trains from the SFT model and lands
    in summary_compare.json (and the closing table) with finite figures."""
    from importlib.resources import files

    import yaml

    from rlhfkit.options import read_yaml
    from rlhfkit.registry import TRAINERS
    from rlhfkit.world.stages import format_summary

    data = read_yaml(str(files("rlhfkit") / "configs" / "compare.yaml"))
    stages = data["stages"]
    assert {stages[n]["type"] for n in stages} >= {"ppo", "grpo", "dpo", "kto", "simpo", "orpo", "eval", "summary"}
    assert set(COMPARE_SHRINK) <= set(stages)
    for name, opts in stages.items():
        opts.update(COMPARE_SHRINK.get(name, {}))
        if opts["type"] in TRAINERS:
            assert opts.get("max_steps", -1) > 0, name  # nothing trains for epochs in the smoke test
    # one torch thread: on cores busy with other work, two threads wait on each other (90 s -> 16 s here)
    data.update(output_dir=str(tmp_path / "run"), seed=3,
                defaults={**data["defaults"], "progress_bar": False, "max_length": 64, "num_threads": 1})
    config = tmp_path / "compare_tiny.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    run_pipeline(config, log=lambda _: None)

    summary = json.loads((tmp_path / "run" / "summary_compare.json").read_text())
    policies = stages["compare_eval"]["policies"]
    assert set(policies) >= {"sft", "ppo", "grpo", "dpo", "kto", "simpo", "orpo"}
    for policy in policies:
        for key in ("win_rate_vs_sft", "win_rate_ci_low", "judge_score", "kl_to_sft", "mean_length"):
            assert isinstance(summary[policy][key], float) and math.isfinite(summary[policy][key]), (policy, key)
    assert summary["sft"]["win_rate_vs_sft"] == 0.5
    assert all(summary[p]["train_seconds"] > 0 for p in policies)  # each method's cost, from its stage
    table = format_summary(summary)
    assert all(any(line.split()[0] == p for line in table.splitlines() if line.strip()) for p in policies), table
    assert (tmp_path / "run" / "report_compare.html").exists()
    assert not (tmp_path / "run" / "summary.json").exists()  # the demo's summary is the demo's


def test_summary_and_closing_table_take_any_set_of_policies(tmp_path):
    """A fake eval.json with policies beyond base/sft/ppo/dpo (one with a long name): every one becomes a
    summary row with kl_to_<baseline> and the training stage's wall time, and a row of the closing table."""
    from rlhfkit.stage import StageContext
    from rlhfkit.world.stages import format_summary, summary_stage

    names = ["sft", "ppo", "grpo", "kto", "simpo", "orpo", "reinforce_pp_long_name"]
    metrics = {n: {"judge_score": 0.1 * i, "win_rate_vs_sft": 0.5 + 0.05 * i, "win_rate_ci_low": 0.4 + 0.05 * i,
                   "kl": 0.01 * i, "mean_length": 10.0 + i} for i, n in enumerate(names)}
    eval_dir = tmp_path / "compare_eval"
    eval_dir.mkdir()
    (eval_dir / "eval.json").write_text(json.dumps({"baseline": "sft", "judge": "gold:w", "policies": metrics}))
    # the pipeline's record of the eval stage: its policies are stage folders of the run (but one)
    paths = {n: str(tmp_path / n) for n in names if n != "orpo"} | {"orpo": "/elsewhere/orpo"}
    (eval_dir / "stage_done.json").write_text(json.dumps({"type": "eval", "options": {"policies": paths}}))
    results = {n: {"wall_seconds": 10.0 + i} for i, n in enumerate(names)}
    summary_stage(StageContext(name="s", output_dir=tmp_path / "s", options={"eval": str(eval_dir),
                               "file": "summary_x.json"}, run_dir=tmp_path, seed=0, defaults={}, results=results))
    summary = json.loads((tmp_path / "summary_x.json").read_text())
    for i, n in enumerate(names):
        assert summary[n]["kl_to_sft"] == pytest.approx(0.01 * i) and "kl" not in summary[n]
        assert summary[n].get("train_seconds") == (None if n == "orpo" else 10.0 + i), n
    lines = format_summary(summary).splitlines()
    rows = [line for line in lines if line.split() and line.split()[0] in names]
    assert [r.split()[0] for r in rows] == names
    header = lines[0]
    assert all(len(r) == len(header) for r in rows)  # a long name widens the first column, not the rest
    assert rows[-1].split()[1:4] == [f"{0.6:.3f}", f"{0.8:.3f}", f"{0.7:.3f}"]


def test_demo_seeds_lists_the_policies_of_the_summary():
    """bench/demo_seeds.py: the main demo's table keeps its rows (sft, ppo, dpo: not the pretrained base); a
    compare summary lists every method, with its training time; the other methods' bar is CI low > 0.5."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "demo_seeds", Path(__file__).resolve().parents[1] / "bench" / "demo_seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)

    def fake(names, ci_low):
        row = {key: 0.6 for key, _ in seeds.COLUMNS.values()}
        return {"baseline": "sft", **{n: {**row, "win_rate_ci_low": ci_low, "train_seconds": 7.0} for n in names},
                "rm": {"gold_accuracy": 0.9}, "annotators": {"krippendorff_alpha": 0.5}, "wall_seconds": 100.0}

    demo = {0: fake(["base", "sft", "ppo", "dpo"], 0.6)}
    lines = seeds.table(demo).splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["sft", "ppo", "dpo"] * 3 and "train s" not in lines[0]
    methods = ["sft", "ppo", "grpo", "dpo", "kto", "simpo", "orpo"]
    compare = {0: fake(["base", *methods], 0.6), 1: fake(["base", *methods], 0.4)}
    lines = seeds.table(compare, train_time=True).splitlines()
    assert [line.split()[1] for line in lines[1:]] == methods * 4 and "train s" in lines[0]
    missed = seeds.misses(compare)
    assert {m.split(":")[1].split()[0] for m in missed if m.startswith("seed 1") and "CI low" in m} == \
        set(methods) - {"sft"}
    assert seeds.summary_name(None) == "summary.json" and seeds.summary_name("compare") == "summary_compare.json"


# -------------------------------------------------- the whole file is checked before its first stage runs (issue 20)


@pytest.mark.parametrize("defaults, stage, message", [
    ("{}", "{type: sft, model: x, learnig_rate: 0.1}",
     "stage 'late': unknown sft option 'learnig_rate'; did you mean 'learning_rate'? (see rlhfkit sft --help)"),
    ("{num_thread: 1}", "{type: sft, model: x}",
     "defaults: unknown option 'num_thread'; did you mean 'num_threads'?"),
    ("{}", "{type: eval, policies: {a: x}, prompts: p.jsonl, judge: 'gold:w', num_sample: 2}",
     "stage 'late': unknown eval option 'num_sample'; did you mean 'num_samples'?"),
    ("{}", "{type: collect, policy: x, world: w, temprature: 0.5}",
     "stage 'late': unknown collect option 'temprature'; did you mean 'temperature'?"),
    ("{}", "{type: sft, model: x, max_steps: many}", "stage 'late': option 'max_steps' = 'many' is not a int"),
    ("{}", "{type: tiny-model}", "stage 'late': unknown type 'tiny-model'; did you mean 'tiny_model'?"),
])
def test_a_misspelt_key_anywhere_stops_the_pipeline_before_any_stage_ran(tmp_path, capsys, defaults, stage,
                                                                         message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a tiny corpus\n" * 20)
    config = tmp_path / "p.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndefaults: {defaults}\nstages:\n"
                      f"  early: {{type: tiny_model, corpus: {corpus}, vocab: 300, layers: 1, hidden: 16}}\n"
                      f"  late: {stage}\n")
    assert main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"rlhfkit pipeline: error: {config}: ") and message in err, err
    assert not (tmp_path / "run").exists()  # not even the first stage ran


def test_eval_stage_options_default_as_the_eval_command(tmp_path, monkeypatch, tiny_model_dir):
    """The eval stage and `rlhfkit eval` given the same options reach evaluate_policies with the same
    arguments: the stage's defaults are the command's (once they differed: 4 samples vs 1, 48 vs 128 tokens)."""
    from rlhfkit.eval import runner
    from rlhfkit.stage import StageContext
    from rlhfkit.stages import eval_stage

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n')
    calls = []
    monkeypatch.setattr(runner, "evaluate_policies", lambda *a, **k: calls.append((a, k)) or {"policies": {}})
    monkeypatch.setattr(runner, "format_table", lambda report: "")
    out = tmp_path / "eval"
    eval_stage(StageContext(name="eval", output_dir=out, options={
        "policies": {"base": str(tiny_model_dir)}, "prompts": str(prompts), "judge": "fn:j.py:f"},
        run_dir=tmp_path, seed=0, defaults={}, results={}))
    runner.main(["--policy", f"base={tiny_model_dir}", "--prompts", str(prompts), "--judge", "fn:j.py:f",
                 "--seed", "100", "--output-dir", str(out)])
    (stage_args, stage_kwargs), (cli_args, cli_kwargs) = calls
    assert stage_args == cli_args and stage_kwargs == cli_kwargs
    assert stage_kwargs["num_samples"] == 1 and stage_kwargs["sampling"].max_new_tokens == 128
    assert stage_kwargs["n_boot"] == 2000 and stage_kwargs["batch_size"] == 8


def test_demo_writes_where_its_config_says_unless_told(tmp_path, monkeypatch):
    """`rlhfkit demo --config FILE` without --output-dir uses the config's output_dir (loop.yaml and tools.yaml
    have worlds of their own and must not land in, or reuse, the main demo's runs/demo)."""
    from rlhfkit.demo import run_demo

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "one.yaml"
    config.write_text("output_dir: from-config\nstages:\n  world: {type: world, sft_demonstrations: 10}\n")
    assert run_demo(["--config", str(config)]) == 0
    assert (tmp_path / "from-config" / "world" / "stage_done.json").exists()
    assert run_demo(["--config", str(config), "--output-dir", "given"]) == 0
    assert (tmp_path / "given" / "world" / "stage_done.json").exists() and not (tmp_path / "runs").exists()


def test_demo_seeds_paired_hallucination_difference_resamples_prompts():
    """bench/demo_seeds.py: PPO's hallucination rate minus SFT's pools the samples (a rate over answers, not a
    mean over prompts), skips rows where the flag does not apply, and its bootstrap resamples prompts."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "demo_seeds", Path(__file__).resolve().parents[1] / "bench" / "demo_seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)

    def rows(prompt, policy, flags):
        return [{"prompt_row": prompt, "policy": policy, "flags": {"hallucination": f}} for f in flags]

    # every prompt: PPO 2 of 4, SFT 1 of 4 -> +0.25 on any resample
    same = [r for k in range(5) for r in rows(k, "ppo", [1, 1, 0, 0]) + rows(k, "sft", [1, 0, 0, 0])]
    assert seeds.paired_rate_difference(same, "ppo", "sft", "hallucination") == pytest.approx((0.25, 0.25, 0.25, 5))
    # prompt 0: PPO 4 of 4 against 0 of 4; prompt 1: 0 of 4 each plus 4 PPO rows where the flag is None (a
    # harmful request); prompt 2: SFT only (PPO never answered it), left out
    mixed = rows(0, "ppo", [1] * 4) + rows(0, "sft", [0] * 4) + rows(1, "ppo", [0] * 4 + [None] * 4) \
        + rows(1, "sft", [0] * 4) + rows(2, "sft", [1] * 4) + rows(0, "dpo", [1] * 4)
    diff, low, high, n = seeds.paired_rate_difference(mixed, "ppo", "sft", "hallucination")
    assert n == 2 and diff == pytest.approx(4 / 8 - 0 / 8)
    # resamples of two prompts: {0,0} -> 1.0, {1,1} -> 0.0, mixed -> 0.5; each extreme has probability 1/4
    assert (low, high) == pytest.approx((0.0, 1.0))
