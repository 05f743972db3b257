"""The judge interface: pairwise verdicts judged in both orders, scoring, and position-bias statistics.

Every judge has a ``name`` and ``compare(prompt, a, b) -> Verdict``. Pairwise backends implement
``compare_once(prompt, first, second) -> (p_first, rationale)``: the probability that the response shown in
the first slot is better. ``compare`` asks for both orders (a first, then b first) and averages:

    p(a better) = (p_forward + p_backward) / 2,  p_forward = p_first(a, b),  p_backward = 1 - p_first(b, a)

so a judge that always prefers the first slot gives p = 0.5 (a tie) for every pair. The verdict is
*inconsistent* when the two orders pick different winners (a tie in one order and a pick in the other
counts as inconsistent). Scoring judges also have ``score(prompt, response) -> float``; their pairwise
verdict is ``sigmoid((score_a - score_b) / temperature)``, the same in both orders.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import RlhfkitError

__all__ = ["JudgeReplyError", "PairwiseJudge", "PositionStats", "ScoringJudge", "Verdict", "sigmoid"]


class JudgeReplyError(RlhfkitError):
    """A judge's reply could not be read as a verdict (names neither option, not JSON, no score)."""


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _pick(p: float) -> int:
    """+1 when the probability favours a, -1 when it favours b, 0 for a tie."""
    return (p > 0.5) - (p < 0.5)


@dataclass
class Verdict:
    """A pairwise judgement of responses a and b to one prompt, from both presentation orders."""

    p_a: float  # P(a is better), averaged over both orders
    p_forward: float  # P(a better) with a shown first
    p_backward: float  # P(a better) with a shown second
    rationales: list[str] = field(default_factory=list)  # the judge's text, forward then backward (if any)

    @property
    def consistent(self) -> bool:
        return _pick(self.p_forward) == _pick(self.p_backward)

    @property
    def winner(self) -> str | None:
        """'a', 'b' or None (a tie)."""
        return {1: "a", -1: "b", 0: None}[_pick(self.p_a)]

    def as_dict(self) -> dict[str, Any]:
        return {"p_a": self.p_a, "p_forward": self.p_forward, "p_backward": self.p_backward,
                "consistent": self.consistent}


def _check_p(p: Any, who: str) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise JudgeReplyError(f"{who}: returned {p!r}, not a probability") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise JudgeReplyError(f"{who}: returned {value!r}, not a probability in [0, 1]")
    return value


class PairwiseJudge:
    """Base class of pairwise judges: subclasses implement ``compare_once``."""

    name = "judge"

    def compare_once(self, prompt: Any, first: Any, second: Any) -> tuple[float, str]:
        """(P(first slot better), rationale text or '')."""
        raise NotImplementedError

    def compare(self, prompt: Any, a: Any, b: Any) -> Verdict:
        p_first, why_forward = self.compare_once(prompt, a, b)
        p_first_swapped, why_backward = self.compare_once(prompt, b, a)
        forward = _check_p(p_first, self.name)
        backward = 1.0 - _check_p(p_first_swapped, self.name)
        rationales = [r for r in (why_forward, why_backward) if r]
        return Verdict(p_a=(forward + backward) / 2, p_forward=forward, p_backward=backward,
                       rationales=rationales)


class ScoringJudge(PairwiseJudge):
    """A judge that scores one response; pairwise by ``sigmoid((s_a - s_b) / temperature)``."""

    temperature = 1.0

    def score(self, prompt: Any, response: Any) -> float:
        raise NotImplementedError

    def score_many(self, prompts: list[Any], responses: list[Any]) -> list[float]:
        return [self.score(p, r) for p, r in zip(prompts, responses)]

    def verdict(self, s_a: float, s_b: float) -> Verdict:
        """The pairwise verdict from the two responses' scores (the same in both orders)."""
        if not (math.isfinite(s_a) and math.isfinite(s_b)):
            raise JudgeReplyError(f"{self.name}: non-finite score ({s_a}, {s_b})")
        p = sigmoid((s_a - s_b) / self.temperature)
        return Verdict(p_a=p, p_forward=p, p_backward=p)

    def compare(self, prompt: Any, a: Any, b: Any) -> Verdict:
        return self.verdict(*self.score_many([prompt, prompt], [a, b]))

    def compare_once(self, prompt: Any, first: Any, second: Any) -> tuple[float, str]:
        return self.compare(prompt, first, second).p_a, ""


@dataclass
class PositionStats:
    """Counts over verdicts: inconsistent pairs, and how often the first slot wins a single-order judgement.

    A judge without position bias wins with the first slot as often as with the second (exactly so when every
    verdict is consistent). ``biased`` is True when a two-sided binomial test of first-slot wins against 1/2
    has p < ``alpha`` and the first-slot win rate is at least ``min_effect`` away from 1/2.
    """

    pairs: int = 0
    inconsistent: int = 0
    ties: int = 0
    first_wins: int = 0  # single-order judgements won by the first slot
    second_wins: int = 0
    alpha: float = 0.05
    min_effect: float = 0.1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, verdict: Verdict) -> None:
        # p_first of the forward order is p_forward (a first); of the backward order, P(b) = 1 - p_backward
        picks = [_pick(verdict.p_forward), _pick(1.0 - verdict.p_backward)]
        with self._lock:
            self.pairs += 1
            self.inconsistent += int(not verdict.consistent)
            self.ties += int(verdict.winner is None)
            self.first_wins += sum(p == 1 for p in picks)
            self.second_wins += sum(p == -1 for p in picks)

    @property
    def first_slot_rate(self) -> float | None:
        n = self.first_wins + self.second_wins
        return self.first_wins / n if n else None

    @property
    def p_value(self) -> float | None:
        n = self.first_wins + self.second_wins
        if not n:
            return None
        from scipy.stats import binomtest

        return float(binomtest(self.first_wins, n, 0.5).pvalue)

    @property
    def biased(self) -> bool:
        rate, p = self.first_slot_rate, self.p_value
        return rate is not None and p is not None and p < self.alpha and abs(rate - 0.5) >= self.min_effect

    def summary(self) -> dict[str, Any]:
        rate = self.first_slot_rate
        return {
            "pairs": self.pairs,
            "inconsistent": self.inconsistent,
            "inconsistent_rate": self.inconsistent / self.pairs if self.pairs else None,
            "ties": self.ties,
            "first_slot_win_rate": rate,
            "position_bias_p_value": self.p_value,
            "position_biased": self.biased,
            "biased_towards": (("first" if rate > 0.5 else "second") if self.biased and rate is not None else None),
        }
