"""What every reward source shares: the batch it scores, its protocol, and the checks on what it returns.

A reward source has a ``name`` (used in messages and logs) and ``score(batch) -> Tensor``: float32 of
shape [N] on the CPU, one scalar per response, in the batch's order (:class:`RewardSource`); the batch is
a :class:`ScoringBatch`. :func:`checked_scores` rejects NaN/inf with a message naming an example, and
``_as_scores`` turns what a user function or a server returned into that tensor or a one-line error. The
sources themselves are in :mod:`rlhfkit.rollout.rewards` and :mod:`rlhfkit.rollout.http_reward`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import RlhfkitError

__all__ = ["RewardSource", "ScoringBatch", "checked_scores", "row_fields"]


@dataclass
class ScoringBatch:
    """What a reward source sees of a batch of rollouts (all lists have one entry per response).

    ``raw_prompts`` and ``columns`` carry the dataset row of each response's prompt (repeated for each of
    the G samples of a prompt), for reward functions that read e.g. an ``answer`` column; they default to
    the rendered prompts and no columns, so sources that score text alone build batches as before.
    """

    prompts: list[str]  # prompt text as the policy saw it (already chat-rendered)
    responses: list[str]  # decoded response text, special tokens stripped, no padding
    prompt_ids: list[list[int]]  # policy-tokenizer ids of each prompt
    response_ids: list[list[int]]  # policy-tokenizer ids of each response; ends with EOS iff the response ended
    ended: list[bool]  # whether each response produced EOS / a stop string
    raw_prompts: list[Any] | None = None  # the row's prompt as written: a string or a list of messages
    columns: dict[str, list[Any]] = field(default_factory=dict)  # the row's other columns, one value each

    def __post_init__(self) -> None:
        n = len(self.responses)
        if self.raw_prompts is None:
            self.raw_prompts = list(self.prompts)
        sizes = {"prompts": len(self.prompts), "prompt_ids": len(self.prompt_ids),
                 "response_ids": len(self.response_ids), "ended": len(self.ended),
                 "raw_prompts": len(self.raw_prompts),
                 **{f"'{k}' values": len(v) for k, v in self.columns.items()}}
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise ValueError(f"ScoringBatch: {n} responses but " + ", ".join(f"{v} {k}" for k, v in wrong.items()))

    def __len__(self) -> int:
        return len(self.responses)


def row_fields(records: Sequence[Mapping[str, Any]], repeats: int = 1) -> dict[str, Any]:
    """``prompts``, ``raw_prompts`` and ``columns`` of a ScoringBatch from prompt records
    (:func:`rlhfkit.data.prepare_prompts`), each record repeated ``repeats`` times (its G samples).

    A column missing from some records (rows given as a list of dicts) is None there.
    """
    names: list[str] = []
    for record in records:
        names += [k for k in record.get("columns") or {} if k not in names]
    return {
        "prompts": [r["prompt"] for r in records for _ in range(repeats)],
        "raw_prompts": [r.get("raw_prompt", r["prompt"]) for r in records for _ in range(repeats)],
        "columns": {name: [(r.get("columns") or {}).get(name) for r in records for _ in range(repeats)]
                    for name in names},
    }


@runtime_checkable
class RewardSource(Protocol):
    name: str

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        """float32 [N] on CPU, one scalar per response."""
        ...


def checked_scores(source: RewardSource, batch: ScoringBatch, error: type[RlhfkitError] = RlhfkitError,
                   context: str = "", role: str = "reward source") -> torch.Tensor:
    """``source.score(batch)`` as float32; a NaN or infinite score raises ``error`` naming an example."""
    scores = source.score(batch).float()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise error(f"{role} '{getattr(source, 'name', 'reward')}' returned {scores[i].item()} for "
                    f"{len(bad)} response(s){context}, e.g. prompt {batch.prompts[i][:60]!r} -> response "
                    f"{batch.responses[i][:60]!r}")
    return scores


def _one_line(text: Any, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _as_scores(values: Any, n: int, who: str) -> torch.Tensor:
    """Check that ``values`` is a 1-D sequence of ``n`` numbers and return it as float32 [n] on the CPU.

    Accepts a list or tuple of numbers (bools, numpy scalars and one-element tensors included), a numpy
    array or a tensor. Non-finite values pass through. ``who`` starts every error message.
    """
    if torch.is_tensor(values):
        if values.is_complex():
            raise RlhfkitError(f"{who} returned a complex tensor; expected real numbers")
        if values.dim() != 1:
            raise RlhfkitError(f"{who} returned a tensor of shape {tuple(values.shape)}; expected shape ({n},)")
        scores = values.detach().to("cpu", torch.float32)
    elif isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise RlhfkitError(f"{who} returned an array of shape {values.shape}; expected shape ({n},)")
        if values.dtype.kind == "O":
            return _as_scores(values.tolist(), n, who)
        if values.dtype.kind not in "biuf":
            raise RlhfkitError(f"{who} returned an array of dtype {values.dtype}; expected numbers")
        scores = torch.from_numpy(values.astype(np.float32))
    elif isinstance(values, (list, tuple)):
        floats = []
        for i, value in enumerate(values):
            if torch.is_tensor(value) and value.numel() == 1 and not value.is_complex():
                value = value.item()
            elif isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf":
                value = value.item()
            if not isinstance(value, (bool, numbers.Real)):
                raise RlhfkitError(f"{who} returned a non-number at index {i}: {_one_line(repr(value), 60)} "
                                   f"({type(value).__name__})")
            floats.append(float(value))
        scores = torch.tensor(floats, dtype=torch.float32)
    else:
        raise RlhfkitError(f"{who} returned {type(values).__name__}; expected a list, tuple, numpy array or "
                           f"tensor of {n} numbers")
    if scores.shape[0] != n:
        raise RlhfkitError(f"{who} returned {scores.shape[0]} scores for {n} responses")
    return scores
