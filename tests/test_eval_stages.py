"""The evaluation commands as pipeline stages (rlhfkit.stages: grade here; eval_rm and audit_judge run in
test_demo_eval.py) and the world's human_labels stage sampling its own policies (no eval stage): options by
the commands' names, checked before any stage runs; outputs in the stage's folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import run_pipeline

QUESTIONS = Path(__file__).resolve().parent.parent / "examples" / "grading_questions.jsonl"


def _config(tmp_path: Path, stages: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "seed": 1, "stages": stages},
                                   sort_keys=False))
    return path


def test_grade_and_human_labels_stages(tmp_path):
    (tmp_path / "judge.py").write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    corpus = "${world}/tokenizer_corpus.txt"
    config = _config(tmp_path, {
        "world": {"type": "world", "sft_demonstrations": 20, "rl_prompts": 8, "num_countries": 4},
        "small": {"type": "tiny_model", "corpus": corpus, "vocab": 400, "layers": 1, "hidden": 32},
        "wider": {"type": "tiny_model", "corpus": corpus, "vocab": 400, "layers": 1, "hidden": 48},
        "grade": {"type": "grade", "policies": {"small": "${small}", "wider": "${wider}"},
                  "questions": str(QUESTIONS), "judge": f"fn:{tmp_path / 'judge.py'}:length",
                  "max_new_tokens": 4, "n_boot": 50},
        "human_labels": {"type": "human_labels", "world": "${world}",
                         "policies": {"small": "${small}", "wider": "${wider}"}, "num_samples": 2,
                         "max_new_tokens": 8, "max_items": 10, "annotators": 3, "overlap": 2, "likert": True,
                         "n_boot": 50},
    })
    results = run_pipeline(config, log=lambda _: None)
    run = tmp_path / "run"
    grading = json.loads((run / "grade" / "grading.json").read_text())
    assert set(grading["policies"]) == {"small", "wider"} and (run / "grade" / "grades.jsonl").exists()
    assert set(results["grade"]["policies"]) == {"small", "wider"}

    human = json.loads((run / "human_labels" / "human_eval.json").read_text())
    items = [json.loads(x) for x in (run / "human_labels" / "items.jsonl").read_text().splitlines()]
    assert 0 < len(items) <= 10 and all(it["policies"] == ["wider", "small"] for it in items)
    assert human["baseline"] == "small" and human["labellers"] == 3 and human["ai"] == {}
    assert human["num_labels"] == 2 * len(items)  # overlap 2: every item labelled twice, through the service
    wider = human["policies"]["wider"]
    assert wider["n_items"] == len(items) and 1 <= wider["likert_mean"] <= 5
    assert 0 <= wider["win_rate_vs_small"] <= 1
    assert results["human_labels"]["labels"] == 2 * len(items)


@pytest.mark.parametrize("stage, message", [
    ({"type": "eval_rm", "reward_model": "x", "pairs": "y", "subset_colum": "c"}, "unknown eval_rm option 'subset_colum'"),
    ({"type": "audit_judge", "judge": "model:x", "pairs": "y", "max_pair": 3}, "unknown audit_judge option 'max_pair'"),
    ({"type": "grade", "questions": "q", "judge": "j", "polices": {}}, "unknown grade option 'polices'"),
    ({"type": "human_labels", "world": "w", "annotator": 3}, "unknown human_labels option 'annotator'"),
])
def test_misspelt_options_fail_before_any_stage_runs(tmp_path, stage, message):
    config = _config(tmp_path, {"first": {"type": "world"}, "second": stage})
    with pytest.raises(ConfigError, match=message):
        run_pipeline(config, log=lambda _: None)
    assert not (tmp_path / "run" / "first").exists()
