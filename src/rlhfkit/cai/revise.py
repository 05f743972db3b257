"""Constitutional AI: response -> critique against a sampled principle -> revision, N rounds, by one policy.

For each prompt (a red-team prompt, say), with ``P`` a principle drawn at random (seeded per prompt and
round, so the choice does not depend on batching):

    initial  = policy([user: prompt])
    critique = policy([user: prompt, assistant: current, user: P.critique])
    revision = policy([user: prompt, assistant: current, user: P.critique, assistant: critique,
                       user: P.revision])
    current  = revision          (repeated for each round)

Outputs in ``out_dir``: ``sft.jsonl`` (prompt -> final revision; ``rlhfkit sft``), ``pairs.jsonl``
(chosen = final revision, rejected = initial response; ``rlhfkit rm`` / ``rlhfkit dpo``), ``trace.jsonl``
(every step and principle) and, with a judge (RL-CAI), ``pairs_ai.jsonl``: the initial and final responses
labelled by the AI judge against the constitution's principles (via ``rlhfkit.judges.label_rows``, so the
labelling is resumable and reports position bias). A revision that comes out empty keeps the response it
revises (counted); prompts whose final response equals the initial one give no pair (counted).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..data.jsonl import read_jsonl, write_jsonl
from ..errors import ConfigError
from ..judges.constitution import Constitution, Principle

logger = logging.getLogger("rlhfkit")

__all__ = ["ChatPolicy", "FunctionPolicy", "HFChatPolicy", "critique_conversation", "revision_conversation",
           "run_cai"]

Messages = list[dict[str, str]]


class ChatPolicy(Protocol):
    def generate(self, conversations: Sequence[Messages]) -> list[str]:
        """One assistant reply per conversation (each ends with a user turn)."""
        ...


class FunctionPolicy:
    """A Python function ``fn(messages) -> str`` as the policy (tests, API-backed models)."""

    def __init__(self, fn: Callable[[Messages], str]):
        self.fn = fn

    def generate(self, conversations: Sequence[Messages]) -> list[str]:
        return [str(self.fn([dict(m) for m in c])) for c in conversations]


class HFChatPolicy:
    """A local causal LM rendered through its chat template, sampled in batches with a KV cache
    (:class:`rlhfkit.rollout.texts.TextSampler`); one generator, seeded once, across calls."""

    def __init__(self, model_path: str, temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 128,
                 max_prompt_length: int = 512, batch_size: int = 16, seed: int = 0, device: str = "cpu"):
        import torch

        from ..rollout.generate import SamplingConfig
        from ..rollout.texts import TextSampler

        self.sampler = TextSampler(model_path, SamplingConfig(temperature=temperature, top_p=top_p,
                                                              max_new_tokens=max_new_tokens),
                                   max_prompt_length=max_prompt_length, batch_size=batch_size, device=device,
                                   need_chat_template=True)
        self.generator = torch.Generator().manual_seed(seed)

    def generate(self, conversations: Sequence[Messages]) -> list[str]:
        return [r[0] for r in self.sampler.sample(list(conversations), 1, self.generator)]


def critique_conversation(base: Messages, response: str, principle: Principle) -> Messages:
    """The conversation the policy critiques from: ``base`` (the prompt), its response, the critique request.

    Shared with the data that teaches a model the format (``rlhfkit.world.data.cai_teaching``), so that
    teaching and the CAI run render byte for byte the same conversations."""
    return [*base, {"role": "assistant", "content": response}, {"role": "user", "content": principle.critique}]


def revision_conversation(critique_conv: Messages, critique: str, principle: Principle) -> Messages:
    """The conversation the policy revises from: the critique conversation, its critique, the revision request."""
    return [*critique_conv, {"role": "assistant", "content": critique},
            {"role": "user", "content": principle.revision}]


def _user_text(prompt: Any) -> Messages:
    if isinstance(prompt, list):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    return [{"role": "user", "content": str(prompt)}]


def run_cai(prompts: Sequence[Any], policy: ChatPolicy, constitution: Constitution, out_dir: str | Path, *,
            rounds: int = 1, seed: int = 0, chat_format: bool = True, judge: Any = None, judge_workers: int = 1,
            restart: bool = False) -> dict[str, Any]:
    """Run the critique -> revision loop over ``prompts`` (strings or chat messages) and write the files."""
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, not {rounds}")
    if not prompts:
        raise ConfigError("no prompts to revise")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = [_user_text(p) for p in prompts]
    initial = policy.generate(bases)
    current = list(initial)
    traces: list[list[dict[str, Any]]] = [[] for _ in prompts]
    empty_revisions = 0
    for r in range(rounds):
        chosen = [random.Random(f"{seed}:{i}:{r}").choice(constitution.principles) for i in range(len(prompts))]
        critique_convs = [critique_conversation(base, cur, p) for base, cur, p in zip(bases, current, chosen)]
        critiques = policy.generate(critique_convs)
        revision_convs = [revision_conversation(conv, crit, p)
                          for conv, crit, p in zip(critique_convs, critiques, chosen)]
        revisions = policy.generate(revision_convs)
        for i, (p, crit, rev) in enumerate(zip(chosen, critiques, revisions)):
            if not rev.strip():
                empty_revisions += 1
                rev = current[i]
            traces[i].append({"round": r + 1, "principle": p.name, "response": current[i], "critique": crit,
                              "revision": rev})
            current[i] = rev

    def prompt_field(base: Messages) -> Any:
        return base if chat_format else base[-1]["content"]

    def reply_field(text: str) -> Any:
        return [{"role": "assistant", "content": text}] if chat_format else text

    sft = [{"prompt": prompt_field(b), "completion": reply_field(c)} for b, c in zip(bases, current)]
    pairs = [{"prompt": prompt_field(b), "chosen": reply_field(c), "rejected": reply_field(i0)}
             for b, c, i0 in zip(bases, current, initial) if c.strip() != i0.strip()]
    trace = [{"prompt": prompt_field(b), "initial": i0, "final": c, "steps": t}
             for b, i0, c, t in zip(bases, initial, current, traces)]
    paths = {"sft": out / "sft.jsonl", "pairs": out / "pairs.jsonl", "trace": out / "trace.jsonl"}
    write_jsonl(paths["sft"], sft)
    write_jsonl(paths["pairs"], pairs)
    write_jsonl(paths["trace"], trace)
    summary: dict[str, Any] = {
        "prompts": len(prompts), "rounds": rounds, "constitution": constitution.name,
        "principle_uses": {p.name: sum(s["principle"] == p.name for t in traces for s in t)
                           for p in constitution.principles},
        "empty_revisions": empty_revisions, "unchanged": len(prompts) - len(pairs), "pairs": len(pairs),
        **{f"{k}_file": str(v) for k, v in paths.items()},
    }
    if judge is not None:
        from ..judges.judge_pairs import label_rows

        candidates = [{"prompt": prompt_field(b), "response_a": reply_field(i0), "response_b": reply_field(c)}
                      for b, i0, c in zip(bases, initial, current) if c.strip() != i0.strip()]
        if candidates:
            ai_out = out / "pairs_ai.jsonl"
            labels = label_rows(candidates, judge, ai_out, source=str(paths["pairs"]), workers=judge_workers,
                                restart=restart, restart_if_changed=True)
            summary["judge"] = {k: labels[k] for k in ("judge", "labelled", "ties", "unlabelled", "inconsistent",
                                                       "position_biased") if k in labels}
            finals = {json.dumps([c["prompt"], c["response_b"]]) for c in candidates}
            labelled = read_jsonl(ai_out)
            wins = sum(json.dumps([r["prompt"], r["chosen"]]) in finals for r in labelled)
            summary["judge"]["revision_preferred"] = wins / len(candidates)
            summary["pairs_ai_file"] = str(ai_out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
