"""Datasets drawn from a world: the pretraining corpus, SFT demonstrations, prompts, gold-labelled pairs,
and preference labels from simulated annotators on a policy's samples."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.jsonl import write_jsonl as write_jsonl  # re-exported: the world's stages write with it
from .annotators import Annotator, annotator_panel, describe_panel, pairwise_agreement
from .generator import PADDING, Request, World, _stable_fraction
from .judge import GoldJudge

if TYPE_CHECKING:
    from ..cai import Constitution

CATEGORY_WEIGHTS = {"benign": 0.5, "harmful": 0.25, "unanswerable": 0.25}


def chat_text(prompt: str, response: str) -> str:
    """A dialogue as the default chat template renders it, without BOS (the tokenizer adds it)."""
    return f"<|user|>\n{prompt}\n<|assistant|>\n{response}<|eos|>"


def _weighted_requests(world: World, split: str, n: int, rng: random.Random) -> list:
    """``n`` requests of ``split`` drawn with the category mix of CATEGORY_WEIGHTS (with replacement)."""
    pools = {c: world.split(split, c) for c in CATEGORY_WEIGHTS}
    cats = [c for c in CATEGORY_WEIGHTS if pools[c]]
    weights = [CATEGORY_WEIGHTS[c] for c in cats]
    return [rng.choice(pools[rng.choices(cats, weights)[0]]) for _ in range(n)]


def pretraining_corpus(world: World, seed: int, copies: int = 2) -> list[str]:
    """Raw text that mixes every response style (a web-like corpus): each training request answered in
    each of its styles ``copies`` times, plus the encyclopedia of facts. Held-out prompts never appear."""
    rng = random.Random(seed)
    docs = []
    for req in world.split("train"):
        for style in world.styles_for(req.category):
            for _ in range(copies):
                docs.append(chat_text(req.prompt, world.respond(req, style, rng)))
    docs += world.encyclopedia() * copies * 2
    rng.shuffle(docs)
    return docs


def sft_demonstrations(world: World, n: int, seed: int, closing_rate: float = 0.5,
                       harmful_style: str | None = None) -> list[dict[str, str]]:
    """``n`` good demonstrations (prompt/completion) on training prompts, as people write them.

    Every demonstration is right (correct, safe, honest), but like human demonstrators, a share
    ``closing_rate`` of them end with a polite closing ("I hope this helps.") that the gold raters, who
    prefer concise replies, mark down a little. SFT imitates the demonstrators' habits; preference
    learning is what can tell the model which of its habits people like. ``harmful_style="comply"`` gives
    the demonstrations of a helpful-only assistant (the starting point of Constitutional AI)."""
    rng = random.Random(seed)
    rows = []
    for req in _weighted_requests(world, "train", n, rng):
        style = harmful_style if harmful_style and req.category == "harmful" else world.good_style(req.category)
        reply = world.respond(req, style, rng)
        if rng.random() < closing_rate:
            reply += " " + " ".join(rng.sample(PADDING, rng.randint(1, 2)))
        rows.append({"prompt": req.prompt, "completion": reply})
    return rows


def prompt_rows(world: World, split: str, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Prompt-only rows (``prompt``, ``category``): all of ``split``, or ``n`` drawn with the category mix."""
    reqs = world.split(split) if n is None else _weighted_requests(world, split, n, random.Random(seed))
    return [{"prompt": r.prompt, "category": r.category} for r in reqs]


def gold_pairs(world: World, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Pairs of different-style replies labelled by the gold judge (gold ties left out): RM accuracy data."""
    rng = random.Random(seed)
    judge = GoldJudge(world)
    rows = []
    while len(rows) < n:
        req = _weighted_requests(world, split, 1, rng)[0]
        a, b = rng.sample(world.styles_for(req.category), 2)
        ra, rb = world.respond(req, a, rng), world.respond(req, b, rng)
        ga, gb = judge.judge(req.prompt, ra).total, judge.judge(req.prompt, rb).total
        if ga == gb:
            continue
        chosen, rejected = (ra, rb) if ga > gb else (rb, ra)
        rows.append({"prompt": req.prompt, "chosen": chosen, "rejected": rejected, "category": req.category,
                     "gold_margin": abs(ga - gb)})
    return rows


def gold_pairs_from_samples(world: World, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of distinct responses of one prompt that the gold judge does not tie, labelled by it.

    ``samples``: rows {prompt, responses}. On held-out prompts this is the reward model's honest test: the
    same kind of responses it was trained to compare, labelled by the gold raters instead of annotators."""
    judge = GoldJudge(world)
    rows = []
    for row in samples:
        distinct = list(dict.fromkeys(r for r in row["responses"] if r.strip()))
        scores = [judge.judge(row["prompt"], r).total for r in distinct]
        for i in range(len(distinct)):
            for k in range(i + 1, len(distinct)):
                if abs(scores[i] - scores[k]) < 1e-9:
                    continue
                hi, lo = (i, k) if scores[i] > scores[k] else (k, i)
                rows.append({"prompt": row["prompt"], "chosen": distinct[hi], "rejected": distinct[lo],
                             "gold_margin": abs(scores[i] - scores[k])})
    return rows


def label_samples(world: World, samples: Sequence[dict[str, Any]], panel: Sequence[Annotator], seed: int,
                  overlap_items: int = 60) -> tuple[list[dict], list[dict], dict]:
    """Simulated annotators label a policy's samples.

    ``samples``: rows {prompt, responses: [...], optional sources: [which model wrote each]}. Duplicates are
    merged; prompts with fewer than two distinct responses are skipped (counted). Each prompt goes to one
    annotator (round robin) who ranks its responses. Returns (ranked rows for the reward model, pairwise
    rows best-vs-worst for DPO, a report with counts, the panel and the panel's agreement on
    ``overlap_items`` pairs every annotator labelled).
    """
    judge = GoldJudge(world)
    rng = random.Random(seed)
    ranked, pairs, overlap = [], [], []
    skipped = 0
    for k, row in enumerate(samples):
        source_of: dict[str, str] = {}
        for i, r in enumerate(row["responses"]):
            if r.strip():
                source_of.setdefault(r, (row.get("sources") or [""] * len(row["responses"]))[i])
        distinct = list(source_of)
        if len(distinct) < 2:
            skipped += 1
            continue
        annotator = panel[k % len(panel)]
        order = annotator.rank(judge, row["prompt"], distinct, rng)
        best_first = [distinct[i] for i in order]
        ranked.append({"prompt": row["prompt"], "responses": best_first, "annotator": annotator.name,
                       "sources": [source_of[r] for r in best_first]})
        pairs.append({"prompt": row["prompt"], "chosen": best_first[0], "rejected": best_first[-1],
                      "annotator": annotator.name})
        if len(overlap) < overlap_items:
            overlap.append((row["prompt"], distinct[0], distinct[1]))
    report = {"prompts_labelled": len(ranked), "prompts_skipped_fewer_than_two_distinct": skipped,
              "pairs_in_rankings": sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in ranked),
              "panel": describe_panel(panel),
              "agreement": pairwise_agreement(judge, panel, overlap, seed=seed + 1) if overlap else {}}
    return ranked, pairs, report


def world_of(path: str | Path) -> World:
    """The world saved by a world stage: its folder (world.json inside) or the file; one-line ConfigError
    when it is missing."""
    from ..errors import ConfigError

    file = Path(path)
    file = file / "world.json" if file.is_dir() else file
    if not file.exists():
        raise ConfigError(f"{file}: no world.json (run a 'world' stage first)")
    return World.load(file)


def default_panel(seed: int, biased: str | None = None, num: int = 5) -> list[Annotator]:
    return annotator_panel(num=num, seed=seed, biased=biased)


# -- Constitutional AI in the world ---------------------------------------------------------------------------
# The critiques a careful assistant writes about its own reply: name the harm, or say nothing is wrong.
HARM_NAMES = {"cheat": "cheat", "steal": "steal", "break_in": "break in", "snoop": "spy on someone"}
CRITIQUE_OK = "My reply is fine. Nothing in it is wrong."


def harm_critique(kind: str) -> str:
    return f"My reply helps someone {HARM_NAMES[kind]}. That is wrong."


def cai_prompt_split(world: World, red_team_fraction: float = 0.5) -> tuple[list[Request], list[Request]]:
    """(teach, red_team): the harmful training requests of each kind split by a seeded hash of the prompt.

    Teaching conversations use only ``teach``; the CAI run uses only ``red_team`` (and evaluation the
    held-out split), so revisions of red-team prompts show a learned format, not remembered answers."""
    if not 0.0 < red_team_fraction < 1.0:
        raise ValueError(f"red_team_fraction must be in (0, 1), not {red_team_fraction}")
    teach: list[Request] = []
    red: list[Request] = []
    harmful = world.split("train", "harmful")
    for kind in dict.fromkeys(r.kind for r in harmful):
        group = sorted((r for r in harmful if r.kind == kind),
                       key=lambda r: _stable_fraction(f"red-team:{r.prompt}", world.seed))
        cut = min(max(1, round(len(group) * red_team_fraction)), len(group) - 1)  # both sides see every kind
        red += group[:cut]
        teach += group[cut:]
    return teach, red


def cai_teaching(world: World, constitution: Constitution, harmful: Sequence[Request], n: int, seed: int,
                 already_safe_rate: float = 0.1) -> list[dict[str, Any]]:
    """``n`` conversations (``messages`` rows) that teach the critique -> revision format of ``rlhfkit cai``.

    Each is prompt, reply, a principle's critique request, critique, the principle's revision request,
    revision: rendered by the CAI pipeline's own conversation builders. Half are harmful requests from
    ``harmful`` answered with compliance (critique names the harm, revision refuses and points to a better
    way; a share ``already_safe_rate`` were answered safely already and are kept); half are benign or
    unanswerable training requests answered well (critique: nothing wrong; revision: the same reply), so the
    model learns to revise what is harmful, not to refuse everything."""
    from ..cai import critique_conversation, revision_conversation

    rng = random.Random(seed)
    others = [r for r in world.split("train") if r.category != "harmful"]
    if not harmful or not others:
        raise ValueError("cai_teaching needs harmful and other training requests")
    rows = []
    for i in range(n):
        principle = rng.choice(constitution.principles)
        req = rng.choice(harmful) if i % 2 == 0 else rng.choice(others)
        if req.category == "harmful" and rng.random() >= already_safe_rate:
            reply, critique = world.respond(req, "comply", rng), harm_critique(req.kind)
            revision = world.respond(req, world.good_style("harmful"), rng)
        else:
            reply = world.respond(req, world.good_style(req.category), rng)
            critique, revision = CRITIQUE_OK, reply
        conv = critique_conversation([{"role": "user", "content": req.prompt}], reply, principle)
        conv = revision_conversation(conv, critique, principle)
        rows.append({"messages": [*conv, {"role": "assistant", "content": revision}]})
    return rows
