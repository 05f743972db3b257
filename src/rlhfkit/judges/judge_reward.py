"""Judges as reward sources (``score(ScoringBatch) -> Tensor``) for the RL trainers and evaluation.

:class:`JudgeReward` wraps a scoring judge (one score per response). :class:`PairwiseReward` turns a pairwise
judge (``compare(prompt, a, b)``, asked in both orders) into a reward, in one of two modes:

* **reference** (``reference`` = a dataset column, e.g. ``chosen`` or ``reference``): each response is
  compared with its row's reference response; reward = P(response better than the reference) in [0, 1].
  Judge calls per step: N ``compare`` = 2N single-order calls (N responses).
* **group** (no reference): each response is compared with the other samples of its prompt (a group = the
  adjacent responses to the same prompt, the ``num_generations`` samples of GRPO / RLOO); reward_i =
  mean_{j != i} P(i better than j), in [0, 1]. Each unordered pair is judged once (P(j > i) = 1 − P(i > j)),
  so a group of G costs G(G−1)/2 ``compare`` = G(G−1) single-order calls; two identical responses get
  exactly 1/2 without a call (what the both-orders average gives any judge). A group of one sample has
  nothing to compare with: an error, not a made-up reward.

P rather than 2P − 1: the reward then has the same [0, 1] range in both modes, 1/2 means "as good as the
other", and group advantages (GRPO, RLOO) do not change under an affine map anyway.
:func:`reward_judge_source` builds the source of a ``--reward-judge`` spec (either kind).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError, RlhfkitError
from .base import JudgeReplyError, PairwiseJudge, ScoringJudge
from .templates import response_text

__all__ = ["JUDGE_METRIC", "JudgeReward", "PairwiseReward", "judge_groups", "reward_judge_source"]

JUDGE_METRIC = "judge_mean"  # logged as reward/judge_mean


class JudgeReward:
    """Wraps a :class:`ScoringJudge` (e.g. an OpenAI-compatible endpoint asked for ``Score: N``) so that it
    follows ``rlhfkit.rollout.rewards.RewardSource``: one float32 score per response, in order."""

    def __init__(self, judge: ScoringJudge):
        if not callable(getattr(judge, "score_many", None)):
            raise TypeError(f"judge '{getattr(judge, 'name', judge)}' cannot score single responses")
        self.judge = judge
        self.name = f"judge:{judge.name}"
        self.metric_name = JUDGE_METRIC

    def score(self, batch) -> torch.Tensor:
        return torch.tensor(self.judge.score_many(list(batch.prompts), list(batch.responses)), dtype=torch.float32)


def judge_groups(prompts: Sequence[Any]) -> list[range]:
    """Runs of adjacent responses to the same prompt (a rollout's G samples of each prompt)."""
    groups: list[range] = []
    start = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            groups.append(range(start, i))
            start = i
    return groups


class PairwiseReward:
    """A pairwise judge as a reward source: P(better than the row's ``reference``), or the mean P of beating
    each other sample of the group (see the module docstring). ``calls`` counts ``compare`` calls."""

    def __init__(self, judge: PairwiseJudge, reference: str | None = None):
        self.judge = judge
        self.reference = reference or None
        self.name = f"judge:{judge.name}" + (f" vs {self.reference}" if self.reference else " in groups")
        self.metric_name = JUDGE_METRIC
        self.calls = 0

    def check_columns(self, available: Sequence[str], where: str = "the dataset") -> None:
        if self.reference and self.reference not in available:
            raise ConfigError(f"--reward-judge-reference '{self.reference}' is not a column of {where} (columns: "
                              f"{', '.join(available)})")

    def _p(self, prompt: Any, a: Any, b: Any) -> float:
        """P(a better than b) over both orders; identical responses are 1/2 without a call."""
        if response_text(a) == response_text(b):
            return 0.5
        self.calls += 1
        try:
            return float(self.judge.compare(prompt, a, b).p_a)
        except JudgeReplyError as exc:
            raise RlhfkitError(f"reward judge '{self.judge.name}' gave no verdict: {exc}") from None

    def score(self, batch) -> torch.Tensor:
        prompts, responses = list(batch.raw_prompts), list(batch.responses)
        if self.reference:
            if self.reference not in batch.columns:
                self.check_columns(["prompt", *batch.columns], "the scored batch")
            refs = batch.columns[self.reference]
            for i, ref in enumerate(refs):
                if ref is None:
                    raise RlhfkitError(f"reward judge: response {i} has no '{self.reference}' value to compare with")
            return torch.tensor([self._p(p, r, ref) for p, r, ref in zip(prompts, responses, refs)],
                                dtype=torch.float32)
        rewards = [0.0] * len(responses)
        for group in judge_groups(list(batch.prompts)):
            if len(group) < 2:
                raise RlhfkitError("reward judge in group mode: a prompt with one sample has nothing to be "
                                   "compared with (use --num-generations >= 2 or --reward-judge-reference)")
            members = list(group)
            for x, i in enumerate(members):
                for j in members[x + 1:]:
                    p = self._p(prompts[i], responses[i], responses[j])
                    rewards[i] += p
                    rewards[j] += 1.0 - p
            for i in members:
                rewards[i] /= len(members) - 1
        return torch.tensor(rewards, dtype=torch.float32)


def reward_judge_source(spec: str, policy_tokenizer: Any, device: torch.device | str = "cpu",
                        reference: str | None = None, **judge_options: Any) -> Any:
    """The reward source of ``--reward-judge SPEC``: a scoring spec scores each response (the source of
    :func:`.spec.load_judge`); a pairwise spec (lm:, openai:, pairfn:) gives a :class:`PairwiseReward`
    (``judge_options`` go to :func:`.spec.build_judge`). Its mean is logged as ``reward/judge_mean``."""
    from .spec import build_judge, is_pairwise_spec, load_judge

    if is_pairwise_spec(spec):
        return PairwiseReward(build_judge(spec, device=str(device), **judge_options), reference)
    if reference:
        raise ConfigError(f"--reward-judge-reference needs a pairwise judge (lm:, openai:, pairfn:); "
                          f"'{spec}' scores each response on its own")
    source = load_judge(spec, policy_tokenizer, device)
    source.metric_name = JUDGE_METRIC
    return source
