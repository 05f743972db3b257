"""Constitutional AI (``rlhfkit cai``): critique -> revision against a constitution, SFT data and pairs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..judges.constitution import Constitution, Principle, load_constitution, principles_text
from .revise import (
    ChatPolicy,
    FunctionPolicy,
    HFChatPolicy,
    critique_conversation,
    revision_conversation,
    run_cai,
)

__all__ = ["ChatPolicy", "Constitution", "FunctionPolicy", "HFChatPolicy", "Principle", "critique_conversation",
           "load_constitution", "load_prompts", "main", "principles_text", "revision_conversation", "run_cai"]


def load_prompts(source: str, category: str | None = None, limit: int = 0) -> list[Any]:
    """The ``prompt`` column of a file/dataset (rows of ``category`` only, when given; the first ``limit``)."""
    from ..data import load_rows, row_number
    from ..errors import DataError

    ds = load_rows(source)
    if "prompt" not in ds.column_names:
        raise DataError(f"no 'prompt' column (columns: {', '.join(ds.column_names)})", source=source,
                        field="prompt")
    if category and "category" not in ds.column_names:
        raise DataError("--category given but there is no 'category' column", source=source, field="category")
    prompts = []
    for i, row in enumerate(ds):
        if category and row.get("category") != category:
            continue
        if not row.get("prompt"):
            raise DataError("empty prompt", source=source, row=row_number(row, i), field="prompt")
        prompts.append(row["prompt"])
    return prompts[: limit or None]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="rlhfkit cai", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Constitutional AI: each prompt's response is critiqued against a "
                                            "sampled principle and revised, N rounds; writes sft.jsonl (prompt -> "
                                            "final revision), pairs.jsonl (revision > initial) and, with --judge, "
                                            "pairs_ai.jsonl labelled by an AI judge against the principles.")
    p.add_argument("--policy", required=True, help="causal LM (folder or hub id) with a chat template")
    p.add_argument("--prompts", required=True, help="file/dataset with a prompt column (e.g. red-team prompts)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--constitution", help="constitution YAML (default: the one shipped with rlhfkit)")
    p.add_argument("--rounds", type=int, default=1, help="critique -> revision rounds")
    p.add_argument("--category", help="only rows whose 'category' column has this value (e.g. harmful)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="principle sampling and generation seed")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--format", choices=("chat", "text"), default="chat",
                   help="chat: prompt/completion/chosen/rejected as chat messages; text: plain strings")
    p.add_argument("--judge", help="RL-CAI: a judge spec (see rlhfkit judge --help) labelling initial vs final "
                                   "responses against the constitution's principles")
    p.add_argument("--judge-template", help="judge template file or name (pairwise, pairwise_cot)")
    p.add_argument("--judge-workers", type=int, default=1)
    p.add_argument("--base-url", help="OpenAI-compatible judge base URL")
    p.add_argument("--rate", type=float, default=0.0, help="HTTP judge requests/s (0 = unlimited)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--restart", action="store_true", help="relabel pairs_ai.jsonl from scratch")
    a = p.parse_args(argv)
    constitution = load_constitution(a.constitution)
    prompts = load_prompts(a.prompts, a.category, a.limit)
    judge = None
    if a.judge:
        from ..judges import build_judge

        judge = build_judge(a.judge, template=a.judge_template, principles=constitution.as_text(),
                            base_url=a.base_url, rate=a.rate, device=a.device)
    policy = HFChatPolicy(a.policy, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                          max_prompt_length=a.max_prompt_length, batch_size=a.batch_size, seed=a.seed,
                          device=a.device)
    summary = run_cai(prompts, policy, constitution, a.out, rounds=a.rounds, seed=a.seed,
                      chat_format=a.format == "chat", judge=judge, judge_workers=a.judge_workers,
                      restart=a.restart)
    print(json.dumps(summary, indent=2))
    return 0
