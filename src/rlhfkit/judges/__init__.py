"""AI judges: pairwise (``compare(prompt, a, b) -> Verdict``, both orders averaged) and scoring
(``score(prompt, response) -> float``) judgements from a local causal LM, an OpenAI-compatible endpoint, a
reward model, the demo world's gold judge or a Python function; ``label_file`` is ``rlhfkit judge``."""

from .backends import (
    FunctionJudge,
    LocalLMJudge,
    OpenAIJudge,
    RateLimiter,
    SourceJudge,
    parse_score,
    parse_verdict,
)
from .base import JudgeReplyError, PairwiseJudge, PositionStats, ScoringJudge, Verdict
from .judge_pairs import label_file, label_rows, summarize
from .judge_reward import JudgeReward
from .spec import JUDGE_KINDS, JUDGE_SPECS, build_judge, load_judge, register_judge_kind
from .templates import JudgeTemplate, load_template

__all__ = [
    "JUDGE_KINDS",
    "JUDGE_SPECS",
    "FunctionJudge",
    "JudgeReplyError",
    "JudgeReward",
    "JudgeTemplate",
    "LocalLMJudge",
    "OpenAIJudge",
    "PairwiseJudge",
    "PositionStats",
    "RateLimiter",
    "ScoringJudge",
    "SourceJudge",
    "Verdict",
    "build_judge",
    "label_file",
    "label_rows",
    "load_judge",
    "load_template",
    "parse_score",
    "parse_verdict",
    "register_judge_kind",
    "summarize",
]
