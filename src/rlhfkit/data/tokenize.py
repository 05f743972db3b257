"""Turn rows into token ids with exact prompt/response boundaries: the shared part.

This module holds what every ``prepare_*`` function shares: :class:`PrepareReport` (rows kept, truncated,
skipped by reason), the row checks that turn bad fields into a DataError naming row and field, and the
encoder that tokenises prompts and responses separately. The functions themselves live beside it:
:mod:`.sft` (``prepare_sft``), :mod:`.preferences` (``prepare_preferences``, ``expand_to_pairs``) and
:mod:`.prompts` (``prepare_prompts``).

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError, ModelError
from ..models.tiny import DEFAULT_CHAT_TEMPLATE

__all__ = ["PrepareReport"]

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
