"""Build a judge from a one-word spec (the ``--judge`` flag of ``rlhfkit judge`` and ``rlhfkit cai``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .backends import FunctionJudge, LocalLMJudge, OpenAIJudge, SourceJudge
from .base import PairwiseJudge

__all__ = ["JUDGE_KINDS", "build_judge"]

JUDGE_KINDS = ("lm:PATH (local causal LM, option-token log-probs), openai[:MODEL] (OpenAI-compatible "
               "chat endpoint), pairfn:FILE.py:FN (fn(prompt, first, second) -> P(first better) or 'A'/'B'), "
               "or a scoring judge: gold:DIR, model:PATH (reward model), fn:FILE.py:FN (fn(prompts, "
               "responses) -> scores), http:URL (reward server)")


def build_judge(spec: str, *, template: str | None = None, principles: str = "", base_url: str | None = None,
                api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3, reply_retries: int = 2,
                rate: float = 0.0, temperature: float = 1.0, device: str = "cpu", **http: Any) -> PairwiseJudge:
    """A judge from ``spec`` (see JUDGE_KINDS); ``template`` / ``principles`` apply to the model judges,
    ``temperature`` to the scoring judges (pairwise p = sigmoid(score difference / temperature))."""
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
        from ..rollout.rewards import load_reward_function

        return FunctionJudge(load_reward_function(rest).fn, name=text)
    from ..eval.runner import load_judge

    tokenizer = None
    if kind == "model" or (not sep and Path(text).expanduser().is_dir()):
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(rest if kind == "model" else text)
    try:
        source = load_judge(text, tokenizer, device=device)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; pairwise judges: {JUDGE_KINDS}") from None
    return SourceJudge(source, temperature=temperature, name=text)
