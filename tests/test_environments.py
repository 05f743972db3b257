"""Environments (--env, issue 24): an environment's observations forced into the same KV cache after each policy
turn, equal to re-prefilling the whole conversation; per-turn rewards summing to the episode's return; the policy
mask; errors counted, never raised; the RL trainers on environment episodes; one-line refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from toy import ENV_SOURCE, TOOLS_SOURCE

from rlhfkit.errors import ConfigError
from rlhfkit.rollout.environments import EnvEpisodes, episode_returns, load_environment, open_episodes
from rlhfkit.rollout.generate import HFGenerationBackend, Rollout, SamplingConfig
from rlhfkit.rollout.tools import _apply_template, load_tools, render_with_tools
from rlhfkit.trainers.rl import GRPOConfig, PPOConfig, build_experience
from rlhfkit.trainers.rl.config import check_config
from rlhfkit.trainers.rl.env_rollouts import score_rollout, scores_at_tokens


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("envs") / "countdown.py"
    path.write_text(ENV_SOURCE)
    return path


def env(env_file, name="Countdown"):
    return load_environment(f"{env_file}:{name}")


def record(start, turns, scale=0.5, prompt="Count with me."):
    return {"prompt": prompt, "raw_prompt": prompt, "columns": {"start": start, "turns": turns, "scale": scale}}


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


class EndsTurns(EnvEpisodes):
    """The tiny policy seldom draws an EOS: each policy turn is made to end at its ``every``-th token as if the
    draw gave an EOS (token, ``done`` and ``lengths`` as the draw sets them). That token's recorded log-prob is
    the replaced draw's, so comparisons leave those positions (``fake``) out."""

    def __init__(self, *args, every=3, **kwargs):
        super().__init__(*args, **kwargs)
        self.every, self.fake = every, []

    def after_step(self, step, tokens, logps, lengths, done):
        eos = self.tokenizer.eos_token_id
        for row in range(self.n):
            if not done[row] and not self.queues[row] and row not in self.failed and \
                    step + 1 - self.segment_start[row] == self.every:
                tokens[row, step], done[row], lengths[row] = eos, True, step + 1
                self.fake.append((row, step))
        return super().after_step(step, tokens, logps, lengths, done)


def sample(policy, tokenizer, factory, records, num_samples=1, every=3, max_new_tokens=80, fast=True,
           temperature=1.0, top_k=0, seed=0, **kwargs):
    envs, conversations, failed = open_episodes(factory, records, num_samples)
    prompts = [ids_of(tokenizer, render_with_tools(tokenizer, c, [])) for c in conversations]
    episodes = EndsTurns(envs, conversations, failed=failed, every=every, **kwargs)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens)
    rollout = HFGenerationBackend(tokenizer, fast_decode=fast).generate(
        policy, prompts, num_samples, sampling, torch.Generator().manual_seed(seed), episodes=episodes)
    return rollout, episodes, conversations


def test_turn_rewards_sum_to_the_return_and_the_row_reaches_the_environment(policy, tiny_tokenizer, env_file):
    rollout, episodes, conversations = sample(policy, tiny_tokenizer, env(env_file),
                                              [record(7, 3, 0.5), record(2, 2, 2.0)], num_samples=2)
    assert conversations == [[{"role": "user", "content": "count down from 7"}],
                             [{"role": "user", "content": "count down from 2"}]]
    # Countdown: turn k scores k * scale; done after the row's 'turns' turns
    assert [[r for _, r in turns] for turns in rollout.turn_rewards] == [[0.5, 1.0, 1.5]] * 2 + [[2.0, 4.0]] * 2
    assert episode_returns(rollout.turn_rewards).tolist() == [3.0, 3.0, 6.0, 6.0]
    assert rollout.turns == [3, 3, 2, 2] and rollout.ended == [True] * 4 and rollout.tool_calls == [0] * 4
    stats = episodes.env_stats
    assert (stats.episodes, stats.steps, stats.done, stats.errors, stats.reward) == (4, 10, 4, 0, 18.0)
    for row, turns in enumerate(rollout.turn_rewards):
        response = rollout.response_ids[row]
        assert [c for c, _ in turns][-1] == len(response) - 1  # the last turn ends the response
        for column, _ in turns:  # each reward sits on its turn's last token: the EOS the policy "drew"
            assert response[column] == tiny_tokenizer.eos_token_id and rollout.policy_mask[row, column] == 1
        text = tiny_tokenizer.decode(response, skip_special_tokens=True)
        left = 3 if row < 2 else 2
        assert [f"{k} to go" in text for k in range(left - 1, 0, -1)] == [True] * (left - 1)
        said = episodes.envs[row].said  # what step() got: the policy's text of each turn, special tokens out
        assert len(said) == len(turns) and all(s and s in text for s in said)


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "lean"])
@pytest.mark.parametrize("temperature, top_k", [(1.0, 1), (0.7, 0)], ids=["greedy", "sampled"])
def test_observations_mid_decoding_equal_reprefilling_the_conversation(fast, temperature, top_k, policy,
                                                                       tiny_tokenizer, env_file):
    """Tokens: the policy's turns as drawn, each observation as the chat template renders it after them
    (policy mask 0 exactly there), the whole decoding to the rendered conversation; log-probs of the policy's
    tokens equal one forward over prompt + response (and greedy picks its argmax)."""
    tok = tiny_tokenizer
    rollout, episodes, conversations = sample(policy, tok, env(env_file), [record(9, 3), record(4, 2)], num_samples=2,
                                              every=4, fast=fast, temperature=temperature, top_k=top_k, seed=3)
    eos_text = tok.decode([tok.eos_token_id])
    for row, response in enumerate(rollout.response_ids):
        opening, said = conversations[row // 2], episodes.envs[row].said
        observations = [f"{k} to go" for k in range(len(said) - 1, 0, -1)]
        expected, mask, history, written = [], [], list(opening), list(opening)
        for k, text in enumerate(said):
            end = response.index(tok.eos_token_id, len(expected))  # the policy's turn: as drawn, up to its EOS
            turn = response[len(expected):end + 1]
            assert tok.decode(turn, skip_special_tokens=True) == text  # what step() got
            expected += turn
            mask += [1.0] * len(turn)
            history.append({"role": "assistant", "content": text})
            # as written: the policy may draw special tokens (e.g. a role tag), which the text it is given leaves out
            written.append({"role": "assistant", "content": tok.decode(turn[:-1], skip_special_tokens=False)})
            if k < len(observations):
                before = _apply_template(tok, history[:-1], True) + text + eos_text
                history.append({"role": "user", "content": observations[k]})
                written.append(history[-1])
                after = _apply_template(tok, history, True)
                assert after.startswith(before)
                turn = ids_of(tok, after[len(before):])
                expected += turn
                mask += [0.0] * len(turn)
        assert response == expected
        assert rollout.policy_mask[row, :len(response)].tolist() == mask
        assert rollout.policy_mask[row, len(response):].eq(0).all()
        whole = tok.decode(rollout.prompt_ids[row] + response, skip_special_tokens=False)
        assert whole == _apply_template(tok, written, False)  # prompt + response = the conversation, rendered
        ids = torch.tensor([rollout.prompt_ids[row] + response])
        with torch.no_grad():
            logits = policy(ids).logits[0].float()[len(rollout.prompt_ids[row]) - 1:-1] / temperature
        reference = torch.log_softmax(logits, -1).gather(-1, ids[0, len(rollout.prompt_ids[row]):, None]).squeeze(-1)
        check = rollout.policy_mask[row, :len(response)].bool()
        for r, column in episodes.fake:
            if r == row:
                check[column] = False
        assert int(check.sum()) >= 6
        torch.testing.assert_close(rollout.logprobs[row, :len(response)][check], reference[check], atol=1e-5, rtol=0)
        assert rollout.logprobs[row, :len(response)][~rollout.policy_mask[row, :len(response)].bool()].eq(0).all()
        if top_k == 1:
            assert torch.tensor(response)[check].tolist() == logits.argmax(-1)[check].tolist()


def test_max_turns_and_the_token_budget_end_episodes(policy, tiny_tokenizer, env_file):
    rollout, episodes, _ = sample(policy, tiny_tokenizer, env(env_file, "Endless"), [record(1, 9)], max_turns=2)
    assert [r for _, r in rollout.turn_rewards[0]] == [1.0, 1.0] and rollout.turns == [2]
    assert rollout.ended == [True] and episodes.env_stats.done == 0  # cut by --max-turns: the policy's turn ended
    # an observation that does not fit ends the episode there, truncated; the scored turn keeps its reward
    opening = [{"role": "user", "content": "count down from 1"}, {"role": "assistant", "content": "x"}]
    before = _apply_template(tiny_tokenizer, opening[:1], True) + "x" + tiny_tokenizer.eos_token
    after = _apply_template(tiny_tokenizer, [*opening, {"role": "user", "content": "again"}], True)
    first = len(ids_of(tiny_tokenizer, after[len(before):]))  # the observation's tokens
    for room, turns in ((-1, 1), (1, 2)):
        rollout, _, _ = sample(policy, tiny_tokenizer, env(env_file, "Endless"), [record(1, 9)],
                               max_new_tokens=3 + first + room)
        assert rollout.turns == [turns] and rollout.ended == [False]
        assert [r for _, r in rollout.turn_rewards[0]] == [1.0]
        assert rollout.policy_mask[0, :3].tolist() == [1.0] * 3


def test_environment_errors_are_counted_and_end_the_episode_with_return_0(policy, tiny_tokenizer, env_file, caplog):
    from rlhfkit.rollout import environments

    environments._warned.clear()  # each kind is logged once per process
    rollout, episodes, _ = sample(policy, tiny_tokenizer, env(env_file, "Broken"), [record(1, 9)], num_samples=2)
    assert episodes.env_stats.errors == 2 and episodes.env_stats.steps == 2
    assert rollout.turn_rewards == [[], []] and episode_returns(rollout.turn_rewards).tolist() == [0.0, 0.0]
    assert rollout.turns == [2, 2] and rollout.ended == [True, True]  # ended at the turn whose step raised
    assert "environment step raised RuntimeError: boom" in caplog.text
    rollout, episodes, _ = sample(policy, tiny_tokenizer, env(env_file, "BadReward"), [record(1, 9)])
    assert episodes.env_stats.errors == 1 and rollout.turn_rewards == [[]] and rollout.turns == [1]
    # a failed reset: that row ends at its first token, without loss; the other rows go on
    rollout, episodes, conversations = sample(policy, tiny_tokenizer, env(env_file, "BadReset"),
                                              [record(-1, 2), record(3, 2)])
    assert episodes.env_stats.errors == 1 and rollout.lengths[0] == 1 and rollout.policy_mask[0].eq(0).all()
    assert conversations[0] == [{"role": "user", "content": "Count with me."}]  # the row's own prompt
    assert rollout.turn_rewards[0] == [] and [r for _, r in rollout.turn_rewards[1]] == [0.5, 1.0]
    assert "environment reset raised KeyError" in caplog.text


def test_an_episode_can_call_tools_too(policy, tiny_tokenizer, env_file, tmp_path):
    """A scripted call opens row 0: the tool turn comes first, then the policy's text, then the environment
    gets that text alone (its turn since the tool turn)."""
    tools_file = tmp_path / "tools.py"
    tools_file.write_text(TOOLS_SOURCE)
    tools = load_tools(f"{tools_file}:add")
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    envs, conversations, failed = open_episodes(env(env_file), [record(1, 1)], 1)

    class Scripted(EndsTurns):
        def start(self, *args, **kwargs):
            super().start(*args, **kwargs)
            self.force(0, ids_of(tiny_tokenizer, call))

    episodes = Scripted(envs, conversations, tools=tools, every=3)
    prompts = [ids_of(tiny_tokenizer, render_with_tools(tiny_tokenizer, conversations[0], tools))]
    rollout = HFGenerationBackend(tiny_tokenizer).generate(policy, prompts, 1, SamplingConfig(max_new_tokens=120),
                                                           torch.Generator().manual_seed(0), episodes=episodes)
    assert rollout.tool_calls == [1] and episodes.stats.calls == 1 and rollout.turns == [2]
    assert [r for _, r in rollout.turn_rewards[0]] == [0.5]
    text = tiny_tokenizer.decode(rollout.response_ids[0], skip_special_tokens=True)
    assert "5" in text and "<tool_call>" not in envs[0].said[0] and envs[0].said[0] in text


# ----------------------------------------------------------------------------- rewards in the trainers


def test_each_turns_reward_lands_on_its_last_token_and_rows_sum_to_their_score():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    placed = scores_at_tokens(torch.tensor([4.0, -1.0]), mask, [[(1, 1.5), (5, 2.5)], []])
    assert placed.tolist() == [[0, 1.5, 0, 0, 0, 2.5, 0], [0, 0, -1.0, 0, 0, 0, 0]]
    # a reward source's score (shaping, normalisation) stays on the last token; rows sum to their scores
    placed = scores_at_tokens(torch.tensor([5.0, 0.0]), mask, [[(1, 1.5), (5, 2.5)], [(2, 0.0)]])
    assert placed.tolist()[0] == [0, 1.5, 0, 0, 0, 3.5, 0] and placed.sum(-1).tolist() == [5.0, 0.0]
    assert torch.equal(scores_at_tokens(torch.tensor([4.0, -1.0]), mask), scores_at_tokens(
        torch.tensor([4.0, -1.0]), mask, None))


def test_ppo_credits_each_turn_and_grpo_baselines_the_returns(tmp_path):
    """γ = λ = 1, no KL, values 0: GAE's advantage at a policy token = the rewards from there on, so a token
    before the first turn's end sees both turns' rewards and one after it the second's alone."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    rollout = Rollout([[1, 2]] * 2, [[5] * 6, [5] * 4], [True, True], torch.zeros(2, 6), policy_mask=mask,
                      turns=[2, 1], tool_calls=[0, 0], turn_rewards=[[(1, 1.0), (5, 2.0)], [(3, 0.5)]])
    scores, by_source = score_rollout(None, [{"prompt": "p"}], ["a", "b"], rollout, [[5] * 6, [5] * 4], ValueError)
    assert scores.tolist() == [3.0, 0.5] and by_source["env"].tolist() == [3.0, 0.5]
    cfg = PPOConfig(model="m", dataset="d", output_dir=str(tmp_path), gamma=1.0, lam=1.0, kl_coef=0.0,
                    whiten_advantages=False)
    exp = build_experience(cfg, 0.0, [{"prompt": "p"}] * 2, rollout, ["a", "b"], scores, scores, torch.zeros(10),
                           torch.zeros(10), 0.1, "test")
    assert exp.records[0]["advantages"].tolist() == [3.0, 3.0, 0.0, 0.0, 2.0, 2.0]
    assert exp.records[1]["advantages"].tolist() == [0.5] * 4
    grpo = GRPOConfig(model="m", dataset="d", output_dir=str(tmp_path), num_generations=2, kl_coef=0.0)
    exp = build_experience(grpo, 0.0, [{"prompt": "p"}], rollout, ["a", "b"], scores, scores, torch.zeros(10), None,
                           0.1, "test")
    assert exp.records[0]["advantages"][0] > 0 > exp.records[1]["advantages"][0]  # the higher return wins
    assert exp.metrics["reward_mean"] == pytest.approx(1.75)


def _env_prompts(tmp_path):
    path = tmp_path / "env_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Item {i}.", "start": i, "turns": 2, "scale": 0.5}) + "\n"
                            for i in range(16)))
    return str(path)


@pytest.mark.parametrize("cls", [GRPOConfig, PPOConfig], ids=["grpo", "ppo"])
def test_rl_with_an_environment_logs_its_metrics(cls, tiny_model_dir, count_e_files, env_file, tmp_path):
    """No reward source: the environment's returns are the reward. Turns end at a stop string ('e'), which the
    tiny policy writes within a few tokens."""
    from test_rl_variants import _run

    rows = _run(cls, tiny_model_dir, count_e_files, tmp_path / "out", env=f"{env_file}:Countdown", reward_fn=None,
                dataset=_env_prompts(tmp_path), stop_strings="e", max_new_tokens=48, num_generations=2,
                max_steps=2)
    assert len(rows) == 2 and rows[0]["rollout_logprob_diff_mean"] < 0.1  # forced tokens left out of the check
    for row in rows:
        assert 1 < row["env/turns_mean"] <= 2 and row["env/errors"] == 0 and row["turns_mean"] > 1
        assert 0.5 <= row["env/reward_per_turn"] <= 1.0 and 0 <= row["env/done_share"] <= 1  # turns score 0.5, 1
        assert 0 < row["reward_mean"] <= 1.5 and row["reward_mean"] == pytest.approx(row["reward/env"])
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert not any(k.startswith("tools/") for k in row)
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert any("1 to go" in s["response"] for s in samples)


# ----------------------------------------------------------------------------- refusals


def _refusal(config):
    with pytest.raises(ConfigError) as info:
        check_config(config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_env_specs_and_what_cannot_run_environments_are_refused_in_one_line(env_file, tmp_path):
    base = dict(model="m", dataset="d", output_dir=str(tmp_path), env=f"{env_file}:Countdown")
    assert "does not exist" in _refusal(GRPOConfig(**{**base, "env": f"{tmp_path}/nope.py:Countdown"}))
    assert "has no class 'Nope'" in _refusal(GRPOConfig(**{**base, "env": f"{env_file}:Nope"}))
    assert "has no method step" in _refusal(GRPOConfig(**{**base, "env": f"{env_file}:NoStep"}))
    assert "without arguments" in _refusal(GRPOConfig(**{**base, "env": f"{env_file}:NeedsArgs"}))
    assert "not a class" in _refusal(GRPOConfig(**{**base, "env": f"{env_file}:NOT_A_CLASS"}))
    assert "ClassName" in _refusal(GRPOConfig(**{**base, "env": f"{env_file}"}))
    assert "vLLM" in _refusal(GRPOConfig(**base, rollout_backend="vllm"))
    assert "--prompt-format raw" in _refusal(GRPOConfig(**base, prompt_format="raw"))
    assert "--max-turns" in _refusal(GRPOConfig(**base, max_turns=0))
    assert "--eval-dataset" in _refusal(GRPOConfig(**base, eval_dataset="e.jsonl"))
    check_config(GRPOConfig(**base))  # the plain case passes, without a reward source


def test_ray_refuses_environments_in_one_line(env_file, tmp_path):
    """The Ray rollout workers sample without episodes: --env with --ray is refused, not silently ignored."""
    from rlhfkit.distributed import with_ray_options
    from rlhfkit.distributed.options import check_ray_config

    config = with_ray_options(GRPOConfig)(model="m", dataset="d", output_dir=str(tmp_path), env=f"{env_file}:Countdown")
    with pytest.raises(ConfigError) as info:
        check_ray_config(config)
    assert "--env" in str(info.value) and "\n" not in str(info.value)
