"""Reward functions see the dataset row: columns as keywords, the prompt as written, weights, reward/<name>.

The end-to-end runs build a GSM8K-style dataset with ``datasets`` (``prompt`` + ``answer``, and a chat-message
variant) and train GRPO through the CLI with reward functions that record every call to a JSON-lines file,
so the test can check what each response was scored against.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import datasets
import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.rollout.rewards import (
    EnsembleReward,
    FunctionReward,
    HTTPReward,
    ScoringBatch,
    build_reward_source,
    load_reward_function,
    parse_reward_weights,
    scores_by_source,
    unique_metric_names,
)

# exact_match: the rlhfkit convention (rendered prompts, responses, then the columns it names);
# trl_style: TRL's (keywords only, completions first); both append their inputs and scores to CALLS_FILE
REWARD_FILE = '''
import json
CALLS_FILE = {calls!r}

def _record(kind, **data):
    with open(CALLS_FILE, "a") as fh:
        fh.write(json.dumps({{"kind": kind, **data}}) + "\\n")

def exact_match(prompts, responses, prompt, answer):
    scores = [float(answer_i) / 100 + (1.0 if r.strip() == answer_i else 0.0) for r, answer_i in zip(responses, answer)]
    _record("exact_match", prompts=prompts, responses=responses, prompt=prompt, answer=answer, scores=scores)
    return scores

def trl_style(completions, answer, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    scores = [len(t) % 5 + float(a) / 1000 for t, a in zip(texts, answer)]
    _record("trl_style", completions=completions, answer=answer, keys=sorted(kwargs), scores=scores)
    return scores

def needs_solution(prompts, responses, solution):
    return [0.0] * len(responses)
'''


def _question(i: int) -> str:
    return f"Question {i}: what is {i} times 7?"


def _write_dataset(path: Path, chat: bool) -> Path:
    """A GSM8K-style set built with ``datasets``: GSM8K's own ``question`` (a string; the run maps it with
    --columns prompt=question) or a ``prompt`` of one user message, and ``answer``."""
    key = "prompt" if chat else "question"
    rows = {key: [[{"role": "user", "content": _question(i)}] if chat else _question(i) for i in range(12)],
            "answer": [str(7 * i) for i in range(12)]}
    datasets.Dataset.from_dict(rows).to_json(path)
    return path


def _number(prompt) -> int:
    text = prompt[0]["content"] if isinstance(prompt, list) else prompt
    return int(re.search(r"Question (\d+):", text).group(1))


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARD_FILE.format(calls=str(tmp_path / "calls.jsonl")))
    return path


def _calls(reward_file: Path) -> list[dict]:
    return [json.loads(line) for line in (reward_file.parent / "calls.jsonl").read_text().splitlines()]


def _grpo(model_dir, dataset, reward_file, out, *extra) -> int:
    return main(["grpo", "--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out),
                 "--max-steps", "2", "--max-new-tokens", "6", "--num-generations", "3", "--prompts-per-step", "2",
                 "--no-progress-bar", "--learning-rate", "1e-3", *extra])


@pytest.mark.parametrize("chat", [False, True], ids=["string_prompts", "chat_prompts"])
def test_grpo_reward_functions_get_their_rows_answers_and_log_each_source(chat, tiny_model_dir, reward_file,
                                                                         tmp_path):
    dataset = _write_dataset(tmp_path / "gsm.jsonl", chat)
    out = tmp_path / "run"
    fns = f"{reward_file}:exact_match,{reward_file}:trl_style"
    columns = [] if chat else ["--columns", "prompt=question"]
    assert _grpo(tiny_model_dir, dataset, reward_file, out, "--reward-fn", fns, "--reward-weights", "1.0,0.5",
                 *columns) == 0

    calls = _calls(reward_file)
    exact = [c for c in calls if c["kind"] == "exact_match"]
    trl = [c for c in calls if c["kind"] == "trl_style"]
    assert len(exact) == len(trl) == 2  # one call per step (no eval set)
    for call in exact:
        assert len(call["responses"]) == len(call["answer"]) == len(call["prompt"]) == 2 * 3
        for rendered, written, answer in zip(call["prompts"], call["prompt"], call["answer"]):
            i = _number(written)
            assert answer == str(7 * i)  # the answer of this response's own prompt
            if chat:  # the prompt as written: the messages list, not the rendered text
                assert written == [{"role": "user", "content": _question(i)}]
            else:
                assert written == _question(i)
            assert _question(i) in rendered  # prompts= stays the text the policy saw
        # G samples of a prompt are adjacent and share its row
        assert [_number(p) for p in call["prompt"][::3]] == [_number(p) for p in call["prompt"][2::3]]
    for call in trl:
        assert call["keys"] == ["completion_ids", "prompt", "prompts"]  # TRL's arguments (+ the prompt column)
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in call["completions"]) == chat
        assert call["answer"] == exact[trl.index(call)]["answer"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    assert len(rows) == 2
    for row, e, t in zip(rows, exact, trl):
        assert row["reward/exact_match"] == pytest.approx(statistics.fmean(e["scores"]), abs=1e-6)
        assert row["reward/trl_style"] == pytest.approx(statistics.fmean(t["scores"]), abs=1e-6)
        # the combined reward is the weighted sum of the sources
        assert row["reward_mean"] == pytest.approx(row["reward/exact_match"] + 0.5 * row["reward/trl_style"],
                                                   abs=1e-5)
        assert row["reward/exact_match"] > 0.05  # the answers (7i/100) reached it: not a vacuous zero


def test_missing_column_and_weight_count_are_one_line_errors_before_training(tiny_model_dir, reward_file,
                                                                             tmp_path, capsys):
    dataset = _write_dataset(tmp_path / "gsm.jsonl", chat=False)
    capsys.readouterr()  # the datasets writer's progress bar
    out = tmp_path / "run"
    assert _grpo(tiny_model_dir, dataset, reward_file, out, "--reward-fn", f"{reward_file}:needs_solution",
                 "--columns", "prompt=question") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1, err
    assert (f"reward function '{reward_file}:needs_solution' has a required parameter 'solution' that is not a "
            f"column of --dataset {dataset} (columns: prompt, answer)") in err[0]
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()

    fns = f"{reward_file}:exact_match,{reward_file}:trl_style"
    assert _grpo(tiny_model_dir, dataset, reward_file, out, "--reward-fn", fns, "--reward-weights", "1",
                 "--columns", "prompt=question") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "--reward-weights has 1 weight(s) for 2 reward source(s)" in err[0], err
    assert not (reward_file.parent / "calls.jsonl").exists()  # nothing was scored


# ---------------------------------------------------------------- units


def _batch(prompts, responses, raw=None, **columns) -> ScoringBatch:
    n = len(responses)
    return ScoringBatch(list(prompts), list(responses), [[1]] * n, [[2, 3]] * n, [True] * n,
                        raw_prompts=raw, columns={k: list(v) for k, v in columns.items()})


def test_weights_combine_as_a_weighted_sum():
    a = FunctionReward(lambda prompts, responses: [1.0, 2.0, 3.0], "a")
    b = FunctionReward(lambda prompts, responses: [4.0, -2.0, 0.5], "b")
    batch = _batch(["p"] * 3, ["x", "y", "z"])
    weighted = EnsembleReward([a, b], weights=[1.0, 0.5])
    assert weighted.score(batch).tolist() == [3.0, 1.0, 3.25]  # 1·a + 0.5·b
    assert EnsembleReward([a, b], weights=[-1.0, 2.0]).score(batch).tolist() == [7.0, -6.0, -2.0]
    assert EnsembleReward([a], weights=[2.0]).score(batch).tolist() == [2.0, 4.0, 6.0]
    by_source = scores_by_source(weighted, weighted.score(batch))
    assert {k: v.tolist() for k, v in by_source.items()} == {"a": [1.0, 2.0, 3.0], "b": [4.0, -2.0, 0.5]}
    assert parse_reward_weights("1.0, 0.5") == [1.0, 0.5] and parse_reward_weights([2, 3]) == [2.0, 3.0]
    assert parse_reward_weights(None) is None and parse_reward_weights("") is None


@pytest.mark.parametrize("weights, ensemble, message", [
    ([1.0], "mean", "--reward-weights has 1 weight(s) for 2 reward source(s) ("),
    ([1.0, 2.0, 3.0], "mean", "--reward-weights has 3 weight(s) for 2 reward source(s)"),
    ([1.0, 2.0], "min", "it cannot be combined with --reward-ensemble min"),
    ([1.0, 2.0], "mean_minus_std", "it cannot be combined with --reward-ensemble mean_minus_std"),
])
def test_weight_errors(weights, ensemble, message, reward_file, tiny_tokenizer):
    fns = [f"{reward_file}:exact_match", f"{reward_file}:trl_style"]
    with pytest.raises(ConfigError) as info:
        build_reward_source([], fns, [], tiny_tokenizer, ensemble=ensemble, weights=weights)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [("1.0,abc", "'abc' is not a number"), ("1,nan", "'nan' is not a finite")])
def test_bad_weight_values(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_reward_weights(text)


def test_two_argument_function_keeps_working_and_kwargs_gets_every_column():
    seen = {}

    def old_style(prompts, responses):
        return [len(r) for r in responses]

    def everything(prompts, responses, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(responses)

    batch = _batch(["<user>hi</user>", "<user>yo</user>"], ["abc", "de"], raw=["hi", "yo"], answer=["1", "2"],
                   level=[3, 4])
    old = FunctionReward(old_style, "old")
    old.check_columns([])  # needs nothing
    assert old.score(batch).tolist() == [3.0, 2.0]
    FunctionReward(everything, "all").score(batch)
    assert seen == {"prompt": ["hi", "yo"], "answer": ["1", "2"], "level": [3, 4]}


def test_named_columns_only_and_missing_column_error():
    got = {}

    def named(prompts, responses, answer, *, prompt, hint="none"):
        got.update(prompts=prompts, answer=answer, prompt=prompt, hint=hint)
        return [1.0] * len(responses)

    batch = _batch(["rendered"], ["r"], raw=[[{"role": "user", "content": "hi"}]], answer=["7"], extra=["x"])
    FunctionReward(named, "named").score(batch)
    assert got == {"prompts": ["rendered"], "answer": ["7"], "prompt": [[{"role": "user", "content": "hi"}]],
                   "hint": "none"}  # 'extra' was not asked for, 'hint' has no column: its default stays

    reward = FunctionReward(named, "r.py:named")
    with pytest.raises(ConfigError) as info:
        reward.check_columns(["prompt", "question"], "--dataset gsm.jsonl")
    assert str(info.value) == ("reward function 'r.py:named' has a required parameter 'answer' that is not a column "
                               "of --dataset gsm.jsonl (columns: prompt, question); rename one to it (--columns "
                               "answer=OLD) or give the parameter a default")
    with pytest.raises(ConfigError, match="required parameter 'answer'"):  # at the first call too
        reward.score(_batch(["p"], ["r"]))
    with pytest.raises(ConfigError, match="takes 1 positional parameter"):
        FunctionReward(lambda responses: [0.0], "one")


def test_trl_style_function_gets_keywords_as_trl_passes_them():
    got = {}

    def accuracy(prompts, completions, answer, **kwargs):
        got.update(prompts=prompts, completions=completions, answer=answer, keys=sorted(kwargs))
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]

    chat = [{"role": "user", "content": "2+2?"}]
    batch = _batch(["<rendered>"] * 2, ["4", "5"], raw=[chat, chat], answer=["4", "4"])
    assert FunctionReward(accuracy, "acc").score(batch).tolist() == [1.0, 0.0]
    assert got["prompts"] == [chat, chat]  # TRL passes the prompts as written
    assert got["completions"] == [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    assert got["keys"] == ["completion_ids", "prompt"]

    def plain(completions, **kwargs):
        return [len(c) for c in completions]

    def no_kwargs(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    assert FunctionReward(plain, "plain").score(_batch(["p", "q"], ["ab", "c"])).tolist() == [2.0, 1.0]
    batch = _batch(["p", "q"], ["4", "5"], answer=["4", "4"])
    assert FunctionReward(no_kwargs, "no_kwargs").score(batch).tolist() == [1.0, 0.0]


def test_metric_names_are_short_and_unique(reward_file, tmp_path):
    fn = load_reward_function(f"{reward_file}:exact_match")
    again = load_reward_function(f"{reward_file}:exact_match")
    url = HTTPReward("http://scorer.local:8000/score")

    class Source:
        name = "gold:/data/world"

    assert unique_metric_names([fn, again, url, Source()]) == ["exact_match", "exact_match_2", "scorer.local",
                                                                "gold:/data/world"]


def test_eval_fn_judge_gets_the_rows_columns(tiny_model_dir, tmp_path):
    calls = tmp_path / "judge_calls.jsonl"
    (tmp_path / "judge.py").write_text(
        "import json\n"
        "def judge(prompts, responses, answer, prompt):\n"
        f"    with open({str(calls)!r}, 'a') as fh:\n"
        "        fh.write(json.dumps({'answer': answer, 'prompt': prompt}) + '\\n')\n"
        "    return [float(a) for a in answer]\n")
    prompts = _write_dataset(tmp_path / "gsm.jsonl", chat=True)
    out = tmp_path / "eval"
    assert main(["eval", "--policy", f"base={tiny_model_dir}", "--prompts", str(prompts), "--judge",
                 f"fn:{tmp_path / 'judge.py'}:judge", "--max-new-tokens", "3", "--max-prompts", "5",
                 "--num-samples", "2", "--batch-size", "4", "--n-boot", "10", "--output-dir", str(out)]) == 0
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    answers = [a for call in seen for a in call["answer"]]
    written = [p for call in seen for p in call["prompt"]]
    assert answers == [str(7 * i) for i in range(5) for _ in range(2)]
    assert written == [[{"role": "user", "content": _question(i)}] for i in range(5) for _ in range(2)]
    report = json.loads((out / "eval.json").read_text())
    assert report["policies"]["base"]["judge_score"] == pytest.approx(statistics.fmean(float(a) for a in answers))


def test_ray_reward_worker_passes_rows_and_returns_each_sources_scores(tiny_model_dir, tiny_tokenizer, reward_file,
                                                                       tmp_path):
    """The Ray reward worker scores a share of the rollout from the prompt records the driver sends (prompt,
    raw_prompt, columns): its functions get the rows' columns, and it returns each source's scores."""
    from rlhfkit.data import prepare_prompts
    from rlhfkit.distributed import with_ray_options
    from rlhfkit.distributed.workers import RewardWorker
    from rlhfkit.rollout.generate import Rollout
    from rlhfkit.trainers.rl import GRPOConfig

    ds = datasets.Dataset.from_dict({"prompt": [_question(i) for i in (3, 5)], "answer": ["21", "35"]})
    records, _ = prepare_prompts(ds, tiny_tokenizer, 64)
    sent = [{k: r[k] for k in ("prompt", "raw_prompt", "columns")} for r in records]  # what the driver sends
    config = with_ray_options(GRPOConfig)(model=str(tiny_model_dir), num_generations=2, ray=True, num_threads=1,
                                          reward_fn=f"{reward_file}:exact_match,{reward_file}:trl_style", reward_weights="2,1")
    worker = RewardWorker(config, "reward", 0)
    worker.setup()
    texts = ["21", "no", "35", "7"]
    response_ids = [tiny_tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    rollout = Rollout([r["prompt_ids"] for r in records for _ in range(2)], response_ids, [False] * 4,
                      torch.zeros(4, max(map(len, response_ids))))
    scores, decoded, by_source = worker.score(sent, rollout, "")
    assert decoded == texts
    exact = [0.21 + 1, 0.21, 0.35 + 1, 0.35]  # answer/100 (+1 when the response is the answer)
    trl = [len(t) % 5 + a / 1000 for t, a in zip(texts, (21, 21, 35, 35))]
    assert by_source["exact_match"].tolist() == pytest.approx(exact)
    assert by_source["trl_style"].tolist() == pytest.approx(trl)
    assert scores.tolist() == pytest.approx([2 * e + t for e, t in zip(exact, trl)])
    assert _calls(reward_file)[0]["answer"] == ["21", "21", "35", "35"]
