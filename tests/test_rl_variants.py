"""float64 tests of rlhfkit.losses.rl_variants (GSPO, REINFORCE++, GRPO scale_rewards, DAPO, TIS) and of the
value_clip_frac count, each against a direct transcription of the paper's equation (plain Python loops)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    group_advantages,
    group_reward_spread,
    overlong_penalty,
    reinforce_pp_advantages,
    scaled_group_advantages,
    sequence_policy_loss,
    truncated_importance_weights,
)
from rlhfkit.trainers.rl import GRPOConfig, GSPOConfig, RLTask, build_experience, run_rl

F64 = torch.float64


def _ragged(lengths, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    old = -torch.rand(n, generator=gen, dtype=F64) * 3
    new = old + scale * torch.randn(n, generator=gen, dtype=F64)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return new, old, ids


# ----------------------------------------------------------------------------- GSPO


def _gspo_reference(new, old, seq_adv, lengths, eps_lo, eps_hi):
    """GSPO eq. 5-7 per sequence: s_i = exp(mean_t log-ratio), J_i = min(s_i A_i, clip(s_i) A_i)."""
    out, start = [], 0
    for length, a in zip(lengths, seq_adv):
        lr = [new[start + t] - old[start + t] for t in range(length)]
        s = math.exp(sum(lr) / length)
        out.append(-min(s * a, min(max(s, 1 - eps_lo), 1 + eps_hi) * a))
        start += length
    return out


@pytest.mark.parametrize(("eps_lo", "eps_hi"), [(3e-4, 4e-4), (0.2, 0.28)])
def test_gspo_matches_paper_per_sequence_and_its_gradient(eps_lo, eps_hi):
    lengths = [3, 7, 1, 5, 2, 6]  # ragged; flat = the packed layout, and a padded batch flattened by its mask
    new, old, ids = _ragged(lengths, scale=0.02 if eps_lo < 1e-3 else 0.3)
    seq_adv = [1.0, -0.5, 2.0, -1.5, 0.7, -0.2]
    adv = torch.tensor(seq_adv, dtype=F64)[ids]
    new.requires_grad_(True)
    out = sequence_policy_loss(new, old, adv, ids, eps_lo, eps_hi)
    # sequence_mean aggregation of the broadcast token losses = the paper's per-sequence objective
    per_seq = torch.zeros(len(lengths), dtype=F64).index_add(0, ids, out.losses) / torch.tensor(lengths, dtype=F64)
    expected = _gspo_reference(new.tolist(), old.tolist(), seq_adv, lengths, eps_lo, eps_hi)
    torch.testing.assert_close(per_seq, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-13)
    clipped_seqs = torch.zeros(len(lengths), dtype=F64).index_add(0, ids, out.clipped).bool().tolist()
    assert any(clipped_seqs) and not all(clipped_seqs)  # both branches are exercised

    # gradient, eq. 10: d(-J_i)/d log pi(y_i,t) = -A_i s_i / |y_i| where unclipped, 0 where the clip is taken
    per_seq.mean().backward()
    start = 0
    for i, length in enumerate(lengths):
        s = math.exp(sum(new.tolist()[start + t] - old.tolist()[start + t] for t in range(length)) / length)
        want = 0.0 if clipped_seqs[i] else -seq_adv[i] * s / length / len(lengths)
        for t in range(length):
            assert new.grad[start + t].item() == pytest.approx(want, abs=1e-13, rel=1e-10)
        start += length


def test_gspo_equals_token_ppo_for_single_token_responses():
    new, old, ids = _ragged([1, 1, 1, 1], scale=0.3)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=F64)
    seq, tok = sequence_policy_loss(new, old, adv, ids, 0.2, 0.2), clipped_policy_loss(new, old, adv, 0.2)
    torch.testing.assert_close(seq.losses, tok.losses, rtol=0, atol=0)
    with pytest.raises(ValueError):
        sequence_policy_loss(new, old, adv, ids, 0.0)


# ----------------------------------------------------------------------------- REINFORCE++


def _reinforce_pp_reference(scores, kl, lengths, beta, gamma, group=None):
    """Eq. 8 with the KL in the reward, then eq. 10's batch whitening (unbiased std, as rlhfkit whitens)."""
    if group:
        scores = [r - sum(scores[g:g + group]) / group for g in range(0, len(scores), group)
                  for r in scores[g:g + group]]
    adv = []
    for r, row, n in zip(scores, kl, lengths):
        adv.append([gamma ** (n - 1 - t) * r - beta * sum(gamma ** (s - t) * row[s] for s in range(t, n))
                    for t in range(n)])
    flat = [a for row in adv for a in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1) + 1e-8)
    return [[(a - mean) / std for a in row] for row in adv]


@pytest.mark.parametrize(("method", "gamma"), [("reinforce_pp", 1.0), ("reinforce_pp_baseline", 1.0),
                                               ("reinforce_pp", 0.9)])
def test_reinforce_pp_matches_paper(method, gamma):
    lengths = [4, 2, 5, 3]  # padded to 6 with garbage that must be ignored
    gen = torch.Generator().manual_seed(3)
    kl = torch.randn(4, 6, generator=gen, dtype=F64) * 0.1
    mask = torch.zeros(4, 6, dtype=F64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    kl = torch.where(mask.bool(), kl, torch.full_like(kl, 7.0))
    scores = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=F64)
    out = reinforce_pp_advantages(scores, kl, mask, 0.3, method, group_size=2, gamma=gamma)
    want = _reinforce_pp_reference(scores.tolist(), kl.tolist(), lengths, 0.3, gamma,
                                   group=2 if method.endswith("baseline") else None)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, :n], torch.tensor(want[i], dtype=F64), rtol=0, atol=1e-12)
        assert out[i, n:].abs().sum() == 0


# ----------------------------------------------------------------------------- GRPO scale_rewards


def test_scale_rewards_group_batch_none():
    r = torch.tensor([1.0, 0.0, 3.0, 2.0, 0.5, 0.5, 4.0, -1.0], dtype=F64)
    g = 4
    groups = [r.tolist()[i:i + g] for i in range(0, len(r), g)]
    centred = [x - sum(grp) / g for grp in groups for x in grp]

    def std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    batch = [c / (std(r.tolist()) + 1e-4) for c in centred]
    group = [centred[i] / (std(groups[i // g]) + 1e-4) for i in range(len(r))]
    torch.testing.assert_close(scaled_group_advantages(r, g, "none"), torch.tensor(centred, dtype=F64))
    torch.testing.assert_close(scaled_group_advantages(r, g, "batch"), torch.tensor(batch, dtype=F64))
    torch.testing.assert_close(scaled_group_advantages(r, g, "group"), torch.tensor(group, dtype=F64))
    # "group" is the existing GRPO advantage, bit for bit
    assert torch.equal(scaled_group_advantages(r.float(), g, "group"), group_advantages(r.float(), g, "grpo"))
    with pytest.raises(ValueError):
        scaled_group_advantages(r, g, "rank")


# ----------------------------------------------------------------------------- DAPO


def test_group_reward_spread_and_overlong_penalty():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0], dtype=F64)
    assert group_reward_spread(r, 2).tolist() == [False, True, True, False]
    assert group_reward_spread(r, 4).tolist() == [True, True]

    # eq. 13 with L_max = 20, L_cache = 8: free up to 12, then (12 - |y|) / 8 down to -1 at 20, -1 beyond
    lengths = torch.tensor([0, 5, 12, 13, 16, 20, 25], dtype=F64)
    want = []
    for n in lengths.tolist():
        want.append(0.0 if n <= 12 else (12 - n) / 8 if n <= 20 else -1.0)
    torch.testing.assert_close(overlong_penalty(lengths, 20, 8), torch.tensor(want, dtype=F64))
    torch.testing.assert_close(overlong_penalty(lengths, 20, 8, 0.5), 0.5 * torch.tensor(want, dtype=F64))
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 20, 0)


# ----------------------------------------------------------------------------- TIS


def test_truncated_importance_weights():
    trainer = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=F64)
    rollout = torch.tensor([-1.1, -2.0, -2.0, -2.5], dtype=F64)
    w, rho = truncated_importance_weights(trainer, rollout, 2.0)
    want = [math.exp(a - b) for a, b in zip(trainer.tolist(), rollout.tolist())]
    torch.testing.assert_close(rho, torch.tensor(want, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(w, torch.tensor([min(x, 2.0) for x in want], dtype=F64), rtol=0, atol=1e-15)
    # the trainer's own log-probs: every weight is exactly 1, so multiplying a loss by it changes no bit
    w_self, _ = truncated_importance_weights(trainer.float(), trainer.float(), 2.0)
    assert torch.equal(w_self, torch.ones(4))
    with pytest.raises(ValueError):
        truncated_importance_weights(trainer, rollout, 0.0)


# ----------------------------------------------------------------------------- value_clip_frac (issue 22, item 5)


def test_value_clip_frac_counts_only_values_outside_the_range():
    """Inside the range, V_old + (V - V_old) can differ from V by one rounding step, and the old count
    ((V_clip - R)^2 > (V - R)^2) took that for a clip. The count is now zero inside the range and equals the
    tokens whose gradient the clip zeroes; the loss is unchanged."""
    gen = torch.Generator().manual_seed(0)
    n, c = 20000, 0.2
    # half near zero, as a zero-initialised value head starts (|V| << |V_old| is where V_old + (V - V_old)
    # rounds away from V), half spread out so that both sides of the range occur
    old = torch.cat([torch.randn(n // 2, generator=gen) * 0.05, torch.randn(n // 2, generator=gen) * 3])
    values = torch.cat([torch.randn(n // 2, generator=gen) * 1e-3, old[n // 2:] + 0.3 * torch.randn(n // 2, generator=gen)])
    values.requires_grad_(True)
    returns = torch.randn(n, generator=gen)
    out = clipped_value_loss(values, old, returns, c)
    inside = (values.detach() - old).abs() < c
    assert out.clipped[inside].sum() == 0
    # the old count on the same tensors: it counts rounding noise inside the range (the bug)
    v_clip = old + torch.clamp(values.detach() - old, -c, c)
    old_count = ((v_clip - returns).square() > (values.detach() - returns).square())
    assert old_count[inside].sum() > 0.005 * inside.sum()
    out.losses.sum().backward()
    assert torch.equal(out.clipped.bool(), values.grad == 0)
    # the loss itself is the documented formula, unchanged
    torch.testing.assert_close(out.losses, 0.5 * torch.maximum((values.detach() - returns).square(),
                                                               (v_clip - returns).square()), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the trainers, on a tiny model

EXTRA_REWARDS = '''
def has_e(prompts, responses):
    return [1.0 if "e" in r else 0.0 for r in responses]

def zero(prompts, responses):
    return [0.0 for r in responses]
'''


def _run(cls, model_dir, files, out, **overrides):
    reward_file = files / "extra_rewards.py"
    if not reward_file.exists():
        reward_file.write_text(EXTRA_REWARDS)
    settings = dict(model=str(model_dir), dataset=str(files / "prompts.jsonl"), output_dir=str(out),
                    reward_fn=f"{files / 'reward.py'}:count_e", max_new_tokens=8, progress_bar=False,
                    eval_on_start=False, prompts_per_step=2, num_generations=4, max_steps=1, learning_rate=1e-2,
                    max_grad_norm=1e9)
    settings.update(overrides)
    if str(settings["reward_fn"]).startswith(":"):
        settings["reward_fn"] = f"{reward_file}{settings['reward_fn']}"
    run_rl(cls(**settings))
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]


def test_gspo_at_ratio_one_has_grpos_gradient(tiny_model_dir, count_e_files, tmp_path):
    """At the first minibatch s_i = 1, and the GSPO gradient A_i/|y_i| Σ_t ∇log π equals sequence-mean GRPO's."""
    grpo = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "grpo", kl_coef=0.0)[0]
    gspo = _run(GSPOConfig, tiny_model_dir, count_e_files, tmp_path / "gspo", num_minibatches=1)[0]
    assert grpo["grad_norm"] > 0
    for key in ("loss", "grad_norm", "policy_loss"):
        assert gspo[key] == pytest.approx(grpo[key], rel=1e-5, abs=1e-6), key


def test_gspo_clips_whole_responses_once_the_ratios_move(tiny_model_dir, count_e_files, tmp_path):
    """After the first of its 4 minibatches (the default) the sequence ratios move, and GSPO's ε = 3e-4 / 4e-4
    clips: every token of a response shares its clip status, so the clipped share is a share of responses."""
    later = _run(GSPOConfig, tiny_model_dir, count_e_files, tmp_path / "gspo4")[0]
    assert later["optimizer_updates"] == 4 and 0 < later["clip_frac"] < 1 and later["ratio"] != 1.0


def test_reinforce_pp_cli_and_its_baseline_variant(tiny_model_dir, count_e_files, tmp_path, capsys):
    out = tmp_path / "rpp"
    assert main(["reinforce_pp", "--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"),
                 "--output-dir", str(out), "--reward-fn", f"{count_e_files / 'reward.py'}:count_e", "--max-steps",
                 "1", "--max-new-tokens", "8", "--prompts-per-step", "4", "--no-progress-bar"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "reinforce_pp"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "reward_mean" in x]
    assert rows[0]["grad_norm"] > 0 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    base = ["--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"), "--output-dir",
            str(tmp_path / "x"), "--reward-fn", f"{count_e_files / 'reward.py'}:count_e"]
    assert main(["reinforce_pp", *base, "--advantage", "reinforce_pp_baseline"]) == 2
    assert "needs --num-generations >= 2" in capsys.readouterr().err
    assert main(["ppo", *base, "--scale-rewards", "batch"]) == 2
    assert "--scale-rewards applies to --advantage grpo only" in capsys.readouterr().err
    assert main(["ppo", *base, "--kl-coef-min", "0.01"]) == 2
    assert "--kl-coef-min needs --kl-target" in capsys.readouterr().err


def test_a_kl_floor_keeps_beta_while_the_kl_is_under_its_target(tiny_model_dir, count_e_files, tmp_path):
    """--kl-target far above the KL: the free controller lowers β at every step, the floored one keeps it."""
    betas = {}
    for name, extra in (("free", []), ("floored", ["--kl-coef-min", "0.05"])):
        out = tmp_path / name
        assert main(["rloo", "--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"),
                     "--output-dir", str(out), "--reward-fn", f"{count_e_files / 'reward.py'}:count_e",
                     "--max-steps", "3", "--max-new-tokens", "8", "--prompts-per-step", "2", "--kl-coef", "0.05",
                     "--kl-target", "50", "--kl-horizon", "10", "--no-progress-bar", *extra]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"beta"' in x]
        betas[name] = [r["beta"] for r in rows]
    assert betas["floored"] == [0.05] * 3
    assert betas["free"][0] <= 0.05 and betas["free"][-1] < betas["free"][0]
    # --kl-coef-from: a later run starts at the β the free run's controller ended at (after its last update),
    # and keeps adapting from there; a floor above it wins
    summary = json.loads((tmp_path / "free" / "summary.json").read_text())
    assert summary["kl_coef_final"] < betas["free"][-1]
    carried = (("carried", [], summary["kl_coef_final"]), ("carried-floored", ["--kl-coef-min", "0.04"], 0.04))
    for name, extra, first in carried:
        out = tmp_path / name
        assert main(["rloo", "--model", str(tiny_model_dir), "--dataset", str(count_e_files / "prompts.jsonl"),
                     "--output-dir", str(out), "--reward-fn", f"{count_e_files / 'reward.py'}:count_e",
                     "--max-steps", "2", "--max-new-tokens", "8", "--prompts-per-step", "2", "--kl-coef", "0.05",
                     "--kl-target", "50", "--kl-horizon", "10", "--no-progress-bar",
                     "--kl-coef-from", str(tmp_path / "free"), *extra]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"beta"' in x]
        assert rows[0]["beta"] == pytest.approx(first, rel=1e-12) and rows[1]["beta"] <= rows[0]["beta"]


def test_kl_coef_from_names_what_is_wrong(tmp_path):
    """A folder without a finished run's final β, or with a bad one, is a one-line ConfigError naming the file."""
    from rlhfkit.errors import ConfigError
    from rlhfkit.trainers.rl import PPOConfig
    from rlhfkit.trainers.rl.config import build_kl_controller, check_config

    def config(**kw):
        return PPOConfig(model="m", dataset="d", output_dir=str(tmp_path / "out"), reward_fn="r.py:f",
                         kl_target=1.0, **kw)

    assert build_kl_controller(config(kl_coef_from="")).beta == 0.05  # '' (a pipeline's round 1) = --kl-coef
    with pytest.raises(ConfigError, match="--kl-coef-from needs --kl-target"):
        check_config(PPOConfig(model="m", dataset="d", output_dir="o", reward_fn="r.py:f", kl_coef_from="x"))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"run.summary\.json gives no final β \(FileNotFoundError\)"):
        build_kl_controller(config(kl_coef_from=str(run)))
    run.mkdir()
    for text, message in (('{"steps": 3}', "no key 'kl_coef_final'"), ("{", "JSONDecodeError"),
                          ('{"kl_coef_final": -1}', "is -1, not a number >= 0"),
                          ('{"kl_coef_final": "0.1"}', "is '0.1', not a number")):
        (run / "summary.json").write_text(text)
        with pytest.raises(ConfigError, match=message):
            build_kl_controller(config(kl_coef_from=str(run)))
    (run / "summary.json").write_text('{"kl_coef_final": 0.2}')
    assert build_kl_controller(config(kl_coef_from=str(run))).beta == 0.2
    assert build_kl_controller(config(kl_coef_from=str(run), kl_coef_min=0.05)).beta == 0.2


def test_reinforce_pp_advantages_in_a_rollout_are_whitened_over_the_batch(tiny_model_dir, count_e_files, tmp_path):
    """The experience of a REINFORCE++-baseline rollout: advantages have mean 0 and std 1 over every token."""
    from rlhfkit.rollout.generate import Rollout
    from rlhfkit.trainers.rl import ReinforcePPConfig

    cfg = ReinforcePPConfig(model="m", dataset="d", output_dir=str(tmp_path), advantage="reinforce_pp_baseline",
                            num_generations=2)
    rollout = Rollout([[1, 2]] * 4, [[5, 6, 7], [5], [8, 9], [4, 4, 4, 4]], [True, False, True, True],
                      torch.log(torch.full((4, 4), 0.5)))
    scores = torch.tensor([1.0, 0.0, 2.0, 0.5])
    exp = build_experience(cfg, 0.1, [{"prompt": "a"}, {"prompt": "b"}], rollout, ["x"] * 4, scores, scores,
                           torch.full((10,), math.log(0.4)), None, 0.1, "test")
    adv = torch.cat([r["advantages"] for r in exp.records]).double()
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-6) and adv.std().item() == pytest.approx(1.0, abs=1e-4)


def test_scale_rewards_none_is_dr_grpo(tiny_model_dir, count_e_files, tmp_path):
    none = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "none", scale_rewards="none")[0]
    dr = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "dr", advantage="dr_grpo")[0]
    assert none["grad_norm"] > 0 and none["grad_norm"] == dr["grad_norm"] and none["loss"] == dr["loss"]


def test_scale_rewards_batch_divides_by_the_batch_reward_std(tiny_model_dir, count_e_files, tmp_path):
    """At the first step (ratio 1, no KL) the loss is linear in the advantages: dividing every centred reward by
    the batch's std (+1e-4) divides the gradient by it."""
    none = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "none", scale_rewards="none", kl_coef=0.0)[0]
    batch = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "batch", scale_rewards="batch", kl_coef=0.0)[0]
    assert batch["reward_std"] > 0.1
    assert batch["grad_norm"] == pytest.approx(none["grad_norm"] / (batch["reward_std"] + 1e-4), rel=1e-4)


def test_bnpo_is_the_token_mean_of_each_micro_batch(tiny_model_dir, tiny_tokenizer, count_e_files, tmp_path):
    """The engine divides the summed micro-batch losses by the summed weights: bnpo's are (token mean, 1) per
    micro-batch, so with one micro-batch it is token_mean, and with uneven micro-batches each weighs the same."""
    cfg = GRPOConfig(model="m", dataset="d", output_dir=str(tmp_path), loss_aggregation="bnpo")
    task = RLTask(cfg, tiny_tokenizer, True, None, None, None, [])
    records = [{"prompt_ids": [1, 2], "response_ids": [5] * n} for n in (3, 1, 2, 4)]
    losses = [torch.arange(1.0, n + 1, dtype=F64) for n in (3, 1, 2, 4)]

    def step_loss(parts):
        batches = [task.collate(records[a:b]) for a, b in parts]
        sums = [task._aggregate(torch.cat(losses[a:b]), batch) for (a, b), batch in zip(parts, batches)]
        return float(sum(sums)) / sum(task.batch_weight(batch) for batch in batches)

    flat = torch.cat(losses)
    assert step_loss([(0, 4)]) == pytest.approx(float(flat.mean()), rel=1e-12)  # = token_mean
    assert step_loss([(0, 2), (2, 4)]) == pytest.approx((float(flat[:4].mean()) + float(flat[4:].mean())) / 2)
    # a run: with uneven micro-batches (3+3+2 responses) bnpo's gradient is not token_mean's
    token = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "tok", loss_aggregation="token_mean",
                 per_device_batch_size=3, max_new_tokens=4)[0]
    bnpo = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "bnpo", loss_aggregation="bnpo",
                per_device_batch_size=3, max_new_tokens=4)[0]
    assert bnpo["grad_norm"] > 0 and bnpo["grad_norm"] != pytest.approx(token["grad_norm"], rel=1e-3)


def test_dapo_dynamic_sampling_keeps_only_groups_with_spread(tiny_model_dir, count_e_files, tmp_path):
    out = tmp_path / "dapo"
    rows = _run(GRPOConfig, tiny_model_dir, count_e_files, out, reward_fn=":has_e", max_new_tokens=1,
                dynamic_sampling=True, dynamic_sampling_max_rounds=6, num_logged_samples=8, sample_steps=1,
                max_steps=2)
    assert sum(r["dynamic_sampling_dropped"] for r in rows) > 0
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        groups = [[s["reward"] for s in samples if s["step"] == row["step"]][i:i + 4] for i in (0, 4)]
        kept = round(row["dynamic_sampling_kept_share"] * 2)
        assert kept >= 1 and all(max(g) > min(g) for g in groups[:kept]), (row, groups)


def test_overlong_shaping_is_the_linear_penalty(tiny_model_dir, count_e_files, tmp_path):
    """A zero reward and a buffer as long as --max-new-tokens: every score is -length / 4, a linear function."""
    row = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "long", reward_fn=":zero", max_new_tokens=4,
               overlong_buffer=4)[0]
    assert row["reward_mean"] == 0.0
    assert row["score_mean"] == pytest.approx(-row["response_length"] / 4, abs=1e-6) and row["score_mean"] < 0


def test_truncated_completions_get_no_loss(tiny_model_dir, tiny_tokenizer, count_e_files, tmp_path):
    from rlhfkit.rollout.generate import Rollout

    cfg = GRPOConfig(model="m", dataset="d", output_dir=str(tmp_path), num_generations=2, mask_truncated=True,
                     loss_aggregation="token_mean")
    rollout = Rollout([[1, 2]] * 4, [[5, 6, 7], [5, 3], [8, 9], [4, 4, 4, 4]], [True, False, True, False],
                      torch.log(torch.full((4, 4), 0.5)))
    scores = torch.tensor([1.0, 0.0, 2.0, 0.5])
    exp = build_experience(cfg, 0.1, [{"prompt": "a"}, {"prompt": "b"}], rollout, ["x"] * 4, scores, scores,
                           torch.full((11,), math.log(0.4)), None, 0.1, "test")
    assert [r["loss_keep"].tolist() for r in exp.records] == [[1.0] * 3, [0.0] * 2, [1.0] * 2, [0.0] * 4]
    task = RLTask(cfg, tiny_tokenizer, True, None, None, None, [])
    batch = task.collate(exp.records)
    assert task.batch_weight(batch) == 5  # the kept responses' tokens only
    cfg.loss_aggregation = "sequence_mean"
    assert task.batch_weight(batch) == 2
    # a run in which no response ends within 4 tokens: nothing is left to learn from, and nothing is learnt
    row = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "mask", mask_truncated=True, max_new_tokens=4)[0]
    assert row["no_eos_rate"] == 1.0 and row["loss"] == 0.0 and row["grad_norm"] == 0.0
    free = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "free", max_new_tokens=4)[0]
    assert free["grad_norm"] > 0


def test_tis_is_a_no_op_for_the_trainers_own_logprobs(tiny_model_dir, count_e_files, tmp_path):
    off = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "off", kl_coef=0.0)[0]
    on = _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / "on", kl_coef=0.0, tis_cap=2.0)[0]
    assert "tis_ratio_mean" not in on  # the HF loop's log-probs are the trainer's: nothing to correct
    for key in ("loss", "grad_norm", "policy_loss"):
        assert on[key] == off[key], key  # bit-identical


def test_tis_reweights_a_mismatched_engine(tiny_model_dir, count_e_files, tmp_path, monkeypatch):
    """An engine whose log-probs are 0.5 nats below the trainer's on every token (as a vLLM kernel might be)."""
    from rlhfkit.rollout.generate import HFGenerationBackend

    real = HFGenerationBackend.generate

    def shifted(self, *args, **kwargs):
        rollout = real(self, *args, **kwargs)
        rollout.logprobs = rollout.logprobs - 0.5
        return rollout

    monkeypatch.setattr(HFGenerationBackend, "generate", shifted)
    monkeypatch.setattr(HFGenerationBackend, "recompute_logprobs", True, raising=False)
    rows = {cap: _run(GRPOConfig, tiny_model_dir, count_e_files, tmp_path / f"tis{cap}", tis_cap=cap,
                      kl_coef=0.0, logprob_check_steps=-1)[0] for cap in (0.0, 1.2, 2.0)}
    assert "tis_ratio_mean" not in rows[0.0]
    assert rows[2.0]["tis_ratio_mean"] == pytest.approx(math.exp(0.5), rel=1e-3)
    assert rows[2.0]["tis_capped_share"] == 0 and rows[1.2]["tis_capped_share"] == 1
    # uncapped, every weight is e^0.5 and the policy-gradient loss scales by it; capped at 1.2, by 1.2
    assert rows[2.0]["grad_norm"] == pytest.approx(math.exp(0.5) * rows[0.0]["grad_norm"], rel=1e-3)
    assert rows[1.2]["grad_norm"] == pytest.approx(1.2 * rows[0.0]["grad_norm"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "settings"), [
    (GSPOConfig, dict(learning_rate=5e-3)),
    ("reinforce_pp", dict(prompts_per_step=16, num_generations=1, learning_rate=3e-3, ppo_epochs=2)),
])
def test_reward_rises_on_the_count_e_task(cls, settings, tiny_model_dir, count_e_files, tmp_path):
    """The toy task of test_rl.py (reward = the letters e / 4): +0.25 over 40 steps is > 3x the noise of a
    10-step mean."""
    from rlhfkit.trainers.rl import ReinforcePPConfig

    cls = ReinforcePPConfig if cls == "reinforce_pp" else cls
    rows = _run(cls, tiny_model_dir, count_e_files, tmp_path / "rise", max_steps=40, max_new_tokens=16,
                max_grad_norm=1.0, **settings)
    first, last = rows[:10], rows[-10:]
    gain = sum(r["reward_mean"] for r in last) / 10 - sum(r["reward_mean"] for r in first) / 10
    assert gain > 0.25, gain


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gspo_dapo", "reinforce_pp_baseline"])
def test_variant_resumes_to_the_uninterrupted_run(variant, tiny_model_dir, count_e_files, tmp_path):
    """A run resumed from checkpoint 1 ends with the uninterrupted run's weights and per-step metrics. GSPO with
    dynamic sampling (refills draw more prompts), overlong shaping and truncation masking: the prompt stream,
    the refills and the RNG all continue where they stopped. REINFORCE++ with its group baseline and two PPO
    epochs over two minibatches: the batch-whitened advantages and the minibatch order continue too."""
    import shutil

    from safetensors.torch import load_file

    from rlhfkit.trainers.rl import ReinforcePPConfig

    if variant == "gspo_dapo":
        cls, keys = GSPOConfig, ("dynamic_sampling_dropped",)
        settings = dict(reward_fn=":has_e", max_new_tokens=3, dynamic_sampling=True, dynamic_sampling_max_rounds=4,
                        overlong_buffer=2, mask_truncated=True)
    else:
        cls, keys = ReinforcePPConfig, ()
        settings = dict(advantage="reinforce_pp_baseline", ppo_epochs=2, num_minibatches=2, max_new_tokens=6)
    settings.update(max_steps=2, save_steps=1, learning_rate=3e-3)
    full = tmp_path / "full"
    rows = _run(cls, tiny_model_dir, count_e_files, full, **settings)
    if variant == "gspo_dapo":
        assert sum(r["dynamic_sampling_dropped"] for r in rows) > 0  # the refills happened, so their restore counts
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    again = _run(cls, tiny_model_dir, count_e_files, resumed, resume=True, **settings)
    assert [r["step"] for r in again] == [2]
    for key in ("reward_mean", "score_mean", "loss", "grad_norm", *keys):
        assert again[0][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-7), key
    want, got = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6)  # fp32 round-off only
