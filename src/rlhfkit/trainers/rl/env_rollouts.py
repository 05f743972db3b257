"""``--env``: the RL step's side of environment episodes (:mod:`rlhfkit.rollout.environments`).

Each generate call builds and resets one environment per sampled response, renders each prompt's opening
conversation (tools offered too with ``--tools``) and samples
:class:`~rlhfkit.rollout.environments.EnvEpisodes`. The reward of an episode is its return, the sum of its
turns' rewards, plus the score of ``--reward-model`` / ``--reward-fn`` / ``--reward-url`` when one is given
(then optional; their weights do not apply to the environment's part; an episode whose environment failed
has return 0, the source still scores its text); group baselines (GRPO, RLOO) are over these totals. PPO's GAE gets each turn's reward on that turn's last policy token (:func:`scores_at_tokens`).
Metrics: ``env/turns_mean`` (turns the environment scored per episode), ``env/reward_per_turn``,
``env/errors``, ``env/done_share``, ``env/template_errors``, ``reward/env`` (the mean return), and the tool
episodes' ``turns_mean`` / ``tool_calls_mean`` (``tools/...`` with ``--tools``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...rollout.environments import EnvEpisodes, EnvStats, episode_returns, load_environment, open_episodes
from ...rollout.generate import Rollout
from ...rollout.rewards import score_records
from .config import RLConfig
from .tool_rollouts import ToolRollouts, summed


class EnvRollouts(ToolRollouts):
    def __init__(self, config: RLConfig, tokenizer: Any):
        super().__init__(config, tokenizer)  # the tools, when --tools is given too
        self.environment = load_environment(config.env)

    def episodes(self, prompts: list[dict]) -> tuple[list[list[int]], EnvEpisodes]:
        """The prompts' ids as the policy sees them (each row's opening conversation) and the episodes of one
        generate call, one freshly reset environment per response. The opening is the whole prompt:
        ``--max-prompt-length`` does not cut it."""
        cfg = self.config
        envs, conversations, failed = open_episodes(self.environment, prompts, cfg.num_generations)
        prompt_ids = [self.tool_prompts.prompt(c)[1] for c in conversations]  # rendered with the tools offered
        self.started.append(EnvEpisodes(envs, conversations, cfg.max_turns, self.tools, cfg.tool_timeout,
                                        cfg.tool_max_chars, failed))
        return prompt_ids, self.started[-1]

    def metrics(self, rollout: Any, sum_across_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The environment's counts over every rank's rollouts (dynamic sampling's refills included), then
        :meth:`ToolRollouts.metrics` (its ``tools/...`` counts with ``--tools`` only)."""
        counts = EnvStats().as_dict()
        for episodes in self.started:
            for name, value in episodes.env_stats.as_dict().items():
                counts[name] += value
        totals = summed(counts, sum_across_ranks)
        out = {k: v for k, v in super().metrics(rollout, sum_across_ranks).items()
               if self.tools or not k.startswith("tools/")}
        episodes, steps = max(totals["env/episodes"], 1.0), max(totals["env/steps"], 1.0)
        out.update({"env/turns_mean": totals["env/steps"] / episodes, "env/reward_per_turn": totals["env/reward"] / steps,
                    "env/errors": totals["env/errors"], "env/done_share": totals["env/done"] / episodes,
                    "env/template_errors": totals["env/template_errors"]})
        return out


def episode_rollouts(config: RLConfig, tokenizer: Any) -> ToolRollouts | None:
    """What makes a run's rollouts multi-turn: environment episodes (``--env``, with tools too when given),
    tool episodes (``--tools``), or None."""
    if config.env:
        return EnvRollouts(config, tokenizer)
    return ToolRollouts(config, tokenizer) if config.tools else None


def score_rollout(source: Any, prompts: list[dict], texts: list[str], rollout: Rollout, scored_ids: list[list[int]],
                  error: type[Exception], where: str = "") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rollout's rewards and each source's by name: the reward source's scores
    (:func:`rlhfkit.rollout.rewards.score_records`; ``source`` may be None with environment episodes) plus,
    with environment episodes, each episode's return (logged as ``reward/env``)."""
    if source is None and rollout.turn_rewards is None:
        raise error(f"no reward source for a rollout without environment episodes{where}")
    scores, by_source = (torch.zeros(len(texts)), {}) if source is None else score_records(
        source, prompts, texts, rollout.prompt_ids, scored_ids, rollout.ended, error, where)
    if rollout.turn_rewards is not None:
        returns = episode_returns(rollout.turn_rewards)
        scores, by_source = scores + returns, {"env": returns, **by_source}
    return scores, by_source


def scores_at_tokens(scores: torch.Tensor, mask: torch.Tensor,
                     turn_rewards: Sequence[Sequence[tuple[int, float]]] | None = None) -> torch.Tensor:
    """[N, T]: each response's score on its last policy token (``mask`` 1); with environment episodes each
    scored turn's reward moved from there to that turn's last policy token, so a row's rewards still sum
    to its score (shaped, normalised) and PPO credits each turn for its own reward."""
    n, width = mask.shape
    placed = torch.zeros_like(mask)
    last = (mask * torch.arange(1, width + 1)).argmax(-1)  # the last policy token (lengths - 1 without episodes)
    placed[torch.arange(n), last] += scores.to(placed.dtype)
    for row, turns in enumerate(turn_rewards or []):
        for column, reward in turns:
            if column < width and column != int(last[row]):
                placed[row, column] += reward
                placed[row, last[row]] -= reward
    return placed
