"""configs/eval.yaml (make demo-eval) end to end, every stage shrunk: the RM report, eval with the RM and an
LM judge on the very samples of the demo's gold eval, both judges' audits, the simulated annotators' human
eval in a labelling-app database with Cohen's kappa against each judge, and the report; the demo's stages,
already done in the folder, are skipped."""

from __future__ import annotations

import json
import math

SHARED = ("world", "base", "pretrain", "sft", "preferences", "rm", "rm2", "ppo", "dpo", "eval")
SAMPLING = {"num_samples": 2, "max_new_tokens": 10, "n_boot": 50, "batch_size": 32, "max_prompts": 12}
SHRINK: dict[str, dict] = {
    "world": {"sft_demonstrations": 60, "rl_prompts": 64, "num_countries": 6},
    "base": {"vocab": 800, "layers": 1, "hidden": 32},  # (the demo's vocabulary: " A" and " B" differ)
    "pretrain": {"max_steps": 12, "per_device_batch_size": 16},
    "sft": {"max_steps": 6, "num_epochs": 1},
    "preferences": {"num_samples": 3, "rounds": 1, "max_prompts": 16, "heldout_samples": 2, "max_new_tokens": 12,
                    "other_samples": 1, "explore_samples": 1},
    "rm": {"max_steps": 4}, "rm2": {"max_steps": 4},
    "ppo": {"max_steps": 2, "prompts_per_step": 4, "max_new_tokens": 10},
    "dpo": {"max_steps": 2},
    # the eval stages sample alike (same settings and seed): the very same texts in each
    "eval": SAMPLING, "eval_rm_judge": SAMPLING, "eval_lm_judge": SAMPLING,
    "eval_rm": {"n_boot": 50},
    "audit_rm": {"max_pairs": 16, "n_boot": 50}, "audit_lm": {"max_pairs": 16, "n_boot": 50},
    "human_labels": {"max_items": 12, "n_boot": 50},
}


def _samples(path):
    return {(r["policy"], r["prompt_row"], r["sample"]): r["response"]
            for r in map(json.loads, path.read_text().splitlines())}


def test_eval_config_shrunk_runs_on_the_demo_folder(tmp_path):
    from importlib.resources import files

    import yaml

    from rlhfkit.options import read_yaml
    from rlhfkit.pipeline import run_pipeline

    data = read_yaml(str(files("rlhfkit") / "configs" / "eval.yaml"))
    stages = data["stages"]
    assert set(SHARED) < set(stages) and set(SHRINK) <= set(stages)
    for name, opts in stages.items():
        opts.update(SHRINK.get(name, {}))
    data.update(output_dir=str(tmp_path / "run"), seed=3,
                defaults={**data["defaults"], "progress_bar": False, "max_length": 64, "num_threads": 1})
    config = tmp_path / "eval_tiny.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    run = tmp_path / "run"

    run_pipeline(config, only=",".join(SHARED), log=lambda _: None)  # what `make demo` leaves in the folder
    before = {name: (run / name / "stage_done.json").read_text() for name in SHARED}
    lines: list[str] = []
    run_pipeline(config, log=lines.append)

    for name in SHARED:  # the demo's stages were not rerun: skipped, their records untouched
        assert any(line.startswith(f"[{list(stages).index(name) + 1}/") and "skipped" in line for line in lines), name
        assert (run / name / "stage_done.json").read_text() == before[name], name
    for name in set(stages) - set(SHARED):
        assert (run / name / "stage_done.json").exists(), name

    rm = json.loads((run / "eval_rm" / "rm_report.json").read_text())
    assert rm["num_pairs"] > 0 and 0 <= rm["overall"]["accuracy"] <= 1 and "ece" in rm["calibration"]
    gold = _samples(run / "eval" / "samples.jsonl")
    for name, judge_type in (("eval_rm_judge", "scoring"), ("eval_lm_judge", "pairwise")):
        report = json.loads((run / name / "eval.json").read_text())
        assert report["judge_type"] == judge_type and set(report["policies"]) == {"sft", "ppo", "dpo"}
        mine = _samples(run / name / "samples.jsonl")
        assert mine and all(gold[key] == text for key, text in mine.items())  # the gold eval's very texts
    for name in ("audit_rm", "audit_lm"):
        audit = json.loads((run / name / "judge_audit.json").read_text())
        assert audit["pairs"] > 0 and {"accuracy", "kappa", "position", "length", "flagged"} <= set(audit)
        assert 0 <= audit["accuracy"]["value"] <= 1 and 0 <= audit["position"]["first_slot_share"]["value"] <= 1

    human = json.loads((run / "human_labels" / "human_eval.json").read_text())
    assert (run / "human_labels" / "labels.db").exists() and human["baseline"] == "sft"
    assert human["num_labels"] > 0 and human["labellers"] == 5 and human["items_with_2_labels"] > 0
    assert {"ppo", "dpo"} <= set(human["policies"]) and set(human["ai"]) == {"eval", "eval_rm_judge", "eval_lm_judge"}
    for comparison in human["ai"].values():
        assert comparison["matched_items"] > 0
        kappa = comparison["cohen_kappa"]
        assert kappa is None or (isinstance(kappa, float) and -1 <= kappa <= 1), comparison
    kappas = [c["cohen_kappa"] for c in human["ai"].values()]
    assert any(isinstance(k, float) and math.isfinite(k) for k in kappas), human["ai"]
    assert "Cohen's kappa" in (run / "human_labels" / "human_eval.txt").read_text()
    html = (run / "report_eval.html").read_text()
    assert "audit_rm" in html and "audit_lm" in html
