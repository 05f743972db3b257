"""Every judge and reward spec is parsed here: the ``--judge`` of ``rlhfkit eval``, ``judge`` and ``cai``,
and the RL trainers' ``--heldout-judge``.

A spec is ``KIND:REST``. Scoring kinds give a reward source (``score(ScoringBatch) -> Tensor``, see
:mod:`rlhfkit.rollout.rewards`): ``model:PATH`` (a reward model; a bare existing folder too), ``fn:FILE.py:FN``
(``fn(prompts, responses) -> scores``; a bare ``FILE.py:FN`` too), ``http:URL`` (a reward server; a bare
``http(s)://`` URL too), and the kinds other packages register: the demo world's ``gold:DIR`` comes in
through the ``rlhfkit.judges`` entry-point group (see pyproject.toml), so the library never imports the demo.
Pairwise kinds give a :class:`PairwiseJudge`: ``lm:PATH``, ``openai[:MODEL]``, ``pairfn:FILE.py:FN``; a
scoring kind used pairwise compares the two scores (:class:`SourceJudge`).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..rollout.rewards import HTTPReward, ModelReward, RewardSource, load_reward_function
from .backends import FunctionJudge, LocalLMJudge, OpenAIJudge, SourceJudge
from .base import PairwiseJudge

__all__ = ["JUDGE_KINDS", "JUDGE_SPECS", "build_judge", "load_judge", "register_judge_kind"]

JUDGE_SPECS = "gold:DIR, model:PATH (or an existing folder), fn:FILE.py:FUNCTION or http:URL"
JUDGE_KINDS = ("lm:PATH (local causal LM, option-token log-probs), openai[:MODEL] (OpenAI-compatible "
               "chat endpoint), pairfn:FILE.py:FN (fn(prompt, first, second) -> P(first better) or 'A'/'B'), "
               "or a scoring judge: gold:DIR, model:PATH (reward model), fn:FILE.py:FN (fn(prompts, "
               "responses) -> scores), http:URL (reward server)")

# kind -> loader(rest of the spec) of the scoring kinds registered from outside (entry points or code)
ScoringLoader = Callable[[str], Any]
_REGISTERED: dict[str, ScoringLoader] = {}
ENTRY_POINT_GROUP = "rlhfkit.judges"


def register_judge_kind(kind: str, loader: ScoringLoader) -> None:
    """Make ``KIND:REST`` a scoring judge: ``loader(REST)`` returns an object with ``score(ScoringBatch)``."""
    _REGISTERED[kind.lower()] = loader


def _registered(kind: str) -> ScoringLoader | None:
    if kind not in _REGISTERED:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name.lower() == kind:
                _REGISTERED[kind] = point.load()
    return _REGISTERED.get(kind)


def _attach_describe(source: Any) -> Any:
    """Give a FunctionReward the ``describe`` of its function (attribute) or of its file (top level)."""
    fn = getattr(source, "fn", None)
    describe = getattr(fn, "describe", None)
    if describe is None:
        describe = getattr(fn, "__globals__", {}).get("describe")
    if callable(describe):
        source.describe = describe
    return source


def load_judge(spec: str, policy_tokenizer: Any, device: torch.device | str = "cpu") -> RewardSource:
    """A scoring judge (a reward source) from a spec; cheap checks first, one-line ConfigError when bad.

    ``policy_tokenizer`` tokenised the responses a reward model will score (it re-tokenises when its own
    tokenizer differs).
    """
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower() if sep else ""
    if text.startswith(("http://", "https://")):
        kind, rest = "http", text
    if kind == "model":
        if not rest:
            raise ConfigError(f"judge '{text}': expected model:PATH")
        return ModelReward(rest, policy_tokenizer, device=device)
    if kind == "fn":
        return _attach_describe(load_reward_function(rest))
    if kind == "http":
        return HTTPReward(rest)
    loader = _registered(kind) if kind else None
    if loader is not None:
        try:
            judge = loader(rest)
        except ConfigError as exc:
            raise ConfigError(f"judge '{text}': {exc}") from None
        if not callable(getattr(judge, "score", None)):
            raise ConfigError(f"judge '{text}': the {kind} loader returned a {type(judge).__name__} without score()")
        return judge
    if ".py:" in text:
        return _attach_describe(load_reward_function(text))
    if text and Path(text).expanduser().is_dir():
        return ModelReward(text, policy_tokenizer, device=device)
    raise ConfigError(f"judge '{text}': expected {JUDGE_SPECS}")


def build_judge(spec: str, *, template: str | None = None, principles: str = "", base_url: str | None = None,
                api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3, reply_retries: int = 2,
                rate: float = 0.0, temperature: float = 1.0, device: str = "cpu", **http: Any) -> PairwiseJudge:
    """A pairwise judge from ``spec`` (see JUDGE_KINDS); ``template`` / ``principles`` apply to the model
    judges, ``temperature`` to the scoring judges (pairwise p = sigmoid(score difference / temperature))."""
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower() if sep else text.lower()
    if kind == "lm":
        if not rest:
            raise ConfigError(f"judge '{text}': expected lm:PATH")
        return LocalLMJudge(rest, template=template, principles=principles, device=device)
    if kind == "openai":
        return OpenAIJudge(rest or None, base_url, api_key, template=template, principles=principles,
                           timeout=timeout, max_retries=max_retries, reply_retries=reply_retries, rate=rate, **http)
    if kind == "pairfn":
        return FunctionJudge(load_reward_function(rest).fn, name=text)
    tokenizer = None
    if kind == "model" or (not sep and Path(text).expanduser().is_dir()):
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(rest if kind == "model" else text)
    try:
        source = load_judge(text, tokenizer, device=device)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; pairwise judges: {JUDGE_KINDS}") from None
    return SourceJudge(source, temperature=temperature, name=text)
