"""``prepare_preferences`` and ``expand_to_pairs``: preference rows -> groups of ranked responses.

Pairs (prompt/chosen/rejected, or chosen/rejected with the prompt split off) and ranked rows
(prompt/responses, optional ranks) become groups ``{"prompt_ids", "responses", "ranks", "margin"}`` under
the tokenisation conventions of :mod:`rlhfkit.data.tokenize`; ``expand_to_pairs`` turns a group into
every ordered pair it implies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import datasets

from ..errors import DataError
from .formats import PREFERENCE_FORMATS, DataFormat, detect_format, split_implicit_prompt
from .loading import dataset_source, row_number
from .tokenize import (
    EMPTY_RESPONSE,
    NO_PREFERENCE,
    SAME_RESPONSES,
    TOO_FEW_RESPONSES,
    PrepareReport,
    _check_max_length,
    _encode_prompt,
    _encode_response,
    _Encoder,
    _ensure_not_empty_prompt,
    _finish,
    _is_empty,
    _require,
    _same,
    _split_conversations,
    _text_or_messages,
    _truncate,
)

__all__ = ["expand_to_pairs", "prepare_preferences"]


def _numbers(value: Any, n: int, name: str, source: str, rownum: int) -> list[float]:
    if not isinstance(value, list) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        raise DataError(f"expected a list of {n} numbers (one per response), got {got}", source=source,
                        row=rownum, field=name)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"expected finite numbers, got {v!r}", source=source, row=rownum, field=name)
        out.append(float(v))
    return out


def _dense_ranks(values: list[float]) -> list[int]:
    """Dense ranks, 0 = best (lowest value); equal values share a rank (a tie)."""
    order = {v: i for i, v in enumerate(sorted(set(values)))}
    return [order[v] for v in values]


def prepare_preferences(
    ds: datasets.Dataset,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None = None,
    source: str = "",
    prompt_format: str = "auto",
    keep_template_tail: bool = False,
) -> tuple[list[dict[str, Any]], PrepareReport]:
    """Tokenise preference rows into groups ``{"prompt_ids", "responses", "ranks", "margin"}``.

    * prompt/chosen/rejected and chosen/rejected (prompt split off, see :func:`split_implicit_prompt`):
      ``responses = [chosen, rejected]``, ``ranks = [0, 1]``.
    * prompt/responses (best first): ``ranks = [0, 1, ..., K-1]``; with a ``ranks`` column those ranks
      (lower = better, equal = tie), stored as dense ranks (0 = best).
    * ``margin`` column: a float (0.0 when absent or null).

    Chosen/rejected may be strings or chat-message lists, in TRL's conversational layout (prompt = the
    history, responses = assistant messages) or UltraFeedback's (responses = whole conversations).
    String prompt/responses become a user turn and assistant turns under ``prompt_format`` chat (auto:
    when the tokenizer has its own chat template); chosen/rejected strings that hold their prompt
    (HH-RLHF) stay text, since they carry their own turn markers.
    Every response ends with EOS; ``keep_template_tail`` (reward models) adds the text the tokenizer's own
    chat template writes after it (:func:`~rlhfkit.data.tokenize.template_tail_ids`), so that chat rows
    equal ``apply_chat_template``'s rendering and every row ends as ``ModelReward`` scores it.
    Rows with an empty response, identical chosen/rejected, fewer than two
    responses or only ties are skipped and counted.
    """
    _check_max_length(max_length)
    source = source or dataset_source(ds)
    fmt = detect_format(ds.column_names, allowed=PREFERENCE_FORMATS, source=source)
    enc = _Encoder(tokenizer, source, prompt_format, keep_template_tail)
    report = PrepareReport(max_length=max_length, source=source)
    has_margin = "margin" in ds.column_names
    has_ranks = "ranks" in ds.column_names
    records: list[dict[str, Any]] = []
    for index, row in enumerate(ds):
        rownum = row_number(row, index)
        report.total_rows += 1
        if fmt is DataFormat.RANKED:
            prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt", report)
            raw = _require(row, "responses", source, rownum)
            if not isinstance(raw, list) or any(isinstance(r, Mapping) for r in raw):
                raise DataError("expected a list of responses (strings or chat-message lists)", source=source,
                                row=rownum, field="responses")
            responses = [_text_or_messages(r, source, rownum, "responses", report) for r in raw]
            names = ["responses"] * len(responses)
            if has_ranks and row.get("ranks") is not None:
                ranks = _dense_ranks(_numbers(row["ranks"], len(responses), "ranks", source, rownum))
            else:
                ranks = list(range(len(responses)))
        else:
            chosen = _text_or_messages(row.get("chosen"), source, rownum, "chosen", report)
            rejected = _text_or_messages(row.get("rejected"), source, rownum, "rejected", report)
            if fmt is DataFormat.PREFERENCE_IMPLICIT:
                if isinstance(chosen, str) != isinstance(rejected, str):
                    raise DataError("chosen and rejected must both be strings or both be message lists",
                                    source=source, row=rownum, field="rejected")
                if _same(chosen, rejected):
                    report.skip(SAME_RESPONSES, rownum)
                    continue
                prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
            else:
                prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt", report)
            responses, names, ranks = [chosen, rejected], ["chosen", "rejected"], [0, 1]
        margin = 0.0
        if has_margin and row.get("margin") is not None:
            m = row["margin"]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise DataError(f"expected a number, got {m!r}", source=source, row=rownum, field="margin")
            margin = float(m)

        if len(responses) < 2:
            report.skip(TOO_FEW_RESPONSES, rownum)
            continue
        prompt, responses = _split_conversations(prompt, responses, names, source, rownum)
        if any(_is_empty(r) for r in responses):
            report.skip(EMPTY_RESPONSE, rownum)
            continue
        if fmt is not DataFormat.RANKED and _same(responses[0], responses[1]):
            report.skip(SAME_RESPONSES, rownum)
            continue
        if not any(ranks[i] < ranks[j] and not _same(responses[i], responses[j])
                   for i in range(len(ranks)) for j in range(len(ranks))):
            report.skip(NO_PREFERENCE, rownum)
            continue

        chat = isinstance(prompt, list) or any(isinstance(r, list) for r in responses) or (
            enc.chat_strings and fmt is not DataFormat.PREFERENCE_IMPLICIT)
        p = _encode_prompt(enc, prompt, chat, rownum)
        ids = [_encode_response(enc, p, r, rownum, n) for r, n in zip(responses, names)]
        prompt_ids, ids, truncated = _truncate(_ensure_not_empty_prompt(enc, p), ids, max_length,
                                               max_prompt_length, max_prompt_length is not None, p.heads)
        report.truncated += int(truncated)
        records.append({"prompt_ids": prompt_ids, "responses": ids, "ranks": ranks, "margin": margin})
    _finish(report, records, source)
    return records, report


def expand_to_pairs(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every group -> one pairwise group per ordered pair (i better than j): K distinct ranks give K(K-1)/2.

    Pairs keep the group's prompt_ids and margin and get ``ranks = [0, 1]``; ties and pairs of identical
    token sequences make no pair. Pairs are ordered by (i, j).
    """
    pairs: list[dict[str, Any]] = []
    for group in groups:
        responses, ranks = group["responses"], group["ranks"]
        for i in range(len(responses)):
            for j in range(len(responses)):
                if ranks[i] < ranks[j] and list(responses[i]) != list(responses[j]):
                    pairs.append({**group, "responses": [responses[i], responses[j]], "ranks": [0, 1]})
    return pairs
