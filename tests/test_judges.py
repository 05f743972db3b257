"""AI judges and `rlhfkit judge`: a scripted OpenAI-compatible server on loopback, position swaps, resuming."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.judges import (
    FunctionJudge,
    JudgeReplyError,
    OpenAIJudge,
    PositionStats,
    build_judge,
    label_file,
    load_template,
    parse_score,
    parse_verdict,
)
from rlhfkit.judges.judge_pairs import sidecar_paths

_PAIR = re.compile(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\n", re.S)


class ScriptedServer:
    """An OpenAI-compatible /v1/chat/completions endpoint. ``script`` is consumed one action per request;
    when it is empty the server answers like a consistent judge: the response containing GOOD wins."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.down = False  # answer every request with 503 (a dead backend)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    action = server.script.pop(0) if server.script else ("judge",)
                    if server.down:
                        action = ("status", 503, {})
                kind = action[0]
                if kind == "sleep":
                    time.sleep(action[1])
                    action = ("judge",)
                    kind = "judge"
                if kind == "status":
                    self.send_response(action[1])
                    for k, v in action[2].items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                if kind == "raw":
                    payload = action[1]
                else:
                    text = action[1] if kind == "reply" else server.verdict(body)
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def verdict(body: dict) -> str:
        question = body["messages"][-1]["content"] + "\n\n"
        first, _second = _PAIR.search(question).groups()
        return "The responses differ in quality.\nVerdict: " + ("A" if "GOOD" in first else "B")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = ScriptedServer()
    yield s
    s.close()


def _judge(server, sleeps=None, **kw):
    kw.setdefault("timeout", 5.0)
    return OpenAIJudge("tiny", server.base_url, api_key="sk-test", sleep=(sleeps.append if sleeps is not None
                                                                          else lambda s: None), **kw)


def _pairs_file(tmp_path, n=6, name="pairs.jsonl"):
    rows = []
    for i in range(n):
        good, bad = f"GOOD answer {i}", f"weak answer {i}"
        a, b, label = (good, bad, "a") if i % 3 else (bad, good, "b")
        rows.append({"prompt": f"question {i}?", "response_a": a, "response_b": b, "label": label})
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_parse_verdict_and_score():
    assert parse_verdict("Response B mentions the date.\nResponse A is vague.\nVerdict: B") == 0.0
    assert parse_verdict("**Final answer:** (A)") == 1.0
    assert parse_verdict("A") == 1.0
    assert parse_verdict("Verdict: tie") == 0.5
    with pytest.raises(JudgeReplyError, match="names neither option"):
        parse_verdict("Both responses are fine, really.")
    assert parse_score("reasoning...\nScore: 7.5") == 7.5
    with pytest.raises(JudgeReplyError):
        parse_score("no score here")


def test_templates_are_editable_files(tmp_path):
    shipped = load_template("pairwise")
    messages = shipped.messages(prompt="P?", response_a="one", response_b="two", principles="Be kind.")
    assert messages[0]["role"] == "system" and "Be kind." in messages[0]["content"]
    assert messages[-1]["role"] == "user" and "one" in messages[-1]["content"] and "two" in messages[-1]["content"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # one few-shot example
    custom = tmp_path / "mine.txt"
    custom.write_text("### system\nJudge {x} literally.\n### user\n{prompt} | {response_a} | {response_b}\n")
    m = load_template(str(custom)).messages(prompt="p", response_a="a", response_b="b", principles="")
    assert m == [{"role": "system", "content": "Judge {x} literally."}, {"role": "user", "content": "p | a | b"}]
    bad = tmp_path / "bad.txt"
    bad.write_text("### sytem\nx\n")
    with pytest.raises(RlhfkitError, match="unknown section"):
        load_template(str(bad))


def test_http_judge_success_and_agreement(server, tmp_path):
    judge = _judge(server)
    verdict = judge.compare("q?", "GOOD one", "bad one")
    assert verdict.p_a == 1.0 and verdict.consistent and len(verdict.rationales) == 2
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert server.requests[0]["model"] == "tiny"
    out = tmp_path / "out.jsonl"
    summary = label_file(str(_pairs_file(tmp_path)), judge, out, soft=True, workers=3)
    rows = _lines(out)
    assert len(rows) == 6 and all("GOOD" in r["chosen"] and "GOOD" not in r["rejected"] for r in rows)
    assert [r["source_row"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["margin"] > 0 and 0.5 < r["label"] < 1 for r in rows)
    assert summary["agreement"]["accuracy"] == 1.0 and summary["agreement"]["cohen_kappa"] == 1.0
    assert summary["position_biased"] is False and summary["inconsistent"] == 0


def test_http_timeout_then_success(server):
    sleeps = []
    server.script = [("sleep", 1.5)]
    judge = _judge(server, sleeps, timeout=0.3)
    assert judge.compare_once("q", "GOOD", "bad")[0] == 1.0
    assert sleeps == [0.5]  # one back-off after the timeout


def test_http_429_honours_retry_after(server):
    sleeps = []
    server.script = [("status", 429, {"Retry-After": "2"}), ("status", 429, {})]
    assert _judge(server, sleeps).compare_once("q", "bad", "GOOD")[0] == 0.0
    assert sleeps == [2.0, 1.0]  # Retry-After, then exponential back-off (0.5 * 2)


def test_http_5xx_then_success_and_give_up(server):
    sleeps = []
    server.script = [("status", 500, {}), ("status", 502, {})]
    assert _judge(server, sleeps).compare_once("q", "GOOD", "bad")[0] == 1.0
    assert sleeps == [0.5, 1.0]
    server.script = [("status", 503, {})] * 3
    with pytest.raises(RlhfkitError, match=r"HTTP 503.*gave up after 3 attempts"):
        _judge(server, max_retries=2).compare_once("q", "GOOD", "bad")
    server.script = [("status", 401, {})]
    with pytest.raises(RlhfkitError, match="HTTP 401.*not retried"):
        _judge(server).compare_once("q", "GOOD", "bad")


def test_malformed_json_is_asked_again(server):
    server.script = [("raw", b"<html>oops"), ("raw", b'{"choices": []}')]
    judge = _judge(server)
    assert judge.compare_once("q", "GOOD", "bad")[0] == 1.0
    assert judge.malformed_replies == 2
    server.script = [("raw", b"not json")] * 3
    with pytest.raises(JudgeReplyError, match="not JSON.*asked 3 times"):
        judge.compare_once("q", "GOOD", "bad")


def test_reply_naming_neither_option_is_recorded_unlabelled(server, tmp_path):
    # row 1 is judged first (one worker): both of its first 3 asks name neither option -> unlabelled
    server.script = [("reply", "They are both lovely.")] * 3
    judge = _judge(server, reply_retries=2)
    out = tmp_path / "out.jsonl"
    summary = label_file(str(_pairs_file(tmp_path)), judge, out)
    assert summary["unlabelled"] == 1 and summary["labelled"] == 5
    assert [r["source_row"] for r in _lines(out)] == [2, 3, 4, 5, 6]
    skipped = _lines(sidecar_paths(out)["unlabelled"])
    assert len(skipped) == 1 and skipped[0]["source_row"] == 1 and "names neither option" in skipped[0]["reason"]
    assert summary["agreement"]["not_labelled_by_judge"] == 1 and summary["agreement"]["compared"] == 5


@pytest.mark.parametrize("workers", [1, 3])
def test_interrupted_run_resumes_to_identical_output(server, tmp_path, workers):
    src = _pairs_file(tmp_path, n=10)
    reference = tmp_path / "reference.jsonl"
    label_file(str(src), _judge(server), reference, soft=True)
    out = tmp_path / "out.jsonl"

    def interrupt_after_4(index):
        if index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_file(str(src), _judge(server), out, soft=True, workers=workers, on_row=interrupt_after_4)
    assert len(_lines(out)) == 4
    # a crash between writing a row and journalling it: a stray output line and a torn journal line
    with out.open("a") as fh:
        fh.write('{"prompt": "stray", "chosen": "x", "rejected": "y"}\n')
    with sidecar_paths(out)["progress"].open("a") as fh:
        fh.write('{"row": 4, "out_by')
    # the server dies midway through the rest: the run stops with an error, losing nothing
    calls = len(server.requests)
    server.script = [("judge",)] * 4

    def die_later(index):
        if index == 5:
            server.down = True

    with pytest.raises(RlhfkitError, match="gave up"):
        label_file(str(src), _judge(server, max_retries=1), out, soft=True, workers=workers, on_row=die_later)
    assert len(server.requests) > calls
    server.down = False
    summary = label_file(str(src), _judge(server), out, soft=True, workers=workers)
    assert out.read_bytes() == reference.read_bytes()
    assert summary["rows"] == 10 and summary["labelled"] == 10 and summary["resumed_from_row"] >= 6
    # finished: rerunning does no work and changes nothing
    before = len(server.requests)
    label_file(str(src), _judge(server), out, soft=True)
    assert len(server.requests) == before and out.read_bytes() == reference.read_bytes()


def test_changed_options_refuse_to_resume(tmp_path):
    src = _pairs_file(tmp_path)
    out = tmp_path / "out.jsonl"
    judge = FunctionJudge(lambda p, a, b: 1.0 if "GOOD" in a else 0.0, "good")
    label_file(str(src), judge, out)
    with pytest.raises(RlhfkitError, match="different run"):
        label_file(str(src), judge, out, soft=True)
    assert label_file(str(src), judge, out, soft=True, restart=True)["labelled"] == 6


def test_first_slot_judge_gives_ties_and_is_position_biased(tmp_path):
    always_first = FunctionJudge(lambda prompt, first, second: "Verdict: A", "first-slot")
    verdict = always_first.compare("q", "x", "y")
    assert verdict.p_a == 0.5 and not verdict.consistent and verdict.winner is None
    out = tmp_path / "out.jsonl"
    summary = label_file(str(_pairs_file(tmp_path, n=8)), always_first, out)
    assert summary["ties"] == 8 and summary["labelled"] == 0 and summary["inconsistent"] == 8
    assert summary["position_biased"] is True and summary["biased_towards"] == "first"
    assert out.read_text() == "" and len(_lines(sidecar_paths(out)["unlabelled"])) == 8  # none lost

    consistent = FunctionJudge(lambda prompt, first, second: 0.9 if "GOOD" in first else 0.1, "consistent")
    summary = label_file(str(_pairs_file(tmp_path, n=8)), consistent, tmp_path / "c.jsonl")
    assert summary["position_biased"] is False and summary["inconsistent"] == 0 and summary["labelled"] == 8
    assert summary["first_slot_win_rate"] == 0.5


def test_position_stats_mild_noise_not_flagged():
    from rlhfkit.judges import Verdict

    stats = PositionStats()
    for i in range(40):
        stats.add(Verdict(0.9, 0.9, 0.9) if i % 10 else Verdict(0.5, 1.0, 0.0))  # 1 in 10 inconsistent
    assert not stats.biased and stats.inconsistent == 4


def test_responses_lists_scoring_function_and_cli(tmp_path, capsys):
    from rlhfkit.cli import main

    fn_file = tmp_path / "judge_fn.py"
    fn_file.write_text("def score(prompts, responses):\n    return [len(r) for r in responses]\n\n"
                       "def prefer(prompt, first, second):\n    return 'A' if len(first) > len(second) else 'B'\n")
    src = tmp_path / "cands.jsonl"
    src.write_text(json.dumps({"prompt": "p", "responses": ["a", "bbb", "cc"], "gold": [1, 3, 2]}) + "\n"
                   + json.dumps({"prompt": "q", "responses": ["x", "yyyy"], "gold": [0, 5]}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["judge", str(src), "--judge", f"fn:{fn_file}:score", "--out", str(out), "--soft"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 4 and summary["labelled"] == 4 and summary["agreement"]["accuracy"] == 1.0
    rows = _lines(out)
    assert rows[0] == {"prompt": "p", "chosen": "bbb", "rejected": "a", "margin": pytest.approx(2.0),
                       "label": pytest.approx(0.8808, abs=1e-4), "source_row": 1}
    out2 = tmp_path / "o2.jsonl"
    assert main(["judge", str(src), "--judge", f"pairfn:{fn_file}:prefer", "--out", str(out2)]) == 0
    assert [(r["chosen"], r["rejected"]) for r in _lines(out2)] == [(r["chosen"], r["rejected"]) for r in rows]
    # the output loads as preference data that rlhfkit rm / dpo read
    from rlhfkit.data import PREFERENCE_FORMATS, DataFormat, detect_format, load_rows

    ds = load_rows(str(out2))
    assert detect_format(ds.column_names, allowed=PREFERENCE_FORMATS) is DataFormat.PREFERENCE_EXPLICIT
    # a row with fewer than two responses has no pair: left out and counted, as training data skips it; a
    # file of nothing else is a one-line error, and a response that is not a list still names its row
    lone = tmp_path / "lone.jsonl"
    lone.write_text(json.dumps({"prompt": "p", "responses": ["only one"]}) + "\n")
    assert main(["judge", str(lone), "--judge", f"fn:{fn_file}:score", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"rlhfkit judge: error: {lone}: no row has two responses to compare " \
                                              "(1 rows)"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(src.read_text() + lone.read_text() + json.dumps({"prompt": "r", "responses": []}) + "\n")
    for spec, out3 in ((f"fn:{fn_file}:score", "m1.jsonl"), (f"pairfn:{fn_file}:prefer", "m2.jsonl")):
        assert main(["judge", str(mixed), "--judge", spec, "--out", str(tmp_path / out3)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["rows_with_fewer_than_two_responses"] == 2 and summary["pairs"] == 4
        assert [(r["chosen"], r["rejected"]) for r in _lines(tmp_path / out3)] == \
            [(r["chosen"], r["rejected"]) for r in rows]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": "not a list"}) + "\n")
    assert main(["judge", str(bad), "--judge", f"fn:{fn_file}:score", "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "row 1, field 'responses': expected a list of responses, got str" in capsys.readouterr().err


def test_scoring_judges_label_many_rows_per_call_with_the_same_verdicts(tmp_path):
    """A reward model scores a batch of rows in one call (the demo's judge stage: 849 pairs in seconds); the
    labels are those of one compare per pair, and a bad score spoils only its own pair."""
    from rlhfkit.judges.judge_pairs import SCORE_BATCH_ROWS, label_file

    fn_file = tmp_path / "judge_fn.py"
    fn_file.write_text("CALLS = []\n\ndef score(prompts, responses):\n    CALLS.append(len(responses))\n"
                       "    return [float('nan') if r == 'bad' else (len(r) * 7) % 5 for r in responses]\n")
    n = SCORE_BATCH_ROWS + 6
    rows = [{"prompt": f"p{i}", "chosen": "x" * (i % 4 + 1), "rejected": "bad" if i == 3 else "y" * (i % 3 + 1)}
            for i in range(n)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = build_judge(f"fn:{fn_file}:score")
    summary = label_file(str(src), judge, tmp_path / "out.jsonl")
    calls = judge.source.fn.__globals__["CALLS"]
    assert sorted(calls) == [2 * 6, 2 * SCORE_BATCH_ROWS]  # two calls, not one per pair
    expected = []
    for i, r in enumerate(rows):
        a, b = (r["chosen"], r["rejected"]) if i % 2 == 0 else (r["rejected"], r["chosen"])
        if i == 3:
            continue
        verdict = judge.compare(r["prompt"], a, b)
        if verdict.winner is not None:
            expected.append((i + 1, a if verdict.winner == "a" else b))
    assert [(x["source_row"], x["chosen"]) for x in _lines(tmp_path / "out.jsonl")] == expected
    assert summary["unlabelled"] == 1 and summary["labelled"] == len(expected)
    skipped = _lines(sidecar_paths(tmp_path / "out.jsonl")["unlabelled"])
    assert [s["source_row"] for s in skipped if "non-finite" in s["reason"]] == [4]


def test_local_lm_judge_probabilities(tiny_model_dir):
    judge = build_judge(f"lm:{tiny_model_dir}")
    lp_a, lp_b = judge.option_logprobs("What is 2+2?", "four", "five")
    assert lp_a < 0 and lp_b < 0
    p, _ = judge.compare_once("What is 2+2?", "four", "five")
    q, _ = judge.compare_once("What is 2+2?", "five", "four")
    assert 0 < p < 1 and 0 < q < 1
    verdict = judge.compare("What is 2+2?", "four", "five")
    swapped = judge.compare("What is 2+2?", "five", "four")
    assert verdict.p_forward == pytest.approx(p) and verdict.p_backward == pytest.approx(1 - q)
    assert verdict.p_a + swapped.p_a == pytest.approx(1.0, abs=1e-6)
    assert judge.render("P", "x", "y").endswith("Verdict:")


def test_gold_judge_spec_labels_demo_world_pairs(tmp_path, capsys):
    import random

    from rlhfkit.cli import main
    from rlhfkit.world import build_world

    world = build_world(0, num_countries=4)
    world.save(tmp_path / "world.json")
    rng = random.Random(0)
    rows = []
    for req in world.requests[:6]:
        good = world.good_style(req.category)
        bad = next(s for s in world.styles_for(req.category) if s != good)
        rows.append({"prompt": [{"role": "user", "content": req.prompt}],
                     "chosen": world.respond(req, good, rng), "rejected": world.respond(req, bad, rng)})
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gold.jsonl"
    assert main(["judge", str(src), "--judge", f"gold:{tmp_path}", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 6 and summary["inconsistent"] == 0
    assert summary["agreement"]["pairs_with_reference"] == 6


def test_rate_limiter_spaces_requests():
    from rlhfkit.judges import RateLimiter

    now = [0.0]
    waits = []

    def sleep(s):
        waits.append(s)

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.acquire()
    assert waits == [0.25, 0.5]


def test_cli_openai_judge_from_environment(server, tmp_path, monkeypatch, capsys):
    from rlhfkit.cli import main

    monkeypatch.setenv("RLHFKIT_JUDGE_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    out = tmp_path / "o.jsonl"
    assert main(["judge", str(_pairs_file(tmp_path, n=3)), "--judge", "openai:judge-model", "--out", str(out),
                 "--cot", "--workers", "2", "--rate", "50"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 3 and summary["agreement"]["accuracy"] == 1.0
    assert server.headers[0]["Authorization"] == "Bearer sk-env" and server.requests[0]["model"] == "judge-model"
    assert "First explain" in server.requests[0]["messages"][-1]["content"]  # the chain-of-thought template


def test_reward_model_judge(tmp_path):
    from rlhfkit.models.tiny import build_tiny_model

    rm = build_tiny_model(tmp_path / "rm", reward=True, layers=1, hidden=32, heads=2, vocab=512)
    judge = build_judge(f"model:{rm}")
    verdict = judge.compare("What is the capital of France?", "Paris.", "I cannot help.")
    assert 0 < verdict.p_a < 1 and verdict.consistent and verdict.p_forward == verdict.p_backward
    s_a, s_b = judge.score_many(["q", "q"], ["Paris.", "I cannot help."])
    assert verdict.p_a != 0.5 or s_a == s_b


def test_scoring_judge_as_reward_source(server):
    from rlhfkit.judges import JudgeReward
    from rlhfkit.rollout.rewards import ScoringBatch, checked_scores

    server.script = [("reply", "Fine.\nScore: 7"), ("reply", "Score: 2")]
    source = JudgeReward(_judge(server))
    batch = ScoringBatch(["q", "q"], ["GOOD", "bad"], [[1], [1]], [[2], [3]], [True, True])
    assert checked_scores(source, batch).tolist() == [7.0, 2.0]
    assert "Response:\nGOOD" in server.requests[0]["messages"][-1]["content"]
