"""`rlhfkit eval --pass-k K --verifier SPEC`: pass@k, maj@k and best@k per policy from the samples' verifier
scores, equal to the closed forms computed from the per-sample flags that samples.jsonl records."""

from __future__ import annotations

import json
import math

import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.eval.runner import main

VERIFIER = (
    "def has_e(prompts, responses):\n"
    "    # a known rule: a response is correct when it holds the letter e\n"
    "    return [1.0 if 'e' in r else 0.0 for r in responses]\n"
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("pass_k")
    (root / "verify.py").write_text(VERIFIER)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about item {i}."}) + "\n"
                                                for i in range(6)))
    return root


def _eval(tiny_model_dir, task, out, *extra):
    return main(["--policy", f"a={tiny_model_dir}", "--policy", f"b={tiny_model_dir}",
                 "--prompts", str(task / "prompts.jsonl"), "--judge", f"fn:{task / 'verify.py'}:has_e",
                 "--max-new-tokens", "6", "--n-boot", "50", "--output-dir", str(out), *extra])


def test_pass_at_k_equals_the_closed_form_from_the_sample_flags(tiny_model_dir, task, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _eval(tiny_model_dir, task, out, "--num-samples", "4", "--pass-k", "1,2,4",
                 "--verifier", f"fn:{task / 'verify.py'}:has_e") == 0
    printed = capsys.readouterr().out
    assert "pass@k by the verifier" in printed and "pass@k [CI]" in printed
    report = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert report["pass_threshold"] == 0.5 and set(report["verifiable"]) == {"a", "b"}
    for name in ("a", "b"):
        mine = [s for s in samples if s["policy"] == name]
        for s in mine:  # the verifier's rule, recorded per sample
            assert s["verified"] == (1.0 if "e" in s["response"] else 0.0)
            assert s["correct"] is ("e" in s["response"])
        by_prompt: dict[int, list[bool]] = {}
        for s in mine:
            by_prompt.setdefault(s["prompt_row"], []).append(s["correct"])
        assert all(len(flags) == 4 for flags in by_prompt.values()) and len(by_prompt) == 6
        assert any(0 < sum(f) < 4 for f in by_prompt.values())  # a mix, so pass@1 < pass@2 < pass@4 is tested
        overall = report["verifiable"][name]["overall"]
        for k in (1, 2, 4):
            closed = [1.0 - math.comb(4 - sum(f), k) / math.comb(4, k) for f in by_prompt.values()]
            assert overall[f"pass@{k}"]["mean"] == pytest.approx(sum(closed) / len(closed), abs=1e-12)
            assert overall[f"pass@{k}"]["n"] == 6
            # best@k of 0/1 rewards is pass@k
            assert overall[f"best@{k}"]["mean"] == pytest.approx(overall[f"pass@{k}"]["mean"], abs=1e-12)
        mean_correct = sum(s["correct"] for s in mine) / len(mine)
        assert overall["maj@1"]["mean"] == pytest.approx(mean_correct)


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "2", "--pass-k", "1,4", "--verifier", "fn:{task}/verify.py:has_e"], "--num-samples >= 4"),
    (["--num-samples", "4", "--pass-k", "2"], "--pass-k needs --verifier"),
    (["--num-samples", "4", "--verifier", "fn:{task}/verify.py:has_e"], "--verifier needs --pass-k"),
    (["--num-samples", "4", "--pass-k", "0,2", "--verifier", "fn:{task}/verify.py:has_e"], ">= 1"),
    (["--num-samples", "4", "--pass-k", "two", "--verifier", "fn:{task}/verify.py:has_e"], "whole numbers"),
])
def test_pass_k_mistakes_are_one_line_config_errors(tiny_model_dir, task, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        _eval(tiny_model_dir, task, tmp_path / "x", *[e.format(task=task) for e in extra])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x" / "eval.json").exists()
