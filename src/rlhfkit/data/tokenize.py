"""Turn rows into token ids with exact prompt/response boundaries.

Conventions (shared by SFT, reward modelling, DPO and RL):

* Prompt and response are tokenised separately and concatenated; a merged string is never re-tokenised,
  so the boundary (and therefore the loss mask) is exact even where BPE would merge across it.
* String prompt: ``tokenizer(prompt).input_ids`` (with the tokenizer's special tokens, e.g. BOS).
  String response: ``tokenizer(response, add_special_tokens=False).input_ids + [eos]``.
* Chat messages: the prompt is rendered with ``add_generation_prompt=True``; the response chunk is the
  text the chat template adds for the response messages (full rendering minus the prompt rendering). Both
  are tokenised with ``add_special_tokens=False`` (the template supplies BOS). The response ids stop at the
  template's last EOS (text after it, usually a newline, carries no signal); EOS is appended when the
  template emits none.
* Truncation keeps the END of the prompt and the START of the response; at least one response token
  always survives.
* Position 0 of every sequence has loss mask 0: nothing predicts the first token, and packing relies on
  it (position 0 of a packed sequence is "predicted" by the previous sequence's last token).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..errors import DataError, ModelError
from ..models.tiny import DEFAULT_CHAT_TEMPLATE
from .formats import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    DataFormat,
    detect_format,
    split_implicit_prompt,
)
from .loading import dataset_source, row_number

__all__ = ["PrepareReport", "expand_to_pairs", "prepare_preferences", "prepare_prompts", "prepare_sft"]

_LOGGER = logging.getLogger("rlhfkit")

# Skip reasons (keys of PrepareReport.skipped).
EMPTY_RESPONSE = "empty response"
EMPTY_PROMPT = "empty prompt"
EMPTY_TEXT = "empty text"
SAME_RESPONSES = "chosen == rejected"
TOO_FEW_RESPONSES = "fewer than 2 responses"
NO_PREFERENCE = "no strict preference"
NO_ASSISTANT = "no assistant turn"


@dataclass
class PrepareReport:
    """What happened to the rows of one dataset: kept, truncated, skipped (by reason, with the first row)."""

    total_rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_row: dict[str, int] = field(default_factory=dict)
    max_length: int | None = None
    source: str = ""

    def skip(self, reason: str, row: int) -> None:
        """Count one skipped row (``row`` is the 1-based row / JSONL line number)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_row.setdefault(reason, row)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def _body(self) -> str:
        parts = [f"{self.kept}/{self.total_rows} rows kept"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{count} {reason} (first: row {self.first_row[reason]})"
                                                for reason, count in self.skipped.items()))
        if self.truncated:
            limit = f" to max_length {self.max_length}" if self.max_length is not None else ""
            parts.append(f"truncated {self.truncated}{limit}")
        return "; ".join(parts)

    def summary(self, source: str | None = None) -> str:
        """One line, e.g. ``train.jsonl: 98/100 rows kept; skipped 1 empty response (first: row 7); ...``."""
        name = source if source is not None else self.source
        return f"{name}: {self._body()}" if name else self._body()

    def log(self, logger: logging.Logger | None = None, source: str | None = None) -> None:
        """Log the summary: a warning when rows were skipped or truncated, info otherwise."""
        logger = logger or _LOGGER
        level = logging.WARNING if (self.skipped or self.truncated) else logging.INFO
        logger.log(level, "%s", self.summary(source))


# --------------------------------------------------------------------------------------------- helpers


def _check_max_length(max_length: int) -> None:
    if int(max_length) < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt and one response token), got {max_length}")


def _visible(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("__")}


def _require(row: Mapping[str, Any], name: str, source: str, rownum: int) -> Any:
    value = row.get(name)
    if value is None:
        raise DataError("missing", source=source, row=rownum, field=name)
    return value


def _clean_messages(value: list, source: str, rownum: int, name: str) -> list[dict[str, Any]]:
    """Validate a chat-message list; drop the None keys Arrow adds for keys other messages had."""
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise DataError(f"message {i + 1} is {type(msg).__name__}, expected an object with role and content",
                            source=source, row=rownum, field=name)
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str):
            raise DataError(f"message {i + 1} has no 'role'", source=source, row=rownum, field=name)
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"message {i + 1} 'content' is {type(content).__name__}, expected a string",
                            source=source, row=rownum, field=name)
        out.append({k: v for k, v in msg.items() if v is not None} | {"content": content or ""})
    return out


def _text_or_messages(value: Any, source: str, rownum: int, name: str) -> str | list[dict[str, Any]]:
    """A field that holds a string or a chat-message list (anything else is a DataError naming row+field)."""
    if value is None:
        raise DataError("missing", source=source, row=rownum, field=name)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            return []
        return _clean_messages(value, source, rownum, name)
    raise DataError(f"expected a string or a list of chat messages, got {type(value).__name__}",
                    source=source, row=rownum, field=name)


def _is_empty(value: str | list[dict[str, Any]]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    contents = [m.get("content") for m in value if m.get("role") == "assistant"] or [
        m.get("content") for m in value]
    return all(not (c.strip() if isinstance(c, str) else c) for c in contents)


def _same(a: str | list, b: str | list) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return [(m.get("role"), m.get("content")) for m in a] == [(m.get("role"), m.get("content")) for m in b]
    return a == b


class _Encoder:
    """Tokenisation helpers bound to one tokenizer (and the chat template to use with it)."""

    def __init__(self, tokenizer: Any, source: str):
        self.tok, self.source = tokenizer, source
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ModelError("the tokenizer has no eos_token: set one so that responses can end with EOS")
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
        self._warned = False

    def prompt_text_ids(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids) if text else []

    def response_text_ids(self, text: str) -> list[int]:
        return self.ids(text) + [self.eos]

    def end_with_eos(self, ids: list[int]) -> list[int]:
        """Cut after the last EOS the template emitted, or append one when it emitted none."""
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == self.eos:
                return ids[: i + 1]
        return ids + [self.eos]

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, rownum: int) -> str:
        if not messages:
            return ""  # transformers refuses empty conversations; an empty prompt renders as nothing
        if self.template is not None and not self._warned:
            self._warned = True
            _LOGGER.warning("%s: the tokenizer has no chat template; using rlhfkit's default template",
                            self.source)
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                chat_template=self.template)
        except Exception as exc:  # jinja errors (e.g. "roles must alternate") are data problems
            raise DataError(f"chat template failed: {' '.join(str(exc).split())}", source=self.source,
                            row=rownum) from None
        if not isinstance(text, str):
            raise DataError("chat template did not return text", source=self.source, row=rownum)
        return text

    def chat_suffix(self, prefix_text: str, messages: list[dict[str, Any]], rownum: int, name: str) -> str:
        """The text the template adds for ``messages`` after the already rendered ``prefix_text``."""
        full = self.render(messages, False, rownum)
        if not full.startswith(prefix_text):
            raise DataError("chat template is not prefix-stable (rendering the prompt alone does not give a "
                            "prefix of the full conversation)", source=self.source, row=rownum, field=name)
        return full[len(prefix_text):]


@dataclass
class _Prompt:
    text: str
    ids: list[int]
    messages: list[dict[str, Any]] | None  # None: a plain-text prompt


def _encode_prompt(enc: _Encoder, prompt: str | list, chat: bool, rownum: int) -> _Prompt:
    """Prompt ids; in chat mode a string prompt becomes one user message."""
    if not chat:
        assert isinstance(prompt, str)
        return _Prompt(prompt, enc.prompt_text_ids(prompt), None)
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = enc.render(messages, True, rownum)
    return _Prompt(text, enc.ids(text), messages)


def _encode_response(enc: _Encoder, prompt: _Prompt, response: str | list, rownum: int, name: str) -> list[int]:
    if prompt.messages is None:
        assert isinstance(response, str)
        return enc.response_text_ids(response)
    messages = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    chunk = enc.chat_suffix(prompt.text, prompt.messages + messages, rownum, name)
    return enc.end_with_eos(enc.ids(chunk))


def _split_conversations(prompt: Any, responses: list, names: list[str], source: str,
                         rownum: int) -> tuple[Any, list]:
    """UltraFeedback-binarized layout: responses are whole conversations [user..., assistant].

    Their shared history (everything before the final assistant message) becomes the prompt; the prompt
    column (the same question as plain text) is then redundant. TRL's conversational layout (responses
    hold only assistant messages) passes through unchanged.
    """
    if not all(isinstance(r, list) and r for r in responses):
        return prompt, responses
    if all(r[0].get("role") == "assistant" for r in responses):
        return prompt, responses
    history = responses[0][:-1]
    out = []
    for resp, name in zip(responses, names):
        if resp[-1].get("role") != "assistant":
            raise DataError("the conversation must end with an assistant message", source=source, row=rownum,
                            field=name)
        if not _same(resp[:-1], history):
            raise DataError(f"the conversation differs from '{names[0]}' before the final assistant message",
                            source=source, row=rownum, field=name)
        out.append([resp[-1]])
    return history, out


def _truncate(prompt: list[int], responses: list[list[int]], max_length: int, prompt_limit: int | None,
              enforce_limit: bool) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + each response into max_length: keep the prompt's end and the responses' starts.

    The prompt is cut only as far as needed, but never below ``prompt_limit`` (default max_length // 2,
    at most max_length - 1) while the responses are too long; ``enforce_limit`` (an explicit
    max_prompt_length) always applies the limit.
    """
    limit = min(prompt_limit if prompt_limit is not None else max_length // 2, max_length - 1)
    limit = max(limit, 0)
    truncated = False
    if enforce_limit and len(prompt) > limit:
        prompt, truncated = prompt[len(prompt) - limit:], True
    longest = max((len(r) for r in responses), default=0)
    if len(prompt) + longest > max_length:
        keep = min(len(prompt), max(max_length - longest, limit))
        if keep < len(prompt):
            prompt, truncated = prompt[len(prompt) - keep:], True
        room = max_length - len(prompt)
        responses = [r[:room] for r in responses]
        truncated = True
    return prompt, responses, truncated


def _finish(report: PrepareReport, records: list, source: str) -> None:
    report.kept = len(records)
    if not records:
        raise DataError(f"no usable rows ({report.summary('')})", source=source or None)


def _ensure_not_empty_prompt(enc: _Encoder, prompt: _Prompt) -> list[int]:
    """Position 0 is never trained on: give an empty plain-text prompt a BOS when the tokenizer has one.

    (Chat renderings already start with the template's BOS, so an empty chat prompt stays empty.)
    """
    if prompt.ids or prompt.messages is not None or enc.bos is None:
        return prompt.ids
    return [enc.bos]


# ------------------------------------------------------------------------------------------------- SFT


def prepare_sft(
    ds: datasets.Dataset,
    tokenizer: Any,
    max_length: int,
    completion_only_loss: bool = True,
    source: str = "",
) -> tuple[list[dict[str, list[int]]], PrepareReport]:
    """Tokenise SFT rows into ``{"input_ids", "loss_mask"}`` records.

    * prompt/completion: loss on the completion tokens (incl. EOS); either side may be chat messages.
    * messages: loss on every assistant turn (through its EOS); system/user turns and the assistant
      headers get mask 0. Rendered prefix by prefix, each chunk tokenised separately.
    * text: loss on every token but the first (EOS appended).

    ``completion_only_loss=False`` puts the loss on every token except position 0. Rows longer than
    ``max_length`` are truncated (prompt end, completion start kept) and counted.
    """
    _check_max_length(max_length)
    source = source or dataset_source(ds)
    fmt = detect_format(ds.column_names, allowed=SFT_FORMATS, source=source)
    enc = _Encoder(tokenizer, source)
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
            resp_ids = enc.prompt_text_ids(text) + [enc.eos]
            resp_mask = [1] * len(resp_ids)
        elif fmt is DataFormat.SFT_MESSAGES:
            parts = _sft_message_parts(enc, row, source, rownum, report, completion_only_loss)
            if parts is None:
                continue
            prompt_ids, resp_ids, resp_mask = parts
        else:
            prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt")
            completion = _text_or_messages(row.get("completion"), source, rownum, "completion")
            if _is_empty(completion):
                report.skip(EMPTY_RESPONSE, rownum)
                continue
            chat = isinstance(prompt, list) or isinstance(completion, list)
            p = _encode_prompt(enc, prompt, chat, rownum)
            prompt_ids = _ensure_not_empty_prompt(enc, p)
            resp_ids = _encode_response(enc, p, completion, rownum, "completion")
            resp_mask = [1] * len(resp_ids)
        # Text rows have no prompt: right-truncate the whole sequence (keep its start).
        if fmt is DataFormat.SFT_TEXT:
            was = len(resp_ids)
            resp_ids, resp_mask = resp_ids[:max_length], resp_mask[:max_length]
            truncated = len(resp_ids) < was
        else:
            prompt_ids, (resp_ids,), truncated = _truncate(prompt_ids, [resp_ids], max_length, None, False)
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
    messages = _clean_messages(raw, source, rownum, "messages")
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


# ------------------------------------------------------------------------------------------ preferences


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
) -> tuple[list[dict[str, Any]], PrepareReport]:
    """Tokenise preference rows into groups ``{"prompt_ids", "responses", "ranks", "margin"}``.

    * prompt/chosen/rejected and chosen/rejected (prompt split off, see :func:`split_implicit_prompt`):
      ``responses = [chosen, rejected]``, ``ranks = [0, 1]``.
    * prompt/responses (best first): ``ranks = [0, 1, ..., K-1]``; with a ``ranks`` column those ranks
      (lower = better, equal = tie), stored as dense ranks (0 = best).
    * ``margin`` column: a float (0.0 when absent or null).

    Chosen/rejected may be strings or chat-message lists, in TRL's conversational layout (prompt = the
    history, responses = assistant messages) or UltraFeedback's (responses = whole conversations).
    Every response ends with EOS. Rows with an empty response, identical chosen/rejected, fewer than two
    responses or only ties are skipped and counted.
    """
    _check_max_length(max_length)
    source = source or dataset_source(ds)
    fmt = detect_format(ds.column_names, allowed=PREFERENCE_FORMATS, source=source)
    enc = _Encoder(tokenizer, source)
    report = PrepareReport(max_length=max_length, source=source)
    has_margin = "margin" in ds.column_names
    has_ranks = "ranks" in ds.column_names
    records: list[dict[str, Any]] = []
    for index, row in enumerate(ds):
        rownum = row_number(row, index)
        report.total_rows += 1
        if fmt is DataFormat.RANKED:
            prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt")
            raw = _require(row, "responses", source, rownum)
            if not isinstance(raw, list) or any(isinstance(r, Mapping) for r in raw):
                raise DataError("expected a list of responses (strings or chat-message lists)", source=source,
                                row=rownum, field="responses")
            responses = [_text_or_messages(r, source, rownum, "responses") for r in raw]
            names = ["responses"] * len(responses)
            if has_ranks and row.get("ranks") is not None:
                ranks = _dense_ranks(_numbers(row["ranks"], len(responses), "ranks", source, rownum))
            else:
                ranks = list(range(len(responses)))
        else:
            chosen = _text_or_messages(row.get("chosen"), source, rownum, "chosen")
            rejected = _text_or_messages(row.get("rejected"), source, rownum, "rejected")
            if fmt is DataFormat.PREFERENCE_IMPLICIT:
                if isinstance(chosen, str) != isinstance(rejected, str):
                    raise DataError("chosen and rejected must both be strings or both be message lists",
                                    source=source, row=rownum, field="rejected")
                if _same(chosen, rejected):
                    report.skip(SAME_RESPONSES, rownum)
                    continue
                prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
            else:
                prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt")
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

        chat = isinstance(prompt, list) or any(isinstance(r, list) for r in responses)
        p = _encode_prompt(enc, prompt, chat, rownum)
        ids = [_encode_response(enc, p, r, rownum, n) for r, n in zip(responses, names)]
        prompt_ids, ids, truncated = _truncate(_ensure_not_empty_prompt(enc, p), ids, max_length,
                                               max_prompt_length, max_prompt_length is not None)
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


# ---------------------------------------------------------------------------------------------- prompts


def prepare_prompts(
    ds: datasets.Dataset,
    tokenizer: Any,
    max_prompt_length: int,
    source: str = "",
) -> tuple[list[dict[str, Any]], PrepareReport]:
    """Tokenise prompts for generation: records ``{"prompt": str, "prompt_ids": list[int]}``.

    String prompts are tokenised as is (with BOS); chat-message prompts are rendered with
    ``add_generation_prompt=True``. Any dataset with a ``prompt`` column works (extra columns, e.g.
    chosen/rejected, are ignored). Long prompts keep their end; ``prompt`` is then the decoded kept part.
    """
    if int(max_prompt_length) < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    source = source or dataset_source(ds)
    detect_format(ds.column_names, allowed=PROMPT_FORMATS, source=source)
    enc = _Encoder(tokenizer, source)
    report = PrepareReport(max_length=max_prompt_length, source=source)
    records: list[dict[str, Any]] = []
    for index, row in enumerate(ds):
        rownum = row_number(row, index)
        report.total_rows += 1
        prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt")
        if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            report.skip(EMPTY_PROMPT, rownum)
            continue
        p = _encode_prompt(enc, prompt, isinstance(prompt, list), rownum)
        text, ids = p.text, p.ids
        if len(ids) > max_prompt_length:
            ids = ids[len(ids) - max_prompt_length:]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            report.truncated += 1
        records.append({"prompt": text, "prompt_ids": ids})
    _finish(report, records, source)
    return records, report
