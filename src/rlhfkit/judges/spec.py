"""Every judge and reward spec is parsed here: the ``--judge`` of ``rlhfkit eval``, ``judge`` and ``cai``,
and the RL trainers' ``--heldout-judge``.

A spec is ``KIND:REST``. Scoring kinds give a reward source (``score(ScoringBatch) -> Tensor``, see
:mod:`rlhfkit.rollout.rewards`): ``model:PATH`` (a reward model; a bare existing folder too), ``fn:FILE.py:FN``
(``fn(prompts, responses) -> scores``; a bare ``FILE.py:FN`` too), ``http:URL`` (a reward server; a bare
``http(s)://`` URL too), and the kinds other packages register: the demo world's ``gold:DIR`` comes in
through the ``rlhfkit.judges`` entry-point group (see pyproject.toml), so the library never imports the demo.
Pairwise kinds give a :class:`PairwiseJudge`: ``lm:PATH``, ``openai[:MODEL]``, ``pairfn:FILE.py:FN``; a
scoring kind used pairwise compares the two scores (:class:`SourceJudge`). :func:`is_pairwise_spec` tells the
two apart, so ``rlhfkit eval --judge`` and the RL trainers' ``--reward-judge`` take either.

The flags that configure a model judge (template, principles, endpoint, retries, rate, temperature) are
added to a parser by :func:`add_judge_flags` and read back by :func:`judge_from_flags`: ``rlhfkit judge``
uses them bare (``--template``), ``rlhfkit eval`` with a ``judge-`` prefix (``--judge-template``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..rollout.rewards import HTTPReward, ModelReward, RewardSource, load_reward_function
from .backends import FunctionJudge, LocalLMJudge, OpenAIJudge, SourceJudge
from .base import PairwiseJudge

__all__ = ["JUDGE_KINDS", "JUDGE_SPECS", "PAIRWISE_KINDS", "add_judge_flags", "build_judge", "is_pairwise_spec",
           "judge_from_flags", "load_judge", "register_judge_kind"]

JUDGE_SPECS = "gold:DIR, model:PATH (or an existing folder), fn:FILE.py:FUNCTION or http:URL"
JUDGE_KINDS = ("lm:PATH (local causal LM, option-token log-probs), openai[:MODEL] (OpenAI-compatible "
               "chat endpoint), pairfn:FILE.py:FN (fn(prompt, first, second) -> P(first better) or 'A'/'B'), "
               "or a scoring judge: gold:DIR, model:PATH (reward model), fn:FILE.py:FN (fn(prompts, "
               "responses) -> scores), http:URL (reward server)")

PAIRWISE_KINDS = ("lm", "openai", "pairfn")  # the kinds that only compare two responses (no score of one)

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


def pairwise_hint(spec: str, fn: Callable[..., Any] | None) -> str:
    """When a scoring ``fn:`` judge's function looks pairwise (three or more positional parameters, the first
    two not the scoring convention's ``prompts, responses``, so the third was taken for a column that is not
    there): the ``pairfn:`` spec to use instead; else ''."""
    text = str(spec).strip()
    if fn is None or text.lower().startswith(PAIRWISE_KINDS) or ".py:" not in text:
        return ""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ""
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # fn(prompts, responses, column): the scoring convention, its names plural (lists of the batch)
    if len(positional) < 3 or positional[0].name == "prompts" or positional[1].name in ("responses", "completions"):
        return ""
    target = text[3:] if text.lower().startswith("fn:") else text
    return (f"; if {getattr(fn, '__name__', 'it')}({', '.join(p.name for p in positional[:3])}) compares two "
            f"responses, it is a pairwise judge: --judge pairfn:{target}")


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


def is_pairwise_spec(spec: str) -> bool:
    """True for the pairwise-only kinds (``lm:``, ``openai[:MODEL]``, ``pairfn:``); False for scoring specs."""
    text = str(spec).strip()
    kind, sep, _ = text.partition(":")
    return (kind if sep else text).lower() in PAIRWISE_KINDS and not text.startswith(("http://", "https://"))


def add_judge_flags(parser: Any, prefix: str = "") -> None:
    """Add the flags that configure a judge built by :func:`build_judge` to an argparse parser, each named
    ``--{prefix}NAME`` (``rlhfkit judge``: no prefix; ``rlhfkit eval``: ``judge-``)."""
    def flag(name: str, **kwargs: Any) -> None:
        parser.add_argument(f"--{prefix}{name}", **kwargs)

    flag("template", help="judge template file, or a shipped one: pairwise, pairwise_cot, score (lm:, openai:)")
    flag("cot", action="store_true", help="shorthand for the template pairwise_cot")
    flag("principles", help="text file (or constitution YAML) whose principles fill {principles}")
    flag("rate", type=float, default=0.0, help="HTTP judges: at most this many requests/s (0 = off)")
    flag("base-url", help="OpenAI-compatible base URL (default $RLHFKIT_JUDGE_BASE_URL or $OPENAI_BASE_URL)")
    flag("api-key-env", help="name of the variable holding the API key (default $RLHFKIT_JUDGE_API_KEY, then "
                             "$OPENAI_API_KEY)")
    flag("timeout", type=float, default=60.0, help="HTTP judges: timeout per request (s)")
    flag("max-retries", type=int, default=3, help="HTTP judges: retries (timeouts, 429, 5xx)")
    flag("reply-retries", type=int, default=2, help="times to ask again after an unreadable reply")
    flag("temperature", type=float, default=1.0,
         help="scoring judges used pairwise: P(a better) = sigmoid((score_a - score_b) / temperature)")


def judge_flag_defaults(prefix: str = "") -> dict[str, Any]:
    """The defaults of :func:`add_judge_flags`'s flags by destination name (``judge_template``, ...)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    add_judge_flags(parser, prefix)
    return {a.dest: a.default for a in parser._actions}


def judge_from_flags(spec: str, values: Any, prefix: str = "", device: str = "cpu") -> PairwiseJudge:
    """:func:`build_judge` for ``spec`` with the flags of :func:`add_judge_flags` read from ``values`` (an
    argparse namespace or a mapping; missing ones take their defaults)."""
    import os

    given = values if isinstance(values, dict) else vars(values)
    key = prefix.replace("-", "_")
    o = {name[len(key):]: given.get(name, default) for name, default in judge_flag_defaults(prefix).items()}
    api_key = None
    if o["api_key_env"]:
        api_key = os.environ.get(o["api_key_env"])
        if not api_key:
            raise ConfigError(f"--{prefix}api-key-env: ${o['api_key_env']} is not set")
    principles = ""
    if o["principles"]:
        from .constitution import principles_text

        principles = principles_text(o["principles"])
    return build_judge(spec, template="pairwise_cot" if o["cot"] and not o["template"] else o["template"],
                       principles=principles, base_url=o["base_url"], api_key=api_key, timeout=o["timeout"],
                       max_retries=o["max_retries"], reply_retries=o["reply_retries"], rate=o["rate"],
                       temperature=o["temperature"], device=str(device))
