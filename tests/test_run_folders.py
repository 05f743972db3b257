"""Runs are never overwritten: a second command into a run's folder is refused (--overwrite replaces, --resume
on a finished run does nothing); every run writes config.yaml, from which it repeats to the same weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file
from toy import write_toy_task

from rlhfkit.cli import main
from rlhfkit.engine.run_folder import RunFinished, begin_run, check_output_dir, clear_run_folder, file_digest
from rlhfkit.errors import ConfigError
from rlhfkit.options import load_yaml_config, parse_trainer_args, run_trainer
from rlhfkit.pipeline import run_pipeline
from rlhfkit.registry import TRAINERS
from rlhfkit.trainers.sft import SFTConfig


def _sft_args(model_dir, data, out, *extra):
    return ["sft", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "3",
            "--per-device-batch-size", "4", "--learning-rate", "1e-3", "--max-length", "64", "--num-threads", "1",
            "--no-progress-bar", "--eval-on-start", "false", *extra]


def _files(out):
    """name -> bytes of every file of a run folder that a second command must not touch."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = write_toy_task(root / "data", n_train=16, n_eval=4)["sft_train"]
    out = root / "sft"
    assert main(_sft_args(tiny_model_dir, data, out)) == 0
    return data, out


def test_finished_run_survives_a_second_command(finished, tiny_model_dir, capsys):
    data, out = finished
    before = _files(out)
    capsys.readouterr()
    assert main(_sft_args(tiny_model_dir, data, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhfkit sft: error: --output-dir {out} holds a finished run (summary.json, model.safetensors, "
                   "metrics.jsonl; step 3); pass --overwrite to replace it, or choose another folder")
    assert _files(out) == before  # model bytes, metrics, summary and config.yaml as they were

    # --resume on a finished run: nothing to do, exit 0, its own summary back, nothing trained or rewritten
    assert main(_sft_args(tiny_model_dir, data, out, "--resume")) == 0
    captured = capsys.readouterr()
    assert f"nothing to do: the run in {out} is finished (step 3)" in captured.err
    assert "finished in" not in captured.err  # no end block: nothing ran
    assert _files(out) == before
    config = parse_trainer_args(SFTConfig, _sft_args(tiny_model_dir, data, out, "--resume")[1:], "rlhfkit sft", "")
    assert run_trainer(TRAINERS["sft"], config) == json.loads(before["summary.json"])  # its own summary back
    assert _files(out) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(finished, tiny_model_dir, tmp_path):
    data, first = finished
    out = tmp_path / "again"
    assert main(_sft_args(tiny_model_dir, data, out, "--seed", "7")) == 0
    seed7, want = load_file(out / "model.safetensors"), load_file(first / "model.safetensors")
    assert any(not torch.equal(seed7[k], want[k]) for k in want)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-9").mkdir()  # an older run's checkpoint must not survive into the new run's folder
    (out / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert main(_sft_args(tiny_model_dir, data, out, "--overwrite")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the old run's rows were removed, not appended to
    assert (out / "notes.txt").read_text() == "mine" and not (out / "checkpoint-9").exists()
    # the default seed again: the same weights as the first run, so the seed-7 model was replaced
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


def _config(out, **kw):
    return SFTConfig(model="m", dataset="d", output_dir=str(out), **kw)


def test_unfinished_runs_are_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("unrelated")
    (out / "config.yaml").write_text("learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match="holds a config.yaml that rlhfkit did not write"):
        check_output_dir(_config(out))
    (out / "config.yaml").unlink()
    check_output_dir(_config(out))  # only unrelated files: fine

    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(ConfigError) as no_checkpoint:
        check_output_dir(_config(out))
    assert str(no_checkpoint.value) == (f"--output-dir {out} holds an unfinished run with no checkpoint "
                                        "(metrics.jsonl; step 2); pass --overwrite to start it again, or choose "
                                        "another folder")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(ConfigError) as unfinished:
        check_output_dir(_config(out))
    assert str(unfinished.value) == (f"--output-dir {out} holds an unfinished run (checkpoint-2, metrics.jsonl; "
                                     "step 2); pass --resume to continue it from its last checkpoint, --overwrite "
                                     "to replace it, or choose another folder")
    check_output_dir(_config(out, resume=True))  # continues from checkpoint-2
    with pytest.raises(ConfigError, match="pass one of them"):
        check_output_dir(_config(out, resume=True, overwrite=True))
    # the resume goes on (config.yaml says from where) and names the options that differ from the checkpoint's
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "config": {**_config(out).as_dict(), "learning_rate": 0.5}}))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("rlhfkit").addHandler(handler)
    try:
        begin_run(_config(out, resume=True), "sft")
    finally:
        logging.getLogger("rlhfkit").removeHandler(handler)
    default_lr = _config(out).learning_rate
    assert any(f"other options (learning_rate 0.5 -> {default_lr!r})" in m for m in messages), messages
    assert yaml.safe_load((out / "config.yaml").read_text())["_run"]["resumed_from"] == "checkpoint-2"
    assert clear_run_folder(out) == ["checkpoint-2", "config.yaml", "metrics.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_never_trains_over_a_saved_model(tmp_path):
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    (model_only / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError) as refused:
        check_output_dir(_config(model_only))
    assert str(refused.value) == (f"--output-dir {model_only} holds a saved model (model.safetensors); pass "
                                  "--overwrite to replace it, or choose another folder")
    with pytest.raises(RunFinished, match="holds a final model"):  # no checkpoint: nothing to resume
        check_output_dir(_config(model_only, resume=True))
    check_output_dir(_config(tmp_path / "empty", resume=True))  # nothing there: the run starts fresh


def test_output_dir_that_is_the_starting_model_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="is also --model"):
        check_output_dir(SFTConfig(model=str(tiny_model_dir), dataset="d", output_dir=str(tiny_model_dir),
                                   overwrite=True))


def test_config_yaml_has_every_option_and_the_run_record(finished, tiny_model_dir):
    data, out = finished
    written = yaml.safe_load((out / "config.yaml").read_text())
    options = {f.name for f in dataclasses.fields(SFTConfig)}
    assert set(written) == options | {"_run"}
    record = written["_run"]
    assert record["trainer"] == "sft" and record["config_class"].endswith(".SFTConfig")
    assert {"python", "rlhfkit", "torch", "transformers", "datasets"} <= set(record["versions"])
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"] == \
        torch.__version__
    assert record["inputs"]["dataset"] == {"path": str(data), "kind": "file", "bytes": data.stat().st_size,
                                           "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert record["host"] and record["started"] and record["command"]
    # --config reads it back (skipping _run) to the run's own options
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    again = SFTConfig(**load_yaml_config(str(out / "config.yaml"), SFTConfig))
    given = parse_trainer_args(SFTConfig, _sft_args(tiny_model_dir, data, out)[1:], "rlhfkit sft", "")
    assert again.as_dict() == given.as_dict() and again.max_steps == 3 and again.learning_rate == 1e-3


def test_folder_digest_is_sha256_of_its_files_listing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"bee")
    (tmp_path / "sub" / "a.arrow").write_bytes(b"\x00" * 3_000_000)  # more than one read block
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}\n"
                    for name, p in [("b.txt", tmp_path / "b.txt"), ("sub/a.arrow", tmp_path / "sub" / "a.arrow")])
    assert file_digest(tmp_path) == (3_000_003, hashlib.sha256(lines.encode()).hexdigest())


def test_run_repeats_from_its_config_yaml_to_the_same_weights(finished, tiny_model_dir, tmp_path):
    _, out = finished
    new = tmp_path / "repeat"
    assert main(["sft", "--config", str(out / "config.yaml"), "--output-dir", str(new)]) == 0
    want, got = load_file(out / "model.safetensors"), load_file(new / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(want[k], start[k]) for k in want)  # the run trained: equality means something
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_grpo_repeats_from_its_config_yaml(tiny_model_dir, count_e_files, tmp_path):
    base = ["--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"),
            "--reward-fn", f"{count_e_files / 'reward.py'}:count_e", "--max-steps", "2", "--prompts-per-step", "2",
            "--num-generations", "2", "--max-new-tokens", "6", "--learning-rate", "1e-2", "--num-threads", "1",
            "--no-progress-bar", "--eval-on-start", "false"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["grpo", *base, "--output-dir", str(first)]) == 0
    written = yaml.safe_load((first / "config.yaml").read_text())
    assert written["_run"]["trainer"] == "grpo"
    assert written["_run"]["inputs"]["reward_fn"]["sha256"] == hashlib.sha256(
        (count_e_files / "reward.py").read_bytes()).hexdigest()
    assert main(["grpo", "--config", str(first / "config.yaml"), "--output-dir", str(second)]) == 0
    want, got = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(want[k], start[k]) for k in want)  # the policy moved
    assert all(torch.equal(want[k], got[k]) for k in want)


PIPELINE = """
output_dir: {out}
defaults: {{num_threads: 1, progress_bar: false, max_length: 64, eval_on_start: false}}
stages:
  sft: {{type: sft, model: "{model}", dataset: "{data}", max_steps: 2, per_device_batch_size: 4}}
"""


def test_pipeline_reuses_a_finished_stage_and_force_replaces_it(finished, tiny_model_dir, tmp_path):
    data, _ = finished
    config = tmp_path / "pipe.yaml"
    config.write_text(PIPELINE.format(out=tmp_path / "run", model=tiny_model_dir, data=data))
    run_pipeline(config, log=lambda _: None)
    stage = tmp_path / "run" / "sft"
    assert yaml.safe_load((stage / "config.yaml").read_text())["_run"]["trainer"] == "sft"
    before = _files(stage)
    # the trainer finished but the pipeline stopped before marking the stage done: rerun, the run is reused
    (stage / "stage_done.json").unlink()
    results = run_pipeline(config, log=lambda _: None)
    assert results["sft"]["steps"] == 2
    assert {k: v for k, v in _files(stage).items() if k != "stage_done.json"} == \
        {k: v for k, v in before.items() if k != "stage_done.json"}
    (stage / "notes.txt").write_text("mine")
    mtime = (stage / "model.safetensors").stat().st_mtime_ns
    run_pipeline(config, force="sft", log=lambda _: None)  # --force: replaced (overwrite), notes kept
    assert (stage / "model.safetensors").stat().st_mtime_ns > mtime and (stage / "notes.txt").exists()
    rows = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]


def test_ray_run_checks_its_folder_before_ray_starts(tiny_model_dir, count_e_files, tmp_path, capsys):
    out = tmp_path / "ray"
    out.mkdir()
    (out / "summary.json").write_text('{"steps": 4, "task": "ppo"}')
    argv = ["ppo", "--ray", "--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"),
            "--reward-fn", f"{count_e_files / 'reward.py'}:count_e", "--output-dir", str(out), "--no-progress-bar"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"rlhfkit ppo: error: --output-dir {out} holds a finished run "
                                               "(summary.json; step 4); pass --overwrite to replace it, or choose "
                                               "another folder")
    assert main([*argv, "--resume"]) == 0
    assert f"nothing to do: the run in {out} is finished (step 4)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no config.yaml: nothing started


def test_resumed_run_keeps_its_starting_evaluation_in_the_summary(tiny_model_dir, tmp_path):
    """The summary's initial_eval_* (the hacking detector's starting point) survive a resume: the step-0
    evaluation is read back from the kept metrics.jsonl, not lost because it ran in the first process."""
    import shutil

    files = write_toy_task(tmp_path / "data", n_train=16, n_eval=4)
    args = lambda out: [*_sft_args(tiny_model_dir, files["sft_train"], out), "--eval-dataset",  # noqa: E731
                        str(files["sft_eval"]), "--eval-on-start", "true", "--save-steps", "1"]
    full = tmp_path / "full"
    assert main(args(full)) == 0
    want = json.loads((full / "summary.json").read_text())
    assert isinstance(want["initial_eval_loss"], float)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2))
    assert main([*args(resumed), "--resume"]) == 0
    got = json.loads((resumed / "summary.json").read_text())
    assert got["initial_eval_loss"] == want["initial_eval_loss"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
