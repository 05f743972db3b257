"""``prepare_sft``: SFT rows (text, prompt/completion, chat messages) -> token ids with a loss mask.

Follows the tokenisation conventions of :mod:`rlhfkit.data.tokenize` (prompt and response tokenised
separately, every response ends with EOS, position 0 never trained on); chat conversations are cut into
context and assistant turns so that only the assistant's tokens carry the completion loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets

from ..errors import DataError
from .formats import SFT_FORMATS, DataFormat, detect_format
from .loading import dataset_source, row_number
from .tokenize import (
    EMPTY_RESPONSE,
    EMPTY_TEXT,
    NO_ASSISTANT,
    PrepareReport,
    _check_max_length,
    _clean_messages,
    _Encoder,
    _finish,
    _heads,
    _is_empty,
    _prompt_and_completion,
    _require,
    _truncate,
)

__all__ = ["prepare_sft"]


def prepare_sft(
    ds: datasets.Dataset,
    tokenizer: Any,
    max_length: int,
    completion_only_loss: bool = True,
    source: str = "",
    prompt_format: str = "auto",
) -> tuple[list[dict[str, list[int]]], PrepareReport]:
    """Tokenise SFT rows into ``{"input_ids", "loss_mask"}`` records.

    * prompt/completion: loss on the completion tokens (incl. EOS); either side may be chat messages.
      Under ``prompt_format`` chat (auto: the tokenizer has its own template) string rows become a user
      turn and its assistant turn; under raw they stay text.
    * messages: loss on every assistant turn (through its EOS); system/user turns and the assistant
      headers get mask 0. Rendered prefix by prefix, each chunk tokenised separately.
    * text: loss on every token but the first (EOS appended).

    ``completion_only_loss=False`` puts the loss on every token except position 0. Rows longer than
    ``max_length`` are truncated (prompt end, completion start kept) and counted.
    """
    _check_max_length(max_length)
    source = source or dataset_source(ds)
    fmt = detect_format(ds.column_names, allowed=SFT_FORMATS, source=source)
    enc = _Encoder(tokenizer, source, prompt_format)
    report = PrepareReport(max_length=max_length, source=source)
    records: list[dict[str, list[int]]] = []
    for index, row in enumerate(ds):
        rownum = row_number(row, index)
        report.total_rows += 1
        if fmt is DataFormat.SFT_TEXT:
            text = _require(row, "text", source, rownum)
            if not isinstance(text, str):
                raise DataError(f"expected a string, got {type(text).__name__}", source=source, row=rownum,
                                field="text")
            if not text.strip():
                report.skip(EMPTY_TEXT, rownum)
                continue
            prompt_ids: list[int] = []
            heads: tuple[int, ...] = ()
            resp_ids = enc.prompt_text_ids(text) + [enc.eos]
            resp_mask = [1] * len(resp_ids)
        elif fmt is DataFormat.SFT_MESSAGES:
            parts = _sft_message_parts(enc, row, source, rownum, report, completion_only_loss)
            if parts is None:
                continue
            prompt_ids, resp_ids, resp_mask = parts
            messages = _clean_messages(row["messages"], source, rownum, "messages")
            heads = _heads(enc, prompt_ids, messages, rownum)
        else:
            parts = _prompt_and_completion(enc, row, source, rownum, report)
            if parts is None:
                continue
            prompt_ids, heads, resp_ids = parts
            resp_mask = [1] * len(resp_ids)
        # Text rows have no prompt: right-truncate the whole sequence (keep its start).
        if fmt is DataFormat.SFT_TEXT:
            was = len(resp_ids)
            resp_ids, resp_mask = resp_ids[:max_length], resp_mask[:max_length]
            truncated = len(resp_ids) < was
        else:
            prompt_ids, (resp_ids,), truncated = _truncate(prompt_ids, [resp_ids], max_length, None, False,
                                                           heads)
            resp_mask = resp_mask[: len(resp_ids)]
        report.truncated += int(truncated)
        input_ids = prompt_ids + resp_ids
        if completion_only_loss:
            mask = [0] * len(prompt_ids) + resp_mask
        else:
            mask = [1] * len(input_ids)
        mask[0] = 0  # nothing predicts the first token
        records.append({"input_ids": input_ids, "loss_mask": mask})
    _finish(report, records, source)
    return records, report


def _sft_message_parts(enc: _Encoder, row: Mapping[str, Any], source: str, rownum: int, report: PrepareReport,
                       completion_only_loss: bool) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt ids, rest ids, rest mask) of a conversation; the rest starts at the first assistant turn."""
    raw = _require(row, "messages", source, rownum)
    if not isinstance(raw, list):
        raise DataError(f"expected a list of chat messages, got {type(raw).__name__}", source=source,
                        row=rownum, field="messages")
    messages = _clean_messages(raw, source, rownum, "messages", report)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns and completion_only_loss:
        report.skip(NO_ASSISTANT, rownum)
        return None
    if assistant_turns and _is_empty([messages[i] for i in assistant_turns]):
        report.skip(EMPTY_RESPONSE, rownum)
        return None
    # Chunks alternate: context (mask 0) up to and including each assistant header, then the assistant
    # turn itself (mask 1). render(messages[:i], add_generation_prompt=True) ends with the header.
    keep_trailing = bool(assistant_turns) and messages[-1]["role"] != "assistant" and not completion_only_loss
    chunks: list[tuple[list[int], bool]] = []
    done = ""  # text rendered so far
    for k, i in enumerate(assistant_turns):
        before = enc.render(messages[:i], True, rownum)
        if not before.startswith(done):
            raise DataError("chat template is not prefix-stable", source=source, row=rownum, field="messages")
        chunks.append((enc.ids(before[len(done):]), False))
        turn = enc.chat_suffix(before, messages[: i + 1], rownum, "messages")
        done = before + turn
        ids = enc.ids(turn)
        last = k == len(assistant_turns) - 1
        if enc.eos in ids:
            # Loss through the turn's EOS; the template's separator after it is context.
            cut = len(enc.end_with_eos(ids))
            body, after = ids[:cut], ids[cut:]
        else:
            # The final answer must teach the model to stop, even if the template emits no EOS.
            body, after = (ids + [enc.eos] if last else ids), []
        chunks.append((body, True))
        if after and (not last or keep_trailing):
            chunks.append((after, False))
    tail = enc.render(messages, False, rownum)
    if not tail.startswith(done):
        raise DataError("chat template is not prefix-stable", source=source, row=rownum, field="messages")
    if keep_trailing or not assistant_turns:
        # Turns after the last answer carry no completion loss; keep them only when training on every token.
        chunks.append((enc.ids(tail[len(done):]), False))
    prompt_ids: list[int] = []
    rest: list[int] = []
    mask: list[int] = []
    seen_assistant = False
    for ids, is_assistant in chunks:
        seen_assistant = seen_assistant or is_assistant
        if not seen_assistant:
            prompt_ids += ids
        else:
            rest += ids
            mask += [int(is_assistant)] * len(ids)
    if not rest:  # conversation without assistant turns (only kept when training on every token)
        rest, mask, prompt_ids = prompt_ids[1:], [0] * (len(prompt_ids) - 1), prompt_ids[:1]
        if not rest:
            report.skip(EMPTY_TEXT, rownum)
            return None
    return prompt_ids, rest, mask
