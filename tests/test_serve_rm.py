"""`rlhfkit serve-rm`: a reward model over HTTP scores exactly as the local ModelReward does; bad requests and
missing tokens get one-line 4xx answers; a PPO run trains against the served model."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from scoring_texts import ENDED, PROMPTS, RESPONSES
from toy import ServerThread

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.tiny import build_tiny_model
from rlhfkit.rollout.reward_server import (
    RequestError,
    ScoreBatcher,
    create_app,
    load_served_reward,
    parse_score_request,
)
from rlhfkit.rollout.rewards import HTTPReward, ModelReward, ScoringBatch

TOLERANCE = 1e-5  # served vs local score: the same forward, only the batch composition may differ


def request(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny reward model with its own tokenizer (smaller vocabulary than the policy's)."""
    return build_tiny_model(tmp_path_factory.mktemp("served_rm"), reward=True, vocab=700, seed=3)


@pytest.fixture(scope="module")
def served(rm_dir):
    reward = load_served_reward(str(rm_dir), "cpu", batch_size=2)
    server = ServerThread(create_app(reward, batch_size=2, max_items=8))
    yield server
    server.close()


def test_served_scores_equal_local_model_reward(served, rm_dir, tiny_tokenizer, monkeypatch):
    """HTTPReward against the server = a local ModelReward on the same texts, for a policy with another
    tokenizer (re-tokenised, EOS only where the response ended) and for one with the same tokenizer."""
    monkeypatch.delenv("RLHFKIT_REWARD_API_KEY", raising=False)
    client = HTTPReward(served.url + "/score", batch_size=3)
    policy_ids = [tiny_tokenizer(p).input_ids for p in PROMPTS]
    response_ids = [tiny_tokenizer(r, add_special_tokens=False).input_ids for r in RESPONSES]
    batch = ScoringBatch(PROMPTS, RESPONSES, policy_ids, response_ids, ENDED)
    remote = client.score(batch)

    local_other = ModelReward(str(rm_dir), tiny_tokenizer, batch_size=4)
    assert local_other.retokenize
    expected = local_other.score(batch)
    assert remote.shape == (5,) and torch.isfinite(remote).all()
    assert (remote - expected).abs().max().item() < TOLERANCE

    # a policy sharing the RM's tokenizer scores its own ids: the same sequences, so the same scores
    rm_tok = local_other.tokenizer
    same_ids = [rm_tok(p).input_ids for p in PROMPTS]
    same_resp = [rm_tok(r, add_special_tokens=False).input_ids + ([rm_tok.eos_token_id] if e else [])
                 for r, e in zip(RESPONSES, ENDED)]
    local_same = ModelReward(str(rm_dir), rm_tok, batch_size=5)
    assert not local_same.retokenize
    same = local_same.score(ScoringBatch(PROMPTS, RESPONSES, same_ids, same_resp, ENDED))
    assert (remote - same).abs().max().item() < TOLERANCE

    # "ended" matters (EOS appended or not) and defaults to true for clients that do not send it
    status, body = request(served.url + "/score", json.dumps({"prompts": PROMPTS[2:3],
                                                              "responses": RESPONSES[2:3]}).encode())
    assert status == 200
    all_ended = local_other.score(ScoringBatch(PROMPTS, RESPONSES, policy_ids, response_ids, [True] * 5))
    assert abs(body["scores"][0] - all_ended[2].item()) < TOLERANCE
    assert abs(body["scores"][0] - expected[2].item()) > 1e-4

    status, health = request(served.url + "/health")
    assert status == 200 and health["model"] == str(rm_dir) and health["device"] == "cpu"
    assert health["batch_size"] == 2 and health["items"] >= 6 and not health["auth"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not JSON"),
    (json.dumps([1, 2]).encode(), 422, "expected a JSON object"),
    (json.dumps({"prompts": ["a"]}).encode(), 422, "missing key(s): 'responses'"),
    (json.dumps({"prompts": "a", "responses": ["b"]}).encode(), 422, "'prompts' must be a list"),
    (json.dumps({"prompts": ["a", "b"], "responses": ["c"]}).encode(), 422, "2 prompts but 1 responses"),
    (json.dumps({"prompts": ["a", "b"], "responses": ["c", 7]}).encode(), 422, "responses[1] is a int"),
    (json.dumps({"prompts": ["a"], "responses": ["b"], "ended": ["yes"]}).encode(), 422, "ended[0] is a str"),
    (json.dumps({"prompts": ["a"] * 9, "responses": ["b"] * 9}).encode(), 413, "at most 8"),
    (json.dumps({"prompts": ["a"], "responses": ["b"], "ended": True}).encode(), 422, "'ended' must be a list"),
])
def test_bad_requests_get_one_line_4xx(served, body, status, words):
    got, reply = request(served.url + "/score", body)
    assert got == status
    assert words in reply["detail"] and "\n" not in reply["detail"] and "Traceback" not in reply["detail"]


def test_bad_request_reaches_the_http_client_as_a_one_line_error(served):
    client = HTTPReward(served.url + "/score", max_retries=0)
    batch = ScoringBatch(PROMPTS[:1] * 9, RESPONSES[:1] * 9, [[1]] * 9, [[2]] * 9, [True] * 9)
    client.batch_size = 9
    with pytest.raises(RlhfkitError, match=r"HTTP 413 .*at most 8.*not retried"):
        client.score(batch)


def test_bearer_token_required_when_the_key_is_set(rm_dir, monkeypatch):
    reward = load_served_reward(str(rm_dir), "cpu", batch_size=4)
    server = ServerThread(create_app(reward, batch_size=4, api_key="s3cret"))
    try:
        body = json.dumps({"prompts": PROMPTS[:2], "responses": RESPONSES[:2]}).encode()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, reply = request(server.url + "/score", body, headers)
            assert status == 401 and "bearer token" in reply["detail"]
        assert request(server.url + "/health")[0] == 401
        status, reply = request(server.url + "/score", body, {"Authorization": "Bearer s3cret"})
        assert status == 200 and len(reply["scores"]) == 2
        # HTTPReward sends $RLHFKIT_REWARD_API_KEY as the bearer token
        monkeypatch.setenv("RLHFKIT_REWARD_API_KEY", "s3cret")
        scores = HTTPReward(server.url + "/score").score(
            ScoringBatch(PROMPTS[:2], RESPONSES[:2], [[1]] * 2, [[2]] * 2, [True] * 2))
        assert scores.tolist() == pytest.approx(reply["scores"], abs=TOLERANCE)
        monkeypatch.setenv("RLHFKIT_REWARD_API_KEY", "other")
        with pytest.raises(RlhfkitError, match="HTTP 401"):
            HTTPReward(server.url + "/score", max_retries=0).score(
                ScoringBatch(PROMPTS[:1], RESPONSES[:1], [[1]], [[2]], [True]))
    finally:
        server.close()


def test_a_failing_model_is_a_one_line_500():
    class Broken:
        name, tokenizer, device, num_truncated = "broken", None, torch.device("cpu"), 0

        def score(self, batch):
            raise ValueError("weights are\nall wrong")

    server = ServerThread(create_app(Broken(), batch_size=4))
    try:
        status, reply = request(server.url + "/score", json.dumps({"prompts": ["p"], "responses": ["r"]}).encode())
        assert status == 500 and reply["detail"] == "scoring failed: ValueError: weights are all wrong"
    finally:
        server.close()


def test_parse_score_request_defaults_ended_to_true():
    assert parse_score_request({"prompts": ["p"], "responses": ["r"]}) == (["p"], ["r"], [True])
    assert parse_score_request({"prompts": [], "responses": [], "ended": []}) == ([], [], [])
    with pytest.raises(RequestError, match="'ended' has 2 entries for 1 responses"):
        parse_score_request({"prompts": ["p"], "responses": ["r"], "ended": [True, False]})


def test_batcher_coalesces_concurrent_requests_and_isolates_a_failing_one():
    calls = []
    gate = threading.Event()

    def score(batch: ScoringBatch) -> torch.Tensor:
        gate.wait(5)  # hold the first batch so that the others queue up behind it
        calls.append(len(batch))
        if "bad" in batch.responses:
            raise RlhfkitError("bad response")
        return torch.tensor([float(len(r)) for r in batch.responses])

    batcher = ScoreBatcher(score, batch_size=4, max_wait_s=0.05)
    try:
        first = batcher.submit(["p"], ["a"], [True])
        time.sleep(0.1)  # the worker holds `first` (and waits max_wait_s for company)
        later = [batcher.submit(["p"] * 2, ["bb", "ccc"], [True] * 2), batcher.submit(["p"], ["dddd"], [True]),
                 batcher.submit(["p"] * 3, ["e", "ff", "ggg"], [True] * 3)]
        gate.set()
        assert first.result(5) == [1.0]
        assert [f.result(5) for f in later] == [[2.0, 3.0], [4.0], [1.0, 2.0, 3.0]]
        assert sum(calls) == 7 and max(calls) <= 4 and len(calls) < 4  # some requests shared a forward
        bad = [batcher.submit(["p"], ["bad"], [True]), batcher.submit(["p"], ["ok"], [True])]
        with pytest.raises(RlhfkitError, match="bad response"):
            bad[0].result(5)
        assert bad[1].result(5) == [2.0]
    finally:
        gate.set()
        batcher.close()


def test_concurrent_clients_get_their_own_scores(served, rm_dir, tiny_tokenizer):
    local = ModelReward(str(rm_dir), tiny_tokenizer, batch_size=8)
    expected = local.score(ScoringBatch(PROMPTS, RESPONSES, [[1]] * 5, [[2]] * 5, ENDED))

    def one(i: int) -> float:
        status, reply = request(served.url + "/score", json.dumps(
            {"prompts": [PROMPTS[i]], "responses": [RESPONSES[i]], "ended": [ENDED[i]]}).encode())
        assert status == 200
        return reply["scores"][0]

    with ThreadPoolExecutor(5) as pool:
        got = list(pool.map(one, [0, 1, 2, 3, 4] * 3))
    assert max(abs(g - expected[i % 5].item()) for i, g in enumerate(got)) < TOLERANCE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ppo_trains_against_the_served_cli_reward_model(rm_dir, tiny_model_dir, tmp_path):
    """`rlhfkit serve-rm` in a subprocess; `run_rl` with reward_url finishes with finite reward metrics."""
    from rlhfkit.trainers.rl import PPOConfig, run_rl

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "RLHFKIT_REWARD_API_KEY": "k3y"}
    # --model, as the trainers take it (the positional MODEL works the same)
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve-rm", "--model", str(rm_dir), "--port", str(port),
                             "--device", "cpu", "--batch-size", "4"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if request(url + "/health", headers={"Authorization": "Bearer k3y"})[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve-rm did not come up"
            time.sleep(0.2)
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n" for i in range(8)))
        out = tmp_path / "ppo"
        os.environ["RLHFKIT_REWARD_API_KEY"] = "k3y"
        try:
            summary = run_rl(PPOConfig(model=str(tiny_model_dir), dataset=str(prompts), output_dir=str(out),
                                       reward_url=url + "/score", max_steps=2, prompts_per_step=2,
                                       num_generations=2, max_new_tokens=8, progress_bar=False,
                                       learning_rate=1e-3))
        finally:
            del os.environ["RLHFKIT_REWARD_API_KEY"]
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]
        assert [r["step"] for r in rows] == [1, 2] and summary["algorithm"] == "ppo"
        assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["reward_std"]) and math.isfinite(r["kl"])
                   for r in rows)
        assert rows[0]["reward_std"] > 0  # four different responses got four different scores
        health = request(url + "/health", headers={"Authorization": "Bearer k3y"})[1]
        assert health["items"] == 8  # 2 steps x 2 prompts x 2 samples, no eval set
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_rm_takes_its_model_once_either_way(rm_dir, capsys):
    from rlhfkit.cli import main

    for argv, words in (([], "the reward model is required"),
                        ([str(rm_dir), "--model", str(rm_dir) + "-other"], "two models"),
                        (["--model", str(rm_dir), "--port", "70000"], "--port 70000 is not a TCP port"),
                        (["--model", str(rm_dir), "--batch-szie", "4"], "unrecognized arguments: --batch-szie")):
        assert main(["serve-rm", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rlhfkit serve-rm: error: ") and words in err and "\n" not in err
