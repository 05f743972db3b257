"""The demo world: determinism, the gold judge's verdicts, simulated annotators, datasets."""

from __future__ import annotations

import random

import pytest

from rlhfkit.errors import DataError
from rlhfkit.world import GoldJudge, annotator_panel, build_world, pairwise_agreement
from rlhfkit.world.data import gold_pairs_from_samples, label_samples, pretraining_corpus, sft_demonstrations
from rlhfkit.world.sampling import near_miss_responses, off_prompt_responses, span_swaps


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def test_world_is_deterministic_and_split_by_prompt(world):
    again = build_world(0)
    assert [r.prompt for r in again.requests] == [r.prompt for r in world.requests]
    assert again.countries == world.countries
    assert build_world(1).countries != world.countries
    train = {r.prompt for r in world.split("train")}
    held = {r.prompt for r in world.split("eval")}
    assert train and held and not train & held
    for category in ("benign", "harmful", "unanswerable"):
        assert world.split("eval", category), category
    # held-out prompts never appear in the pretraining corpus
    corpus = "\n".join(pretraining_corpus(world, 0))
    assert not any(p in corpus for p in held)
    # every held-out benign request asks for a fact some training prompt also asks for
    for seed in (0, 1, 2):
        w = build_world(seed)
        trained = {r.answer_sentence for r in w.split("train", "benign")}
        assert {r.answer_sentence for r in w.split("eval", "benign")} <= trained
        assert 0.15 < len(w.split("eval")) / len(w.requests) < 0.4


def _mean_score(judge, world, category, style, n=40):
    rng = random.Random(0)
    reqs = world.split("train", category)[:n]
    return sum(judge.judge(r.prompt, world.respond(r, style, rng)).total for r in reqs) / len(reqs)


def test_gold_judge_orders_styles(world):
    judge = GoldJudge(world)
    s = {st: _mean_score(judge, world, "benign", st) for st in world.styles_for("benign")}
    assert s["concise"] == pytest.approx(1.0)
    assert s["concise"] > s["padded"] > s["over_refusal"] > s["wrong"]
    assert s["concise"] > s["flattery"] and s["concise"] > s["repeat"]
    h = {st: _mean_score(judge, world, "harmful", st) for st in world.styles_for("harmful")}
    assert h["redirect"] == pytest.approx(1.0)
    assert h["redirect"] > h["over_refusal"] > h["repeat"] > h["comply"]
    u = {st: _mean_score(judge, world, "unanswerable", st) for st in world.styles_for("unanswerable")}
    assert u["concise"] == pytest.approx(1.0) and u["wrong"] == pytest.approx(-1.0)


def test_gold_judge_reads_free_text_and_chat_prompts(world):
    judge = GoldJudge(world)
    req = next(r for r in world.requests if r.kind == "math")
    rendered = f"<|bos|><|user|>\n{req.prompt}\n<|assistant|>\n"
    right = judge.judge(rendered, req.answer_sentence)
    assert right.total == pytest.approx(1.0) and right.flags["correct"]
    wrong = req.answer_sentence.rsplit(" is ", 1)[0] + f" is {req.wrong_answers[0]}."
    verdict = judge.judge(req.prompt, wrong)
    assert verdict.honest == -1.0 and verdict.flags["hallucination"]
    # a question repeated back asserts no answer ("How much is one plus four?" does not claim "one")
    asked = next(r for r in world.requests if r.kind == "math" and r.prompt.startswith("How much is"))
    echo = judge.judge(asked.prompt, "You asked: " + asked.prompt)
    assert echo.honest == 0.0 and not echo.flags["hallucination"] and echo.flags["repeat"]
    claim = asked.answer_sentence.rsplit(" is ", 1)[0] + f" is {asked.wrong_answers[0]}."
    assert judge.judge(asked.prompt, f"You asked: {asked.prompt} {claim}").flags["hallucination"]
    # each extra word costs 0.05
    assert judge.judge(req.prompt, req.answer_sentence + " Yes indeed.").total == pytest.approx(0.9)
    flags = judge.describe([req.prompt], ["I'm sorry, but I can't help with that."])[0]
    assert flags == {"harmful_refusal": None, "harmful_compliance": None, "benign_over_refusal": True,
                     "hallucination": False, "correct": False, "tool_call": None}
    with pytest.raises(DataError, match="does not know the prompt"):
        judge.judge("What is the airspeed of a swallow?", "42")


def test_annotators_disagree_like_people_and_biases_show(world):
    judge = GoldJudge(world)
    rng = random.Random(0)
    items = []
    for req in rng.sample(world.split("train"), 120):
        a, b = rng.sample(world.styles_for(req.category), 2)
        items.append((req.prompt, world.respond(req, a, rng), world.respond(req, b, rng)))
    agreement = pairwise_agreement(judge, annotator_panel(5, seed=0), items, seed=0)
    assert 0.3 < agreement["krippendorff_alpha"] < 0.95
    assert all(0.8 < v <= 1.0 for v in agreement["agreement_with_gold"].values())
    assert min(agreement["agreement_with_gold"].values()) < 0.97  # nobody is perfect
    # concise vs padded: the length-loving panel picks the padded reply far more often
    pairs = [(r.prompt, world.respond(r, "padded", rng), world.respond(r, world.good_style(r.category), rng))
             for r in world.split("train")[:100]]

    def padded_share(panel):
        votes = [a.prefers_first(judge, p, x, y, rng) for a in panel for p, x, y in pairs]
        return sum(votes) / len(votes)

    assert padded_share(annotator_panel(5, 0, biased="length")) > 0.7 > 0.3 > padded_share(annotator_panel(5, 0))


def test_labels_and_gold_pairs(world):
    reqs = world.split("train")[:30]
    samples = []
    for i, r in enumerate(reqs):
        rng = random.Random(i)
        responses = [world.respond(r, s, rng) for s in world.styles_for(r.category)[:4]]
        if i == 0:
            responses = [responses[0]] * 4  # one distinct response: skipped and counted
        samples.append({"prompt": r.prompt, "responses": responses})
    ranked, pairs, report = label_samples(world, samples, annotator_panel(3, 0), seed=0, overlap_items=20)
    assert report["prompts_skipped_fewer_than_two_distinct"] == 1
    assert len(ranked) == len(pairs) == 29
    assert report["pairs_in_rankings"] == sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in ranked)
    assert {a["name"] for a in report["panel"]} == {"annotator_0", "annotator_1", "annotator_2"}
    gold = gold_pairs_from_samples(world, samples)
    judge = GoldJudge(world)
    assert gold and all(judge.judge(g["prompt"], g["chosen"]).total > judge.judge(g["prompt"], g["rejected"]).total
                        for g in gold)
    # the annotators' best-vs-worst pairs agree with gold far above chance
    agree = [judge.judge(p["prompt"], p["chosen"]).total >= judge.judge(p["prompt"], p["rejected"]).total
             for p in pairs]
    assert sum(agree) / len(agree) > 0.8


def test_sft_demonstrations_are_right_with_human_closings(world):
    demos = sft_demonstrations(world, 200, seed=0, closing_rate=0.5)
    judge = GoldJudge(world)
    verdicts = [judge.judge(d["prompt"], d["completion"]) for d in demos]
    assert all(v.helpful == 1.0 and v.harmless == 0 and v.honest == 0 for v in verdicts)
    closings = sum(v.flags["padding"] for v in verdicts) / len(verdicts)
    assert 0.4 < closings < 0.6


def test_cai_data_helpful_only_demonstrations_and_a_clean_red_team_split(world):
    from rlhfkit.world.data import cai_prompt_split

    demos = sft_demonstrations(world, 200, seed=0, closing_rate=0.0, harmful_style="comply")
    judge = GoldJudge(world)
    for d in demos:
        v = judge.judge(d["prompt"], d["completion"])
        req = world.request(d["prompt"])
        assert req.split == "train"
        if req.category == "harmful":  # a helpful-only assistant complies
            assert v.flags["harmful_compliance"] and d["completion"] == req.comply
        else:
            assert v.helpful == 1.0 and v.honest == 0
    # the same seed, default style: the demo's demonstrations are unchanged by the new option
    assert sft_demonstrations(world, 50, seed=1) == sft_demonstrations(world, 50, seed=1, harmful_style=None)
    teach, red = cai_prompt_split(world, 0.5)
    harmful = world.split("train", "harmful")
    assert {r.prompt for r in teach} | {r.prompt for r in red} == {r.prompt for r in harmful}
    assert not {r.prompt for r in teach} & {r.prompt for r in red}
    assert {r.kind for r in teach} == {r.kind for r in red} == {r.kind for r in harmful}  # every harm, both sides
    assert cai_prompt_split(build_world(0), 0.5) == (teach, red)
    with pytest.raises(ValueError, match="red_team_fraction"):
        cai_prompt_split(world, 1.0)


def test_off_prompt_replies_come_from_the_nearest_other_prompt(world):
    """Each prompt borrows replies of the closest other prompt (words in order), never its own, and the
    annotators mark a right answer to another sum down as a wrong fact."""
    prompts = ["What is one plus two?", "What is one plus three?", "What is two plus one?",
               "What is the capital of Norway?", "What is one plus two?"]
    samples = [[f"reply {i}.{j}" for j in range(3)] for i in range(len(prompts))]
    samples[4] = ["", "reply 4.1"]
    borrowed = off_prompt_responses(prompts, samples, 2, random.Random(0))
    assert [len(b) for b in borrowed] == [2, 2, 2, 2, 2]
    owner = {r: p for p, s in zip(prompts, samples) for r in s}
    assert all(owner[r] != p for p, b in zip(prompts, borrowed) for r in b)
    # "one plus three" is nearer "one plus two" (one word changed) than "two plus one" (two moved)
    assert {owner[r] for r in borrowed[1]} == {"What is one plus two?"}
    assert {owner[r] for r in borrowed[3]} <= {"What is one plus two?", "What is one plus three?",
                                               "What is two plus one?"}
    assert off_prompt_responses(["only one prompt"], [["a", "b"]], 1, random.Random(0)) == [[]]
    judge = GoldJudge(world)
    maths = [r for r in world.requests if r.kind == "math"]
    asked, other = next((a, b) for a in maths for b in maths if a.answer != b.answer)
    right_elsewhere = world.respond(other, world.good_style(other.category), random.Random(0))
    assert judge.judge(asked.prompt, right_elsewhere).flags["hallucination"]


def test_near_miss_edits_swap_the_answer_and_the_annotators_mark_them_wrong(world):
    """A reply with one aligned span taken from the nearest other prompt's reply, never a span that repeats
    the prompt's words: for every sum and fact of the world the edit keeps the question and swaps the answer,
    a wrong answer (the gold judge flags a hallucination), and no edit repeats one of the prompt's own
    replies."""
    assert span_swaps("One plus six is seven.", "One plus two is three.") == [
        "One plus two is seven.", "One plus six is three."]
    # spans of different lengths align; a long differing span (a closing) is no near miss
    assert span_swaps("The capital of Avon is Bree.", "The capital of Upper Dale is Esk. Have a nice day.") == [
        "The capital of Upper Dale is Bree."]
    assert span_swaps("I don't know.", "I don't know.") == []
    prompts = ["What is one plus six?", "What is one plus two?", "What is the capital of Avon?"]
    assert near_miss_responses(prompts, [["One plus six is seven."], ["One plus two is three."], []], 1,
                               random.Random(0))[0] == ["One plus six is three."]
    judge = GoldJudge(world)
    benign = [r for r in world.split("train", "benign") if r.answer]
    prompts = [r.prompt for r in benign]
    samples = [[r.answer_sentence] for r in benign]
    edited = near_miss_responses(prompts, samples, 2, random.Random(0))
    assert [len(e) for e in edited].count(2) > 0.9 * len(prompts)
    answer_swapped = 0
    for req, own, edits in zip(benign, samples, edited):
        assert not set(edits) & set(own)
        asked = set(req.prompt.lower().rstrip("?.").split())
        for e in edits:
            kept = [w for w in req.answer_sentence.split() if w.lower() in asked]
            assert kept == [w for w in e.split() if w.lower() in asked], (req.prompt, e)  # the question's words
            flags = judge.judge(req.prompt, e).flags
            assert not flags["correct"], (req.prompt, e)
            answer_swapped += flags["hallucination"]
    assert answer_swapped > 0.8 * sum(map(len, edited))  # most swap the answer for one of its kind
    # the same draw again, and a prompt alone (no neighbour) gets none
    assert near_miss_responses(prompts, samples, 2, random.Random(0)) == edited
    assert near_miss_responses(["What is one plus two?"], [["One plus two is three."]], 1, random.Random(0)) == [[]]
