"""Fault tests: SIGKILL / SIGTERM mid-run, then --resume, ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from toy import write_toy_task

from rlhfkit.engine.checkpoint import atomic_dir_write, list_checkpoints

STEPS = 14


def _sft_cmd(model_dir, data, out, *extra):
    return [sys.executable, "-m", "rlhfkit", "sft", "--model", str(model_dir), "--dataset", str(data),
            "--output-dir", str(out), "--max-steps", str(STEPS), "--per-device-batch-size", "8",
            "--learning-rate", "1e-3", "--max-length", "64", "--save-steps", "2", "--save-total-limit", "3",
            "--num-threads", "2", "--no-progress-bar", "--eval-on-start", "false", *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _wait_for_checkpoint(proc, out, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s, _ in list_checkpoints(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {step}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def _assert_checkpoints_complete(out):
    for _step, path in list_checkpoints(out):
        state = load_file(str(path / "model.safetensors"))  # complete: loads without error
        assert state and (path / "optimizer.bin").exists(), path


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_match_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_toy_task(tmp_path / "data", n_train=96, n_eval=8)["sft_train"]
    reference = tmp_path / "reference"
    subprocess.run(_sft_cmd(tiny_model_dir, data, reference), check=True, env=_env(), capture_output=True)

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(_sft_cmd(tiny_model_dir, data, out), env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, out, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_checkpoints_complete(out)
    killed_at = list_checkpoints(out)[-1][0]
    assert killed_at < STEPS
    # the same command without --resume is refused, and leaves the checkpoints as they were
    refused = subprocess.run(_sft_cmd(tiny_model_dir, data, out), env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "holds an unfinished run" in refused.stderr
    assert "pass --resume to continue it" in refused.stderr.strip().splitlines()[-1]
    assert list_checkpoints(out)[-1][0] == killed_at

    # resume, then stop politely with SIGTERM: a checkpoint is written at that step before exiting
    proc = subprocess.Popen(_sft_cmd(tiny_model_dir, data, out, "--resume"), env=_env(), stderr=subprocess.PIPE,
                            text=True)
    _wait_for_checkpoint(proc, out, killed_at + 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) in (0, 128 + signal.SIGTERM)
    _assert_checkpoints_complete(out)

    finished = subprocess.run(_sft_cmd(tiny_model_dir, data, out, "--resume"), env=_env(), capture_output=True,
                              text=True)
    assert finished.returncode == 0, finished.stderr
    assert "resumed from" in finished.stderr
    want, got = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in want:  # tolerance: float32 round-off only (same threads, same data order)
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == STEPS and len(steps) == len(set(steps)) == STEPS


def test_crash_while_writing_leaves_no_checkpoint_behind(tmp_path):
    def write_then_crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        atomic_dir_write(tmp_path / "checkpoint-3", write_then_crash)
    assert not (tmp_path / "checkpoint-3").exists()
    assert list_checkpoints(tmp_path) == []

    def write_ok(tmp):
        (tmp / "trainer_state.json").write_text("{}")

    atomic_dir_write(tmp_path / "checkpoint-3", write_ok)  # the stale temp folder is replaced
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert not (tmp_path / ".checkpoint-3.tmp").exists()
