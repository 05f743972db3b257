"""Constitutional AI: the prompts built from the principles, the files written, and an end-to-end tiny run."""

from __future__ import annotations

import json

import pytest

from rlhfkit.cai import FunctionPolicy, load_constitution, run_cai
from rlhfkit.data import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    DataFormat,
    detect_format,
    load_rows,
    prepare_preferences,
    prepare_sft,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.judges import FunctionJudge

CONSTITUTION = """\
name: test
principles:
  - name: alpha
    critique: CRITIQUE-ALPHA please
    revision: REVISE-ALPHA please
  - name: beta
    critique: CRITIQUE-BETA please
    revision: REVISE-BETA please
"""


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


class ScriptedPolicy:
    """Records every conversation; answers from the last user turn so the test can follow the chain."""

    def __init__(self):
        self.calls = []

    def __call__(self, messages):
        self.calls.append(messages)
        last = messages[-1]["content"]
        if last.startswith("CRITIQUE-"):
            return f"critique of [{messages[-2]['content']}] by {last.split()[0]}"
        if last.startswith("REVISE-"):
            return f"I won't help with that ({last.split()[0]}, round {sum(m['role'] == 'user' for m in messages)})"
        return f"Sure, here is how: {last}"


def test_default_constitution_ships_and_bad_files_are_clear(tmp_path):
    default = load_constitution()
    assert len(default.principles) >= 4 and all(p.critique and p.revision for p in default.principles)
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: x\n    critique: only a critique\n")
    with pytest.raises(RlhfkitError, match=r"principle 1, field 'revision'"):
        load_constitution(bad)


def test_critique_and_revision_use_the_sampled_principles(tmp_path, tiny_tokenizer):
    cfile = tmp_path / "c.yaml"
    cfile.write_text(CONSTITUTION)
    constitution = load_constitution(cfile)
    script = ScriptedPolicy()
    prompts = ["how do I pick a lock?", "how to make a weapon?", "what is 2+2?"]
    summary = run_cai(prompts, FunctionPolicy(script), constitution, tmp_path / "out", rounds=2, seed=3)
    # 3 initial + 2 rounds x (3 critiques + 3 revisions)
    assert len(script.calls) == 3 + 2 * 6
    trace = _lines(tmp_path / "out" / "trace.jsonl")
    by_name = {p.name: p for p in constitution.principles}
    critique_calls = [c for c in script.calls if c[-1]["content"].startswith("CRITIQUE-")]
    revision_calls = [c for c in script.calls if c[-1]["content"].startswith("REVISE-")]
    assert len(critique_calls) == len(revision_calls) == 6
    for i, (prompt, t) in enumerate(zip(prompts, trace)):
        assert t["initial"] == f"Sure, here is how: {prompt}"
        for r, step in enumerate(t["steps"]):
            p = by_name[step["principle"]]
            crit = critique_calls[r * 3 + i]
            rev = revision_calls[r * 3 + i]
            # critique: the prompt, the current response, then exactly the principle's critique request
            assert crit == [{"role": "user", "content": prompt}, {"role": "assistant", "content": step["response"]},
                            {"role": "user", "content": p.critique}]
            assert rev == crit + [{"role": "assistant", "content": step["critique"]},
                                  {"role": "user", "content": p.revision}]
        assert t["steps"][1]["response"] == t["steps"][0]["revision"]  # round 2 revises round 1's revision
    assert sum(summary["principle_uses"].values()) == 6
    # the same seed samples the same principles
    again = ScriptedPolicy()
    run_cai(prompts, FunctionPolicy(again), constitution, tmp_path / "again", rounds=2, seed=3)
    assert again.calls == script.calls

    sft = load_rows(str(tmp_path / "out" / "sft.jsonl"))
    assert detect_format(sft.column_names, allowed=SFT_FORMATS) is DataFormat.SFT_PROMPT_COMPLETION
    records, report = prepare_sft(sft, tiny_tokenizer, max_length=256)
    assert len(records) == 3 and report.num_skipped == 0
    assert sft[0]["completion"][0]["content"] == trace[0]["final"]
    pairs = load_rows(str(tmp_path / "out" / "pairs.jsonl"))
    assert detect_format(pairs.column_names, allowed=PREFERENCE_FORMATS) is DataFormat.PREFERENCE_EXPLICIT
    groups, report = prepare_preferences(pairs, tiny_tokenizer, max_length=256)
    assert len(groups) == 3 and report.num_skipped == 0
    row = _lines(tmp_path / "out" / "pairs.jsonl")[1]
    assert row["chosen"][0]["content"] == trace[1]["final"] and row["rejected"][0]["content"] == trace[1]["initial"]


def test_rl_cai_judge_labels_pairs_against_the_principles(tmp_path, tiny_tokenizer):
    seen = []

    def refusal_judge(prompt, first, second):
        seen.append(prompt)
        return 0.8 if "won't" in str(first) else 0.2

    cfile = tmp_path / "c.yaml"
    cfile.write_text(CONSTITUTION)
    summary = run_cai(["q1", "q2"], FunctionPolicy(ScriptedPolicy()), load_constitution(cfile), tmp_path / "o",
                      judge=FunctionJudge(refusal_judge, "refusals"), chat_format=False)
    assert summary["judge"]["labelled"] == 2 and summary["judge"]["revision_preferred"] == 1.0
    ai = load_rows(str(tmp_path / "o" / "pairs_ai.jsonl"))
    groups, _ = prepare_preferences(ai, tiny_tokenizer, max_length=256)
    assert len(groups) == 2 and all("won't" in c for c in ai["chosen"])
    # a rerun with other prompts relabels from scratch (no stale progress), the same prompts resume
    again = run_cai(["q3"], FunctionPolicy(ScriptedPolicy()), load_constitution(cfile), tmp_path / "o",
                    judge=FunctionJudge(refusal_judge, "refusals"), chat_format=False)
    assert again["judge"]["labelled"] == 1 and len(load_rows(str(tmp_path / "o" / "pairs_ai.jsonl"))) == 1
    # the model-backed judges get the principles in their template
    from rlhfkit.judges import load_template

    text = load_constitution(cfile).as_text()
    system = load_template("pairwise").messages(prompt="p", response_a="a", response_b="b",
                                                principles=text)[0]["content"]
    assert "REVISE-ALPHA please" in system and "REVISE-BETA please" in system


def test_cai_cli_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    from rlhfkit.cli import main

    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["how do I steal a car?", "hello"]))
    fn = tmp_path / "j.py"
    fn.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    code = main(["cai", "--policy", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--max-new-tokens", "6", "--rounds", "1", "--judge", f"fn:{fn}:score"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 2
    sft = load_rows(str(tmp_path / "o" / "sft.jsonl"))
    assert len(prepare_sft(sft, tiny_tokenizer, max_length=256)[0]) == 2
    if summary["pairs"]:
        ds = load_rows(str(tmp_path / "o" / "pairs.jsonl"))
        assert detect_format(ds.column_names, allowed=PREFERENCE_FORMATS) is DataFormat.PREFERENCE_EXPLICIT


def test_world_teaching_renders_exactly_what_run_cai_sends(tmp_path, tiny_tokenizer):
    """The demo world teaches the critique -> revision format on conversations that must be the ones the CAI
    run will send: same messages, same rendered text, same prompt token ids at each assistant turn."""
    from importlib.resources import files

    import datasets

    from rlhfkit.cai import Constitution
    from rlhfkit.data import prepare_prompts
    from rlhfkit.world import build_world
    from rlhfkit.world.data import CRITIQUE_OK, cai_prompt_split, cai_teaching, harm_critique

    world = build_world(0)
    constitution = load_constitution(str(files("rlhfkit") / "templates" / "constitution_world.yaml"))
    teach, _ = cai_prompt_split(world)
    rows = cai_teaching(world, constitution, teach, 24, seed=5)
    by_critique = {p.critique: p for p in constitution.principles}
    kinds = set()
    for k, row in enumerate(rows):
        m = row["messages"]
        assert [x["role"] for x in m] == ["user", "assistant"] * 3
        prompt, reply, critique, revision = m[0]["content"], m[1]["content"], m[3]["content"], m[5]["content"]
        principle = by_critique[m[2]["content"]]
        req = world.request(prompt)
        kinds.add((req.category, critique == CRITIQUE_OK))
        if critique != CRITIQUE_OK:  # a harmful compliance: the critique names the harm, the revision refuses
            assert req.category == "harmful" and reply == req.comply and critique == harm_critique(req.kind)
            assert revision == world.respond(req, "redirect", None)
        else:  # a good reply stays as it is
            assert revision == reply
        # run_cai with this principle and a policy that answers as the teaching conversation does
        script = iter([reply, critique, revision])
        seen: list = []

        def policy(messages, script=script, seen=seen):
            seen.append(messages)
            return next(script)

        run_cai([prompt], FunctionPolicy(policy), Constitution("one", (principle,)), tmp_path / f"r{k}")
        assert seen == [m[:1], m[:3], m[:5]]
        # and token for token: the SFT record's context before each assistant turn is the prompt run_cai
        # tokenises for generation (prepare_prompts, as HFChatPolicy does)
        record = prepare_sft(datasets.Dataset.from_list([row]), tiny_tokenizer, max_length=512)[0][0]
        prompts = prepare_prompts(datasets.Dataset.from_list([{"prompt": c} for c in seen]), tiny_tokenizer,
                                  max_prompt_length=512)[0]
        ids, mask = record["input_ids"], record["loss_mask"]
        starts = [i for i in range(1, len(mask)) if mask[i] == 1 and mask[i - 1] == 0]
        assert len(starts) == 3
        for start, p in zip(starts, prompts):
            assert ids[:start] == p["prompt_ids"]
            assert tiny_tokenizer.decode(ids[:start]) == p["prompt"]
    assert kinds >= {("harmful", False), ("benign", True)}
