"""Multi-turn episodes inside the decode loop: forced turns (a tool's answer, an environment's observation)
written into the same KV cache.

The decode loop (:meth:`rlhfkit.rollout.generate.HFGenerationBackend.generate`, ``episodes=``) calls
``after_step`` once per decode step, after the step drew and recorded its tokens (eager or lean step alike;
neither is changed). :class:`ForcedEpisodes` is what every kind of episode shares:

- **Forced tokens.** A row with pending forced ids (the text of a turn that is not the policy's) has the column
  just drawn overwritten with the next of them; the next step feeds that column as its input, so the KV cache
  holds exactly the conversation and nothing is prefilled again. Its recorded log-probability is 0 (the lean
  step does not hand its logits out, and forced tokens carry no loss: :attr:`policy_mask` is 0 there), and an
  end the draw caused (a sampled EOS) is undone, so a forced position never ends a row; a forced EOS (the end
  of the assistant turn a template writes) does not end one either, since only the draw ends rows.
- **Turns.** :meth:`ForcedEpisodes.append_turn` renders the next turn after the policy's text
  (:func:`rlhfkit.rollout.tools.continuation_text`: the re-rendered conversation minus what the cache already
  holds, so decoding on equals re-prefilling it) and queues it as forced tokens. The token budget
  (``max_new_tokens``) counts every token, forced ones included: a row whose next turn does not fit ends
  right there, not ended (truncated).
- **Stop strings** are looked for in the policy's own text only (never inside a forced turn).

:class:`ToolEpisodes` adds tool calls: a row whose text since its last forced turn completes ``</tool_call>``
after ``<tool_call>`` (checked on the tail only, like stop strings) does not end: the call is parsed and run
(in a child process, with a timeout and a cap on the result's length) and the tool turn is appended. A row's
call after ``max_turns`` calls ends the row as a stop string would. The environments of
:mod:`rlhfkit.rollout.environments` build on the same class (an environment's episode may call tools too).

One object serves one rollout at a time; ``start`` (called by the backend) resets it, and after the rollout
:attr:`ToolEpisodes.stats` holds that rollout's :class:`~rlhfkit.rollout.tools.ToolStats`.
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

__all__ = ["ForcedEpisodes", "ToolEpisodes"]


class ForcedEpisodes:
    """Per-row forced-token queues, conversation history and the policy mask of one rollout.

    ``conversations[p]`` is prompt ``p``'s chat messages (the ones its prompt ids were rendered from), aligned
    with the ``prompt_ids`` given to ``generate``; forced turns are rendered after them, with ``tools`` offered
    as the prompt offered them (:func:`rlhfkit.rollout.tools.render_with_tools`). Subclasses decide what
    happens at a row's tail (:meth:`_check`) and, with ``ends_turns``, when the policy's draw ends its turn
    (:meth:`_turn_ended`); by default a stop string ends the row and a drawn EOS ends it too.
    """

    ends_turns = False  # whether _turn_ended sees the rows whose draw (EOS) ended them

    def __init__(self, conversations: Sequence[Sequence[Mapping[str, Any]]], tools: Sequence[Tool] = ()):
        self.conversations = [list(c) for c in conversations]
        self.tools = list(tools)

    def start(self, tokenizer: Any, n_rows: int, num_samples: int, steps: int,
              stop_strings: Sequence[str] = ()) -> None:
        """Reset for a rollout of ``n_rows`` rows (prompt-major, ``num_samples`` each) of ``steps`` columns."""
        if len(self.conversations) * num_samples != n_rows:
            raise ValueError(f"{type(self).__name__}: {len(self.conversations)} conversations for "
                             f"{n_rows // num_samples} prompts; give one message list per prompt")
        self.tokenizer, self.n, self.num_samples, self.steps = tokenizer, n_rows, num_samples, steps
        eos = tokenizer.eos_token_id
        self.eos_ids = {int(i) for i in (eos if isinstance(eos, list | tuple) else [eos]) if i is not None}
        self.stops = tuple(s for s in stop_strings if s)
        self.window = max([len(CALL_CLOSE), *map(len, self.stops)]) + 2  # tokens of tail that can complete one
        self.queues: list[deque[int]] = [deque() for _ in range(n_rows)]
        self.segment_start = [0] * n_rows  # first column of each row's text since its last forced turn
        self.history: list[list[dict[str, Any]]] = [[] for _ in range(n_rows)]  # turns after the prompt so far
        self.truncated = [False] * n_rows
        self.mask = torch.ones((n_rows, steps), dtype=torch.float32)

    def force(self, row: int, ids: Sequence[int]) -> None:
        """Queue ``ids`` as ``row``'s next tokens, written over its draws (policy mask 0); for forced turns,
        and for scripting a row's text (tests)."""
        self.queues[row].extend(int(i) for i in ids)

    @property
    def turns(self) -> list[int]:
        """Assistant turns per row: one, plus one after each forced turn appended."""
        return [1 + sum(m["role"] != "assistant" for m in h) for h in self.history]

    def _end(self, row: int, step: int, lengths: torch.Tensor, done: torch.Tensor, truncated: bool = False) -> None:
        lengths[row], done[row] = step + 1, True
        self.truncated[row] = truncated
        self.queues[row].clear()

    def said(self, row: int, step: int, tokens: torch.Tensor) -> str:
        """The policy's text since ``row``'s last forced turn, up to column ``step``, special tokens left out."""
        return self.tokenizer.decode(tokens[row, self.segment_start[row]:step + 1].tolist(), skip_special_tokens=True)

    def after_step(self, step: int, tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor,
                   done: torch.Tensor) -> bool:
        """Apply forced tokens, end turns and check tails at decode column ``step`` (tensors as the loop's
        ``record`` holds them, edited in place); whether every row has ended."""
        forced = [row for row in range(self.n) if self.queues[row]]
        if forced:
            rows = torch.as_tensor(forced, device=tokens.device)
            tokens[rows, step] = torch.as_tensor([self.queues[r].popleft() for r in forced], device=tokens.device)
            logps[rows, step] = 0.0
            done[rows], lengths[rows] = False, self.steps  # a forced position never ends a row
            self.mask[forced, step] = 0.0
        if self.ends_turns:  # rows whose draw at this column ended them (EOS)
            for row in (done & (lengths == step + 1)).nonzero().flatten().tolist():
                self._turn_ended(row, step, tokens, lengths, done)
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
        """A live row's text tail at ``step``: a stop string ends its turn (:meth:`_stop`)."""
        if self.stops and any(s in self.tokenizer.decode(tail_ids, skip_special_tokens=True) for s in self.stops):
            self._stop(row, step, tokens, lengths, done)

    def _stop(self, row: int, step: int, tokens: torch.Tensor, lengths: torch.Tensor, done: torch.Tensor) -> None:
        """The policy's text ended its turn without an EOS (a stop string): the row ends."""
        self._end(row, step, lengths, done)

    def _turn_ended(self, row: int, step: int, tokens: torch.Tensor, lengths: torch.Tensor,
                    done: torch.Tensor) -> None:
        """The policy drew an EOS at ``step`` (``ends_turns`` only): the row stays ended unless a subclass
        appends a turn."""

    def append_turn(self, row: int, step: int, said: str, message: Mapping[str, Any], tokens: torch.Tensor,
                    lengths: torch.Tensor, done: torch.Tensor) -> bool:
        """Append ``message`` after the policy's turn ``said`` (which ends at column ``step``) as ``row``'s
        forced tokens, the row live again; or, when it does not fit in the token budget, end the row there,
        truncated. Whether it was appended.

        When the policy ended its turn by drawing an EOS that the template also writes at the end of an
        assistant turn, the cache already holds it: the rendered continuation starts after it.
        """
        conversation = [*self.conversations[row // self.num_samples], *self.history[row],
                        {"role": "assistant", "content": said}]
        text = continuation_text(self.tokenizer, conversation, message, self.tools)
        last = int(tokens[row, step])
        if last in self.eos_ids:
            drawn = self.tokenizer.decode([last], skip_special_tokens=False)
            text = text[len(drawn):] if drawn and text.startswith(drawn) else text
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if step + len(ids) >= self.steps:  # the turn does not fit in the token budget
            self._end(row, step, lengths, done, truncated=True)
            return False
        self.history[row] += [conversation[-1], dict(message)]
        self.force(row, ids)
        done[row], lengths[row] = False, self.steps
        self.segment_start[row] = step + 1 + len(ids)
        return True

    def finish(self, rollout: Any) -> Any:
        """Set the rollout's episode fields: ``policy_mask`` [N, R] (1 = the policy's token, 0 = forced, 0 after
        the response like its log-probs) and ``turns``; a truncated row is not ``ended``."""
        width = rollout.logprobs.shape[1]
        mask = self.mask[:, :width].clone()
        mask[torch.arange(width)[None, :] >= torch.as_tensor(rollout.lengths)[:, None]] = 0.0
        rollout.policy_mask = mask
        rollout.turns = self.turns
        rollout.ended = [e and not t for e, t in zip(rollout.ended, self.truncated)]
        return rollout


class ToolEpisodes(ForcedEpisodes):
    """The tool side of one rollout: calls run at ``</tool_call>``, their answers appended as tool turns.

    ``conversations[p]`` is prompt ``p``'s chat messages (e.g. rendered by
    :func:`rlhfkit.rollout.tools.render_with_tools`); ``timeout_s`` and ``max_chars`` bound each call
    (:func:`rlhfkit.rollout.tools.run_tool_call`); ``max_turns`` calls per row at most.
    """

    def __init__(self, tools: Sequence[Tool], conversations: Sequence[Sequence[Mapping[str, Any]]],
                 max_turns: int = 3, timeout_s: float = 10.0, max_chars: int = 2000):
        super().__init__(conversations, tools)
        self.max_turns, self.timeout_s, self.max_chars = max_turns, timeout_s, max_chars
        self.stats = ToolStats()

    def start(self, tokenizer: Any, n_rows: int, num_samples: int, steps: int,
              stop_strings: Sequence[str] = ()) -> None:
        super().start(tokenizer, n_rows, num_samples, steps, stop_strings)
        self.tool_calls = [0] * n_rows
        self.stats = ToolStats()

    def _check(self, row: int, step: int, tail_ids: list[int], tokens: torch.Tensor, lengths: torch.Tensor,
               done: torch.Tensor) -> None:
        """End ``row``'s turn at a stop string, or run the call its text since its last forced turn just completed."""
        tail = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
        if any(s in tail for s in self.stops):
            self._stop(row, step, tokens, lengths, done)
            return
        if not self.tools or CALL_CLOSE not in tail:
            return
        text = self.said(row, step, tokens)
        if not call_closed(text):
            return
        if self.tool_calls[row] >= self.max_turns:  # out of turns: the call ends the turn, as a stop string would
            self._stop(row, step, tokens, lengths, done)
            return
        call = parse_tool_call(text, self.tools)
        if call is None:  # call_closed found a <tool_call>, so the parser does too; were it not, no call: decode on
            return
        result = run_tool_call(call, self.tools, self.timeout_s, self.max_chars)
        self.stats.record(result)
        self.tool_calls[row] += 1
        self.append_turn(row, step, text, tool_message(call, result), tokens, lengths, done)

    def finish(self, rollout: Any) -> Any:
        """:meth:`ForcedEpisodes.finish`, and ``tool_calls`` per row."""
        rollout = super().finish(rollout)
        rollout.tool_calls = list(self.tool_calls)
        return rollout
