"""The pools of replies the demo world's preference stages label (``collect``, ``routed_collect``): a
policy's samples, plus where set another model's, the policy's hotter ones, replies borrowed from the
nearest other prompt and the policy's replies with their answer swapped for that prompt's, each reply with
its source."""

from __future__ import annotations

import functools
import random
import re
from difflib import SequenceMatcher
from typing import Any

from ..rollout.texts import sample_responses
from ..stage import StageContext

__all__ = ["near_miss_responses", "off_prompt_responses", "reply_pools", "span_swaps"]


def reply_pools(ctx: StageContext, prompts: list[str], k: int, temperature: float, max_new: int, seed: int,
                explore: bool = True, other_seed: int | None = None) -> list[dict[str, Any]]:
    """Rows {prompt, responses, sources}: ``k`` samples of option ``policy`` (source "policy"), then, where
    the stage's options ask for them, ``other_samples`` of ``other_policy`` ("other"; drawn with
    ``other_seed``, default ``seed`` + 7), ``explore_samples`` of the policy at ``explore_temperature`` (1.5;
    "explore": the near misses RL's exploration finds first), ``off_prompt_samples`` borrowed replies
    ("off_prompt", :func:`off_prompt_responses`) and ``near_miss_samples`` of the policy's replies with their
    answer swapped ("near_miss", :func:`near_miss_responses`). ``explore=False`` leaves the last three out
    (held-out pairs)."""
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
    off_k = int(ctx.option("off_prompt_samples", 0)) if explore else 0
    near_k = int(ctx.option("near_miss_samples", 0)) if explore else 0
    neighbours = _nearest_prompts(prompts, samples) if off_k or near_k else None  # both read it: made once
    if off_k:
        extras.append(("off_prompt", off_prompt_responses(prompts, samples, off_k, random.Random(seed + 13),
                                                          neighbours)))
    if near_k:
        extras.append(("near_miss", near_miss_responses(prompts, samples, near_k, random.Random(seed + 17),
                                                        neighbours=neighbours)))
    for source, extra in extras:
        for row, more in zip(rows, extra):
            row["responses"] = row["responses"] + more
            row["sources"] = row["sources"] + [source] * len(more)
    return rows


def off_prompt_responses(prompts: list[str], samples: list[list[str]], k: int, rng: random.Random,
                         neighbours: tuple[dict, dict] | None = None) -> list[list[str]]:
    """For each prompt, ``k`` of the policy's replies to the most similar *other* prompt (words in order,
    difflib's ratio; ties drawn at random): "One plus one is two." beside the replies to "What is one plus
    two?" (a word set would pick "What is two plus one?", whose answer is the same).

    A reward model that has only seen replies to their own prompt can learn that a reply is good in itself
    (a sum that adds up) without checking that it answers the question asked; replies borrowed from a close
    prompt are the counter-examples (RRM, Liu et al. 2024, "RRM: Robust Reward Model Training Mitigates
    Reward Hacking", augments with other prompts' responses for the same reason). The annotators rank them
    with the rest, so a borrowed reply that does answer this prompt too is not marked down. ``neighbours``:
    :func:`_nearest_prompts` of the same prompts and samples, when the caller has it.
    """
    replies, nearest = neighbours or _nearest_prompts(prompts, samples)
    out = []
    for p in prompts:
        pool = replies[rng.choice(nearest[p])] if nearest[p] else []
        out.append(rng.sample(pool, min(k, len(pool))))
    return out


def near_miss_responses(prompts: list[str], samples: list[list[str]], k: int, rng: random.Random,
                        max_words: int = 2, neighbours: tuple[dict, dict] | None = None) -> list[list[str]]:
    """For each prompt, up to ``k`` of its own replies with one short span (at most ``max_words`` words)
    swapped for the aligned span of a reply to the most similar other prompt, where the span swapped out
    repeats no word of the prompt: the reply still restates the question but answers it wrong. For "What is
    one plus six?", "One plus six is seven." and "One plus two is three." give "One plus six is three." (not
    "One plus two is seven.": replies to the wrong question are what ``off_prompt_samples`` adds); for "What
    is the capital of Avon?", "The capital of Avon is Bree." and "The capital of Dale is Esk." give "... of
    Avon is Esk." (see :func:`span_swaps`).

    Minimal edits that make a reply wrong (counterfactual pairs, Kaushik et al. 2020, "Learning the
    Difference that Makes a Difference with Counterfactually-Augmented Data"): ranked beside the reply they
    came from, they show a reward model that the answer must fit the question, where the policy's own samples
    rarely get a sum or a capital wrong and RL's exploration then finds the wrong sums the reward model never
    saw. The text only is used, no knowledge of the world: the annotators rank the edits with the rest, so
    an edit that is still right (two prompts with one answer) is not marked down. Fewer than ``k`` where a
    prompt's replies and its neighbour's differ in no short span. ``neighbours``: as
    :func:`off_prompt_responses` takes it."""
    replies, nearest = neighbours or _nearest_prompts(prompts, samples)
    out = []
    for p, mine in zip(prompts, samples):
        own = [r for r in mine if r.strip()]
        asked = frozenset(_words(p))
        edits = {e for q in nearest[p] for a in own for b in set(replies[q]) for e in _swaps(a, b, max_words, asked)}
        candidates = sorted(edits - set(own))
        out.append(rng.sample(candidates, min(k, len(candidates))))
    return out


def span_swaps(reply: str, other: str, max_words: int = 2) -> list[str]:
    """``reply`` with one of the spans where it differs from ``other`` (difflib's word alignment: a
    "replace" of at most ``max_words`` words on each side) taken from ``other``; words are rejoined with
    single spaces.

    Naive equivalent for two replies of the same shape: ``[" ".join(a[:i] + [b[i]] + a[i + 1:]) for i in
    range(len(a)) if a[i] != b[i]]`` with ``a, b = reply.split(), other.split()``; the alignment also
    handles replies of different lengths (a closing one has and the other lacks)."""
    return list(_swaps(reply, other, max_words, frozenset()))


@functools.lru_cache(maxsize=65536)
def _swaps(reply: str, other: str, max_words: int, keep: frozenset[str]) -> tuple[str, ...]:
    """:func:`span_swaps`, remembered (the same replies meet again and again across rounds and prompts),
    leaving alone the spans that hold a word of ``keep`` (lower case, as :func:`_words` splits)."""
    a, b = reply.split(), other.split()
    swaps = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "replace" and i2 - i1 <= max_words and j2 - j1 <= max_words and \
                not keep & set(_words(" ".join(a[i1:i2]))):
            swaps.append(" ".join(a[:i1] + b[j1:j2] + a[i2:]))
    return tuple(swaps)


def _words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped: how prompts are compared, and a span checked against its prompt."""
    return re.findall(r"[a-z0-9']+", text.lower())


def _nearest_prompts(prompts: list[str], samples: list[list[str]]) -> tuple[dict[str, list[str]],
                                                                            dict[str, list[str]]]:
    """(each prompt's non-empty replies over all its rows, each prompt's most similar other prompts): words
    in order, difflib's ratio, every prompt tied for the best; only prompts with a reply count."""
    replies: dict[str, list[str]] = {}
    for p, s in zip(prompts, samples):
        replies.setdefault(p, []).extend(r for r in s if r.strip())
    words = {p: _words(p) for p in replies}
    nearest: dict[str, list[str]] = {}
    for p, mine in words.items():
        scored = [(SequenceMatcher(None, mine, w, autojunk=False).ratio(), q)
                  for q, w in words.items() if q != p and replies[q]]
        best = max((x for x, _ in scored), default=None)
        nearest[p] = [q for x, q in scored if x == best]
    return replies, nearest
