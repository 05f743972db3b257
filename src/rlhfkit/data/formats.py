"""Dataset layouts (which columns mean what) and their detection from column names."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

from ..errors import DataError

__all__ = [
    "PREFERENCE_FORMATS",
    "PROMPT_FORMATS",
    "SFT_FORMATS",
    "KTO_FORMATS",
    "DataFormat",
    "describe_format",
    "detect_format",
    "split_implicit_prompt",
]


class DataFormat(str, Enum):
    """A dataset layout. Values are stable strings (usable in configs and logs)."""

    SFT_PROMPT_COMPLETION = "sft_prompt_completion"  # prompt + completion
    SFT_MESSAGES = "sft_messages"  # messages: [{"role", "content"}, ...]
    SFT_TEXT = "sft_text"  # text
    PREFERENCE_EXPLICIT = "preference_explicit"  # prompt + chosen + rejected
    PREFERENCE_IMPLICIT = "preference_implicit"  # chosen + rejected, prompt inside both (HH-RLHF)
    RANKED = "ranked"  # prompt + responses (best first) [+ ranks]
    UNPAIRED = "unpaired"  # prompt + completion + label (true = desirable): KTO
    PROMPT_ONLY = "prompt_only"  # prompt (RL rollouts)


SFT_FORMATS: tuple[DataFormat, ...] = (
    DataFormat.SFT_PROMPT_COMPLETION, DataFormat.SFT_MESSAGES, DataFormat.SFT_TEXT,
)
PREFERENCE_FORMATS: tuple[DataFormat, ...] = (
    DataFormat.PREFERENCE_EXPLICIT, DataFormat.PREFERENCE_IMPLICIT, DataFormat.RANKED,
)
PROMPT_FORMATS: tuple[DataFormat, ...] = (DataFormat.PROMPT_ONLY,)
# KTO reads unpaired labelled rows, and splits preference pairs (and rankings) into such rows
KTO_FORMATS: tuple[DataFormat, ...] = (DataFormat.UNPAIRED, *PREFERENCE_FORMATS)

# Required columns of each layout, in detection priority order: the most specific layout first, so that
# e.g. prompt/chosen/rejected is a preference set and not "prompt only with extra columns".
_LAYOUTS: tuple[tuple[DataFormat, frozenset[str], str], ...] = (
    (DataFormat.PREFERENCE_EXPLICIT, frozenset({"prompt", "chosen", "rejected"}), "prompt/chosen/rejected"),
    (DataFormat.PREFERENCE_IMPLICIT, frozenset({"chosen", "rejected"}), "chosen/rejected"),
    (DataFormat.RANKED, frozenset({"prompt", "responses"}), "prompt/responses[/ranks]"),
    (DataFormat.SFT_MESSAGES, frozenset({"messages"}), "messages"),
    (DataFormat.UNPAIRED, frozenset({"prompt", "completion", "label"}), "prompt/completion/label"),
    (DataFormat.SFT_PROMPT_COMPLETION, frozenset({"prompt", "completion"}), "prompt/completion"),
    (DataFormat.SFT_TEXT, frozenset({"text"}), "text"),
    (DataFormat.PROMPT_ONLY, frozenset({"prompt"}), "prompt"),
)
_DESCRIPTIONS = {fmt: desc for fmt, _, desc in _LAYOUTS}


def describe_format(fmt: DataFormat) -> str:
    """The columns of a layout, e.g. ``prompt/chosen/rejected``."""
    return _DESCRIPTIONS[DataFormat(fmt)]


def _join_or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def detect_format(
    columns: Iterable[str],
    allowed: Iterable[DataFormat] | None = None,
    source: str | None = None,
) -> DataFormat:
    """The layout of a dataset with these column names.

    Extra columns (id, margin, score, ...) and hidden ones (starting with ``__``) are ignored. When
    ``allowed`` is given, the most specific allowed layout the columns satisfy wins, so a
    prompt/chosen/rejected set can feed a prompt-only (RL) trainer. Raises :class:`DataError` (one line,
    listing the expected layouts and the columns found) when nothing fits.
    """
    names = [c for c in columns if not str(c).startswith("__")]
    present = set(names)
    allowed_list = list(dict.fromkeys(DataFormat(a) for a in allowed)) if allowed is not None else None
    matches = [fmt for fmt, required, _ in _LAYOUTS if required <= present]
    for fmt in matches:
        if allowed_list is None or fmt in allowed_list:
            return fmt
    candidates = allowed_list if allowed_list is not None else [fmt for fmt, _, _ in _LAYOUTS]
    expected = _join_or([_DESCRIPTIONS[fmt] for fmt in candidates]) if candidates else "(nothing allowed)"
    found = ", ".join(names) if names else "(none)"
    if matches:
        message = (f"this data cannot be used here: expected {expected}; found columns: {found} "
                   f"({_DESCRIPTIONS[matches[0]]} layout)")
    else:
        message = f"cannot tell the data format: expected {expected}; found columns: {found}"
    if names and not matches:  # the data may hold the right things under other names
        message += " (rename with --columns NEW=OLD, e.g. prompt=question)"
    raise DataError(message, source=source)


_ASSISTANT_MARKER = "\n\nAssistant:"


def _same_message(a: Any, b: Any) -> bool:
    # Rows coming from Arrow carry None for keys other messages had; compare what the template reads.
    if isinstance(a, dict) and isinstance(b, dict):
        return a.get("role") == b.get("role") and a.get("content") == b.get("content")
    return a == b


def split_implicit_prompt(chosen: str | list, rejected: str | list) -> tuple[Any, Any, Any]:
    """Split a chosen/rejected pair that repeats its prompt into (prompt, chosen_response, rejected_response).

    Strings (Anthropic HH-RLHF, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``): the longest common prefix, cut
    back to just after its last ``"\\n\\nAssistant:"``, so the prompt ends with ``"Assistant:"`` and each
    response keeps its own leading space. Without that marker the cut is at the last whitespace of the
    common prefix (responses start with that whitespace), so no word is split between prompt and response.

    Chat-message lists: the shared leading messages are the prompt; each response keeps at least its
    final message.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        limit = min(len(chosen), len(rejected)) - 1  # every response keeps >= 1 message
        while shared < limit and _same_message(chosen[shared], rejected[shared]):
            shared += 1
        return list(chosen[:shared]), list(chosen[shared:]), list(rejected[shared:])
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise TypeError("chosen and rejected must both be strings or both be lists of chat messages")
    common = 0
    limit = min(len(chosen), len(rejected))
    while common < limit and chosen[common] == rejected[common]:
        common += 1
    prefix = chosen[:common]
    marker = prefix.rfind(_ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(_ASSISTANT_MARKER)
    else:
        cut = max((i for i, ch in enumerate(prefix) if ch.isspace()), default=0)
    return chosen[:cut], chosen[cut:], rejected[cut:]
