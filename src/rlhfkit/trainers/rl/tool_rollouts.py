"""``--tools``: the RL step's side of tool episodes. Each prompt is rendered with the tools offered, each
generate call samples :class:`~rlhfkit.rollout.episodes.ToolEpisodes`, and the step's tool counts are summed
over its generate calls (dynamic sampling's refills too) and over ranks for the metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...rollout.episodes import ToolEpisodes
from ...rollout.tools import load_tools, render_with_tools
from .config import RLConfig


class ToolRollouts:
    def __init__(self, config: RLConfig, tokenizer: Any):
        self.config, self.tokenizer = config, tokenizer
        self.tools = load_tools(config.tools)
        self._prompts: dict[tuple[int, ...], tuple[list[dict], list[int]]] = {}
        self.started: list[ToolEpisodes] = []  # this step's episodes, of each generate call (dynamic sampling's too)

    def prompt(self, record: dict) -> tuple[list[dict], list[int]]:
        """A prompt's chat messages (a plain string is one user turn: tool turns are chat turns) and its ids
        rendered with the tools offered (:func:`rlhfkit.rollout.tools.render_with_tools`), cached per prompt.
        It is the whole prompt: ``--max-prompt-length`` cut the data's rendering, the tool schemas come on top."""
        key = tuple(record["prompt_ids"])
        if key not in self._prompts:
            raw = record.get("raw_prompt", record["prompt"])
            messages = list(raw) if isinstance(raw, list) else [{"role": "user", "content": raw}]
            text = render_with_tools(self.tokenizer, messages, self.tools)
            self._prompts[key] = messages, self.tokenizer(text, add_special_tokens=False).input_ids
        return self._prompts[key]

    def episodes(self, prompts: list[dict]) -> tuple[list[list[int]], ToolEpisodes]:
        """The prompts' ids as the policy sees them (tools offered) and the episodes of one generate call."""
        conversations, prompt_ids = zip(*(self.prompt(p) for p in prompts))
        cfg = self.config
        self.started.append(ToolEpisodes(self.tools, conversations, cfg.max_turns, cfg.tool_timeout,
                                          cfg.tool_max_chars))
        return list(prompt_ids), self.started[-1]

    def metrics(self, rollout: Any, sum_across_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """This step's counts over every rank's rollouts, and the step's rollout's mean turns and tool calls
        per episode; then a fresh count for the next step."""
        counts: dict[str, float] = {}
        for episodes in self.started:
            for name, value in episodes.stats.as_dict().items():
                counts[name] = counts.get(name, 0) + value
        counts.update(episodes=len(rollout.turns), turns=sum(rollout.turns), calls=sum(rollout.tool_calls))
        totals = dict(zip(counts, sum_across_ranks(torch.tensor([float(v) for v in counts.values()],
                                                                dtype=torch.float32)).tolist()))
        self.started = []
        episodes = max(totals.pop("episodes"), 1.0)
        return {**{k: totals[k] for k in list(totals)[:-2]}, "turns_mean": totals["turns"] / episodes,
                "tool_calls_mean": totals["calls"] / episodes}
