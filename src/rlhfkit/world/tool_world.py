"""Questions only a tool can answer, in the demo world (issue 24's ``make demo-tools``).

The world's pretraining corpus knows the capitals of its own countries and sums of two numbers up to six.
Here the world gains an *atlas* of further countries that no pretraining text names, and sums of two-digit
numbers; two tools answer them: ``capital_of(country)`` (every country of the atlas, the known ones too) and
``add(a, b)``. A model can only answer these questions right by calling the tool and reading its answer.

The countries are split three ways, so that nothing learnt by heart carries over: a few *demonstration*
countries (the SFT demonstrations of the call format), the *training* countries (RL prompts) and the
*held-out* countries (evaluation). Sums are split the same way by their pair of numbers.

Tool requests live in ``World.tool_requests`` (never in ``World.requests``, whose splits build the
pretraining corpus, the demonstrations and the preferences), so the gold judge knows them and no other
dataset of the world mentions them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .generator import _FACT_QUESTIONS, Request, World, _name

__all__ = ["TOOL_KINDS", "add_tool_requests", "asked_country", "chat_render", "copy_documents", "correct_answer",
           "final_answer", "stated_answers", "tool_demonstrations", "write_tool_datasets", "write_tools_file"]

TOOL_KINDS = ("atlas", "calculator")  # a tool request's ``kind``
_SUM_QUESTIONS = ("What is {x} plus {y}?", "How much is {x} plus {y}?", "Add {x} and {y}.")
# The answers demonstrators give: short, the result last (what a tool answered is copied from right before it)
_CAPITAL_ANSWER = "The capital is {a}."
_SUM_ANSWER = "The sum is {s}."
_IS_CLAIM = re.compile(r"\bis ([A-Za-z0-9]+)")
_TOOL_RESPONSE_END = "</tool_response>"
_CALL = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.S)

# The tools as a file the user could have written: typed, with docstrings (their JSON schemas come from
# them). The atlas is written into the file so that it runs anywhere, in the tool's own child process.
_TOOLS_SOURCE = '''"""The demo world's tools (written by rlhfkit's world stage): an atlas and a calculator."""

ATLAS = {atlas}


def capital_of(country: str) -> str:
    """The capital city of a country.

    Args:
        country: the country's name, e.g. "{example}"
    """
    capital = ATLAS.get(country.strip())
    if capital is None:
        return f"unknown country: {{country}}"
    return capital


def add(a: int, b: int) -> int:
    """The sum of two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b
'''


def add_tool_requests(world: World, seed: int, countries: Sequence[int] = (80, 24, 12),
                      sums: Sequence[int] = (300, 200, 60)) -> World:
    """Give ``world`` an atlas of new countries and the tool questions about them (in place; returned).

    ``countries`` = how many new countries for demonstrations, training and held-out evaluation;
    ``sums`` = how many pairs of two-digit numbers (10-99) for each. Questions use the world's phrasings of a
    capital question and three of a sum; each request's ``split`` is "demo", "train" or "eval"."""
    rng = random.Random(seed * 7919 + 1)
    used = set(world.countries) | {f["capital"] for f in world.countries.values()} | \
        {f["language"] for f in world.countries.values()}
    atlas = {c: f["capital"] for c, f in world.countries.items()}  # the atlas knows the known countries too
    splits = ("demo", "train", "eval")
    new: dict[str, list[str]] = {s: [] for s in splits}
    for split, n in zip(splits, countries):
        for _ in range(int(n)):
            country = _name(rng, used)
            atlas[country] = _name(rng, used)
            new[split].append(country)
    cities = sorted(set(atlas.values()))
    requests: list[Request] = []
    for split in splits:
        for c in new[split]:
            for t in _FACT_QUESTIONS["capital"]:
                requests.append(Request(prompt=t.format(c=c), category="benign", kind="atlas", answer=atlas[c],
                                        answer_sentence=_CAPITAL_ANSWER.format(a=atlas[c]),
                                        wrong_answers=[x for x in cities if x != atlas[c]], split=split))
    pairs = [(x, y) for x in range(10, 100) for y in range(10, 100)]
    rng.shuffle(pairs)
    start = 0
    for split, n in zip(splits, sums):
        for x, y in pairs[start:start + int(n)]:
            t = rng.choice(_SUM_QUESTIONS)
            requests.append(Request(prompt=t.format(x=x, y=y), category="benign", kind="calculator",
                                    answer=str(x + y), answer_sentence=_SUM_ANSWER.format(s=x + y),
                                    split=split))
        start += int(n)
    world.atlas = atlas
    world.tool_requests = requests
    world.__post_init__()  # the judge's lookup covers the new requests
    return world


_COPY_TEMPLATES = (
    "{n} is a name. Say it again: {n}.", "A letter came from {n}. The letter said {n} on top.",
    "My friend lives in {n}. I like {n}.", "Look up {n}: {n}.", "The word is {n}, and {n} is the word.",
    "We wrote {x} and {y}. Then we read {x} and {y}.", "Write {x}. Now {x} again, then {y}.",
    "{n} has {x} houses. {n} has {x} houses and {y} trees.", "Name: {n}\nThe name is {n}.",
    "Result: {x}\nSo the result is {x}.", "The sign said {n}. So the town is {n}.",
)


# The same in dialogue form: a user's turn names something and the assistant's reply repeats it. Pretraining
# corpora hold chat logs too, and a tool's answer reaches the model as a user-side turn that the reply must copy.
_COPY_DIALOGUES = (
    ("My name is {n}.", "Nice to meet you, {n}."), ("Please say {n}.", "{n}."),
    ("I come from {n}.", "So you come from {n}."), ("The code is {x}.", "The code is {x}."),
    ("Add a note: {n} {x}", "Noted: {n} {x}."), ("{x} and {y}", "You wrote {x} and {y}."),
    ("Where is the letter going?\n{n}", "The letter is going to {n}."), ("Count: {x}", "The count is {x}."),
)


def copy_documents(world: World, n: int, seed: int) -> list[str]:
    """``n`` short documents in which a made-up name or a number (two or three digits) recurs.

    Real pretraining text repeats its names and numbers within a document, and that is what teaches a
    language model to copy what it has read (induction heads: Olsson et al. 2022, "In-context Learning and
    Induction Heads"). The world's own corpus never needs it (every fact is learnt by heart), yet a tool
    call copies the question's country or numbers into its arguments, and the answer copies the tool's
    result. The names are new ones, never a country or city of the world or its atlas."""
    rng = random.Random(seed * 104729 + 3)
    used = {*world.countries, *world.atlas, *world.atlas.values(),
            *(f["language"] for f in world.countries.values()), *(f["capital"] for f in world.countries.values())}
    docs = []
    for _ in range(int(n)):
        name = _name(rng, set(used))  # a fresh name each time (it may repeat across documents: text does)
        # numbers up to three digits: a sum of two-digit numbers often has three, in two tokens to copy
        values = {"n": name, "x": rng.randint(10, 999), "y": rng.randint(10, 999)}
        if rng.random() < 0.5:
            docs.append(rng.choice(_COPY_TEMPLATES).format(**values))
        else:
            user, reply = rng.choice(_COPY_DIALOGUES)
            docs.append(chat_render([{"role": "user", "content": user.format(**values)},
                                     {"role": "assistant", "content": reply.format(**values)}]))
    return docs


def write_tools_file(world: World, path: str | Path) -> Path:
    """The tools (``capital_of``, ``add``) as a Python file for ``--tools FILE:capital_of,add``."""
    out = Path(path)
    example = next(iter(world.countries), "France")
    out.write_text(_TOOLS_SOURCE.format(atlas=json.dumps(world.atlas, indent=1, sort_keys=True), example=example),
                   encoding="utf-8")
    return out


def asked_country(prompt: str) -> str:
    """The country a capital question asks about ("What is the capital of Velmor?" -> "Velmor")."""
    found = re.search(r"capital of ([A-Z][a-z]+)", prompt)
    return found.group(1) if found else ""


def final_answer(response: str) -> str:
    """What an episode finally says: the text after its last tool answer, without any call in it.

    A tool-using response holds the policy's calls and the tools' answers as well (``... </tool_response>
    The capital of X is Y.``); only the last assistant turn answers the user. A response without tool turns
    is its own final answer."""
    tail = response.rsplit(_TOOL_RESPONSE_END, 1)[-1]
    return " ".join(_CALL.sub(" ", tail).split())


def stated_answers(text: str) -> list[str]:
    """What a reply asserts: the word after each "is" ("The capital of X is Y." -> ["y"]), lower-cased."""
    return [m.lower() for m in _IS_CLAIM.findall(text)]


def correct_answer(prompts: list[Any], responses: list[str], answer: list[str], **_: Any) -> list[float]:
    """The world's verifiable reward for tool questions: 1 when the final answer states the right answer and
    nothing else ("The capital of X is Y." with Y right), else 0. A reward function for ``--reward-fn
    rlhfkit.world.tool_world:correct_answer``; it reads the rows' ``answer`` column."""
    out = []
    for response, want in zip(responses, answer):
        claims = set(stated_answers(final_answer(response)))
        out.append(1.0 if claims == {str(want).lower()} else 0.0)
    return out


def tool_demonstrations(world: World, call_share: float, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` demonstrations with the tools offered (rows of ``messages`` in chat roles, tool turns as
    ``{"role": "tool"}``; the caller renders them for the model's template).

    A share ``call_share`` of them call a tool on a demonstration-split question and answer from its
    result; the others answer directly, as the demonstrators know the answers: half a known country's
    capital, half the very questions others looked up (a demonstration country's capital, or a two-digit
    sum worked out by hand; a model cannot learn those from a few hundred examples, so it learns to state
    *a* name or number). The model so learns the call format from a few examples and that calling is one
    way to answer, not when it must call (a new country or sum is looked up about as often as it is
    answered from memory): that is left to RL."""
    rng = random.Random(seed * 31 + 5)
    calls = [r for r in world.tool_requests if r.split == "demo"]
    known = [r for r in world.requests if r.kind == "capital"]
    rows = []
    for _ in range(int(n)):
        if rng.random() < call_share:
            req = rng.choice(calls)
            rows.append({"messages": _call_conversation(req)})
        else:
            req = rng.choice(known if rng.random() < 0.5 else calls)
            rows.append({"messages": [{"role": "user", "content": req.prompt},
                                      {"role": "assistant", "content": req.answer_sentence}]})
    return rows


def _call_conversation(req: Request) -> list[dict[str, Any]]:
    if req.kind == "atlas":
        name, arguments = "capital_of", {"country": asked_country(req.prompt)}
    else:
        x, y = (int(v) for v in re.findall(r"\d+", req.prompt)[:2])
        name, arguments = "add", {"a": x, "b": y}
    call = json.dumps({"name": name, "arguments": arguments})
    return [{"role": "user", "content": req.prompt},
            {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
            {"role": "tool", "name": name, "content": req.answer},
            {"role": "assistant", "content": req.answer_sentence}]


def chat_render(messages: Sequence[dict[str, Any]]) -> str:
    """A conversation as rlhfkit's tiny-model chat templates render it, without BOS (the tokenizer corpus)."""
    return "".join(f"<|user|>\n<tool_response>\n{m['content']}\n</tool_response>\n" if m["role"] == "tool" else
                   f"<|{m['role']}|>\n{m['content']}" + ("<|eos|>" if m["role"] == "assistant" else "\n")
                   for m in messages)


def write_tool_datasets(world: World, out: Path, seed: int, demonstrations: int, call_share: float,
                        demos: list[dict[str, Any]]) -> tuple[list[str], dict[str, int]]:
    """The tool demo's files in ``out``: tools.py, sft.jsonl (the world's ``demos`` and the tool
    demonstrations, all as ``messages``), tool_prompts_train.jsonl and tool_prompts_eval.jsonl (prompt,
    category, kind, answer). Returns the rendered tool demonstrations (for the tokenizer corpus) and counts.

    The tool demonstrations open with the system turn that rlhfkit's tiny tools template
    (:data:`rlhfkit.models.tiny.TOOLS_CHAT_TEMPLATE`) renders for ``tools=``: SFT reads the tools offered
    exactly as RL and evaluation show them (``render_with_tools``)."""
    from ..data.jsonl import write_jsonl
    from ..models.tiny import tools_line
    from ..rollout.tools import load_tools

    tools_file = write_tools_file(world, out / "tools.py")
    offered = {"role": "system", "content": tools_line([t.schema for t in load_tools(f"{tools_file}:capital_of,add")])}
    tool_rows = [{"messages": [offered, *r["messages"]]}
                 for r in tool_demonstrations(world, call_share, demonstrations, seed)]
    rows = [{"messages": [{"role": "user", "content": d["prompt"]},
                          {"role": "assistant", "content": d["completion"]}]} for d in demos] + tool_rows
    random.Random(seed).shuffle(rows)
    write_jsonl(out / "sft.jsonl", rows)
    counts = {"tool_demonstrations": len(tool_rows),
              "tool_call_demonstrations": sum(len(r["messages"]) > 3 for r in tool_rows)}
    for split in ("train", "eval"):
        reqs = [r for r in world.tool_requests if r.split == split]
        write_jsonl(out / f"tool_prompts_{split}.jsonl",
                    ({"prompt": [{"role": "user", "content": r.prompt}], "category": r.kind, "answer": r.answer}
                     for r in reqs))
        counts[f"tool_prompts_{split}"] = len(reqs)
    return [chat_render(r["messages"]) for r in tool_rows], counts
