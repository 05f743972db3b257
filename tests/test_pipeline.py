"""`rlhfkit pipeline`: a whole demo-shaped chain on a tiny model, skipping, forcing, and config errors."""

from __future__ import annotations

import json
import math

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
                heldout_samples: 2, max_new_tokens: 12}}
  rm: {{type: rm, model: "${{sft}}", dataset: "${{preferences}}/ranked.jsonl",
       eval_dataset: "${{preferences}}/gold_pairs.jsonl", max_steps: 4}}
  ppo: {{type: ppo, model: "${{sft}}", reward_model: "${{rm}}", dataset: "${{world}}/prompts_train.jsonl",
        eval_dataset: "${{world}}/prompts_eval.jsonl", heldout_judge: "gold:${{world}}", eval_steps: 1,
        max_steps: 2, prompts_per_step: 4, num_generations: 2, max_new_tokens: 10, learning_rate: 1.0e-4}}
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
        "world", "base", "pretrain", "sft", "preferences", "rm", "ppo", "dpo", "eval", "summary", "report"]
    summary = json.loads((run / "summary.json").read_text())
    for policy in ("sft", "ppo", "dpo"):
        for key in ("win_rate_vs_sft", "win_rate_ci_low", "harmful_refusal_rate", "benign_over_refusal_rate",
                    "kl_to_sft", "judge_score", "mean_length"):
            assert isinstance(summary[policy][key], float) and math.isfinite(summary[policy][key]), (policy, key)
    assert summary["sft"]["win_rate_vs_sft"] == 0.5
    assert abs(summary["sft"]["kl_to_sft"]) < 1e-4
    assert 0.0 <= summary["rm"]["gold_accuracy"] <= 1.0
    assert summary["wall_seconds"] > 0 and summary["annotators"]["prompts_labelled"] > 0
    # the PPO run was watched by the held-out gold judge
    ppo_rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    held = [r["eval_heldout_reward"] for r in ppo_rows if "eval_heldout_reward" in r]
    assert len(held) >= 2 and all(math.isfinite(h) for h in held)
    # its standard error (the detector's noise floor): positive, below the gold judge's score range
    assert all(0 < r["eval_heldout_reward_se"] < 1.6 for r in ppo_rows if "eval_heldout_reward" in r)
    assert (run / "ppo" / "best_heldout" / "config.json").exists()
    assert "hacking" in json.loads((run / "ppo" / "summary.json").read_text())
    assert (run / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_pipeline_skips_done_stages_and_force_reruns(tiny_pipeline):
    config, run, _, _ = tiny_pipeline
    lines: list[str] = []
    run_pipeline(config, log=lines.append)
    assert sum("skipped" in line for line in lines) == 11
    stamp = (run / "dpo" / "stage_done.json").stat().st_mtime_ns
    lines.clear()
    run_pipeline(config, force="dpo", only="dpo", log=lines.append)
    assert (run / "dpo" / "stage_done.json").stat().st_mtime_ns > stamp
    assert any(line.startswith("[8/11] dpo (dpo) ->") for line in lines)


@pytest.mark.parametrize("stages, message", [
    ("a: {type: sft, model: '${nowhere}'}", r"stage 'a': unknown reference \$\{nowhere\}"),
    ("a: {type: teleport}", "stage 'a': unknown type 'teleport'"),
    ("a: {type: sft, learning_rat: 0.1}", "stage 'a': unknown sft option 'learning_rat'"),
    ("a: [1, 2]", "stage 'a' needs a mapping with a 'type'"),
])
def test_pipeline_config_errors_are_one_line(tmp_path, stages, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  {stages}\n")
    with pytest.raises(ConfigError, match=message):
        run_pipeline(config, log=lambda _: None)


def test_pipeline_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["pipeline", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pipeline config not found" in err


def test_bundled_configs_share_their_common_stages():
    """The hacking config reuses the demo's folder: a stage both define must be defined the same way, or
    whichever config ran first would silently decide the other's world / models."""
    from importlib.resources import files

    from rlhfkit.cli import read_yaml

    configs = files("rlhfkit") / "configs"
    demo = read_yaml(str(configs / "demo.yaml"))
    hacking = read_yaml(str(configs / "hacking.yaml"))
    assert demo["output_dir"] == hacking["output_dir"] and demo["seed"] == hacking["seed"]
    shared = set(demo["stages"]) & set(hacking["stages"]) - {"report"}
    assert {"world", "base", "pretrain", "sft"} <= shared
    for name in shared:
        assert demo["stages"][name] == hacking["stages"][name], name
    assert demo["defaults"] == hacking["defaults"]
