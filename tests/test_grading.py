"""MT-Bench-style grading: the grade parser, the local LM's expected grade, a chat judge on loopback and
`rlhfkit grade` end to end with tiny policies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_judges import ScriptedServer

from rlhfkit.errors import ConfigError
from rlhfkit.eval.grading_run import (
    format_grading_table,
    grade_policies,
    load_questions,
    main,
    summarize_grades,
)
from rlhfkit.judges.base import JudgeReplyError
from rlhfkit.judges.grading import GradingTemplates, LMGrader, ScoreGrader, build_grader, parse_grade

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "grading_questions.jsonl"

GRADES = [
    ("The answer is correct and well organised. It explains each step.\n\nRating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("The response covers the main points but misses the edge case.\nScore: 7/10", 7.0),
    ("It is mostly accurate, though a little verbose. I would rate this 6 out of 10.", 6.0),
    ("**Assessment:** clear and correct.\n\n**Rating:** 9", 9.0),
    ("7", 7.0),
    ("Rating: 10", 10.0),
    ("First draft: [[7]]. On reflection the arithmetic in step 2 is wrong.\nRating: [[3]]", 3.0),
    ("Explanation: the reference says 420 and the assistant says 420.\n\nFinal grade - 8", 8.0),
    ("The answer has 3 small mistakes and 2 strong points.\nOverall, I'd give it an 8/10.", 8.0),
    ("Rating: [[ 4 ]]\n\nThat is all.", 4.0),
    ("The reply is helpful.\n**8**", 8.0),
    ("Judgement: decent, not great.\nRating: [[5/10]]", 5.0),
    ("It follows the instructions.\nRating: 7.25", 7.25),
]

REJECTS = [
    "The answer is good but I cannot give a number.",
    "Rating: [[15]]",
    "Rating: 0",
    "Score: 4/5",
    "Rating: [[N/A]]",
    "",
]


@pytest.mark.parametrize("text,expected", GRADES)
def test_parse_grade_reads_real_replies(text, expected):
    assert parse_grade(text) == expected


@pytest.mark.parametrize("text", REJECTS)
def test_parse_grade_rejects(text):
    with pytest.raises(JudgeReplyError):
        parse_grade(text)


def test_parse_grade_scale_and_snippet():
    assert parse_grade("Rating: [[4]]", scale=5) == 4.0
    with pytest.raises(JudgeReplyError, match="outside"):
        parse_grade("Rating: [[7]]", scale=5)
    with pytest.raises(JudgeReplyError, match="cannot give"):
        parse_grade("I cannot give a grade here.")


def test_templates_show_the_whole_conversation_for_turn_two():
    t = GradingTemplates.load()
    _, messages = t.messages(["Q-ONE", "Q-TWO"], ["A-ONE", "A-TWO"], 2, ["REF-ONE", "REF-TWO"])
    question = messages[-1]["content"]
    for part in ("Q-ONE", "A-ONE", "Q-TWO", "A-TWO", "REF-ONE", "REF-TWO", "user message 2", "Rating: [[N]]"):
        assert part in question
    _, messages = t.messages(["Q-ONE", "Q-TWO"], ["A-ONE", "A-TWO"], 1)
    assert "Q-ONE" in messages[-1]["content"] and "Q-TWO" not in messages[-1]["content"]
    assert "reference" not in messages[-1]["content"].lower()


def _sequence_logprob(model, ids, start):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(logp[j - 1, ids[j]]) for j in range(start, len(ids)))


def test_lm_grader_is_the_expected_grade_over_full_option_sequences(policy, tiny_tokenizer):
    grader = LMGrader(policy, tiny_tokenizer)
    questions, answers = ["What is 2 + 2?", "And times 3?"], ["It is 4.", "That makes 12."]
    for turn, reference in ((1, None), (2, ["4", "12"])):
        score, reply = grader.grade(questions, answers, turn, reference)
        text = grader.render(questions, answers, turn, reference)
        assert text.endswith("Rating: [[")
        context = tiny_tokenizer(text, add_special_tokens=False).input_ids
        logps = []
        for s in range(1, 11):  # recomputed from one plain forward over context + option, no cache
            full = tiny_tokenizer(text + f"{s}]]", add_special_tokens=False).input_ids
            assert full[:len(context)] == context
            assert len(full) - len(context) >= 2  # every option is several tokens: the whole sequence counts
            logps.append(_sequence_logprob(policy, full, len(context)))
        top = max(logps)
        weights = [math.exp(lp - top) for lp in logps]
        expected = sum(s * w for s, w in zip(range(1, 11), weights)) / sum(weights)
        assert 1.0 <= score <= 10.0
        assert score == pytest.approx(expected, abs=1e-4)
        probs = [float(x.split(":")[1]) for x in reply.split()[1:]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-2)


class GradingServer(ScriptedServer):
    """Grades 7 on turn 1 and 3 on turn 2; writes no grade for turn 1 of a question containing FAILME."""

    @staticmethod
    def verdict(body):
        content = body["messages"][-1]["content"]
        if "user message 2" in content:
            return "[[3]]"
        if "FAILME" in content:
            return "I am not able to grade this one."
        return "The answer addresses the question.\n\nRating: [[7]]"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_openai_grader_per_turn_means_and_failures(tmp_path, tiny_model_dir):
    server = GradingServer()
    try:
        grader = build_grader("openai:tiny", base_url=server.base_url, api_key="sk-test", timeout=5.0)
        assert grader.grade(["q"], ["a"], 1) == (7.0, "The answer addresses the question.\n\nRating: [[7]]")
        questions = _write(tmp_path / "q.jsonl", [
            {"id": 1, "category": "maths", "turns": ["What is 3 + 4?", "Double it."], "reference": ["7", "14"]},
            {"id": 2, "category": "writing", "turns": ["Write a haiku.", "Make it rhyme."]},
            {"id": 3, "category": "writing", "turns": ["FAILME please", "Again."]},
        ])
        qs = load_questions(questions, "auto")
        lines = grade_policies({"tiny": str(tiny_model_dir)}, qs, grader, max_new_tokens=4, batch_size=4)
        report = summarize_grades(lines, n_boot=200)["policies"]["tiny"]
        assert report["turns"]["1"]["mean"] == 7.0 and report["turns"]["1"]["n"] == 2
        assert report["turns"]["2"]["mean"] == 3.0 and report["turns"]["2"]["n"] == 3
        assert report["parse_failures"] == 1 and report["categories"]["writing"]["parse_failures"] == 1
        failed = [r for r in lines if r["parse_failure"]]
        assert len(failed) == 1 and failed[0]["score"] is None and "not able" in failed[0]["judge_reply"]
        assert [r["mode"] for r in lines if r["id"] == "1"] == ["reference", "reference"]
        sent = [b["messages"][-1]["content"] for b in server.requests]
        assert any("Reference answer" in s and "14" in s for s in sent)
        table = format_grading_table({"judge": grader.name, "scale": 10, "mode": "auto",
                                      **summarize_grades(lines, n_boot=200)})
        assert "grade 1-10" in table and "1 judge reply had no readable grade" in table
    finally:
        server.close()


def test_score_grader_reports_raw_scores(tmp_path, tiny_model_dir):
    fn = tmp_path / "judge.py"
    fn.write_text("def length(prompts, responses):\n    return [100.0 + len(r) for r in responses]\n")
    grader = build_grader(f"fn:{fn}:length")
    assert isinstance(grader, ScoreGrader) and grader.scale is None
    assert grader.grade(["q1", "q2"], ["abc", "hello"], 2) == (105.0, "")
    qs = load_questions(_write(tmp_path / "q.jsonl", [{"id": "a", "category": "c", "turns": ["Hi."]}]))
    lines = grade_policies({"p": str(tiny_model_dir)}, qs, grader, max_new_tokens=4)
    table = format_grading_table({"judge": grader.name, "scale": None, "mode": "single",
                                  **summarize_grades(lines, n_boot=100)})
    assert "the judge's raw score, not a 1-10 grade" in table and lines[0]["score"] >= 100.0


def test_grade_command_end_to_end_and_resume(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    argv = ["--policy", f"a={tiny_model_dir}", "--policy", f"b={tiny_model_dir}", "--questions", str(EXAMPLES),
            "--judge", f"lm:{tiny_model_dir}", "--max-new-tokens", "6", "--batch-size", "4", "--n-boot", "300",
            "--output-dir", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "maths" in table and "reasoning" in table and "turn 2" in table and "overall" in table
    rows = [json.loads(x) for x in EXAMPLES.read_text().splitlines()]
    turns = sum(len(r["turns"]) for r in rows)
    report = json.loads((out / "grading.json").read_text())
    lines = [json.loads(x) for x in (out / "grades.jsonl").read_text().splitlines()]
    assert len(lines) == turns * 2
    n = sum(c["n"] for p in report["policies"].values() for c in p["categories"].values())
    assert n == turns * 2 == 24
    for p in report["policies"].values():
        assert p["parse_failures"] == 0
        for stat in [p["overall"], *p["turns"].values(), *p["categories"].values()]:
            assert stat["ci_low"] <= stat["mean"] <= stat["ci_high"]
            assert 1.0 <= stat["mean"] <= 10.0
    # same model, same seed: both policies answer alike and get the same grades
    assert report["policies"]["a"]["overall"]["mean"] == pytest.approx(report["policies"]["b"]["overall"]["mean"])
    assert {r["mode"] for r in lines if r["category"] == "maths"} == {"reference"}
    assert {r["mode"] for r in lines if r["category"] == "writing"} == {"single"}
    # a rerun resumes: nothing is answered again, the report is the same
    assert main(argv) == 0
    again = json.loads((out / "grading.json").read_text())
    assert again["policies"] == report["policies"]
    assert len((out / "grades.jsonl").read_text().splitlines()) == 24
    with pytest.raises(ConfigError, match="other settings"):
        main([*argv[:-2], "--mode", "single", "--output-dir", str(out)])


def test_question_file_errors_name_file_row_and_field(tmp_path):
    path = _write(tmp_path / "questions.jsonl", [{"id": 1, "category": "maths", "turns": ["Hi?"]},
                                                 {"id": 2, "category": "maths", "prompt": "Hi?"}])
    with pytest.raises(ConfigError) as err:
        load_questions(path)
    message = str(err.value)
    assert "questions.jsonl, row 2, field 'turns'" in message and "\n" not in message
    with pytest.raises(ConfigError, match="row 1, field 'reference'.*turn 1"):
        load_questions(_write(tmp_path / "r.jsonl", [{"id": 1, "turns": ["a", "b"]}]), "reference")
    with pytest.raises(ConfigError, match="row 2, field 'id'"):
        load_questions(_write(tmp_path / "d.jsonl", [{"id": 1, "turns": ["a"]}, {"id": 1, "turns": ["b"]}]))
    with pytest.raises(ConfigError, match="pairwise function"):
        build_grader("pairfn:x.py:f")
