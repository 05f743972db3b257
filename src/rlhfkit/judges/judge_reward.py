"""A scoring judge as a reward source (``score(ScoringBatch) -> Tensor``) for the RL trainers and evaluation."""

from __future__ import annotations

import torch

from .base import ScoringJudge

__all__ = ["JudgeReward"]


class JudgeReward:
    """Wraps a :class:`ScoringJudge` (e.g. an OpenAI-compatible endpoint asked for ``Score: N``) so that it
    follows ``rlhfkit.rollout.rewards.RewardSource``: one float32 score per response, in order."""

    def __init__(self, judge: ScoringJudge):
        if not callable(getattr(judge, "score_many", None)):
            raise TypeError(f"judge '{getattr(judge, 'name', judge)}' cannot score single responses")
        self.judge = judge
        self.name = f"judge:{judge.name}"

    def score(self, batch) -> torch.Tensor:
        return torch.tensor(self.judge.score_many(list(batch.prompts), list(batch.responses)), dtype=torch.float32)
