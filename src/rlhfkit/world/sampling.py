"""The pools of replies the demo world's preference stages label (``collect``, ``routed_collect``): a
policy's samples, plus where set another model's, the policy's hotter ones and replies borrowed from the
nearest other prompt, each reply with its source."""

from __future__ import annotations

import random
import re
from difflib import SequenceMatcher
from typing import Any

from ..rollout.texts import sample_responses
from ..stage import StageContext

__all__ = ["off_prompt_responses", "reply_pools"]


def reply_pools(ctx: StageContext, prompts: list[str], k: int, temperature: float, max_new: int, seed: int,
                explore: bool = True, other_seed: int | None = None) -> list[dict[str, Any]]:
    """Rows {prompt, responses, sources}: ``k`` samples of option ``policy`` (source "policy"), then, where
    the stage's options ask for them, ``other_samples`` of ``other_policy`` ("other"; drawn with
    ``other_seed``, default ``seed`` + 7), ``explore_samples`` of the policy at ``explore_temperature`` (1.5;
    "explore": the near misses RL's exploration finds first) and ``off_prompt_samples`` borrowed replies
    ("off_prompt", :func:`off_prompt_responses`). ``explore=False`` leaves the last two out (held-out pairs)."""
    policy = ctx.option("policy")
    samples = sample_responses(policy, prompts, k, temperature, max_new, seed)
    rows = [{"prompt": p, "responses": s, "sources": ["policy"] * len(s)} for p, s in zip(prompts, samples)]
    other, other_k = ctx.option("other_policy"), int(ctx.option("other_samples", 0))
    explore_k = int(ctx.option("explore_samples", 0)) if explore else 0
    extras = []
    if other and other_k:
        extras.append(("other", sample_responses(other, prompts, other_k, temperature, max_new,
                                                 seed + 7 if other_seed is None else other_seed)))
    if explore_k:
        hot = float(ctx.option("explore_temperature", 1.5))
        extras.append(("explore", sample_responses(policy, prompts, explore_k, hot, max_new, seed + 11)))
    for source, extra in extras:
        for row, more in zip(rows, extra):
            row["responses"] = row["responses"] + more
            row["sources"] = row["sources"] + [source] * len(more)
    off_k = int(ctx.option("off_prompt_samples", 0)) if explore else 0
    if off_k:
        borrowed = off_prompt_responses(prompts, samples, off_k, random.Random(seed + 13))
        for row, more in zip(rows, borrowed):
            row["responses"] = row["responses"] + more
            row["sources"] = row["sources"] + ["off_prompt"] * len(more)
    return rows


def off_prompt_responses(prompts: list[str], samples: list[list[str]], k: int,
                         rng: random.Random) -> list[list[str]]:
    """For each prompt, ``k`` of the policy's replies to the most similar *other* prompt (words in order,
    difflib's ratio; ties drawn at random): "One plus one is two." beside the replies to "What is one plus
    two?" (a word set would pick "What is two plus one?", whose answer is the same).

    A reward model that has only seen replies to their own prompt can learn that a reply is good in itself
    (a sum that adds up) without checking that it answers the question asked; replies borrowed from a close
    prompt are the counter-examples (RRM, Liu et al. 2024, "RRM: Robust Reward Model Training Mitigates
    Reward Hacking", augments with other prompts' responses for the same reason). The annotators rank them
    with the rest, so a borrowed reply that does answer this prompt too is not marked down.
    """
    replies: dict[str, list[str]] = {}
    for p, s in zip(prompts, samples):
        replies.setdefault(p, []).extend(r for r in s if r.strip())
    words = {p: re.findall(r"[a-z0-9']+", p.lower()) for p in replies}
    nearest: dict[str, list[str]] = {}
    for p, mine in words.items():
        scored = [(SequenceMatcher(None, mine, w, autojunk=False).ratio(), q)
                  for q, w in words.items() if q != p and replies[q]]
        best = max((x for x, _ in scored), default=None)
        nearest[p] = [q for x, q in scored if x == best]
    out = []
    for p in prompts:
        pool = replies[rng.choice(nearest[p])] if nearest[p] else []
        out.append(rng.sample(pool, min(k, len(pool))))
    return out
