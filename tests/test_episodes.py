"""Tool-using episodes in the decode loop: a call mid-decoding, its tool turn forced into the same KV cache, equal
to re-prefilling the whole conversation; the policy mask, turn and call counts, failing tools and the budget."""

from __future__ import annotations

import pytest
import torch
from toy import TOOLS_SOURCE as TOOLS_FILE

from rlhfkit.rollout.episodes import ToolEpisodes
from rlhfkit.rollout.generate import (
    HFGenerationBackend,
    Rollout,
    SamplingConfig,
    concat_rollouts,
    slice_rollout,
)
from rlhfkit.rollout.tools import (
    continuation_text,
    load_tools,
    parse_tool_call,
    render_with_tools,
    run_tool_call,
    tool_message,
)


def call_text(name, arguments):
    import json

    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


ADD = call_text("add", {"a": 2, "b": 3})
QUESTIONS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Tell me about cats."}]]


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    path = tmp_path_factory.mktemp("episode_tools") / "episode_tools.py"
    path.write_text(TOOLS_FILE)
    return load_tools(f"{path}:add,fail,hang,huge")


def prompt_ids(tokenizer, tools, conversations):
    return [tokenizer(render_with_tools(tokenizer, c, tools), add_special_tokens=False).input_ids for c in conversations]


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


class Scripted(ToolEpisodes):
    """Rows whose first tokens are scripted (forced), e.g. a call; ``again`` follows every tool turn."""

    def __init__(self, *args, scripts=None, again=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.scripts, self.again = scripts or {}, list(again)

    def start(self, *args, **kwargs):
        super().start(*args, **kwargs)
        for row, ids in self.scripts.items():
            super().force(row, ids)

    def force(self, row, ids):
        super().force(row, [*ids, *self.again])


def tool_turn_ids(tokenizer, tools, conversation, said, timeout_s=5.0, max_chars=2000):
    call = parse_tool_call(said, tools)
    result = run_tool_call(call, tools, timeout_s, max_chars)
    text = continuation_text(tokenizer, [*conversation, {"role": "assistant", "content": said}],
                             tool_message(call, result), tools)
    return ids_of(tokenizer, text)


def full_forward(model, prompt, response, temperature):
    """Log-probs of every response token and the argmax tokens, from ONE forward over prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].float()[len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1), logits.argmax(-1)


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "lean"])
@pytest.mark.parametrize("temperature, top_k", [(1.0, 1), (0.7, 0)], ids=["greedy", "sampled"])
def test_a_tool_turn_mid_decoding_equals_reprefilling_the_conversation(fast, temperature, top_k, policy, tools,
                                                                      tiny_tokenizer, monkeypatch):
    """Rows 0 and 3 write a call (scripted), the tool runs, its turn is forced into the KV cache and decoding
    goes on; one full forward over prompt + everything gives the policy tokens' log-probs (and argmax)."""
    from rlhfkit.rollout import fast_decode

    started = []
    monkeypatch.setattr(fast_decode.FastDecoder, "start",
                        lambda self, *a, _start=fast_decode.FastDecoder.start: started.append(1) or _start(self, *a))
    prompts = prompt_ids(tiny_tokenizer, tools, QUESTIONS)
    call = ids_of(tiny_tokenizer, ADD)
    other = call_text("add", {"a": 40, "b": 2})
    episodes = Scripted(tools, QUESTIONS, scripts={0: call, 3: ids_of(tiny_tokenizer, other)})
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, max_new_tokens=110)
    backend = HFGenerationBackend(tiny_tokenizer, fast_decode=fast)
    rollout = backend.generate(policy, prompts, 2, sampling, torch.Generator().manual_seed(7), episodes=episodes)
    assert bool(started) is fast  # the lean step ran (or not) as asked
    assert rollout.tool_calls == [1, 0, 0, 1] and rollout.turns == [2, 1, 1, 2]
    assert episodes.stats.calls == 2 and sum(episodes.stats.errors.values()) == 0
    for row, (said, conversation) in {0: (ADD, QUESTIONS[0]), 3: (other, QUESTIONS[1])}.items():
        forced = len(ids_of(tiny_tokenizer, said)) + len(tool_turn_ids(tiny_tokenizer, tools, conversation, said))
        response = rollout.response_ids[row]
        assert response[:len(ids_of(tiny_tokenizer, said))] == ids_of(tiny_tokenizer, said)
        assert response[len(ids_of(tiny_tokenizer, said)):forced] == \
            tool_turn_ids(tiny_tokenizer, tools, conversation, said)  # "5" / "42" in the tool turn
        assert len(response) >= forced + 3, "the policy decoded on after the tool turn"
        mask = rollout.policy_mask[row]
        assert mask[:forced].eq(0).all() and mask[forced:len(response)].eq(1).all() and mask[len(response):].eq(0).all()
        assert rollout.logprobs[row, :forced].eq(0).all()
    for row in (1, 2):  # rows without a call: all the policy's
        assert rollout.policy_mask[row, :rollout.lengths[row]].eq(1).all()
    for row, (prompt, response) in enumerate(zip(rollout.prompt_ids, rollout.response_ids)):
        reference, argmax = full_forward(policy, prompt, response, temperature)
        policy_tokens = rollout.policy_mask[row, :len(response)].bool()
        got = rollout.logprobs[row, :len(response)][policy_tokens]
        torch.testing.assert_close(got, reference[policy_tokens], atol=1e-5, rtol=0)
        if top_k == 1:
            assert torch.tensor(response)[policy_tokens].tolist() == argmax[policy_tokens].tolist()


def test_the_eager_and_lean_paths_give_the_same_episodes(policy, tools, tiny_tokenizer):
    prompts = prompt_ids(tiny_tokenizer, tools, QUESTIONS)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=100)
    rollouts = [HFGenerationBackend(tiny_tokenizer, fast_decode=fast).generate(
        policy, prompts, 2, sampling, torch.Generator().manual_seed(3),
        episodes=Scripted(tools, QUESTIONS, scripts={1: ids_of(tiny_tokenizer, ADD)})) for fast in (True, False)]
    assert rollouts[0].response_ids == rollouts[1].response_ids
    torch.testing.assert_close(rollouts[0].logprobs, rollouts[1].logprobs, atol=1e-5, rtol=0)
    assert torch.equal(rollouts[0].policy_mask, rollouts[1].policy_mask)


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "lean"])
def test_without_a_call_episodes_change_nothing(fast, policy, tools, tiny_tokenizer):
    prompts = prompt_ids(tiny_tokenizer, tools, QUESTIONS)
    sampling = SamplingConfig(temperature=0.9, max_new_tokens=20, stop_strings=("cat",))
    backend = HFGenerationBackend(tiny_tokenizer, fast_decode=fast)
    plain = backend.generate(policy, prompts, 2, sampling, torch.Generator().manual_seed(1))
    episodes = backend.generate(policy, prompts, 2, sampling, torch.Generator().manual_seed(1),
                                episodes=ToolEpisodes(tools, QUESTIONS))
    assert plain.policy_mask is None and plain.turns is None
    assert episodes.response_ids == plain.response_ids and episodes.ended == plain.ended
    assert torch.equal(episodes.logprobs, plain.logprobs)
    assert episodes.turns == [1] * 4 and episodes.tool_calls == [0] * 4
    width = plain.logprobs.shape[1]
    assert torch.equal(episodes.policy_mask,
                       (torch.arange(width)[None] < torch.tensor(plain.lengths)[:, None]).float())


def test_max_turns_ends_the_row_at_its_next_call(policy, tools, tiny_tokenizer):
    """Every tool turn is followed by another call (scripted): two calls run, the third ends the row."""
    prompts = prompt_ids(tiny_tokenizer, tools, QUESTIONS[:1])
    call = ids_of(tiny_tokenizer, ADD)
    episodes = Scripted(tools, QUESTIONS[:1], max_turns=2, scripts={0: call}, again=call)
    rollout = HFGenerationBackend(tiny_tokenizer).generate(
        policy, prompts, 1, SamplingConfig(max_new_tokens=400), torch.Generator().manual_seed(0), episodes=episodes)
    turn = tool_turn_ids(tiny_tokenizer, tools, QUESTIONS[0], ADD)
    assert rollout.tool_calls == [2] and rollout.turns == [3] and episodes.stats.calls == 2
    assert rollout.ended == [True]
    assert rollout.response_ids[0] == call + turn + call + turn + call  # ends right after the third call
    assert rollout.policy_mask[0].eq(0).all()  # every token was forced (scripted calls and tool turns)


def test_failing_tools_give_counted_errors_and_decoding_goes_on(policy, tools, tiny_tokenizer, tmp_path):
    conversations = QUESTIONS * 2
    prompts = prompt_ids(tiny_tokenizer, tools, conversations)
    scripts = [call_text("fail", {"x": 1}), call_text("hang", {"pid_file": str(tmp_path / "hang.pid")}), call_text("huge", {}),
               '<tool_call>\n{"name": "add", "arguments": {"a": "two"}}\n</tool_call>']
    episodes = Scripted(tools, conversations, timeout_s=1.0, max_chars=50,
                        scripts={row: ids_of(tiny_tokenizer, s) for row, s in enumerate(scripts)})
    rollout = HFGenerationBackend(tiny_tokenizer).generate(
        policy, prompts, 1, SamplingConfig(max_new_tokens=200), torch.Generator().manual_seed(0), episodes=episodes)
    assert episodes.stats.calls == 4 and rollout.tool_calls == [1] * 4 and rollout.turns == [2] * 4
    assert {k: v for k, v in episodes.stats.errors.items() if v} == \
        {"exception": 1, "timeout": 1, "truncated": 1, "malformed": 1}
    assert episodes.stats.as_dict()["tools/errors"] == 4
    texts = [tiny_tokenizer.decode(r, skip_special_tokens=True) for r in rollout.response_ids]
    for text, words in zip(texts, ["raised ValueError: bad x 1", "timed out after 1 s", "more characters cut",
                                   "malformed tool call"]):
        assert words in text
    for row in range(4):  # the policy decoded on after each tool turn
        mask = rollout.policy_mask[row, :rollout.lengths[row]]
        assert mask[0] == 0 and mask[-1] == 1 and mask.sum() >= 1


def test_a_tool_turn_past_the_token_budget_truncates_the_row(policy, tools, tiny_tokenizer):
    prompts = prompt_ids(tiny_tokenizer, tools, QUESTIONS[:1])
    call = ids_of(tiny_tokenizer, ADD)
    turn = tool_turn_ids(tiny_tokenizer, tools, QUESTIONS[0], ADD)
    for room in (-1, 0, 1):  # columns left for the policy after the tool turn
        budget = len(call) + len(turn) + room
        episodes = Scripted(tools, QUESTIONS[:1], scripts={0: call})
        rollout = HFGenerationBackend(tiny_tokenizer).generate(
            policy, prompts, 1, SamplingConfig(max_new_tokens=budget), torch.Generator().manual_seed(0),
            episodes=episodes)
        assert rollout.ended == [False] and rollout.tool_calls == [1]
        if room >= 0:  # the tool turn fits (then the policy's tokens): forced tokens count in the budget
            assert rollout.response_ids[0][:len(call) + len(turn)] == call + turn and rollout.turns == [2]
            assert rollout.policy_mask[0].tolist() == [0.0] * (len(call) + len(turn)) + [1.0] * room
        else:  # it does not fit: the row is cut right after the call, not ended
            assert rollout.response_ids[0] == call and rollout.turns == [1]


def test_a_forced_position_never_ends_a_row(tiny_tokenizer, tools):
    """A draw that sampled EOS where a forced token goes is undone; a forced EOS ends nothing either."""
    eos = tiny_tokenizer.eos_token_id
    episodes = ToolEpisodes(tools, QUESTIONS[:1])
    episodes.start(tiny_tokenizer, 1, 1, 5)
    episodes.force(0, [eos, 7])
    tokens, logps = torch.full((1, 5), eos), torch.full((1, 5), -0.5)
    lengths, done = torch.tensor([1]), torch.tensor([True])  # as the draw of an EOS at column 0 left them
    assert episodes.after_step(0, tokens, logps, lengths, done) is False
    assert tokens[0, 0] == eos and logps[0, 0] == 0 and lengths.tolist() == [5] and done.tolist() == [False]
    episodes.after_step(1, tokens, logps, lengths, done)
    assert tokens[0, 1] == 7 and episodes.mask[0].tolist() == [0, 0, 1, 1, 1]


def test_slice_and_concat_keep_the_episode_fields():
    def rollout(n, width, mask=None, turns=None, calls=None):
        return Rollout([[1]] * n, [[5] * width] * n, [True] * n, torch.ones(n, width), 3, mask, turns, calls)

    tooled = rollout(2, 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), [2, 1], [1, 0])
    both = concat_rollouts([tooled, rollout(1, 4)])
    assert both.policy_mask.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]]
    assert both.turns == [2, 1, 1] and both.tool_calls == [1, 0, 0]
    part = slice_rollout(both, 1, 3)
    assert part.policy_mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]] and part.turns == [1, 1]
    assert part.tool_calls == [0, 0]
    plain = concat_rollouts([rollout(1, 2), rollout(1, 2)])
    assert plain.policy_mask is None and plain.turns is None and slice_rollout(plain, 0, 1).tool_calls is None
