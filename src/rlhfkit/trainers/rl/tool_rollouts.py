"""``--tools``: the RL step's side of tool episodes. Each prompt is rendered with the tools offered, each
generate call samples :class:`~rlhfkit.rollout.episodes.ToolEpisodes`, and the step's tool counts are summed
over its generate calls (dynamic sampling's refills too) and over ranks for the metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...rollout.episodes import ToolEpisodes
from ...rollout.tool_prompts import ToolPrompts, ToolSettings
from .config import RLConfig


class ToolRollouts:
    def __init__(self, config: RLConfig, tokenizer: Any):
        self.config, self.tokenizer = config, tokenizer
        settings = ToolSettings(config.tools or "", config.max_turns, config.tool_timeout, config.tool_max_chars)
        self.tool_prompts = ToolPrompts(settings, tokenizer, tools=None if config.tools else [])
        self.tools = self.tool_prompts.tools
        self.started: list[ToolEpisodes] = []  # this step's episodes, of each generate call (dynamic sampling's too)

    def episodes(self, prompts: list[dict]) -> tuple[list[list[int]], ToolEpisodes]:
        """The prompts' ids as the policy sees them (tools offered: the whole prompt, ``--max-prompt-length``
        cut only the data's rendering) and the episodes of one generate call
        (:class:`rlhfkit.rollout.tool_prompts.ToolPrompts`)."""
        prompt_ids, episodes = self.tool_prompts.episodes([p.get("raw_prompt", p["prompt"]) for p in prompts])
        self.started.append(episodes)
        return prompt_ids, episodes

    def metrics(self, rollout: Any, sum_across_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """This step's tool counts (``tools/...``) over every rank's rollouts, and the step's rollout's mean turns
        and tool calls per episode; then a fresh count for the next step."""
        counts: dict[str, float] = {}
        for episodes in self.started:
            for name, value in episodes.stats.as_dict().items():
                counts[name] = counts.get(name, 0) + value
        counts.update(episodes=len(rollout.turns), turns=sum(rollout.turns), calls=sum(rollout.tool_calls))
        totals = summed(counts, sum_across_ranks)
        self.started = []
        episodes = max(totals["episodes"], 1.0)
        return {**{k: v for k, v in totals.items() if k.startswith("tools/")}, "turns_mean": totals["turns"] / episodes,
                "tool_calls_mean": totals["calls"] / episodes}


def summed(counts: dict[str, float], sum_across_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """``counts`` summed over every rank (one all-reduce), by name."""
    names = list(counts)
    values = sum_across_ranks(torch.tensor([float(counts[k]) for k in names], dtype=torch.float32)).tolist()
    return dict(zip(names, values))
