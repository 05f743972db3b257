"""``prepare_prompts``: prompt rows -> token ids for generation (RL rollouts, evaluation, sampling).

String prompts are one user turn under the chat prompt format and text (with the tokenizer's special
tokens) under raw; chat prompts are rendered with the generation prompt, as in :mod:`rlhfkit.data.tokenize`.
Long prompts keep their end, their BOS and a leading system turn that fits.
"""

from __future__ import annotations

from typing import Any

import datasets

from .formats import PROMPT_FORMATS, detect_format
from .loading import dataset_source, row_number
from .tokenize import (
    EMPTY_PROMPT,
    PrepareReport,
    _encode_prompt,
    _Encoder,
    _finish,
    _keep_end,
    _text_or_messages,
)

__all__ = ["prepare_prompts"]


def prepare_prompts(
    ds: datasets.Dataset,
    tokenizer: Any,
    max_prompt_length: int,
    source: str = "",
    prompt_format: str = "auto",
) -> tuple[list[dict[str, Any]], PrepareReport]:
    """Tokenise prompts for generation: records ``{"prompt", "prompt_ids", "raw_prompt", "columns"}``.

    ``prompt`` is the text the policy sees (chat-rendered), ``prompt_ids`` its token ids, ``raw_prompt``
    the row's prompt as the user wrote it (a string or a list of messages) and ``columns`` every other
    column of the row (``{"answer": ...}``; hidden ``__`` columns left out), for reward functions.

    Chat-message prompts, and string prompts under ``prompt_format`` chat (auto: when the tokenizer has its
    own chat template), are rendered as a user turn with ``add_generation_prompt=True``; raw string
    prompts are tokenised as is (with BOS). Any dataset with a ``prompt`` column works (extra columns,
    e.g. chosen/rejected, are ignored). Long prompts keep their end (and BOS / a system turn, see
    :mod:`.tokenize`); ``prompt`` is then the decoded kept part.
    """
    if int(max_prompt_length) < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    source = source or dataset_source(ds)
    detect_format(ds.column_names, allowed=PROMPT_FORMATS, source=source)
    enc = _Encoder(tokenizer, source, prompt_format)
    report = PrepareReport(max_length=max_prompt_length, source=source)
    records: list[dict[str, Any]] = []
    for index, row in enumerate(ds):
        rownum = row_number(row, index)
        report.total_rows += 1
        prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt", report)
        if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            report.skip(EMPTY_PROMPT, rownum)
            continue
        p = _encode_prompt(enc, prompt, isinstance(prompt, list) or enc.chat_strings, rownum)
        text, ids = p.text, p.ids
        if len(ids) > max_prompt_length:
            ids = _keep_end(ids, max_prompt_length, p.heads)
            text = tokenizer.decode(ids, skip_special_tokens=False)
            report.truncated += 1
        columns = {k: v for k, v in row.items() if k != "prompt" and not k.startswith("__")}
        records.append({"prompt": text, "prompt_ids": ids, "raw_prompt": prompt, "columns": columns})
    _finish(report, records, source)
    return records, report
