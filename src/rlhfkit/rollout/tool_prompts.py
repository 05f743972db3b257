"""Prompts with tools offered, and the episodes of one generate call: what RL rollouts and ``rlhfkit eval``
share when a policy may call tools (``--tools``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .episodes import ToolEpisodes
from .tool_worker import shared_worker
from .tools import Tool, load_tools, render_with_tools

__all__ = ["ToolPrompts", "ToolSettings", "loaded_tools", "start_tool_worker"]

_LOADED: dict[str, list[Tool]] = {}


@dataclass(frozen=True)
class ToolSettings:
    """``--tools`` and the bounds of an episode, as the RL trainers and ``rlhfkit eval`` take them."""

    spec: str                 # "path/to/file.py:fn1,fn2" (or "package.module:fn")
    max_turns: int = 3        # most tool calls per response (the next call ends the response)
    timeout_s: float = 10.0   # seconds a call may run before it is killed (an error turn)
    max_chars: int = 2000     # longest tool answer in characters (the rest is cut, with a note)


def loaded_tools(spec: str) -> list[Tool]:
    """The tools of ``spec``, loaded once per process: the same functions every time, so that one worker
    process (:func:`rlhfkit.rollout.tool_worker.shared_worker`) serves every rollout of a run."""
    if spec not in _LOADED:
        _LOADED[spec] = load_tools(spec)
    return _LOADED[spec]


def start_tool_worker(spec: str) -> list[Tool]:
    """Load ``spec``'s tools and fork their worker process now. Called before any model is loaded, the worker
    holds none of the models' memory (a worker forked later keeps its own copy of every page the trainer
    rewrites after the fork)."""
    tools = loaded_tools(spec)
    shared_worker((t.name, t.function) for t in tools).start()
    return tools


def prompt_messages(prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A prompt as chat messages: tool turns are chat turns, so a plain string is one user turn."""
    return [dict(m) for m in prompt] if isinstance(prompt, list | tuple) else [{"role": "user", "content": prompt}]


class ToolPrompts:
    """The tools of ``settings`` loaded once; prompts rendered with them offered (cached per prompt), and
    the :class:`~rlhfkit.rollout.episodes.ToolEpisodes` of each generate call."""

    def __init__(self, settings: ToolSettings, tokenizer: Any, tools: Sequence[Tool] | None = None):
        self.settings, self.tokenizer = settings, tokenizer
        self.tools = list(tools) if tools is not None else loaded_tools(settings.spec)
        self._cache: dict[str, tuple[list[dict[str, Any]], list[int]]] = {}

    def prompt(self, prompt: str | Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
        """The prompt's messages and its ids with the tools offered
        (:func:`rlhfkit.rollout.tools.render_with_tools`): the whole prompt, the tool schemas included."""
        messages = prompt_messages(prompt)
        key = repr(messages)
        if key not in self._cache:
            text = render_with_tools(self.tokenizer, messages, self.tools)
            self._cache[key] = messages, self.tokenizer(text, add_special_tokens=False).input_ids
        return self._cache[key]

    def episodes(self, prompts: Sequence[str | Sequence[dict[str, Any]]]) -> tuple[list[list[int]], ToolEpisodes]:
        """The prompts' ids as the policy sees them and the episodes of one generate call over them."""
        conversations, prompt_ids = zip(*(self.prompt(p) for p in prompts)) if prompts else ((), ())
        s = self.settings
        return list(prompt_ids), ToolEpisodes(self.tools, conversations, s.max_turns, s.timeout_s, s.max_chars)
