"""``prepare_kto`` and ``mismatched_completions``: rows -> KTO records ``{"prompt_ids", "completion_ids",
"desirable"}``, and the mismatched completion each record's KL estimate reads beside its own.

* prompt/completion/label (TRL's unpaired layout): ``label`` true = desirable, false = undesirable; prompt
  and completion are strings or chat-message lists, as in SFT's prompt/completion rows.
* preference pairs (prompt/chosen/rejected, chosen/rejected): each pair -> a desirable row (chosen) and an
  undesirable row (rejected), tokenised exactly as DPO tokenises them (:func:`prepare_preferences`).
* ranked rows (prompt/responses[/ranks]): the best-ranked responses are desirable, the worst-ranked
  undesirable; those in between carry no binary label and are left out.
"""

from __future__ import annotations

from typing import Any

import datasets

from ..errors import DataError
from .formats import KTO_FORMATS, DataFormat, detect_format
from .loading import dataset_source, row_number
from .preferences import prepare_preferences
from .tokenize import (
    PrepareReport,
    _check_max_length,
    _Encoder,
    _finish,
    _prompt_and_completion,
    _require,
    _truncate,
)

__all__ = ["count_labels", "mismatched_completions", "prepare_kto"]

_SEARCH_LIMIT = 1000  # how far back mismatched_completions looks for a row with another prompt


def prepare_kto(
    ds: datasets.Dataset,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None = None,
    source: str = "",
    prompt_format: str = "auto",
) -> tuple[list[dict[str, Any]], PrepareReport]:
    """Tokenise KTO rows into ``{"prompt_ids", "completion_ids", "desirable"}`` records (see the module doc).

    Tokenisation follows :mod:`rlhfkit.data.tokenize` (prompt and completion tokenised separately, every
    completion ends with EOS). A ``label`` that is not true/false is a DataError naming file, row and field.
    Rows with an empty completion are skipped and counted.
    """
    _check_max_length(max_length)
    source = source or dataset_source(ds)
    fmt = detect_format(ds.column_names, allowed=KTO_FORMATS, source=source)
    if fmt is not DataFormat.UNPAIRED:
        groups, report = prepare_preferences(ds, tokenizer, max_length=max_length,
                                             max_prompt_length=max_prompt_length, source=source,
                                             prompt_format=prompt_format)
        return _split_groups(groups), report
    enc = _Encoder(tokenizer, source, prompt_format)
    report = PrepareReport(max_length=max_length, source=source)
    records: list[dict[str, Any]] = []
    for index, row in enumerate(ds):
        rownum = row_number(row, index)
        report.total_rows += 1
        label = _require(row, "label", source, rownum)
        if not isinstance(label, bool):
            raise DataError(f"expected true or false (true = desirable), got {label!r}", source=source,
                            row=rownum, field="label")
        parts = _prompt_and_completion(enc, row, source, rownum, report)
        if parts is None:
            continue
        prompt_ids, heads, completion_ids = parts
        prompt_ids, (completion_ids,), truncated = _truncate(
            prompt_ids, [completion_ids], max_length, max_prompt_length, max_prompt_length is not None, heads)
        report.truncated += int(truncated)
        records.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "desirable": label})
    _finish(report, records, source)
    return records, report


def _split_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference groups -> KTO records: best rank desirable, worst rank undesirable (a pair: one of each)."""
    records = []
    for group in groups:
        best, worst = min(group["ranks"]), max(group["ranks"])
        for response, rank in zip(group["responses"], group["ranks"]):
            if rank in (best, worst):
                records.append({"prompt_ids": list(group["prompt_ids"]), "completion_ids": list(response),
                                "desirable": rank == best})
    return records


def count_labels(records: list[dict[str, Any]]) -> tuple[int, int]:
    """(desirable, undesirable) record counts."""
    desirable = sum(1 for r in records if r["desirable"])
    return desirable, len(records) - desirable


def mismatched_completions(records: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Records ``{"prompt_ids", "responses": [completion, mismatched completion], "desirable"}``: every record
    gets the completion of another one, which the KL estimate z0 scores after this record's prompt. (Two
    responses under one prompt: the layout DPO's batching and reference precomputation read.)

    Completions are shifted by one, as TRL's ``_get_kl_dataset`` does: record i gets the completion of the
    nearest earlier record (cyclically) whose prompt differs, so that the pair (x_i, y_j) is mismatched even
    where a split preference pair put two rows with one prompt side by side. (With one prompt in the whole
    set there is no mismatched pair; the previous row's completion is used.) The pairs are fixed here, not
    per batch, so that their reference log-probs can be computed once. A borrowed completion is cut to fit
    ``max_length`` after this record's prompt.
    """
    n = len(records)
    out = []
    for i, rec in enumerate(records):
        source = records[(i - 1) % n]
        for step in range(1, min(n, _SEARCH_LIMIT)):  # bounded: a one-prompt set would cost n² otherwise
            other = records[(i - step) % n]
            if other["prompt_ids"] != rec["prompt_ids"]:
                source = other
                break
        room = max(max_length - len(rec["prompt_ids"]), 1)
        out.append({"prompt_ids": rec["prompt_ids"], "desirable": rec["desirable"],
                    "responses": [rec["completion_ids"], list(source["completion_ids"])[:room]]})
    return out
