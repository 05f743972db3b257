"""The RL trainers on tool episodes (issue 24): forced tool-turn tokens carry no loss, KL or advantage, GAE runs
over a row's policy tokens as one sequence, tool metrics are logged, and what cannot carry tools is refused."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from toy import TOOLS_SOURCE as TOOLS_FILE

from rlhfkit.errors import ConfigError
from rlhfkit.losses import gae
from rlhfkit.rollout.episodes import ToolEpisodes
from rlhfkit.rollout.generate import Rollout
from rlhfkit.trainers.rl import (
    GRPOConfig,
    GSPOConfig,
    PPOConfig,
    ReinforcePPConfig,
    RLOOConfig,
    RLTask,
    build_experience,
)
from rlhfkit.trainers.rl.config import check_config

F64 = torch.float64
# 1 = the policy's token, 0 = a forced tool-turn token: holes in the middle of rows, one row without any
MASKS = [[1, 1, 0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0, 1, 1, 1], [1, 1, 0, 1, 1]]
SCORES = torch.tensor([1.0, -0.5, 2.0, 0.25])



def _rollout(seed=0):
    """A hand-made tool rollout (forced tokens' log-probs 0, as the decode loop records them), its reference
    log-probs and values flat, and the same rollout with the forced tokens removed."""
    gen = torch.Generator().manual_seed(seed)
    width, lengths = max(map(len, MASKS)), [len(m) for m in MASKS]
    mask = torch.tensor([m + [0] * (width - len(m)) for m in MASKS], dtype=torch.float32)
    logps = (-torch.rand((len(MASKS), width), generator=gen) * 3) * mask
    ref = [(-torch.rand(n, generator=gen) * 3) for n in lengths]
    values = [torch.randn(n, generator=gen) for n in lengths]
    responses = [[10 + 7 * i + t for t in range(n)] for i, n in enumerate(lengths)]
    full = Rollout([[1, 2]] * 4, responses, [True] * 4, logps, policy_mask=mask, turns=[2, 1, 2, 2],
                   tool_calls=[1, 0, 1, 1])
    keep = [torch.tensor(m).bool() for m in MASKS]
    kept = [int(k.sum()) for k in keep]
    compact_logps = torch.zeros((4, max(kept)))
    for i, k in enumerate(keep):
        compact_logps[i, :kept[i]] = logps[i, :len(k)][k]
    compact = Rollout([[1, 2]] * 4, [[r for r, k in zip(resp, k) if k] for resp, k in zip(responses, keep)],
                      [True] * 4, compact_logps)
    flat = {"full": (torch.cat(ref), torch.cat(values)),
            "compact": (torch.cat([r[k] for r, k in zip(ref, keep)]), torch.cat([v[k] for v, k in zip(values, keep)]))}
    return full, compact, flat, keep


def _experience(cfg, rollout, ref, values):
    n = len(rollout.lengths)
    return build_experience(cfg, 0.1, [{"prompt": "p"}] * 4, rollout, ["x"] * n, SCORES, SCORES,
                            ref, values, 0.1, "test")


CONFIGS = {
    "grpo_k1_reward": (GRPOConfig, dict(kl_mode="reward", kl_estimator="k1")),
    "grpo_k3_loss": (GRPOConfig, {}),
    "rloo_whitened": (RLOOConfig, dict(whiten_advantages=True, kl_mode="reward")),
    "reinforce_pp_discounted": (ReinforcePPConfig, dict(gamma=0.9)),
    "reinforce_pp_baseline": (ReinforcePPConfig, dict(advantage="reinforce_pp_baseline", num_generations=2)),
    "ppo_gae": (PPOConfig, dict(gamma=0.9, lam=0.8, kl_estimator="k1")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forced_tokens_get_nothing_and_policy_tokens_what_a_run_without_them_gets(name, tmp_path):
    """Loss mask, KL and advantages are exactly 0 on forced tokens; on the policy's tokens everything equals the
    experience of the same rollout with the forced tokens cut out (KL summed over policy tokens, group
    baselines per row, whitening and GAE over the policy tokens only)."""
    cls, overrides = CONFIGS[name]
    cfg = cls(model="m", dataset="d", output_dir=str(tmp_path), **{"num_generations": 2, **overrides})
    full, compact, flat, keep = _rollout()
    with_values = cfg.advantage == "gae"
    exp = _experience(cfg, full, flat["full"][0], flat["full"][1] if with_values else None)
    ref = _experience(cfg, compact, flat["compact"][0], flat["compact"][1] if with_values else None)
    torch.testing.assert_close(exp.kl_seq, ref.kl_seq, rtol=0, atol=1e-6)
    fields = ["advantages", "old_logps", "ref_logps"] + (["returns", "old_values"] if with_values else [])
    for record, short, k in zip(exp.records, ref.records, keep):
        assert record["loss_keep"].tolist() == k.float().tolist() == record["policy_mask"].tolist()
        assert record["advantages"][~k].eq(0).all()
        for field in fields:
            torch.testing.assert_close(record[field][k], short[field], rtol=0, atol=1e-5, msg=field)
    assert exp.metrics["kl"] == pytest.approx(ref.metrics["kl"], abs=1e-6)
    # the episode counts over ranks (one rank here): .tool_rollouts.ToolRollouts.metrics
    from rlhfkit.trainers.rl.tool_rollouts import ToolRollouts

    counts = ToolRollouts.metrics(SimpleNamespace(started=[]), full, lambda t: t)
    assert counts == {"turns_mean": 1.75, "tool_calls_mean": 0.75}
    if with_values:
        assert exp.metrics["explained_variance"] == pytest.approx(ref.metrics["explained_variance"], abs=1e-5)


def _gae_loop(rewards, values, mask, gamma, lam):
    """GAE over each row's policy tokens only, as one sequence: plain Python, float64."""
    adv = [[0.0] * len(r) for r in rewards]
    for i, (r, v, m) in enumerate(zip(rewards, values, mask)):
        positions = [t for t, x in enumerate(m) if x]
        running, next_value = 0.0, 0.0
        for t in reversed(positions):
            delta = r[t] + gamma * next_value - v[t]
            running = delta + gamma * lam * running
            adv[i][t], next_value = running, v[t]
    return adv


def test_gae_skips_the_holes_float64(tmp_path):
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=F64)
    rewards, values = torch.randn(3, 7, generator=gen, dtype=F64), torch.randn(3, 7, generator=gen, dtype=F64)
    advantages, returns = gae(rewards, values, mask, 0.9, 0.8)
    expected = torch.tensor(_gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8), dtype=F64)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, (expected + values) * mask, rtol=0, atol=1e-12)
    # and in build_experience: r_t = -β·k1_t on the policy tokens, the score on the last one
    cfg = PPOConfig(model="m", dataset="d", output_dir=str(tmp_path), gamma=0.9, lam=0.8, kl_estimator="k1",
                    whiten_advantages=False)
    full, _, flat, keep = _rollout(seed=5)
    exp = _experience(cfg, full, *flat["full"])
    for i, (record, k) in enumerate(zip(exp.records, keep)):
        kl = (record["old_logps"].double() - record["ref_logps"].double()) * k
        r = (-0.1 * kl).tolist()
        r[max(t for t, x in enumerate(k.tolist()) if x)] += float(SCORES[i])
        want = _gae_loop([r], [record["old_values"].double().tolist()], [k.tolist()], 0.9, 0.8)[0]
        torch.testing.assert_close(record["advantages"].double(), torch.tensor(want, dtype=F64), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("cls", "aggregation"), [(GRPOConfig, "token_mean"), (GRPOConfig, "sequence_mean"),
                                                   (GSPOConfig, "sequence_mean")])
def test_the_loss_has_no_gradient_on_forced_tokens(cls, aggregation, tiny_tokenizer, tmp_path):
    """The update's batch counts policy tokens only, and the loss's gradient is exactly 0 on the forced ones
    (GSPO: its sequence ratio is over the policy's tokens)."""
    cfg = cls(model="m", dataset="d", output_dir=str(tmp_path), num_generations=2, kl_coef=0.1,
              loss_aggregation=aggregation, entropy_coef=0.01)
    full, _, flat, keep = _rollout()
    exp = _experience(cfg, full, flat["full"][0], None)
    task = RLTask(cfg, tiny_tokenizer, True, None, None, None, [])
    batch = task.collate(exp.records)
    policy_tokens = sum(int(k.sum()) for k in keep)
    assert task.batch_weight(batch) == (policy_tokens if aggregation == "token_mean" else 4)
    assert batch["response_lengths"].tolist() == [float(k.sum()) for k in keep]
    logits = torch.randn(sum(map(len, keep)), len(tiny_tokenizer), generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    loss, sums = task._policy_loss(logits, batch)
    loss.backward()
    moved = logits.grad.abs().sum(-1) > 0
    assert moved.tolist() == torch.cat(keep).tolist()
    assert sums["approx_kl"][1] == policy_tokens  # the logged statistics are over the policy's tokens too


# ----------------------------------------------------------------------------- end to end


class ScriptedCalls(ToolEpisodes):
    """The tiny model never writes a call: rows 0 and 2 of every rollout start with one (forced)."""

    def start(self, tokenizer, *args, **kwargs):
        super().start(tokenizer, *args, **kwargs)
        call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
        for row in (0, 2):
            self.force(row, tokenizer(call, add_special_tokens=False).input_ids)


def test_grpo_with_tools_logs_tool_metrics(tiny_model_dir, count_e_files, tmp_path, monkeypatch):
    from test_rl_variants import _run

    import rlhfkit.rollout.tool_prompts as tool_prompts_module

    tools = tmp_path / "rl_tools.py"
    tools.write_text(TOOLS_FILE)
    monkeypatch.setattr(tool_prompts_module, "ToolEpisodes", ScriptedCalls)
    # the log-prob check at step 1 (on by default) passes only if the forced tokens are left out of it
    rows = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "out", tools=f"{tools}:add", max_steps=2,
                max_new_tokens=96, num_generations=2, tool_timeout=20.0)
    assert len(rows) == 2 and rows[0]["rollout_logprob_diff_mean"] < 0.1
    for row in rows:
        assert row["tools/calls"] >= 2 and row["tools/errors"] == 0 and row["tools/seconds"] > 0
        assert row["turns_mean"] > 1 and row["tool_calls_mean"] >= 0.5
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert any("<tool_call>" in s["response"] for s in samples)


def test_without_tools_no_tool_metrics(tiny_model_dir, count_e_files, tmp_path):
    from test_rl_variants import _run

    row = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "out", num_generations=2)[0]
    assert not any(k.startswith("tools/") for k in row) and "turns_mean" not in row


# ----------------------------------------------------------------------------- refusals


def _refusal(config, check=check_config):
    with pytest.raises(ConfigError) as info:
        check(config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_what_cannot_carry_tools_is_refused_in_one_line(tmp_path):
    tools = tmp_path / "rl_tools.py"
    tools.write_text(TOOLS_FILE)
    base = dict(model="m", dataset="d", output_dir=str(tmp_path), tools=f"{tools}:add")
    assert "vLLM" in _refusal(GRPOConfig(**base, rollout_backend="vllm"))
    assert "--prompt-format raw" in _refusal(GRPOConfig(**base, prompt_format="raw"))
    assert "--tool-timeout" in _refusal(GRPOConfig(**base, tool_timeout=0))
    assert "nope" in _refusal(GRPOConfig(**{**base, "tools": f"{tools}:nope"}))
    check_config(GRPOConfig(**base))  # the plain case passes

    from rlhfkit.distributed import with_ray_options
    from rlhfkit.distributed.options import check_ray_config

    assert "--tools" in _refusal(with_ray_options(GRPOConfig)(**base), check_ray_config)


# ----------------------------------------------------------------------------- resume


# wall-clock metrics differ between any two runs; everything else a step logs must be equal after a resume
_CLOCK = ("seconds", "time", "per_s", "throughput", "elapsed", "memory", "mem_")


@pytest.mark.parametrize("cls", [GRPOConfig, PPOConfig], ids=["grpo", "ppo"])
def test_tool_run_resumes_to_the_uninterrupted_run(cls, tiny_model_dir, count_e_files, tmp_path, monkeypatch):
    """A run with tools resumed from checkpoint 1 ends with exactly the uninterrupted run's weights
    (torch.equal) and the same per-step metrics, the tool metrics included; calls happen after the checkpoint
    (rows 0 and 2 of every rollout are scripted to call add: the tiny model never writes a call itself)."""
    import shutil

    from safetensors.torch import load_file
    from test_rl_variants import _run

    import rlhfkit.rollout.tool_prompts as tool_prompts_module

    tools = tmp_path / "rl_tools.py"
    tools.write_text(TOOLS_FILE)
    monkeypatch.setattr(tool_prompts_module, "ToolEpisodes", ScriptedCalls)
    # 96 tokens: the scripted call (54) and its tool turn (30) fit, so the turn is taken, not truncated; one
    # thread: tiny matmuls on a busy machine are ten times faster so (both runs the same, so still exact)
    per_prompt = dict(num_generations=2) if cls is GRPOConfig else dict(num_generations=1, prompts_per_step=4)
    settings = dict(tools=f"{tools}:add", max_steps=2, save_steps=1, max_new_tokens=96, learning_rate=3e-3,
                    tool_timeout=20.0, num_threads=1, **per_prompt)
    full = tmp_path / "full"
    rows = _run(cls, tiny_model_dir, count_e_files, full, **settings)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["tools/calls"] >= 2 and rows[1]["turns_mean"] > 1  # the step after the checkpoint calls
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    again = _run(cls, tiny_model_dir, count_e_files, resumed, resume=True, **settings)
    assert [r["step"] for r in again] == [2]
    keys = {k for k in rows[1] if not any(c in k for c in _CLOCK)}
    assert {"tools/calls", "tools/errors", "turns_mean", "tool_calls_mean", "loss", "reward_mean"} <= keys
    assert keys <= set(again[0])
    assert {k: again[0][k] for k in sorted(keys)} == {k: rows[1][k] for k in sorted(keys)}
    want, got = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert want.keys() == got.keys()
    assert [name for name in want if not torch.equal(got[name], want[name])] == []
