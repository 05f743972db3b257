"""Turn rows into token ids with exact prompt/response boundaries: the shared part.

This module holds what every ``prepare_*`` function shares: :class:`PrepareReport` (rows kept, truncated,
skipped by reason), the row checks that turn bad fields into a DataError naming row and field, and the
encoder that tokenises prompts and responses separately. The functions themselves live beside it:
:mod:`.sft` (``prepare_sft``), :mod:`.preferences` (``prepare_preferences``, ``expand_to_pairs``) and
:mod:`.prompts` (``prepare_prompts``).

Conventions (shared by SFT, reward modelling, DPO and RL):

* Prompt and response are tokenised separately and concatenated; a merged string is never re-tokenised,
  so the boundary (and therefore the loss mask) is exact even where BPE would merge across it.
* Prompt format (``--prompt-format``, :func:`resolve_prompt_format`): with ``chat`` (``auto``'s choice
  when the tokenizer ships its own chat template) a string prompt becomes one user turn and a string
  response the assistant turn, rendered as below; with ``raw`` strings stay text:
  String prompt: ``tokenizer(prompt).input_ids`` (with the tokenizer's special tokens, e.g. BOS).
  String response: ``tokenizer(response, add_special_tokens=False).input_ids + [eos]``.
* Chat messages: the prompt is rendered with ``add_generation_prompt=True``; the response chunk is the
  text the chat template adds for the response messages (full rendering minus the prompt rendering). Both
  are tokenised with ``add_special_tokens=False`` (the template supplies BOS). The response ids stop at the
  template's last EOS (text after it, usually a newline, carries no signal); EOS is appended when the
  template emits none. Reward models keep that text (:func:`template_tail_ids`): they are read at the last
  token, and users feed them ``apply_chat_template``'s rendering.
* Truncation keeps the END of the prompt and the START of the response; at least one response token
  always survives. A cut prompt keeps its first token when that is BOS (models such as Gemma depend on
  it), and a leading system turn whole when it fits.
* Position 0 of every sequence has loss mask 0: nothing predicts the first token, and packing relies on
  it (position 0 of a packed sequence is "predicted" by the previous sequence's last token).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DataError, ModelError
from ..models.tiny import DEFAULT_CHAT_TEMPLATE, FALLBACK_CHAT_TEMPLATES

__all__ = ["PROMPT_FORMAT_CHOICES", "PrepareReport", "has_own_chat_template", "resolve_prompt_format",
           "template_tail_ids"]

_LOGGER = logging.getLogger("rlhfkit")

# Skip reasons (keys of PrepareReport.skipped).
EMPTY_RESPONSE = "empty response"
EMPTY_PROMPT = "empty prompt"
EMPTY_TEXT = "empty text"
SAME_RESPONSES = "chosen == rejected"
TOO_FEW_RESPONSES = "fewer than 2 responses"
NO_PREFERENCE = "no strict preference"
NO_ASSISTANT = "no assistant turn"
# Message roles chat templates know; another (a typo such as "usr") is kept as written but counted: templates
# render it as a header of that name, or drop the message without a word.
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")
UNKNOWN_ROLE = "with a message role outside " + "/".join(KNOWN_ROLES)


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
    noted: dict[str, int] = field(default_factory=dict)  # rows with something to warn about, by reason
    first_noted: dict[str, tuple[int, str]] = field(default_factory=dict)  # reason -> (first row, example)
    last_noted: dict[str, int] = field(default_factory=dict, repr=False)

    def skip(self, reason: str, row: int) -> None:
        """Count one skipped row (``row`` is the 1-based row / JSONL line number)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_row.setdefault(reason, row)

    def note(self, reason: str, row: int, example: str) -> None:
        """Count a row with something worth a warning (not a reason to skip it), once per row."""
        self.first_noted.setdefault(reason, (row, example))
        if self.last_noted.get(reason) != row:  # rows come in order: a row's second hit is not counted
            self.noted[reason] = self.noted.get(reason, 0) + 1
            self.last_noted[reason] = row

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
        for reason, count in self.noted.items():
            row, example = self.first_noted[reason]
            parts.append(f"{count} {'row' if count == 1 else 'rows'} {reason} (first: row {row}, {example!r}; "
                         "kept as written)")
        return "; ".join(parts)

    def summary(self, source: str | None = None) -> str:
        """One line, e.g. ``train.jsonl: 98/100 rows kept; skipped 1 empty response (first: row 7); ...``."""
        name = source if source is not None else self.source
        return f"{name}: {self._body()}" if name else self._body()

    def log(self, logger: logging.Logger | None = None, source: str | None = None) -> None:
        """Log the summary: a warning when rows were skipped, truncated or noted, info otherwise."""
        logger = logger or _LOGGER
        level = logging.WARNING if (self.skipped or self.truncated or self.noted) else logging.INFO
        logger.log(level, "%s", self.summary(source))


# -------------------------------------------------------------------------------------- prompt format

PROMPT_FORMAT_CHOICES = ("auto", "chat", "raw")


def has_own_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer ships a chat template of its own.

    rlhfkit's fallback template (given by ``load_tokenizer`` to tokenizers without one, and used by the
    tiny test models) does not count: it is compared by value, so the answer survives a save and reload.
    """
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and template not in FALLBACK_CHAT_TEMPLATES


def resolve_prompt_format(tokenizer: Any, requested: str = "auto", model: str = "", log: bool = False) -> str:
    """``auto`` / ``chat`` / ``raw`` -> ``"chat"`` or ``"raw"``: how plain-string prompts are tokenised.

    auto = chat when the tokenizer has its own chat template, raw otherwise. Chat-message data are
    rendered with a template either way. ``log=True`` logs the choice (once per run, by the caller).
    """
    mode = str(requested or "auto").lower()
    if mode not in PROMPT_FORMAT_CHOICES:
        raise ConfigError(f"--prompt-format must be auto, chat or raw, not '{requested}'")
    own = has_own_chat_template(tokenizer)
    name = f" of '{model}'" if model else ""
    if mode == "chat" and not own:
        raise ConfigError(f"--prompt-format chat: the tokenizer{name} has no chat template of its own; use "
                          "--prompt-format raw, or give the data as chat messages")
    resolved = "chat" if mode == "chat" or (mode == "auto" and own) else "raw"
    if log:
        if resolved == "chat":
            why = "tokenizer has a chat template" if mode == "auto" else "--prompt-format chat"
            _LOGGER.info("prompt format: chat (%s; string prompts become one user turn)", why)
        else:
            why = "tokenizer has no chat template of its own" if mode == "auto" else "--prompt-format raw"
            _LOGGER.info("prompt format: raw (%s; string prompts stay text)", why)
    return resolved


def template_tail_ids(tokenizer: Any) -> list[int]:
    """Ids of the text a tokenizer's own chat template writes after an assistant turn's EOS (Qwen, Gemma and
    Phi-3 write a newline), [] when it writes none or has no template of its own.

    A reward model is scored at its last token, and users score a conversation as
    ``apply_chat_template(messages)`` renders it: reward models therefore train (``prepare_preferences(...,
    keep_template_tail=True)``) and score (``ModelReward``) with this tail after EOS.
    """
    eos = getattr(tokenizer, "eos_token", None)
    if not has_own_chat_template(tokenizer) or not eos:
        return []
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                             tokenize=False)
    except Exception:  # a template that refuses this conversation: no tail known
        return []
    cut = text.rfind(eos) if isinstance(text, str) else -1
    tail = text[cut + len(eos):] if cut >= 0 else ""
    return list(tokenizer(tail, add_special_tokens=False).input_ids) if tail else []


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


def _clean_messages(value: list, source: str, rownum: int, name: str,
                    report: PrepareReport | None = None) -> list[dict[str, Any]]:
    """Validate a chat-message list; drop the None keys Arrow adds for keys other messages had. A role
    outside ``KNOWN_ROLES`` is counted in ``report``."""
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise DataError(f"message {i + 1} is {type(msg).__name__}, expected an object with role and content",
                            source=source, row=rownum, field=name)
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str):
            raise DataError(f"message {i + 1} has no 'role'", source=source, row=rownum, field=name)
        if report is not None and role not in KNOWN_ROLES:
            report.note(UNKNOWN_ROLE, rownum, role)
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"message {i + 1} 'content' is {type(content).__name__}, expected a string",
                            source=source, row=rownum, field=name)
        out.append({k: v for k, v in msg.items() if v is not None} | {"content": content or ""})
    return out


def _text_or_messages(value: Any, source: str, rownum: int, name: str,
                      report: PrepareReport | None = None) -> str | list[dict[str, Any]]:
    """A field that holds a string or a chat-message list (anything else is a DataError naming row+field)."""
    if value is None:
        raise DataError("missing", source=source, row=rownum, field=name)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            return []
        return _clean_messages(value, source, rownum, name, report)
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

    def __init__(self, tokenizer: Any, source: str, prompt_format: str = "auto", keep_template_tail: bool = False):
        self.tok, self.source = tokenizer, source
        self.tail = template_tail_ids(tokenizer) if keep_template_tail else []  # reward models: see above
        self.chat_strings = resolve_prompt_format(tokenizer, prompt_format) == "chat"  # strings -> chat turns
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
    heads: tuple[int, ...] = ()  # prefix lengths a left cut keeps, best first (system turn, BOS)


def _heads(enc: _Encoder, ids: list[int], messages: list[dict[str, Any]] | None, rownum: int) -> tuple[int, ...]:
    """The leading ids a left cut keeps: a system turn (when it renders as a token prefix), else BOS."""
    heads: list[int] = []
    if messages and len(messages) > 1 and messages[0].get("role") == "system":
        try:
            system_ids = enc.ids(enc.render(messages[:1], False, rownum))
        except DataError:  # templates that refuse a system-only conversation: keep BOS only
            system_ids = []
        if system_ids and ids[: len(system_ids)] == system_ids and len(system_ids) < len(ids):
            heads.append(len(system_ids))
    if ids and enc.bos is not None and ids[0] == enc.bos:
        heads.append(1)
    return tuple(heads)


def _keep_end(ids: list[int], keep: int, heads: tuple[int, ...] = ()) -> list[int]:
    """The last ``keep`` tokens, with the first protected head that leaves room for >= 1 tail token."""
    if keep >= len(ids):
        return ids
    for head in heads:
        if head < keep:
            return ids[:head] + ids[len(ids) - (keep - head):]
    return ids[len(ids) - keep:] if keep > 0 else []


def _encode_prompt(enc: _Encoder, prompt: str | list, chat: bool, rownum: int) -> _Prompt:
    """Prompt ids; in chat mode a string prompt becomes one user message."""
    if not chat:
        assert isinstance(prompt, str)
        ids = enc.prompt_text_ids(prompt)
        return _Prompt(prompt, ids, None, _heads(enc, ids, None, rownum))
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = enc.render(messages, True, rownum)
    ids = enc.ids(text)
    return _Prompt(text, ids, messages, _heads(enc, ids, messages, rownum))


def _encode_response(enc: _Encoder, prompt: _Prompt, response: str | list, rownum: int, name: str) -> list[int]:
    """Response ids through EOS (plus the template tail for reward models, on every row as ModelReward reads)."""
    if prompt.messages is None:
        assert isinstance(response, str)
        return enc.response_text_ids(response) + enc.tail
    messages = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    chunk = enc.chat_suffix(prompt.text, prompt.messages + messages, rownum, name)
    return enc.end_with_eos(enc.ids(chunk)) + enc.tail


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
              enforce_limit: bool, heads: tuple[int, ...] = ()) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + each response into max_length: keep the prompt's end and the responses' starts.

    The prompt is cut only as far as needed, but never below ``prompt_limit`` (default max_length // 2,
    at most max_length - 1) while the responses are too long; ``enforce_limit`` (an explicit
    max_prompt_length) always applies the limit. A cut keeps the protected ``heads`` (see :func:`_keep_end`).
    """
    limit = min(prompt_limit if prompt_limit is not None else max_length // 2, max_length - 1)
    limit = max(limit, 0)
    truncated = False
    if enforce_limit and len(prompt) > limit:
        prompt, truncated = _keep_end(prompt, limit, heads), True
    longest = max((len(r) for r in responses), default=0)
    if len(prompt) + longest > max_length:
        keep = min(len(prompt), max(max_length - longest, limit))
        if keep < len(prompt):
            prompt, truncated = _keep_end(prompt, keep, heads), True
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


def _prompt_and_completion(enc: _Encoder, row: Mapping[str, Any], source: str, rownum: int,
                           report: PrepareReport) -> tuple[list[int], tuple[int, ...], list[int]] | None:
    """A prompt/completion row (SFT, KTO) -> (prompt ids, the prompt's turn heads, completion ids ending with
    EOS); None (skipped and counted) when the completion is empty."""
    prompt = _text_or_messages(row.get("prompt"), source, rownum, "prompt", report)
    completion = _text_or_messages(row.get("completion"), source, rownum, "completion", report)
    if _is_empty(completion):
        report.skip(EMPTY_RESPONSE, rownum)
        return None
    chat = isinstance(prompt, list) or isinstance(completion, list) or enc.chat_strings
    p = _encode_prompt(enc, prompt, chat, rownum)
    return _ensure_not_empty_prompt(enc, p), p.heads, _encode_response(enc, p, completion, rownum, "completion")
