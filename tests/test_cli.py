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
def test_bad_data_gives_one_line_error(tiny_model_dir, tmp_path, case, capsys):
    """The first case through a real `python -m rlhfkit` process (what a user sees: exit code, stderr, no
    traceback); the others through `main` in this process (the same handler, without a ~5 s interpreter start)."""
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
    args = ["rm", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "out", "--max-steps", 1,
            "--no-progress-bar"]
    if case == "malformed":
        proc = run_cli(*args)
    else:
        code = main([str(a) for a in args])
        proc = subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
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


def test_different_tokenizers_rejected(tiny_model_dir, tmp_path, capsys):
    from rlhfkit.models.tiny import build_tiny_model, default_corpus

    other = build_tiny_model(tmp_path / "other", vocab=600, corpus=default_corpus(300, seed=5))
    data = write_jsonl(preference_rows(8), tmp_path / "prefs.jsonl")
    code = main(["dpo", "--model", str(tiny_model_dir), "--ref-model", str(other), "--dataset", str(data),
                 "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--no-progress-bar"])
    _assert_one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "different tokenizers")


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

    for reward in (False, True):  # the language model through a real process, the reward model through main
        out = tmp_path / ("rm" if reward else "lm")
        args = ["tiny-model", str(out), "--layers", "1", "--hidden", "32", "--vocab", "512"]
        if reward:
            assert main([*args, "--reward"]) == 0
        else:
            proc = run_cli(*args)
            assert proc.returncode == 0, proc.stderr
        tok = AutoTokenizer.from_pretrained(out)
        cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
        model = cls.from_pretrained(out)
        assert model.config.num_hidden_layers == 1 and len(tok) <= 512
        assert tok.pad_token and tok.eos_token and tok.chat_template


def test_tiny_model_never_writes_over_a_folder_that_holds_files(tmp_path, capsys):
    small = ["--layers", "1", "--hidden", "32", "--vocab", "512"]
    out = tmp_path / "model"
    assert main(["tiny-model", "--output-dir", str(out), *small]) == 0  # the trainers' flag works too
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    # a second build there (another seed: other weights) is refused in one line and leaves the files alone
    assert main(["tiny-model", str(out), *small, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds" in err and "--overwrite" in err and "\n" not in err
    assert (out / "model.safetensors").read_bytes() == weights
    assert main(["tiny-model", str(out), *small, "--seed", "1", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != weights
    assert main(["tiny-model", str(out), "--output-dir", str(tmp_path / "other")]) == 2  # two folders
    assert main(["tiny-model"]) == 2
    (tmp_path / "file").write_text("mine")
    assert main(["tiny-model", str(tmp_path / "file")]) == 2 and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("steps", [0, -5])
def test_impossible_max_steps_is_one_line_error(tiny_model_dir, tmp_path, capsys, steps):
    data = write_jsonl(preference_rows(4), tmp_path / "prefs.jsonl")
    assert main(["dpo", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir",
                 str(tmp_path / "out"), "--max-steps", str(steps), "--no-progress-bar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhfkit dpo: error: --max-steps {steps}: give a number of optimizer steps >= 1, or -1 to "
                   "derive it from --num-epochs")
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- mistakes get one line (issue 20)


def _one_error_line(capsys, argv) -> str:
    """Run the CLI in-process; the whole stderr must be exactly one line, and the exit code 2."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, expected", [
    (["sft", "--learning-rat", "0.1"],
     "rlhfkit sft: error: unknown option --learning-rat; did you mean --learning-rate?"),
    (["dpo", "--max_step", "3"], "rlhfkit dpo: error: unknown option --max_step; did you mean --max-steps?"),
    (["grpo", "--num-generation=4"],
     "rlhfkit grpo: error: unknown option --num-generation; did you mean --num-generations?"),
    (["sft", "--max-steps", "many"], "rlhfkit sft: error: argument --max-steps/--max_steps: invalid int value: 'many'"),
    (["rm", "--resume", "maybe"], "rlhfkit rm: error: argument --resume: expected true or false, not 'maybe'"),
    (["stf", "--model", "m"], "rlhfkit: error: unknown command 'stf'; did you mean 'sft'? (rlhfkit --help lists them)"),
])
def test_flag_mistakes_are_one_line_with_the_closest_flag(capsys, argv, expected):
    assert _one_error_line(capsys, argv) == expected


def test_unknown_yaml_key_names_the_closest_option(tmp_path, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("learning-rat: 1.0e-4\n")
    assert _one_error_line(capsys, ["sft", "--config", str(cfg)]) == (
        f"rlhfkit sft: error: {cfg}: unknown option 'learning-rat'; did you mean 'learning-rate'?")


def test_flags_parse_as_transformers_hfargumentparser_did():
    """The argparse builder that replaced HfArgumentParser keeps its spellings and bool forms."""
    from rlhfkit.trainers.rl import GRPOConfig

    base = ["--model", "m", "--dataset", "d.jsonl"]
    parse = lambda *flags: parse_trainer_args(GRPOConfig, [*base, *flags], "rlhfkit grpo", "")  # noqa: E731
    assert parse().progress_bar is True and parse().max_prompt_length == 256
    assert parse("--no-progress-bar").progress_bar is False
    assert parse("--no_progress_bar").progress_bar is False
    assert parse("--progress-bar", "false").progress_bar is False
    assert parse("--progress_bar", "no").progress_bar is False
    assert parse("--resume").resume is True and parse("--resume", "1").resume is True
    c = parse("--learning_rate", "3e-4", "--max-prompt-length", "12", "--num-generations", "4")
    assert (c.learning_rate, c.max_prompt_length, c.num_generations) == (3e-4, 12, 4)


def test_help_imports_neither_torch_nor_transformers():
    code = """
import contextlib, io, sys
from rlhfkit.cli import main
from rlhfkit.registry import TRAINERS
for name in TRAINERS:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([name, "--help"])
        except SystemExit:
            pass
    assert "--learning-rate" in out.getvalue(), name
print(sorted(m for m in ("torch", "transformers", "accelerate", "datasets") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_local_looking_paths_and_hub_ids(tmp_path, monkeypatch):
    from rlhfkit.models.loading import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("/abs/model", "./models/sft", "../sft", "~/models/x", "runs/sft", "a/b/c"):
        assert looks_like_local_path(path), path
    for hub_id in ("gpt2", "Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B"):
        assert not looks_like_local_path(hub_id), hub_id


@pytest.mark.parametrize("trainer, flag, value", [
    ("sft", "--model", "./models/sft"),
    ("dpo", "--ref-model", "runs_missing/a/ref"),
    ("ppo", "--reward-model", "{tiny},/nowhere/rm"),
])
def test_missing_model_path_is_one_line(tiny_model_dir, tmp_path, capsys, trainer, flag, value):
    data = write_jsonl(preference_rows(4), tmp_path / "data.jsonl")
    value = value.format(tiny=tiny_model_dir)
    argv = [trainer, "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "out"),
            flag, value]
    missing = value.split(",")[-1]
    assert _one_error_line(capsys, argv) == f"rlhfkit {trainer}: error: {flag} {missing}: no such file or folder"
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_folder_without_tokenizer_is_one_sentence(tiny_model_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    data = write_jsonl(preference_rows(4), tmp_path / "data.jsonl")
    err = _one_error_line(capsys, ["rm", "--model", str(bare), "--dataset", str(data), "--output-dir",
                                   str(tmp_path / "out"), "--no-progress-bar"])
    assert err == (f"rlhfkit rm: error: {bare} has no tokenizer (none of tokenizer.json, tokenizer_config.json, "
                   f"tokenizer.model): save the tokenizer the model was trained with into it, e.g. "
                   f"AutoTokenizer.from_pretrained(BASE).save_pretrained('{bare}').")


def _cpu_without_bf16(monkeypatch):
    import torch

    from rlhfkit.engine import setup

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(setup, "_cpu_flags", lambda: {"fpu", "avx", "avx2"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_bf16_on_a_cpu_without_bf16_units_is_refused_unless_forced(tmp_path, capsys, monkeypatch):
    import torch

    from rlhfkit.engine.setup import resolve_precision
    from rlhfkit.options import check_before_loading

    _cpu_without_bf16(monkeypatch)
    err = _one_error_line(capsys, ["sft", "--model", "m", "--dataset", "d.jsonl", "--output-dir",
                                   str(tmp_path / "out"), "--precision", "bf16"])
    assert err == ("rlhfkit sft: error: --precision bf16: this CPU has no bf16 units (no avx512_bf16 or amx_bf16), "
                   "so bf16 would run many times slower than fp32 here; use --precision fp32 (or auto), or pass "
                   "--precision bf16 --force-precision to insist")
    forced = parse_trainer_args(SFTConfig, ["--precision", "bf16", "--force-precision"], "rlhfkit sft", "")
    assert forced.force_precision is True
    check_before_loading(forced)  # passes
    assert resolve_precision("bf16", force=True)[0] == "bf16"
    assert resolve_precision("auto")[0] == "no"  # auto stays fp32 here
    # a CPU that has the units runs bf16 without being asked twice
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert resolve_precision("bf16") == ("bf16", "as requested")


def test_trainer_run_is_quiet_and_ends_with_one_block(tiny_model_dir, tmp_path):
    data = write_jsonl(preference_rows(8), tmp_path / "prefs.jsonl")
    out = tmp_path / "out"
    proc = run_cli("rm", "--model", tiny_model_dir, "--dataset", data, "--eval-dataset", data, "--output-dir", out,
                   "--max-steps", 2, "--per-device-batch-size", 4)
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    for noise in ("Loading weights", "Writing model shards", "DeepSpeed", "real_accelerator", "Map", "Filter"):
        assert noise not in both, (noise, both)
    assert proc.stderr.count("reward: 100%") >= 1  # the run's own bar (named after its task) is kept
    tail = proc.stderr.strip().splitlines()[-3:]
    assert tail[0].startswith("[rlhfkit] rm finished in ") and tail[0].endswith("(2 steps)"), tail
    assert tail[1] == f"[rlhfkit] model: {out} (summary.json and metrics.jsonl beside it)"
    assert tail[2].startswith("[rlhfkit] metrics: train_loss ") and "eval_accuracy" in tail[2], tail
    assert sum(line.startswith("[rlhfkit] rm finished") for line in proc.stderr.splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] > 0


def test_eval_accepts_every_option_its_messages_suggest():
    """Flags named in the messages of eval and of the decoding it runs (e.g. the hint to use --compile-decode)
    must be options of `rlhfkit eval`."""
    import re
    from pathlib import Path

    import rlhfkit
    from rlhfkit.eval.runner import build_parser

    parser = build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    root = Path(rlhfkit.__file__).parent
    text = "".join((root / f).read_text(encoding="utf-8") for f in
                   ("eval/runner.py", "eval/policy_run.py", "rollout/generate.py", "rollout/compiled_decode.py"))
    # a message's adjacent string literals, all of them (a flag may sit in the second line of a long message)
    messages = re.findall(r'(?:ConfigError|DataError|ModelError|logger\.\w+)\(\s*((?:f?"(?:[^"\\]|\\.)*"\s*)+)',
                          text)
    suggested = {flag for m in messages for flag in re.findall(r"--[a-z][a-z-]+", m)}
    assert {"--compile-decode", "--no-compile-decode"} <= suggested and suggested - known == set()
    a = parser.parse_args(["--policy", "p", "--prompts", "x", "--judge", "j", "--compile-decode",
                           "--no-fast-decode"])
    assert (a.compile_decode, a.fast_decode) == (True, False)


def test_end_block_names_the_model_time_and_headline_metrics_of_any_trainer():
    from rlhfkit.cli import end_block

    rl = {"steps": 40, "train_reward_mean": 0.61234, "train_kl": 0.0421, "train_loss": -0.01, "eval_reward_mean": 0.5,
          "eval_heldout_reward": 0.4, "hacking": {"fired": False}, "precision": "fp32"}
    assert end_block("grpo", rl, "runs/grpo", 754.2).splitlines() == [
        "grpo finished in 12m 34s (40 steps)",
        "model: runs/grpo (summary.json and metrics.jsonl beside it)",
        "metrics: train_loss -0.01, train_reward_mean 0.6123, train_kl 0.0421, eval_reward_mean 0.5, "
        "eval_heldout_reward 0.4"]
    assert end_block("dpo", {"steps": 3}, "out", 2.04).splitlines() == [
        "dpo finished in 2.0s (3 steps)", "model: out (summary.json and metrics.jsonl beside it)"]
