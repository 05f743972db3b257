"""SimPO / ORPO / CPO trainers learn held-out preferences without a reference model (LoRA and packing too);
the DPO variants run end to end; TR-DPO's reference follows the policy as its α-mix and resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from toy import preference_rows, write_jsonl

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.trainers import dpo as dpo_trainer
from rlhfkit.trainers.configs import CPOConfig, DPOConfig, ORPOConfig, SimPOConfig
from rlhfkit.trainers.dpo import run_dpo
from rlhfkit.trainers.reference_free import run_reference_free

FAST = {"progress_bar": False, "max_length": 64, "num_threads": 2, "seed": 0}


@pytest.fixture(scope="module")
def style_pairs(tmp_path_factory):
    """Toy pairs whose rejected reply is rude or a refusal (not merely a wrong answer): a difference a tiny
    model can learn from scratch and that carries over to the held-out questions of the eval file."""
    root = tmp_path_factory.mktemp("style_pairs")

    def rows(n: int, seed: int, split: str) -> list[dict]:
        bad_style = [r for r in preference_rows(4 * n, seed, split) if r["rejected"][0] not in "SHGO"]
        return bad_style[:n]

    return write_jsonl(rows(192, 1, "train"), root / "train.jsonl"), write_jsonl(rows(64, 2000, "eval"),
                                                                                  root / "eval.jsonl")


def _count_model_loads(monkeypatch) -> list[str]:
    loaded: list[str] = []
    real = dpo_trainer.load_causal_lm

    def counting(name, **kwargs):
        loaded.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(dpo_trainer, "load_causal_lm", counting)
    return loaded


OBJECTIVES = {
    "simpo": (SimPOConfig, {}),
    "orpo": (ORPOConfig, {}),
    "cpo": (CPOConfig, {"cpo_alpha": 0.2}),  # a lighter BC term: the preference term leads within 12 steps
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_reference_free_objective_learns_heldout_preferences(name, tiny_model_dir, style_pairs, tmp_path,
                                                             monkeypatch):
    loaded = _count_model_loads(monkeypatch)
    config_class, extra = OBJECTIVES[name]
    train, held_out = style_pairs
    summary = run_reference_free(config_class(
        model=str(tiny_model_dir), dataset=str(train), eval_dataset=str(held_out), output_dir=str(tmp_path / name),
        max_steps=12, per_device_batch_size=16, learning_rate=1e-2, lr_scheduler_type="constant", **extra, **FAST))
    assert loaded == [str(tiny_model_dir)]  # the policy only: no reference model
    assert summary["task"] == name
    assert summary["eval_reward_accuracy"] >= 0.8, summary
    assert summary["eval_reward_accuracy"] > summary["initial_eval_reward_accuracy"] + 0.05, summary
    assert summary["eval_loss"] < summary["initial_eval_loss"], summary


@pytest.mark.slow
def test_simpo_with_lora_and_packing(tiny_model_dir, style_pairs, tmp_path):
    train, held_out = style_pairs
    summary = run_reference_free(SimPOConfig(
        model=str(tiny_model_dir), dataset=str(train), eval_dataset=str(held_out), output_dir=str(tmp_path / "lora"),
        max_steps=12, per_device_batch_size=16, learning_rate=3e-2, lr_scheduler_type="constant", lora_r=8,
        packing="on", **FAST))
    assert summary["packing"] is True
    assert summary["eval_reward_accuracy"] >= 0.8, summary
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()  # LoRA trained (and merged)


def test_dpo_variants_run_and_ld_weighting_applies_to_the_reference_too(tiny_model_dir, style_pairs, tmp_path):
    """sigmoid_norm with LD-DPO weighting and precomputed reference log-probs: before training the policy is
    the reference, so every implicit reward is 0 only if both sides are weighted alike."""
    train, held_out = style_pairs
    few = write_jsonl([json.loads(line) for line in held_out.read_text().splitlines()[:16]], tmp_path / "few.jsonl")
    summary = run_dpo(DPOConfig(
        model=str(tiny_model_dir), dataset=str(few), eval_dataset=str(few), output_dir=str(tmp_path / "ld"),
        max_steps=1, per_device_batch_size=8, learning_rate=1e-3, loss_type="sigmoid_norm", ld_alpha=0.5,
        precompute_ref=True, **FAST))
    assert summary["initial_eval_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert summary["initial_eval_chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "ld" / "ref_logps.pt").exists()


@pytest.mark.parametrize(("flags", "message"), [
    ({"precompute_ref": True}, "--sync-ref-model: the reference changes during training"),
    ({"lora_r": 4}, "--sync-ref-model: with LoRA"),
    ({"ref_model_mixup_alpha": 0.0}, "--ref-model-mixup-alpha must be in (0, 1]"),
    ({"ref_model_sync_steps": 0}, "--ref-model-sync-steps must be >= 1"),
])
def test_trdpo_refuses_what_it_cannot_do(flags, message, tmp_path):
    config = DPOConfig(model="m", dataset="d", output_dir=str(tmp_path / "o"), sync_ref_model=True, **flags)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_dpo(config)


def _checkpoint_reference(path) -> tuple[int, dict[str, torch.Tensor]]:
    for file in sorted(path.glob("custom_checkpoint_*.pkl")):
        state = torch.load(file, weights_only=False)
        if isinstance(state, dict) and "reference" in state:
            return state["updates"], state["reference"]
    raise AssertionError(f"no reference state in {path}")


@pytest.mark.slow
def test_trdpo_reference_is_the_alpha_mix_and_resumes(tiny_model_dir, style_pairs, tmp_path):
    train, _ = style_pairs
    alpha = 0.5

    def config(out, **kw):
        return DPOConfig(model=str(tiny_model_dir), dataset=str(train), output_dir=str(out), max_steps=4,
                         per_device_batch_size=4, learning_rate=1e-3, beta=0.5, sync_ref_model=True,
                         ref_model_mixup_alpha=alpha, ref_model_sync_steps=2, save_steps=2, eval_on_start=False,
                         **FAST, **kw)

    full = tmp_path / "full"
    run_dpo(config(full))
    updates, reference = _checkpoint_reference(full / "checkpoint-2")
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    policy = load_file(str(full / "checkpoint-2" / "model.safetensors"))
    assert updates == 2
    compared = 0
    for name, ref in reference.items():
        if name in policy and name in start:
            torch.testing.assert_close(ref, alpha * policy[name] + (1 - alpha) * start[name], atol=1e-6, rtol=1e-6)
            compared += 1
    assert compared > 5
    assert any(not torch.equal(reference[k], start[k]) for k in start if k in reference)  # it did move

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    run_dpo(config(resumed, resume=True))
    want, got = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)


def test_reference_free_help_needs_no_torch():
    code = ("import sys\nfrom rlhfkit.cli import main\nfor name in ('simpo', 'orpo', 'cpo'):\n"
            "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--simpo-gamma" in out and "--cpo-alpha" in out and out.strip().endswith("NO-TORCH")


@pytest.mark.slow
@pytest.mark.parametrize(("trainer", "extra"), [
    ("orpo", []),
    ("cpo", []),
    ("dpo", ["--sync-ref-model", "--ref-model-sync-steps", "1", "--ref-model-mixup-alpha", "0.5"]),  # TR-DPO
])
def test_two_processes_equal_one(trainer, extra, tiny_model_dir, style_pairs, tmp_path):
    """torchrun, 2 processes x 2 micro-batches of 2 = one process with a batch of 8 (per-pair normalisation
    over the global batch; TR-DPO's reference mixed identically on every rank)."""
    train, _ = style_pairs
    args = [trainer, "--model", str(tiny_model_dir), "--dataset", str(train), "--max-steps", "3", "--learning-rate",
            "1e-3", "--no-progress-bar", "--num-threads", "1", "--seed", "3", "--max-length", "64", *extra]
    single = tmp_path / "single"
    assert main([*args, "--per-device-batch-size", "8", "--output-dir", str(single)]) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, "-m", "rlhfkit", *args, "--per-device-batch-size", "2",
                           "--gradient-accumulation-steps", "2", "--output-dir", str(double)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    want, got = losses(single), losses(double)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), step
    a, b = load_file(str(single / "model.safetensors")), load_file(str(double / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a if k in start) > 1e-3  # it trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_reference_free_resume_equals_uninterrupted(name, tiny_model_dir, style_pairs, tmp_path):
    """Stopped after checkpoint 2 of 4 and resumed: the uninterrupted run's weights (fp32 round-off only)."""
    train, _ = style_pairs
    cls, extra = OBJECTIVES[name]

    def config(out, **kw):
        return cls(model=str(tiny_model_dir), dataset=str(train), output_dir=str(out), max_steps=4,
                   per_device_batch_size=4, learning_rate=1e-3, save_steps=2, eval_on_start=False, **FAST, **extra,
                   **kw)

    full = tmp_path / "full"
    run_reference_free(config(full))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    run_reference_free(config(resumed, resume=True))
    want, got = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(want[k], start[k]) for k in start if k in want)  # it trained
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)
