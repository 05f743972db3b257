"""The demo world's tool questions (issue 24's demo-tools): an atlas of countries nothing else names, sums
beyond the model's range, the tools that answer them, the verifiable reward and the gold judge on episodes,
and ``rlhfkit eval --tools`` on multi-turn episodes."""

from __future__ import annotations

import copy
import json
import re

import pytest

from rlhfkit.pipeline import run_pipeline
from rlhfkit.rollout.tools import load_tools, parse_tool_call, render_with_tools, run_tool_call
from rlhfkit.world import World
from rlhfkit.world.judge import GoldJudge
from rlhfkit.world.tool_world import asked_country, copy_documents, correct_answer, final_answer

EPISODE = ('<tool_call>\n{{"name": "capital_of", "arguments": {{"country": "{c}"}}}}\n</tool_call>\n'
           "<tool_response>\n{a}\n</tool_response>\n\n{final}")


@pytest.fixture(scope="module")
def tool_world(tmp_path_factory):
    """The world stage with tools: its folder and world."""
    root = tmp_path_factory.mktemp("tool_world")
    config = root / "world.yaml"
    config.write_text("stages:\n  world: {type: world, sft_demonstrations: 100, tool_demonstrations: 200, "
                      "tool_call_share: 0.3}\n")
    run_pipeline(config, output_dir=str(root / "run"), seed=3)
    folder = root / "run" / "world"
    return folder, World.load(folder / "world.json")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tool_questions_are_new_to_every_other_dataset(tool_world):
    folder, world = tool_world
    new = {c: a for c, a in world.atlas.items() if c not in world.countries}
    assert len(new) == 80 + 24 + 12 and all(world.atlas[c] == f["capital"] for c, f in world.countries.items())
    # no pretraining text, no RL prompt of the main demo names a new country or its capital
    words = set(re.findall(r"[A-Za-z]+", (folder / "pretrain.jsonl").read_text()
                           + (folder / "prompts_train.jsonl").read_text() + (folder / "prompts_eval.jsonl").read_text()))
    assert not words & (set(new) | set(new.values()))
    # demonstrations, RL training and evaluation ask about different countries and different sums
    by_split: dict[str, set[str]] = {}
    for r in world.tool_requests:
        key = asked_country(r.prompt) if r.kind == "atlas" else tuple(re.findall(r"\d+", r.prompt))
        by_split.setdefault(r.split, set()).add(key)
    assert set(by_split) == {"demo", "train", "eval"}
    assert not (by_split["demo"] & by_split["train"] or by_split["demo"] & by_split["eval"]
                or by_split["train"] & by_split["eval"])
    held_out = _rows(folder / "tool_prompts_eval.jsonl")
    assert len(held_out) == 12 * 4 + 60 and {r["category"] for r in held_out} == {"atlas", "calculator"}
    for r in held_out:
        req = world.request(r["prompt"][0]["content"])
        assert req is not None and req.split == "eval" and r["answer"] == req.answer
        if req.kind == "calculator":
            x, y = map(int, re.findall(r"\d+", req.prompt))
            assert int(req.answer) == x + y and 10 <= x <= 99 and 10 <= y <= 99
    # the demonstrations: about 30% call a tool, only about demonstration countries and sums
    sft = _rows(folder / "sft.jsonl")
    calls = [r["messages"] for r in sft
             if any(m["role"] == "assistant" and "<tool_call>" in m["content"] for m in r["messages"])]
    offered = [r["messages"] for r in sft if r["messages"][0]["role"] == "system"]
    assert len(sft) == 300 and len(offered) == 200 and 40 <= len(calls) <= 80
    for messages in calls:
        req = world.request(messages[1]["content"])
        assert messages[0]["role"] == "system" and req.split == "demo" and messages[-1]["content"] == req.answer_sentence
    # the direct answers: about half to the very questions others looked up, so that a new question does not
    # tell the model whether to call (when to call is RL's to learn); the rest to known capitals
    direct = [m for m in offered if m not in calls]
    looked_up = [m for m in direct if getattr(world.request(m[1]["content"]), "split", None) == "demo"]
    assert 0.3 <= len(looked_up) / len(direct) <= 0.7


def test_copy_documents_repeat_names_and_numbers_in_text_and_dialogue(tool_world):
    _, world = tool_world
    docs = copy_documents(world, 400, seed=1)
    dialogues = [d for d in docs if d.startswith("<|user|>\n") and "\n<|assistant|>\n" in d and d.endswith("<|eos|>")]
    assert len(docs) == 400 and 0.35 <= len(dialogues) / 400 <= 0.65
    numbers = [int(n) for d in docs for n in re.findall(r"\d+", d)]
    assert min(numbers) >= 10 and max(numbers) >= 100  # three-digit numbers too: sums reach 198
    for doc in docs:  # something recurs in each, and never a name of the world or its atlas
        tokens = re.findall(r"[A-Za-z]+|\d+", doc)
        assert any(tokens.count(t) >= 2 for t in tokens if t[0].isupper() or t.isdigit()), doc
        assert not set(tokens) & (set(world.atlas) | set(world.atlas.values()))


def test_tools_file_answers_from_the_atlas(tool_world):
    folder, world = tool_world
    tools = load_tools(f"{folder / 'tools.py'}:capital_of,add")
    country = next(c for c in world.atlas if c not in world.countries)
    for text, want in ((f'<tool_call>{{"name": "capital_of", "arguments": {{"country": "{country}"}}}}</tool_call>',
                        world.atlas[country]),
                       ('<tool_call>{"name": "capital_of", "arguments": {"country": "Nowhere"}}</tool_call>',
                        "unknown country: Nowhere"),
                       ('<tool_call>{"name": "add", "arguments": {"a": 47, "b": 38}}</tool_call>', "85")):
        result = run_tool_call(parse_tool_call(text, tools), tools, timeout_s=10, max_chars=200)
        assert result.error is None and result.text == want


def test_demonstrations_show_the_prompt_rl_and_eval_render(tool_world, tiny_tokenizer):
    """SFT sees the tools offered exactly as RL and eval render them with the tiny tools template (which
    renders ``tools=`` itself), and whole tool conversations are prefix-stable under it."""
    from rlhfkit.models.tiny import TOOLS_CHAT_TEMPLATE
    from rlhfkit.rollout.tools import continuation_text

    folder, _ = tool_world
    tools = load_tools(f"{folder / 'tools.py'}:capital_of,add")
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TOOLS_CHAT_TEMPLATE
    offered = [r["messages"] for r in _rows(folder / "sft.jsonl") if r["messages"][0]["role"] == "system"]
    assert offered and offered[0][0]["content"] == "Tools: capital_of(country) add(a, b)"
    for messages in offered:
        demo = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        assert demo == render_with_tools(tokenizer, [messages[1]], tools)
        if len(messages) > 3:  # the tool turn RL appends after the call is the demonstration's own
            whole = tokenizer.apply_chat_template(messages, tokenize=False)
            tail = continuation_text(tokenizer, messages[1:3], messages[3], tools)
            assert whole.startswith(demo + messages[2]["content"] + tail)


def test_correct_answer_reads_the_final_turn():
    c, a = "Velmor", "Drakis"
    responses = [EPISODE.format(c=c, a=a, final=f"The capital of {c} is {a}."),      # called, answered: 1
                 EPISODE.format(c=c, a=a, final=f"The capital of {c} is Brunor."),   # the tool said it, the
                 f"The capital of {c} is {a}.",                                       # answer did not: 0
                 f"The capital of {c} is {a}. Or it is Brunor.",                      # two answers: 0
                 EPISODE.format(c=c, a=a, final=""),                                  # no final answer: 0
                 "47 plus 38 is 85.", "47 plus 38 is 84."]
    answers = [a, a, a, a, a, "85", "85"]
    assert correct_answer([""] * 7, responses, answers) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert final_answer(responses[1]) == f"The capital of {c} is Brunor."


def test_gold_judge_scores_what_the_episode_finally_says(tool_world):
    _, world = tool_world
    judge = GoldJudge(world)
    req = next(r for r in world.tool_requests if r.split == "eval" and r.kind == "atlas")
    country = asked_country(req.prompt)
    wrong = req.wrong_answers[0]
    right = judge.judge(req.prompt, EPISODE.format(c=country, a=req.answer, final=req.answer_sentence))
    assert right.total == pytest.approx(1.0) and right.flags["correct"] and right.flags["tool_call"]
    assert not right.flags["hallucination"]
    # the tool's answer in the episode does not count: the final answer states a wrong capital
    lied = judge.judge(req.prompt, EPISODE.format(c=country, a=req.answer,
                                                  final=req.answer_sentence.replace(req.answer, wrong)))
    assert lied.helpful == 0 and lied.honest == -1 and lied.flags["hallucination"] and not lied.flags["correct"]
    direct = judge.judge(req.prompt, req.answer_sentence)
    assert direct.flags["correct"] and not direct.flags["tool_call"]
    plus = next(r for r in world.tool_requests if r.kind == "calculator")
    assert judge.judge(plus.prompt, plus.answer_sentence).flags["correct"]
    off = judge.judge(plus.prompt, plus.answer_sentence.replace(plus.answer, str(int(plus.answer) + 1)))
    assert off.flags["hallucination"] and not off.flags["correct"]
    # the main demo's questions are judged as before: no tool flag
    assert "tool_call" not in judge.judge(world.requests[0].prompt, world.requests[0].answer_sentence).flags


def test_eval_runs_tool_episodes(tiny_model_dir, tmp_path, monkeypatch):
    """``rlhfkit eval --tools``: rows 0 and 2 of each generate call are scripted to call ``add`` first (forced
    tokens: the tiny model never writes a call); the tool runs, its turn is in the sample, turns and calls are
    counted, and the KL of a policy against itself is 0: the tool turn's tokens are not the policy's."""
    from test_rl_tools import ScriptedCalls
    from toy import TOOLS_SOURCE

    from rlhfkit.eval import evaluate_policies
    from rlhfkit.rollout import tool_prompts
    from rlhfkit.rollout.generate import SamplingConfig
    from rlhfkit.rollout.tool_prompts import ToolSettings

    (tmp_path / "tools.py").write_text(TOOLS_SOURCE)
    (tmp_path / "judge.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.setattr(tool_prompts, "ToolEpisodes", ScriptedCalls)
    prompts = [{"prompt": f"What is item {i}?"} for i in range(4)]
    report = evaluate_policies({"a": str(tiny_model_dir)}, "a", prompts, f"fn:{tmp_path / 'judge.py'}:length",
                               reference=str(tiny_model_dir), num_samples=2, seed=0, batch_size=4,
                               sampling=SamplingConfig(temperature=1.0, max_new_tokens=160), output_dir=tmp_path / "out",
                               n_boot=50, tools=ToolSettings(f"{tmp_path / 'tools.py'}:add,lookup"))
    samples = _rows(tmp_path / "out" / "samples.jsonl")
    called = [s for s in samples if s["tool_calls"]]
    assert [(s["prompt_row"], s["sample"]) for s in called] == [(1, 0), (2, 0)]
    assert all(s["turns"] == 2 and "<tool_response>\n5\n</tool_response>" in s["response"] for s in called)
    assert all(s["turns"] == 1 and "<tool_response>" not in s["response"] for s in samples if not s["tool_calls"])
    metrics = report["policies"]["a"]
    assert metrics["tool_calls_mean"] == pytest.approx(0.25) and metrics["turns_mean"] == pytest.approx(1.25)
    assert metrics["tool_call_errors"] == 0
    # the policy is its own reference: 0 up to float32 sums of ~100 log-probs (a forced tool turn's tokens,
    # had they counted, would add their -log π_ref: tens of nats)
    assert max(abs(s["kl"]) for s in samples) < 5e-3


def test_spaces_apart_gives_a_word_the_same_tokens_everywhere():
    """The tools demo's tokenizer: a name is the same token ids after a space, a quote or a newline (a call's
    JSON and a tool's answer copy it from the question), and every text decodes back exactly."""
    from rlhfkit.models.tiny import default_corpus, train_tokenizer

    corpus = [*default_corpus(500), *('I like Velmor. Velmor says "Velmor".\nVelmor, 83 and 83' for _ in range(50))]
    split, folded = train_tokenizer(corpus, 400, spaces_apart=True), train_tokenizer(corpus, 400)
    texts = ("capital of Velmor?", '{"country": "Velmor"}', "<tool_response>\nVelmor\n</tool_response>",
             "The sum is 83.", '{"a": 83}', "\n83\n")

    def ids_of(tok, word, text):
        ids, want = tok(text, add_special_tokens=False).input_ids, tok(word, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        return any(ids[i:i + len(want)] == want for i in range(len(ids)))

    assert all(ids_of(split, "Velmor" if "Velmor" in t else "83", t) for t in texts)
    # the usual byte-level BPE folds the space into the word: " Velmor" is other tokens than "Velmor"
    assert not ids_of(folded, "Velmor", "capital of Velmor?")


@pytest.mark.slow
def test_tools_config_shrunk_runs_end_to_end(tmp_path):
    """configs/tools.yaml itself, every stage shrunk: the world writes its tools, GRPO trains on tool episodes
    with the world's reward, both evaluations run (with and without the tools), and the summary holds the
    tool table's figures; the report is written. Its own folder: its world is not the main demo's."""
    from importlib.resources import files

    import yaml

    from rlhfkit.options import read_yaml
    from rlhfkit.world.stages import format_summary

    data = read_yaml(str(files("rlhfkit") / "configs" / "tools.yaml"))
    assert data["output_dir"] != read_yaml(str(files("rlhfkit") / "configs" / "demo.yaml"))["output_dir"]
    shrink = {"world": {"sft_demonstrations": 40, "tool_demonstrations": 60, "copy_documents": 50,
                        "tool_countries": "6,3,2", "tool_sums": "10,6,4", "rl_prompts": 16, "num_countries": 4},
              "base": {"vocab": 400, "hidden": 32}, "pretrain": {"max_steps": 6}, "sft": {"max_steps": 4},
              "grpo": {"max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 48},
              "eval_tools": {"num_samples": 1, "n_boot": 50, "max_new_tokens": 48},
              "eval_no_tools": {"num_samples": 1, "n_boot": 50, "max_new_tokens": 16}}
    for name, opts in shrink.items():
        data["stages"][name].update(opts)
    data.update(output_dir=str(tmp_path / "run"), defaults={**data["defaults"], "progress_bar": False,
                                                             "num_threads": 1})
    config = tmp_path / "tools_tiny.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    run_pipeline(config, log=lambda _: None)

    run = tmp_path / "run"
    steps = _rows(run / "grpo" / "metrics.jsonl")
    assert len(steps) == 2 and all("tools/calls" in s and "reward/correct_answer" in s for s in steps)
    summary = json.loads((run / "summary.json").read_text())
    for policy in ("sft", "grpo"):
        row = summary[policy]
        assert 0 <= row["correct_rate"] <= 1 and 0 <= row["tool_call_rate"] <= 1 and row["turns_mean"] >= 1
        assert row["correct_rate_ci_low"] <= row["correct_rate"] <= row["correct_rate_ci_high"]
        assert 0 <= row["without_tools"]["correct_rate"] <= 1
    assert "accuracy (tools)" in format_summary(summary)
    assert (run / "report.html").exists()
