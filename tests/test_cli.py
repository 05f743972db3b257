"""The command line: help, YAML + flag precedence, one-line errors for bad input, tiny-model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from toy import preference_rows, write_jsonl

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.options import parse_trainer_args
from rlhfkit.trainers import DPOConfig, SFTConfig


def run_cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-m", "rlhfkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-steps", "--per-device-batch-size", "--gradient-accumulation-steps", "--learning-rate",
                 "--max-length", "--seed", "--lora-r", "--beta", "--loss-type", "--precompute-ref", "--resume"):
        assert flag in text, flag
    assert "(default: 0.1)" in text  # beta's default is shown


def test_yaml_config_then_flags_override(tmp_path):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("model: some/model\nlearning-rate: 1.0e-6\nbeta: 0.3\nmax_steps: 7\n")
    config = parse_trainer_args(DPOConfig, ["--config", str(cfg), "--beta", "0.5", "--dataset", "d.jsonl"],
                                "rlhfkit dpo", "")
    assert (config.model, config.learning_rate, config.beta, config.max_steps, config.dataset) == (
        "some/model", 1e-6, 0.5, 7, "d.jsonl")


def test_yaml_unknown_key_is_one_line_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rat'"):
        parse_trainer_args(SFTConfig, ["--config", str(cfg)], "rlhfkit sft", "")


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("case", ["malformed", "non_utf8", "missing_column", "missing_field", "wrong_format"])
def test_bad_data_gives_one_line_error(tiny_model_dir, tmp_path, case):
    data = tmp_path / "prefs.jsonl"
    rows = [json.dumps(r) for r in preference_rows(5)]
    if case == "malformed":
        rows[2] = '{"prompt": "hi", "chosen": "a", '
        needles = ("prefs.jsonl", "row 3", "JSON")
    elif case == "non_utf8":
        rows[3] = None
        needles = ("prefs.jsonl", "row 4", "UTF-8")
    elif case == "missing_column":
        rows = [json.dumps({"prompt": "p", "chosen": "c"}) for _ in range(3)]
        needles = ("prefs.jsonl", "rejected")
    elif case == "missing_field":
        rows[1] = json.dumps({"prompt": "p", "chosen": "c", "rejected": None})
        needles = ("prefs.jsonl", "row 2", "rejected")
    else:
        rows = [json.dumps({"question": "p", "answer": "c"}) for _ in range(3)]
        needles = ("question", "answer")
    with open(data, "wb") as fh:
        for row in rows:
            fh.write(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n' if row is None else (row + "\n").encode())
    proc = run_cli("rm", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "out",
                   "--max-steps", 1, "--no-progress-bar")
    _assert_one_line_error(proc, *needles)


def test_counted_warnings_for_skipped_and_truncated_rows(tiny_model_dir, tmp_path):
    rows = preference_rows(12)
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[5]["chosen"] = "   "
    rows[7]["chosen"] = "word " * 300
    data = write_jsonl(rows, tmp_path / "prefs.jsonl")
    proc = run_cli("rm", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "out",
                   "--max-steps", 1, "--max-length", 64, "--no-progress-bar", "--eval-on-start", "false")
    assert proc.returncode == 0, proc.stderr
    report = [line for line in proc.stderr.splitlines() if "rows kept" in line]
    assert len(report) == 1, proc.stderr
    assert "10/12" in report[0] and "row 4" in report[0] and "row 6" in report[0] and "truncated 1" in report[0]


def test_different_tokenizers_rejected(tiny_model_dir, tmp_path):
    from rlhfkit.models.tiny import build_tiny_model, default_corpus

    other = build_tiny_model(tmp_path / "other", vocab=600, corpus=default_corpus(300, seed=5))
    data = write_jsonl(preference_rows(8), tmp_path / "prefs.jsonl")
    proc = run_cli("dpo", "--model", tiny_model_dir, "--ref-model", other, "--dataset", data,
                   "--output-dir", tmp_path / "out", "--max-steps", 1, "--no-progress-bar")
    _assert_one_line_error(proc, "different tokenizers")


def test_tokenizer_without_pad_token_warns_and_uses_eos(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from rlhfkit.models import load_tokenizer

    copy = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, copy)
    tok = AutoTokenizer.from_pretrained(copy)
    tok.pad_token = None
    tok.save_pretrained(copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = load_tokenizer(str(copy))
    assert loaded.pad_token_id == loaded.eos_token_id


def test_tiny_model_command_builds_loadable_models(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for reward in (False, True):
        out = tmp_path / ("rm" if reward else "lm")
        proc = run_cli("tiny-model", out, "--layers", 1, "--hidden", 32, "--vocab", 512, *(["--reward"] if reward else []))
        assert proc.returncode == 0, proc.stderr
        tok = AutoTokenizer.from_pretrained(out)
        cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
        model = cls.from_pretrained(out)
        assert model.config.num_hidden_layers == 1 and len(tok) <= 512
        assert tok.pad_token and tok.eos_token and tok.chat_template


@pytest.mark.parametrize("steps", [0, -5])
def test_impossible_max_steps_is_one_line_error(tiny_model_dir, tmp_path, capsys, steps):
    data = write_jsonl(preference_rows(4), tmp_path / "prefs.jsonl")
    assert main(["dpo", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir",
                 str(tmp_path / "out"), "--max-steps", str(steps), "--no-progress-bar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhfkit dpo: error: --max-steps {steps}: give a number of optimizer steps >= 1, or -1 to "
                   "derive it from --num-epochs")
    assert not (tmp_path / "out").exists()  # refused before anything was written
