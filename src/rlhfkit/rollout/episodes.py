"""Tool-using episodes inside the decode loop: a row that writes a call gets the tool's answer as forced tokens.

The decode loop (:meth:`rlhfkit.rollout.generate.HFGenerationBackend.generate`, ``episodes=``) calls
:meth:`ToolEpisodes.after_step` once per decode step, after the step drew and recorded its tokens (eager or
lean step alike; neither is changed). There:

- **Forced tokens.** A row with pending forced ids (a tool turn's continuation) has the column just drawn
  overwritten with the next of them; the next step feeds that column as its input, so the KV cache holds
  exactly the conversation and nothing is prefilled again. Its recorded log-probability is 0 (the lean step
  does not hand its logits out, and forced tokens carry no loss: :attr:`policy_mask` is 0 there), and an end
  the draw caused (a sampled EOS) is undone, so a forced position never ends a row; a forced EOS (the end of
  the assistant turn a template writes) does not end one either, since only the draw ends rows.
- **Calls.** A row whose text since its last tool turn completes ``</tool_call>`` after ``<tool_call>``
  (checked on the tail only, like stop strings) does not end: the call is parsed and run (in a child process,
  with a timeout and a cap on the result's length), the tool turn's text
  (:func:`rlhfkit.rollout.tools.continuation_text`) is tokenized and queued as that row's forced tokens. A
  row's call after ``max_turns`` calls ends the row as a stop string would. The token budget
  (``max_new_tokens``) counts every token, forced ones included: a row whose tool turn does not fit ends
  right after its call, not ended (truncated).
- **Stop strings** end a row only in the policy's own text (never inside a tool's answer).

One object serves one rollout at a time; :meth:`ToolEpisodes.start` (called by the backend) resets it, and
after the rollout :attr:`stats` holds that rollout's :class:`~rlhfkit.rollout.tools.ToolStats`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .tools import (
    CALL_CLOSE,
    Tool,
    ToolStats,
    call_closed,
    continuation_text,
    parse_tool_call,
    run_tool_call,
    tool_message,
)

__all__ = ["ToolEpisodes"]


class ToolEpisodes:
    """The tool side of one rollout: per-row forced-token queues, calls and turns, and the policy mask.

    ``conversations[p]`` is prompt ``p``'s chat messages (the ones its prompt ids were rendered from, e.g. by
    :func:`rlhfkit.rollout.tools.render_with_tools`), aligned with the ``prompt_ids`` given to ``generate``;
    the tool turns' text is rendered after them. ``timeout_s`` and ``max_chars`` bound each call
    (:func:`rlhfkit.rollout.tools.run_tool_call`).
    """

    def __init__(self, tools: Sequence[Tool], conversations: Sequence[Sequence[Mapping[str, Any]]],
                 max_turns: int = 3, timeout_s: float = 10.0, max_chars: int = 2000):
        self.tools = list(tools)
        self.conversations = [list(c) for c in conversations]
        self.max_turns, self.timeout_s, self.max_chars = max_turns, timeout_s, max_chars
        self.stats = ToolStats()

    def start(self, tokenizer: Any, n_rows: int, num_samples: int, steps: int,
              stop_strings: Sequence[str] = ()) -> None:
        """Reset for a rollout of ``n_rows`` rows (prompt-major, ``num_samples`` each) of ``steps`` columns."""
        if len(self.conversations) * num_samples != n_rows:
            raise ValueError(f"ToolEpisodes: {len(self.conversations)} conversations for {n_rows // num_samples} "
                             "prompts; give one message list per prompt")
        self.tokenizer, self.n, self.num_samples, self.steps = tokenizer, n_rows, num_samples, steps
        self.stops = tuple(s for s in stop_strings if s)
        self.window = max([len(CALL_CLOSE), *map(len, self.stops)]) + 2  # tokens of tail that can complete one
        self.queues: list[deque[int]] = [deque() for _ in range(n_rows)]
        self.segment_start = [0] * n_rows  # first column of each row's text since its last tool turn
        self.history: list[list[dict[str, Any]]] = [[] for _ in range(n_rows)]  # assistant and tool turns so far
        self.tool_calls = [0] * n_rows
        self.truncated = [False] * n_rows
        self.mask = torch.ones((n_rows, steps), dtype=torch.float32)
        self.stats = ToolStats()

    def force(self, row: int, ids: Sequence[int]) -> None:
        """Queue ``ids`` as ``row``'s next tokens, written over its draws (policy mask 0); for tool turns, and
        for scripting a row's text (tests, environments)."""
        self.queues[row].extend(int(i) for i in ids)

    @property
    def turns(self) -> list[int]:
        """Assistant turns per row: one, plus one after each tool turn appended."""
        return [1 + sum(m["role"] == "tool" for m in h) for h in self.history]

    def _end(self, row: int, step: int, lengths: torch.Tensor, done: torch.Tensor, truncated: bool = False) -> None:
        lengths[row], done[row] = step + 1, True
        self.truncated[row] = truncated
        self.queues[row].clear()

    def after_step(self, step: int, tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor,
                   done: torch.Tensor) -> bool:
        """Apply forced tokens and run completed calls at decode column ``step`` (tensors as the loop's
        ``record`` holds them, edited in place); whether every row has ended."""
        forced = [row for row in range(self.n) if self.queues[row]]
        if forced:
            rows = torch.as_tensor(forced, device=tokens.device)
            tokens[rows, step] = torch.as_tensor([self.queues[r].popleft() for r in forced], device=tokens.device)
            logps[rows, step] = 0.0
            done[rows], lengths[rows] = False, self.steps  # a forced position never ends a row
            self.mask[forced, step] = 0.0
        candidates = [row for row in (~done).nonzero().flatten().tolist()
                      if not self.queues[row] and self.segment_start[row] <= step]
        if candidates:
            tail = tokens[:, max(0, step + 1 - self.window):step + 1].tolist()
            for row in candidates:
                self._check(row, step, tail[row][max(0, len(tail[row]) - (step + 1 - self.segment_start[row])):],
                            tokens, lengths, done)
        return bool(done.all())

    def _check(self, row: int, step: int, tail_ids: list[int], tokens: torch.Tensor, lengths: torch.Tensor,
               done: torch.Tensor) -> None:
        """End ``row`` at a stop string, or run the call its text since its last tool turn just completed."""
        tail = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
        if any(s in tail for s in self.stops):
            self._end(row, step, lengths, done)
            return
        if CALL_CLOSE not in tail:
            return
        text = self.tokenizer.decode(tokens[row, self.segment_start[row]:step + 1].tolist(), skip_special_tokens=True)
        if not call_closed(text):
            return
        if self.tool_calls[row] >= self.max_turns:  # out of turns: the call ends the row, as a stop string would
            self._end(row, step, lengths, done)
            return
        call = parse_tool_call(text, self.tools)
        assert call is not None  # call_closed: there is a <tool_call>
        result = run_tool_call(call, self.tools, self.timeout_s, self.max_chars)
        self.stats.record(result)
        self.tool_calls[row] += 1
        said, answer = {"role": "assistant", "content": text}, tool_message(call, result)
        conversation = [*self.conversations[row // self.num_samples], *self.history[row], said]
        ids = self.tokenizer(continuation_text(self.tokenizer, conversation, answer, self.tools),
                             add_special_tokens=False).input_ids
        if step + len(ids) >= self.steps:  # the tool turn does not fit in the token budget
            self._end(row, step, lengths, done, truncated=True)
            return
        self.history[row] += [said, answer]
        self.force(row, ids)
        self.segment_start[row] = step + 1 + len(ids)

    def finish(self, rollout: Any) -> Any:
        """Set the rollout's episode fields: ``policy_mask`` [N, R] (1 = the policy's token, 0 = forced, 0 after
        the response like its log-probs), ``turns``, ``tool_calls``; a truncated row is not ``ended``."""
        width = rollout.logprobs.shape[1]
        mask = self.mask[:, :width].clone()
        mask[torch.arange(width)[None, :] >= torch.as_tensor(rollout.lengths)[:, None]] = 0.0
        rollout.policy_mask = mask
        rollout.turns, rollout.tool_calls = self.turns, list(self.tool_calls)
        rollout.ended = [e and not t for e, t in zip(rollout.ended, self.truncated)]
        return rollout
