"""Reward sources: a local reward model (same or different tokenizer), a Python file, an HTTP server, ensembles."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from scoring_texts import ENDED, PROMPTS, RESPONSES

from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.models.tiny import build_tiny_model
from rlhfkit.rollout.rewards import (
    REWARD_ENSEMBLES,
    EnsembleReward,
    FunctionReward,
    HTTPReward,
    ModelReward,
    RewardSource,
    ScoringBatch,
    build_reward_source,
    load_reward_function,
)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def rlhfkit_logs():
    """Records of the 'rlhfkit' logger, whatever its propagate setting (the CLI turns propagation off)."""
    log = logging.getLogger("rlhfkit")
    handler, level = _Capture(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler.records
    log.removeHandler(handler)
    log.setLevel(level)


def text_batch(prompts=PROMPTS, responses=RESPONSES, ended=None) -> ScoringBatch:
    n = len(responses)
    return ScoringBatch(list(prompts), list(responses), [[1]] * n, [[2]] * n,
                        list(ended) if ended is not None else [True] * n)


def policy_batch(tok, prompts=PROMPTS, responses=RESPONSES, ended=ENDED) -> ScoringBatch:
    """What the trainer builds: policy ids (prompt with BOS; response + EOS when it ended)."""
    prompt_ids = [tok(p).input_ids for p in prompts]
    response_ids = [tok(r, add_special_tokens=False).input_ids + ([tok.eos_token_id] if e else [])
                    for r, e in zip(responses, ended)]
    return ScoringBatch(list(prompts), list(responses), prompt_ids, response_ids, list(ended))


def alone(model, ids: list[int]) -> float:
    """The reward model's own forward on one unpadded sequence (it pools at the last token)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


# ---------------------------------------------------------------- ModelReward


@pytest.fixture(scope="module")
def rm_same(tmp_path_factory, tiny_tokenizer):
    """A tiny reward model that shares the policy's tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("rm_same"), reward=True, tokenizer=tiny_tokenizer, seed=1)


@pytest.fixture(scope="module")
def rm_other(tmp_path_factory):
    """A tiny reward model with its own, smaller vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("rm_other"), reward=True, vocab=700, seed=2)


def test_model_reward_matches_unpadded_forward(rm_same, tiny_tokenizer, rlhfkit_logs):
    reward = ModelReward(str(rm_same), tiny_tokenizer, batch_size=2)
    assert isinstance(reward, RewardSource) and reward.name == str(rm_same)
    assert not reward.retokenize and not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    batch = policy_batch(tiny_tokenizer)
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    assert len(set(lengths)) == len(lengths)  # varied lengths, so the batches are padded
    scores = reward.score(batch)
    assert scores.dtype == torch.float32 and scores.shape == (5,) and scores.device.type == "cpu"
    expected = [alone(reward.model, p + r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5, rtol=0), (scores, expected)
    assert len(set(np.round(expected, 4))) == 5  # a random RM still tells the sequences apart
    # a single batch holding everything gives the same scores
    assert torch.allclose(ModelReward(reward.model, tiny_tokenizer, batch_size=16).score(batch), scores, atol=1e-5)
    assert not [r for r in rlhfkit_logs if "re-tokenis" in r.getMessage()]
    assert reward.score(ScoringBatch([], [], [], [], [])).shape == (0,)


def test_model_reward_retokenises_for_a_different_tokenizer(rm_other, tiny_tokenizer, rlhfkit_logs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_tok = AutoTokenizer.from_pretrained(rm_other)
    assert len(rm_tok) != len(tiny_tokenizer)
    reward = ModelReward(str(rm_other), tiny_tokenizer, batch_size=3)
    assert reward.retokenize
    notes = [r for r in rlhfkit_logs if "re-tokenis" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    batch = policy_batch(tiny_tokenizer)
    # policy ids beyond the RM's vocabulary would crash its embedding if they were used
    assert max(max(ids) for ids in batch.prompt_ids + batch.response_ids) >= len(rm_tok)
    scores = reward.score(batch)
    reward.score(batch)
    assert len([r for r in rlhfkit_logs if "re-tokenis" in r.getMessage()]) == 1  # logged once
    model = AutoModelForSequenceClassification.from_pretrained(rm_other).eval()
    expected = [alone(model, rm_tok(p).input_ids + rm_tok(r, add_special_tokens=False).input_ids
                      + ([rm_tok.eos_token_id] if e else []))
                for p, r, e in zip(PROMPTS, RESPONSES, ENDED)]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5, rtol=0), (scores, expected)


def test_model_reward_drops_a_doubled_bos_when_retokenising(rm_other, tiny_tokenizer):
    reward = ModelReward(str(rm_other), tiny_tokenizer)
    bos = reward.tokenizer.bos_token
    plain = reward.score(text_batch(PROMPTS[:2], RESPONSES[:2]))
    with_bos_text = reward.score(text_batch([bos + p for p in PROMPTS[:2]], RESPONSES[:2]))
    assert torch.allclose(plain, with_bos_text, atol=1e-6)


def test_model_reward_truncates_keeping_the_end(tmp_path, tiny_tokenizer, rlhfkit_logs):
    short = build_tiny_model(tmp_path / "short_rm", reward=True, tokenizer=tiny_tokenizer, max_positions=12)
    reward = ModelReward(str(short), tiny_tokenizer)
    batch = policy_batch(tiny_tokenizer)
    sequences = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    too_long = sum(len(s) > 12 for s in sequences)
    assert too_long >= 2
    scores = reward.score(batch)
    assert reward.num_truncated == too_long
    expected = [alone(reward.model, s[-12:]) for s in sequences]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5, rtol=0)
    warnings = [r for r in rlhfkit_logs if r.levelno == logging.WARNING and "exceeds" in r.getMessage()]
    assert len(warnings) == 1


# ---------------------------------------------------------------- functions

REWARD_FILE = '''
import numpy as np
import torch

NOT_CALLABLE = 3

def count_yes(prompts, responses):
    return [r.lower().count("yes") for r in responses]

def prompt_len(prompts, responses):
    return np.array([len(p) for p in prompts])

def as_tensor(prompts, responses):
    return torch.arange(len(responses), dtype=torch.float64) * 0.5

def as_tuple(prompts, responses):
    return tuple(float(i) for i in range(len(responses)))

def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)

def words(prompts, responses):
    return ["high"] * len(responses)

def nan_inf(prompts, responses):
    return [float("nan"), float("inf")] + [0.0] * (len(responses) - 2)

def scalar(prompts, responses):
    return 1.0

def matrix(prompts, responses):
    return torch.zeros(len(responses), 2)
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def test_load_reward_function_scores(reward_file):
    batch = text_batch(responses=["yes", "no", "Yes, yes and yes", "", "maybe"])
    reward = load_reward_function(f"{reward_file}:count_yes")
    assert isinstance(reward, FunctionReward) and reward.name == f"{reward_file}:count_yes"
    assert reward.score(batch).tolist() == [1.0, 0.0, 3.0, 0.0, 0.0]
    assert load_reward_function(f"{reward_file}:prompt_len").score(batch).tolist() == [len(p) for p in PROMPTS]
    scores = load_reward_function(f"{reward_file}:as_tensor").score(batch)
    assert scores.dtype == torch.float32 and scores.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert load_reward_function(f"{reward_file}:as_tuple").score(batch).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    odd = load_reward_function(f"{reward_file}:nan_inf").score(batch)  # returned as-is; the trainer checks
    assert math.isnan(odd[0]) and math.isinf(odd[1]) and odd[2:].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("spec, words", [
    ("{file}:missing_fn", ["my_rewards.py", "missing_fn"]),
    ("{file}:NOT_CALLABLE", ["my_rewards.py", "NOT_CALLABLE", "not a function"]),
    ("{dir}/nope.py:count_yes", ["nope.py", "does not exist"]),
    ("{file}", ["my_rewards.py", "file.py:function"]),
    ("{file}:", ["my_rewards.py", "file.py:function"]),
])
def test_load_reward_function_config_errors(reward_file, spec, words):
    spec = spec.format(file=reward_file, dir=reward_file.parent)
    with pytest.raises(ConfigError) as info:
        load_reward_function(spec)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_load_reward_function_import_error_is_one_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def f(prompts, responses)\n    return []\n")
    with pytest.raises(ConfigError, match="broken.py.*SyntaxError") as info:
        load_reward_function(f"{path}:f")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("func, words", [
    ("too_few", ["too_few", "4 scores for 5 responses"]),
    ("words", ["words", "non-number at index 0", "'high'"]),
    ("scalar", ["scalar", "returned float"]),
    ("matrix", ["matrix", "shape (5, 2)"]),
])
def test_function_reward_bad_results(reward_file, func, words):
    reward = load_reward_function(f"{reward_file}:{func}")
    with pytest.raises(RlhfkitError) as info:
        reward.score(text_batch())
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


# ---------------------------------------------------------------- HTTP


class ScriptedServer:
    """A local JSON server. Each POST takes the next scripted reply; with none left it returns
    ``{"scores": [len(response) for each response]}``.

    A reply is (status, headers, body) where body is bytes or a JSON-able object, or "stall" (hold the
    request until the test ends).
    """

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"body": body, "headers": dict(self.headers)})
                reply = owner.script.pop(0) if owner.script else (200, {}, {"scores": [len(r) for r in
                                                                                     body["responses"]]})
                if reply == "stall":
                    owner.release.wait(10)
                    return
                status, headers, payload = reply
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def sleeps():
    return []


def http(url, sleeps, **kwargs) -> HTTPReward:
    return HTTPReward(url, sleep=sleeps.append, **kwargs)


LENGTHS = [float(len(r)) for r in RESPONSES]


def test_http_success_in_chunks_and_reply_shapes(server, sleeps, monkeypatch):
    monkeypatch.delenv("RLHFKIT_REWARD_API_KEY", raising=False)
    reward = http(server.url, sleeps, batch_size=2)
    assert reward.name == server.url
    scores = reward.score(text_batch())
    assert scores.dtype == torch.float32 and scores.tolist() == LENGTHS
    assert [r["body"]["responses"] for r in server.requests] == [RESPONSES[0:2], RESPONSES[2:4], RESPONSES[4:]]
    assert [r["body"]["prompts"] for r in server.requests] == [PROMPTS[0:2], PROMPTS[2:4], PROMPTS[4:]]
    assert all("Authorization" not in r["headers"] for r in server.requests)
    # the row goes along, chunked like the rest: the prompt as written and the other columns
    server.requests.clear()
    answers = [str(i) for i in range(len(RESPONSES))]
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    batch = ScoringBatch(list(PROMPTS), list(RESPONSES), [[] for _ in RESPONSES], [[] for _ in RESPONSES],
                         [True] * len(RESPONSES), raw_prompts=messages, columns={"answer": answers})
    assert reward.score(batch).tolist() == LENGTHS
    assert [r["body"]["columns"] for r in server.requests] == [
        {"prompt": messages[s:s + 2], "answer": answers[s:s + 2]} for s in (0, 2, 4)]
    server.script = [(200, {}, {"rewards": [1, 2.5]}), (200, {}, [3, -4])]
    assert http(server.url, sleeps).score(text_batch(PROMPTS[:2], RESPONSES[:2])).tolist() == [1.0, 2.5]
    assert http(server.url, sleeps).score(text_batch(PROMPTS[:2], RESPONSES[:2])).tolist() == [3.0, -4.0]
    assert sleeps == []


def test_http_429_honours_retry_after_capped(server, sleeps):
    server.script = [(429, {"Retry-After": "7"}, {"error": "slow down"}),
                     (429, {"Retry-After": "600"}, {}),
                     (429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, {})]
    scores = http(server.url, sleeps, max_retries=3).score(text_batch())
    assert scores.tolist() == LENGTHS
    assert sleeps == [7.0, 60.0, 2.0]  # the date form falls back to back-off (third wait: 0.5 * 2**2)
    assert len(server.requests) == 4


def test_http_5xx_retried_with_backoff(server, sleeps):
    server.script = [(500, {}, {"error": "boom"}), (503, {}, b"busy")]
    assert http(server.url, sleeps).score(text_batch()).tolist() == LENGTHS
    assert sleeps == [0.5, 1.0] and len(server.requests) == 3


def test_http_5xx_gives_up_after_retries(server, sleeps):
    server.script = [(502, {}, b"bad gateway")] * 5
    with pytest.raises(RlhfkitError) as info:
        http(server.url, sleeps, max_retries=2).score(text_batch())
    message = str(info.value)
    assert "\n" not in message and server.url in message and "502" in message and "3 attempts" in message
    assert sleeps == [0.5, 1.0] and len(server.requests) == 3


def test_http_400_fails_at_once(server, sleeps):
    server.script = [(400, {}, {"error": "responses must be a list"})]
    with pytest.raises(RlhfkitError) as info:
        http(server.url, sleeps).score(text_batch())
    message = str(info.value)
    assert "\n" not in message and server.url in message and "400" in message and "attempt 1" in message
    assert "must be a list" in message
    assert sleeps == [] and len(server.requests) == 1


@pytest.mark.parametrize("reply, words", [
    (b"<html>oops</html>", ["not JSON", "oops"]),
    ({"scores": [1.0, 2.0]}, ["2 scores for 5 responses"]),
    ({"score": [1.0] * 5}, ["no 'scores' or 'rewards'"]),
    ({"scores": [1.0, "x", 2, 3, 4]}, ["non-number at index 1"]),
    ("just text", ["expected a JSON list", "str"]),
])
def test_http_bad_replies(server, sleeps, reply, words):
    server.script = [(200, {}, reply)]
    with pytest.raises(RlhfkitError) as info:
        http(server.url, sleeps).score(text_batch())
    message = str(info.value)
    assert "\n" not in message and server.url in message and all(w in message for w in words), message
    assert len(server.requests) == 1  # a bad reply is not retried


def test_http_timeout_retried_then_fails(server, sleeps):
    server.script = ["stall"] * 3
    with pytest.raises(RlhfkitError) as info:
        http(server.url, sleeps, timeout=0.2, max_retries=2).score(text_batch())
    message = str(info.value)
    assert "\n" not in message and server.url in message and "timed out" in message and "3 attempts" in message
    assert sleeps == [0.5, 1.0]


def test_http_timeout_then_success(server, sleeps):
    server.script = ["stall"]
    assert http(server.url, sleeps, timeout=0.2).score(text_batch()).tolist() == LENGTHS
    assert sleeps == [0.5]


def test_http_connection_refused_is_retried(sleeps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RlhfkitError) as info:
        http(url, sleeps, max_retries=1).score(text_batch())
    assert url in str(info.value) and "2 attempts" in str(info.value) and sleeps == [0.5]


def test_http_sends_bearer_key_from_env(server, sleeps, monkeypatch):
    monkeypatch.setenv("RLHFKIT_REWARD_API_KEY", "s3cret")
    http(server.url, sleeps).score(text_batch())
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer s3cret"
    http(server.url, sleeps, headers={"Authorization": "Token mine", "X-Team": "a"}).score(text_batch())
    assert server.requests[-1]["headers"]["Authorization"] == "Token mine"
    assert server.requests[-1]["headers"]["X-Team"] == "a"


def test_http_bad_url_is_config_error():
    with pytest.raises(ConfigError, match="ftp://x"):
        HTTPReward("ftp://x/score")


# ---------------------------------------------------------------- ensembles and building


def constant(values, name):
    return FunctionReward(lambda prompts, responses: list(values), name)


def test_ensemble_reductions():
    a, b = constant([1.0, 2.0, 3.0], "a"), constant([3.0, 2.0, 7.0], "b")
    batch = text_batch(PROMPTS[:3], RESPONSES[:3])
    assert EnsembleReward([a, b]).score(batch).tolist() == [2.0, 2.0, 5.0]
    assert EnsembleReward([a, b], reduce="min").score(batch).tolist() == [1.0, 2.0, 3.0]
    # std over two sources with unbiased=False is half their distance: 1, 0, 2
    assert EnsembleReward([a, b], reduce="mean_minus_std").score(batch).tolist() == [1.0, 2.0, 3.0]
    ensemble = EnsembleReward([a, b], reduce="mean_minus_std", std_coef=0.5)
    assert ensemble.score(batch).tolist() == [1.5, 2.0, 4.0]
    assert ensemble.name == "mean_minus_std(a, b)"
    assert [s.tolist() for s in ensemble.last_scores] == [[1.0, 2.0, 3.0], [3.0, 2.0, 7.0]]
    c = constant([0.0, 5.0, float("nan")], "c")
    mixed = EnsembleReward([a, b, c], reduce="min").score(batch)
    assert mixed[:2].tolist() == [0.0, 2.0] and math.isnan(mixed[2])
    assert REWARD_ENSEMBLES == ("mean", "min", "mean_minus_std")


def test_ensemble_errors():
    with pytest.raises(ConfigError, match="median"):
        EnsembleReward([constant([1.0], "a")], reduce="median")
    with pytest.raises(ConfigError):
        EnsembleReward([])

    class Bad:
        name = "bad"

        def score(self, batch):
            return torch.zeros(2, 1)

    with pytest.raises(RlhfkitError, match="'bad'"):
        EnsembleReward([constant([1.0, 2.0], "a"), Bad()]).score(text_batch(PROMPTS[:2], RESPONSES[:2]))


def test_build_reward_source(reward_file, rm_same, tiny_tokenizer, server):
    fn = f"{reward_file}:count_yes"
    single = build_reward_source([], [fn], [], tiny_tokenizer)
    assert isinstance(single, FunctionReward)
    assert isinstance(build_reward_source(None, None, [server.url], tiny_tokenizer), HTTPReward)
    both = build_reward_source([], [fn], [server.url], tiny_tokenizer, ensemble="min")
    assert isinstance(both, EnsembleReward) and both.reduce == "min"
    assert [type(s) for s in both.sources] == [FunctionReward, HTTPReward]
    batch = text_batch(responses=["yes"] * 5)
    assert both.score(batch).tolist() == [1.0] * 5  # min(count of 'yes' = 1, length = 3)
    three = build_reward_source([str(rm_same)], [fn], [server.url], tiny_tokenizer, ensemble="mean_minus_std",
                                std_coef=2.0, batch_size=4)
    assert [type(s) for s in three.sources] == [ModelReward, FunctionReward, HTTPReward]
    assert three.std_coef == 2.0 and three.sources[0].batch_size == 4
    with pytest.raises(ConfigError, match=r"^give a reward source: --reward-model, --reward-fn, --reward-url or "
                                          r"--reward-judge$"):
        build_reward_source([], [], [], tiny_tokenizer)
    with pytest.raises(ConfigError, match="average"):
        build_reward_source([], [fn, fn], [], tiny_tokenizer, ensemble="average")


def test_scoring_batch_checks_lengths():
    with pytest.raises(ValueError, match="2 responses but 1 ended"):
        ScoringBatch(["a", "b"], ["x", "y"], [[1], [1]], [[2], [2]], [True])
