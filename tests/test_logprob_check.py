"""The rollout/trainer log-prob match check: the pure statistics, and inside `run_rl` with the HF backend (the
difference is ~0 and the check passes) and with perturbed rollout log-probs (a one-line error)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.rollout.generate import HFGenerationBackend, SamplingConfig
from rlhfkit.rollout.logprob_check import (
    LogprobMatch,
    LogprobMismatchError,
    check_logprob_match,
    compare_logprobs,
    response_mask,
    trainer_logprobs,
)
from rlhfkit.trainers.rl import GRPOConfig, PPOConfig, run_rl

# HF backend vs the trainer's forward, fp32 on CPU: the KV-cache decode and the full forward differ by
# round-off only (test_rollout.py bounds it by 2e-5 per token); 1e-4 leaves room for summation order.
HF_TOLERANCE = 1e-4

def test_compare_logprobs_statistics_over_response_tokens():
    rollout = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.1, -1.8, 5.0], [-0.5, 9.0, 9.0]])  # padding (mask 0) is ignored
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    match = compare_logprobs(rollout, trainer, mask)
    assert match.tokens == 3
    assert match.diff_mean == pytest.approx((0.1 + 0.2 + 0.0) / 3, abs=1e-6)
    assert match.diff_max == pytest.approx(0.2, abs=1e-6)
    assert match.ratio_mean == pytest.approx((math.exp(-0.1) + math.exp(0.2) + 1.0) / 3, abs=1e-6)
    assert match.metrics() == {"rollout_logprob_diff_mean": match.diff_mean,
                               "rollout_logprob_diff_max": match.diff_max,
                               "rollout_importance_ratio_mean": match.ratio_mean}
    assert compare_logprobs(rollout, rollout, torch.zeros_like(mask)) == LogprobMatch(0.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="shapes"):
        compare_logprobs(rollout, trainer[:, :2], mask)


def test_check_logprob_match_raises_above_tolerance_and_on_nan():
    check_logprob_match(LogprobMatch(0.05, 0.3, 1.0, 10), tolerance=0.1)
    with pytest.raises(LogprobMismatchError, match=r"mean \|Δ\| 0.2 nats per token > tolerance 0.1.*temperature"):
        check_logprob_match(LogprobMatch(0.2, 0.5, 1.1, 10), tolerance=0.1, where=" at step 1")
    nan = compare_logprobs(torch.tensor([[math.nan]]), torch.tensor([[-1.0]]), torch.tensor([[1]]))
    with pytest.raises(LogprobMismatchError, match="nan"):
        check_logprob_match(nan, tolerance=math.inf)


def test_trainer_logprobs_match_the_hf_rollout(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [tiny_tokenizer(t).input_ids for t in ("Tell me about cats.", "Why?", "A longer prompt, with words.")]
    rollout = HFGenerationBackend(tiny_tokenizer).generate(model, prompts, 2, SamplingConfig(0.7, max_new_tokens=9),
                                                           torch.Generator().manual_seed(4))
    ours = trainer_logprobs(model, rollout.prompt_ids, rollout.response_ids, 0.7, tiny_tokenizer.pad_token_id,
                            batch_size=4)
    assert ours.shape == rollout.logprobs.shape
    match = compare_logprobs(rollout.logprobs, ours, response_mask(rollout.lengths, ours.shape[1]))
    assert match.tokens == sum(rollout.lengths) and match.diff_max < HF_TOLERANCE
    assert (ours[response_mask(rollout.lengths, ours.shape[1]) == 0] == 0).all()


def _config(cls, model_dir, count_e_files, out, **overrides):
    settings = dict(model=str(model_dir), dataset=str(count_e_files / "prompts.jsonl"), output_dir=str(out),
                    reward_fn=f"{count_e_files / 'reward.py'}:count_e", max_new_tokens=12, progress_bar=False,
                    eval_on_start=False, prompts_per_step=2, num_generations=4, learning_rate=1e-2)
    settings.update(overrides)
    return cls(**settings)


def _rows(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]


def test_hf_backend_passes_the_check_every_other_step(tiny_model_dir, count_e_files, tmp_path):
    out = tmp_path / "hf"
    run_rl(_config(GRPOConfig, tiny_model_dir, count_e_files, out, max_steps=3, logprob_check_steps=2,
                   logprob_check_tolerance=HF_TOLERANCE))
    rows = _rows(out)
    checked = [r["step"] for r in rows if "rollout_logprob_diff_mean" in r]
    assert checked == [1, 3]  # steps 1, N+1 (0-based 0 and 2)
    for row in rows:
        if row["step"] in checked:
            assert row["rollout_logprob_diff_mean"] < HF_TOLERANCE
            assert row["rollout_logprob_diff_max"] < 10 * HF_TOLERANCE
            assert row["rollout_importance_ratio_mean"] == pytest.approx(1.0, abs=HF_TOLERANCE)
    # the first minibatch's |Δ| before any update (logged since before) agrees with the check's
    assert rows[0]["rollout_logprob_mismatch"] < HF_TOLERANCE


class PerturbedBackend(HFGenerationBackend):
    """The HF backend with every reported log-prob of a response token shifted by ``delta``."""

    delta = 0.3

    def generate(self, *args, **kwargs):
        rollout = super().generate(*args, **kwargs)
        lengths = torch.as_tensor(rollout.lengths)
        mask = torch.arange(rollout.logprobs.shape[1])[None, :] < lengths[:, None]
        rollout.logprobs = rollout.logprobs + self.delta * mask
        return rollout


def test_perturbed_rollout_logprobs_stop_the_run_with_a_clear_message(tiny_model_dir, count_e_files, tmp_path,
                                                                      monkeypatch, capsys):
    import rlhfkit.trainers.rl.run as rl

    monkeypatch.setattr(rl, "build_rollout_backend", lambda config, tok: PerturbedBackend(tok))
    with pytest.raises(LogprobMismatchError) as info:
        run_rl(_config(PPOConfig, tiny_model_dir, count_e_files, tmp_path / "bad", max_steps=2, num_generations=1))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("rollout and trainer log-probs disagree at step 1 (hf rollouts, ")
    assert "mean |Δ| 0.3 nats per token > tolerance 0.1" in message and "diff_max=0.3" in message
    assert f"ratio_mean={math.exp(-0.3):.4g}" in message
    # the default tolerance (0.1) lets a small shift through, and logs it
    PerturbedBackend.delta = 0.05
    try:
        out = tmp_path / "small"
        run_rl(_config(PPOConfig, tiny_model_dir, count_e_files, out, max_steps=1, num_generations=1))
    finally:
        PerturbedBackend.delta = 0.3
    row = _rows(out)[0]
    assert row["rollout_logprob_diff_mean"] == pytest.approx(0.05, abs=1e-4)
    assert row["rollout_importance_ratio_mean"] == pytest.approx(math.exp(-0.05), abs=1e-4)
    # and from the command line it is a one-line error (exit code 2)
    code = main(["ppo", "--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"),
                 "--output-dir", str(tmp_path / "cli"), "--reward-fn", f"{count_e_files / 'reward.py'}:count_e",
                 "--max-steps", "1", "--prompts-per-step", "2", "--max-new-tokens", "8", "--no-progress-bar"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "log-probs disagree at step 1" in err[0]


def test_bad_check_settings_are_config_errors(tiny_model_dir, count_e_files, tmp_path, capsys):
    base = ["ppo", "--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"), "--output-dir",
            str(tmp_path / "x"), "--reward-fn", f"{count_e_files / 'reward.py'}:count_e"]
    assert main([*base, "--logprob-check-steps", "-2"]) == 2
    assert "--logprob-check-steps must be >= -1" in capsys.readouterr().err
    assert main([*base, "--rollout-backend", "sglang"]) == 2
    assert "--rollout-backend must be one of hf, vllm, not 'sglang'" in capsys.readouterr().err
