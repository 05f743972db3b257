"""Environments: multi-turn episodes where the other side is a program or a simulated user (issue 24).

An environment is a class named on the command line (``--env path/to/file.py:ClassName`` or
``package.module:ClassName``), built with no arguments, one instance per episode (per sampled response):

- ``reset(row) -> first observation``: ``row`` is the dataset row, every column (``prompt`` as written, and
  the others: ``{"prompt": ..., "answer": 42, ...}``). It returns the user turn that opens the episode (a
  string), or the whole opening conversation (a list of chat messages), or None to open with the row's own
  prompt. The samples of a row share one prompt (prefilled once for all of them), so the opening must depend
  on the row alone: a sample whose reset gives another opening than its row's first one counts as an error.
- ``step(text) -> (observation, reward, done)``: called with the policy's text at the end of each of its
  assistant turns (when it draws EOS, or writes a stop string), special tokens left out. ``reward`` (a finite
  number) is that turn's; unless ``done`` (or the observation is None), the observation is appended as the
  next user turn, in the same KV cache, and the policy answers it.

An episode ends when the environment says ``done``, after ``max_turns`` steps (the last observation is not
shown), or when the token budget runs out (a turn cut by it is not scored; an observation that does not fit
ends the episode there, truncated). Its return is the sum of its turns' rewards. An environment that raises
in ``reset`` or ``step`` (or returns something else than the above) never stops the rollout: the error is
counted (``env/errors``) and logged once per kind, and the episode ends with return 0 (a failed reset: the row
ends at its first token, none of which the policy is trained on). Observations are rendered with the chat
template (:meth:`rlhfkit.rollout.episodes.ForcedEpisodes.append_turn`) as forced tokens, policy mask 0; an
environment's episode may call tools too (:class:`EnvEpisodes` extends
:class:`~rlhfkit.rollout.episodes.ToolEpisodes`).
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import ConfigError, ModelError
from .episodes import ToolEpisodes
from .scoring import _one_line
from .tools import Tool
from .user_code import load_functions

__all__ = ["EnvEpisodes", "EnvStats", "Environment", "episode_returns", "episode_row", "load_environment",
           "open_episodes"]

logger = logging.getLogger("rlhfkit")
PROTOCOL = ("an environment needs reset(row) -> first observation and step(text) -> (observation, reward, done)")
_warned: set[str] = set()  # kinds of environment errors already logged in this process


class _ProtocolError(ValueError):
    """What an environment returned does not follow the protocol."""


@runtime_checkable
class Environment(Protocol):
    """What ``--env`` names (a class, built with no arguments once per episode)."""

    def reset(self, row: dict[str, Any]) -> str | list[dict[str, Any]] | None:
        """The opening user turn (or opening messages, or None: the row's own prompt) for dataset ``row``."""
        ...

    def step(self, text: str) -> tuple[str | None, float, bool]:
        """The policy's turn ``text`` -> (next user turn or None, this turn's reward, whether the episode is over)."""
        ...


def load_environment(spec: str) -> Callable[[], Any]:
    """The environment class of ``path/to/file.py:ClassName`` (or ``package.module:ClassName``); a missing file,
    class or method and a class that cannot be built without arguments are one-line ConfigErrors."""
    [(name, factory)] = load_functions(spec, "environment", noun="class")
    where = f"environment '{name}' in '{spec.strip().rpartition(':')[0].strip()}'"
    if isinstance(factory, type):
        missing = [m for m in ("reset", "step") if not callable(getattr(factory, m, None))]
        if missing:
            raise ConfigError(f"{where} has no method {' or '.join(missing)} ({PROTOCOL})")
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise ConfigError(f"{where} cannot be built without arguments (one instance is made per episode, "
                          "as ClassName())") from None
    except ValueError:  # no signature to read (a builtin): found out at the first episode
        pass
    return factory


def episode_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset row of a prompt record (:func:`rlhfkit.data.prepare_prompts`): ``prompt`` as written and
    every other column."""
    return {"prompt": record.get("raw_prompt", record["prompt"]), **(record.get("columns") or {})}


def _prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def _opening(value: Any, row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The opening conversation from what ``reset`` returned."""
    if value is None:
        return _prompt_messages(row["prompt"])
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [dict(m) for m in value]
    raise _ProtocolError(f"returned {_one_line(repr(value), 60)}; expected the first observation (a string), "
                         "a list of chat messages or None")


def _warn(kind: str, message: str, outcome: str = "counted in env/errors; the episode's return is 0") -> None:
    """Log the first error of each kind in this process."""
    if kind not in _warned:
        _warned.add(kind)
        logger.warning("%s (%s; logged once)", message, outcome)


def _describe(method: str, exc: Exception) -> tuple[str, str]:
    """(kind, message) of an environment's failure in ``method``."""
    if isinstance(exc, _ProtocolError):
        return f"{method} protocol", f"environment {method} {exc}"
    return f"{method} {type(exc).__name__}", f"environment {method} raised {type(exc).__name__}: {_one_line(exc)}"


def open_episodes(factory: Callable[[], Any], records: Sequence[Mapping[str, Any]],
                  num_samples: int) -> tuple[list[Any], list[list[dict[str, Any]]], dict[int, tuple[str, str]]]:
    """Build and reset one environment per episode (``num_samples`` per record, prompt-major): the
    environments (None where building failed), each record's opening conversation, and the rows whose
    environment failed to open, with (kind, message)."""
    envs: list[Any] = []
    conversations: list[list[dict[str, Any]]] = []
    failed: dict[int, tuple[str, str]] = {}
    for p, record in enumerate(records):
        row, openings = episode_row(record), []
        for k in range(num_samples):
            index, env, opening = p * num_samples + k, None, None
            try:
                env = factory()
                opening = _opening(env.reset(dict(row)), row)
            except Exception as exc:  # noqa: BLE001 - user code: counted, never raised
                failed[index] = _describe("reset", exc)
            envs.append(env)
            openings.append((index, opening))
        first = next((o for _, o in openings if o is not None), None)
        for index, opening in openings:
            if opening is not None and opening != first:
                failed[index] = ("reset opening", "environment reset gave another opening than its row's first sample "
                                 "(the samples of a row share one prompt: reset must depend on the row alone)")
        conversations.append(first if first is not None else _prompt_messages(row["prompt"]))
    return envs, conversations, failed


def _step_outcome(outcome: Any) -> tuple[str | None, float, bool]:
    """``step``'s (observation, reward, done), checked."""
    if not isinstance(outcome, tuple | list) or len(outcome) != 3:
        raise _ProtocolError(f"returned {_one_line(repr(outcome), 60)}; expected (observation, "
                             "reward, done)")
    observation, reward, done = outcome
    if torch.is_tensor(reward) and reward.numel() == 1:
        reward = reward.item()
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise _ProtocolError(f"returned the reward {_one_line(repr(reward), 40)}; expected a "
                             "finite number")
    if observation is not None and not isinstance(observation, str):
        raise _ProtocolError(f"returned the observation {_one_line(repr(observation), 40)}; "
                             "expected a string or None")
    return observation, float(reward), bool(done)


@dataclass
class EnvStats:
    """One rollout's environment counts, for the metrics."""

    episodes: int = 0
    steps: int = 0  # turns the environment scored
    reward: float = 0.0  # the sum of those turns' rewards
    done: int = 0  # episodes the environment ended itself
    errors: int = 0  # resets and steps that raised or broke the protocol
    template_errors: int = 0  # observations the chat template could not append (the episode ended, truncated)

    def as_dict(self) -> dict[str, float]:
        return {f"env/{f.name}": float(getattr(self, f.name)) for f in fields(self)}


class EnvEpisodes(ToolEpisodes):
    """The environment side of one rollout: ``envs[row]`` (reset already, :func:`open_episodes`) answers each
    of the row's turns; ``failed`` rows (their reset failed) end at their first token.

    ``conversations[p]`` is prompt ``p``'s opening conversation (its prompt ids rendered from it, with
    ``tools`` offered when there are any); ``max_turns`` bounds the environment's steps per episode and the
    tool calls. After the rollout, :attr:`rewards` holds each row's ``(column, reward)`` per scored turn and
    :attr:`env_stats` the counts; :meth:`finish` puts the rewards on the rollout (``turn_rewards``).
    """

    ends_turns = True

    def __init__(self, envs: Sequence[Any], conversations: Sequence[Sequence[Mapping[str, Any]]],
                 max_turns: int = 3, tools: Sequence[Tool] = (), timeout_s: float = 10.0, max_chars: int = 2000,
                 failed: Mapping[int, tuple[str, str]] | None = None):
        super().__init__(tools, conversations, max_turns, timeout_s, max_chars)
        self.envs, self.failed = list(envs), dict(failed or {})
        self.env_stats = EnvStats()

    def start(self, tokenizer: Any, n_rows: int, num_samples: int, steps: int,
              stop_strings: Sequence[str] = ()) -> None:
        super().start(tokenizer, n_rows, num_samples, steps, stop_strings)
        if len(self.envs) != n_rows:
            raise ValueError(f"EnvEpisodes: {len(self.envs)} environments for {n_rows} rows; give one per row")
        self.rewards: list[list[tuple[int, float]]] = [[] for _ in range(n_rows)]
        self.env_steps = [0] * n_rows
        self.errored = [row in self.failed for row in range(n_rows)]
        self.env_stats = EnvStats(episodes=n_rows, errors=len(self.failed))
        for row, (kind, message) in self.failed.items():
            _warn(kind, message, "counted in env/errors; the row ends at its first token, return 0, no loss")
            self.mask[row] = 0.0  # nothing the policy did: no loss on it

    def after_step(self, step: int, tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor,
                   done: torch.Tensor) -> bool:
        if step == 0:  # a failed reset: the row ends at once
            for row in self.failed:
                self._end(row, 0, lengths, done)
        return super().after_step(step, tokens, logps, lengths, done)

    def _turn_ended(self, row: int, step: int, tokens: torch.Tensor, lengths: torch.Tensor,
                    done: torch.Tensor) -> None:
        if not self.errored[row]:
            self._env_turn(row, step, tokens, lengths, done)

    def _stop(self, row: int, step: int, tokens: torch.Tensor, lengths: torch.Tensor, done: torch.Tensor) -> None:
        self._end(row, step, lengths, done)  # a stop string ends the turn as an EOS would
        if not self.errored[row]:
            self._env_turn(row, step, tokens, lengths, done)

    def _fail(self, row: int, exc: Exception) -> None:
        self.errored[row] = True
        self.rewards[row] = []  # the episode's return is 0
        self.env_stats.errors += 1
        _warn(*_describe("step", exc))

    def _env_turn(self, row: int, step: int, tokens: torch.Tensor, lengths: torch.Tensor,
                  done: torch.Tensor) -> None:
        """The policy's turn ended at ``step`` (the row is ended): score it, then append the observation."""
        said = self.said(row, step, tokens)
        try:
            observation, reward, finished = _step_outcome(self.envs[row].step(said))
        except Exception as exc:  # noqa: BLE001 - user code: counted, never raised
            self._fail(row, exc)
            return
        self.env_steps[row] += 1
        self.rewards[row].append((step, reward))
        self.env_stats.steps += 1
        self.env_stats.reward += reward
        if finished or observation is None:
            self.env_stats.done += 1
            return
        if self.env_steps[row] >= self.max_turns:  # out of turns: the last observation is not shown
            return
        try:
            self.append_turn(row, step, said, {"role": "user", "content": observation}, tokens, lengths, done)
        except ModelError as exc:  # the template re-renders earlier turns: this conversation cannot go on
            self._end(row, step, lengths, done, truncated=True)
            self.env_stats.template_errors += 1
            _warn("template", f"environment observation not appended: {exc}",
                  "counted in env/template_errors; the episode ends there, truncated")

    def finish(self, rollout: Any) -> Any:
        """:meth:`ToolEpisodes.finish`, and ``turn_rewards`` per row."""
        rollout = super().finish(rollout)
        rollout.turn_rewards = [list(r) for r in self.rewards]
        return rollout


def episode_returns(turn_rewards: Sequence[Sequence[tuple[int, float]]]) -> torch.Tensor:
    """Each episode's return, float32 [N]: the sum of its turns' rewards."""
    return torch.tensor([sum(r for _, r in turns) for turns in turn_rewards], dtype=torch.float32)
