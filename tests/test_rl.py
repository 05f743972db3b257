"""PPO / GRPO / RLOO end to end on a tiny model with a programmatic reward (share of the letter 'e').

The reward is a verifiable function (``--reward-fn file.py:function``): it rewards responses whose text
holds many 'e's, which a random-init tiny model can learn within tens of steps. Runs are seeded and
deterministic on one machine; the margins below are several times the step-to-step noise.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.engine import TrainingError
from rlhfkit.trainers.rl import GRPOConfig, PPOConfig, RLOOConfig, run_rl

REWARD_FILE = '''
import math
CALLS = 0

def count_e(prompts, responses):
    return [r.count("e") / 4.0 for r in responses]

def nan_on_third_call(prompts, responses):
    global CALLS
    CALLS += 1
    return [math.nan if CALLS == 3 else r.count("e") / 4.0 for r in responses]
'''


@pytest.fixture(scope="module")
def rl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    (root / "reward.py").write_text(REWARD_FILE)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n"
                                                for i in range(64)))
    (root / "eval.jsonl").write_text("".join(json.dumps({"prompt": f"Describe thing {i}."}) + "\n"
                                             for i in range(8)))
    return root


def _config(cls, model_dir, files, out, **overrides):
    settings = dict(model=str(model_dir), dataset=str(files / "prompts.jsonl"), output_dir=str(out),
                    reward_fn=f"{files / 'reward.py'}:count_e", max_new_tokens=16, progress_bar=False,
                    eval_on_start=False, prompts_per_step=2, num_generations=4)
    settings.update(overrides)
    return cls(**settings)


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


# (config class, settings of the adaptive-β run): tuned so that the rise and the KL band hold on several seeds
ALGORITHMS = {
    "ppo": (PPOConfig, dict(prompts_per_step=16, num_generations=1, ppo_epochs=2, kl_target=4.0, kl_horizon=64,
                            kl_coef=0.5, learning_rate=3e-3)),
    "grpo": (GRPOConfig, dict(kl_target=4.0, kl_horizon=32, kl_coef=1.0, learning_rate=5e-3)),
    "rloo": (RLOOConfig, dict(num_generations=8, kl_target=4.0, kl_horizon=64, kl_coef=0.5, learning_rate=7e-3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_reward_rises_with_kl_near_target_and_large_beta_stays_near_reference(algorithm, tiny_model_dir,
                                                                              rl_files, tmp_path):
    cls, adaptive = ALGORITHMS[algorithm]
    out = tmp_path / "adaptive"
    run_rl(_config(cls, tiny_model_dir, rl_files, out, max_steps=50, **adaptive))
    rows = _rows(out)
    first, last = rows[:10], rows[-10:]
    # +0.25 is > 3x the noise of a 10-step mean (per-response std ~0.5 over >= 80 responses)
    assert _mean(last, "reward_mean") > _mean(first, "reward_mean") + 0.25, (first, last)
    # the controller holds KL near the 4-nat target (rloo after test_report.py reaches 8.1: order-dependent state)
    assert 0.5 * 4.0 <= _mean(last, "kl") <= 2.5 * 4.0
    assert rows[-1]["beta"] < adaptive["kl_coef"]  # it lowered β from a deliberately high start

    # The leash: at the same learning rate, β = 2 keeps the policy far closer to the reference than β = 0.
    common = {**adaptive, "kl_target": None, "learning_rate": 3e-3}
    kls = {}
    for beta in (0.0, 2.0):
        run_out = tmp_path / f"beta{beta}"
        run_rl(_config(cls, tiny_model_dir, rl_files, run_out, max_steps=30, **{**common, "kl_coef": beta}))
        kls[beta] = _mean(_rows(run_out)[-5:], "kl")
    assert kls[2.0] < 0.5 * kls[0.0], kls
    assert kls[2.0] < 1.0, kls


def test_cli_grpo_logs_every_step_and_writes_samples(tiny_model_dir, rl_files, tmp_path):
    out = tmp_path / "grpo"
    code = main(["grpo", "--model", str(tiny_model_dir), "--dataset", str(rl_files / "prompts.jsonl"),
                 "--eval-dataset", str(rl_files / "eval.jsonl"), "--output-dir", str(out),
                 "--reward-fn", f"{rl_files / 'reward.py'}:count_e", "--max-steps", "3", "--max-new-tokens", "8",
                 "--num-generations", "4", "--prompts-per-step", "2", "--sample-steps", "2",
                 "--no-progress-bar", "--learning-rate", "1e-3", "--per-device-batch-size", "3"])
    assert code == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "kl", "reward_penalized", "beta", "entropy", "clip_frac",
                "approx_kl", "response_length", "no_eos_rate", "rollout_tokens_per_s", "train_tokens_per_s",
                "loss", "learning_rate"):
        assert all(key in r and r[key] == r[key] for r in rows), key  # present and not NaN
    assert all(r["reward/count_e"] == pytest.approx(r["reward_mean"], abs=1e-6) for r in rows)  # the one source
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # before any update the policy is the reference
    assert rows[0]["rollout_logprob_mismatch"] < 1e-4  # sampler and trainer agree on log-probs
    assert rows[0]["clip_frac"] == 0.0  # one update per rollout: the ratio is exactly 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    assert all(isinstance(s["response"], str) and "reward" in s for s in samples)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_reward_mean" in line]
    assert evals and "eval_kl" in evals[-1]
    assert evals[-1]["eval_reward/count_e"] == pytest.approx(evals[-1]["eval_reward_mean"], abs=1e-6)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_ppo_resume_after_nan_reward_matches_uninterrupted(tiny_model_dir, rl_files, tmp_path):
    """A NaN reward stops the run with a message naming the last good checkpoint; resuming from it (with
    the reward fixed) reproduces the uninterrupted run: weights, β and the reward normaliser."""
    settings = dict(prompts_per_step=4, num_generations=1, ppo_epochs=2, num_minibatches=2,
                    per_device_batch_size=2, learning_rate=3e-3, kl_target=1.0, kl_horizon=8,
                    reward_normalize=True, max_steps=4, save_steps=2)
    full = tmp_path / "full"
    run_rl(_config(PPOConfig, tiny_model_dir, rl_files, full, **settings))

    broken = tmp_path / "broken"
    with pytest.raises(TrainingError, match=r"returned nan.*checkpoint-2"):
        run_rl(_config(PPOConfig, tiny_model_dir, rl_files, broken,
                       reward_fn=f"{rl_files / 'reward.py'}:nan_on_third_call", **settings))
    assert (broken / "checkpoint-2" / "trainer_state.json").exists()
    assert not (broken / "model.safetensors").exists()
    run_rl(_config(PPOConfig, tiny_model_dir, rl_files, broken, resume=True, **settings))

    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(broken / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name  # tolerance: fp32 round-off
    rows_a, rows_b = _rows(full), _rows(broken)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("reward_mean", "beta", "kl", "score_mean"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert rows_a[-1]["beta"] != 0.05  # the adaptive β moved, so its restore was tested


def test_grpo_with_lora_uses_disabled_adapter_as_reference(tiny_model_dir, rl_files, tmp_path):
    out = tmp_path / "lora"
    run_rl(_config(GRPOConfig, tiny_model_dir, rl_files, out, max_steps=2, lora_r=4, learning_rate=1e-2))
    rows = _rows(out)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert rows[1]["kl"] != 0.0  # the adapters moved the policy away from the (adapter-free) reference
    assert (out / "adapter" / "adapter_config.json").exists()


def test_ppo_with_value_model_from_reward_model(tiny_model_dir, rl_files, tmp_path):
    from rlhfkit.models.tiny import build_tiny_model

    rm_dir = build_tiny_model(tmp_path / "rm", reward=True)
    runs = {}
    for checkpointing in (False, True):  # activation checkpointing on the policy and the value model
        out = tmp_path / f"ppo_rm_{checkpointing}"
        run_rl(_config(PPOConfig, tiny_model_dir, rl_files, out, reward_fn=None, reward_model=str(rm_dir),
                       critic="reward_model", prompts_per_step=4, num_generations=1, max_steps=2,
                       learning_rate=1e-3, missing_eos_penalty=1.0, gradient_checkpointing=checkpointing))
        runs[checkpointing] = _rows(out)
    rows = runs[False]
    for plain, checkpointed in zip(rows, runs[True], strict=True):  # it changes memory, not the run
        for key in ("loss", "value_loss", "kl", "score_mean"):
            assert checkpointed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    assert all(r["value_loss"] > 0 and r["value_loss"] == r["value_loss"] for r in rows)
    assert all(-1.0 <= r["explained_variance"] <= 1.0 for r in rows)
    assert rows[0]["no_eos_rate"] > 0  # a random model rarely ends within 16 tokens: the penalty applies
    assert rows[0]["score_mean"] == pytest.approx(rows[0]["reward_mean"] - rows[0]["no_eos_rate"], abs=1e-5)


def test_bad_rl_settings_are_one_line_errors(tiny_model_dir, rl_files, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--dataset", str(rl_files / "prompts.jsonl"), "--output-dir",
            str(tmp_path / "x")]
    assert main(["grpo", *base, "--reward-fn", f"{rl_files / 'reward.py'}:count_e", "--num-generations", "1"]) == 2
    assert "needs --num-generations >= 2" in capsys.readouterr().err
    assert main(["ppo", *base]) == 2
    assert "give a reward source" in capsys.readouterr().err
    assert main(["ppo", *base, "--reward-fn", f"{rl_files / 'reward.py'}:nope"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "has no function 'nope'" in errors[0]


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_micro_batching_equals_one_batch(aggregation, tiny_model_dir, rl_files, tmp_path):
    """Splitting the minibatch into uneven micro-batches (3+3+2 sequences) gives the same loss and the same
    accumulated gradient as one batch of 8: the loss is normalised by the whole step's tokens (or
    responses), not per micro-batch. (Weights after AdamW are not compared: Adam turns fp32 round-off in
    near-zero gradients into full-size steps.)"""
    rows = []
    for size in (8, 3):
        out = tmp_path / f"mb{size}"
        run_rl(_config(GRPOConfig, tiny_model_dir, rl_files, out, max_steps=1, learning_rate=1e-2,
                       per_device_batch_size=size, loss_aggregation=aggregation, max_grad_norm=1e9))
        rows.append(_rows(out)[0])
    assert rows[0]["grad_norm"] > 0
    for key in ("loss", "grad_norm", "policy_loss", "entropy"):
        # abs: a GRPO loss is ~0 at the first step (group advantages sum to zero), a sum of O(1) terms whose
        # fp32 round-off (~1e-7) depends on how the batch is split; the gradient norm carries the check
        assert rows[0][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-6), key


def test_shared_prompt_packing_equals_whole_samples(tiny_model_dir, rl_files, tmp_path):
    """GRPO with each group's prompt packed once (the default) matches the same step with every sample packed
    whole: the same rollout, KL to the reference, loss and gradient."""
    rows, summaries = [], []
    for share in (True, False):
        out = tmp_path / f"share{share}"
        summaries.append(run_rl(_config(GRPOConfig, tiny_model_dir, rl_files, out, max_steps=1, learning_rate=1e-2,
                                        max_grad_norm=1e9, share_prompts=share)))
        rows.append(_rows(out)[0])
    assert [s["shared_prompts"] for s in summaries] == [True, False]
    assert rows[0]["reward_mean"] == rows[1]["reward_mean"] and rows[0]["grad_norm"] > 0
    for key in ("kl", "loss", "grad_norm", "policy_loss", "entropy", "rollout_logprob_mismatch"):
        assert rows[0][key] == pytest.approx(rows[1][key], rel=1e-4, abs=1e-6), key
