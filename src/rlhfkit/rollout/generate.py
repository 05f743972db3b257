"""Sampling responses from a policy: a batched decode loop over a KV cache, behind a backend interface.

HF ``generate`` spends most of a small model's decode step in per-token Python (logits processors,
stopping criteria, cache bookkeeping). The loop here does only what RLHF rollouts need: one forward per
new token over the cache, temperature / top-k / top-p sampling from a seeded generator, and the
log-probability of every sampled token under the temperature-scaled policy. Those log-probs are what
the trainer scores with (same temperature), so they double as PPO's "old" log-probs: the policy is not
run a second time over its own rollout.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import ConfigError
from .fast_decode import FastDecoder, fast_decoder
from .sampling import draw_and_record, filter_logits

if TYPE_CHECKING:
    from .episodes import ForcedEpisodes

logger = logging.getLogger("rlhfkit")

__all__ = ["GenerationBackend", "HFGenerationBackend", "Rollout", "SamplingConfig", "concat_rollouts", "filter_logits",
           "slice_rollout"]


@dataclass
class SamplingConfig:
    """How responses are sampled. ``temperature`` also scales the logits whenever the trainer scores them."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0 for RL rollouts (the policy is scored at the same "
                              "temperature it samples with)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--top-k must be >= 0 and --top-p in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")


@dataclass
class Rollout:
    """Sampled responses for a batch of prompts (one row per sample, the samples of a prompt adjacent).

    ``response_ids[i]`` is cut after the first EOS (kept) or after the token that completes a stop string;
    ``ended[i]`` says whether either happened within max_new_tokens. ``logprobs[i, t]`` is
    log softmax(logits / temperature)[token] for t < len(response_ids[i]) and 0 after.

    Tool-using rollouts (``generate(..., episodes=)``, :mod:`rlhfkit.rollout.episodes`) also set
    ``policy_mask`` [N, R] (1 = a token the policy sampled, 0 = a forced tool-turn token, whose log-prob is 0,
    and 0 after the response), ``turns`` (assistant turns) and ``tool_calls`` per row; None otherwise (every
    token is the policy's, one turn, no calls). Environment episodes (:mod:`rlhfkit.rollout.environments`) also
    set ``turn_rewards``: per row, ``(column, reward)`` for each turn the environment scored, the column being
    that turn's last policy token.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]
    logprobs: torch.Tensor  # [N, R] float32
    decode_steps: int = 0
    policy_mask: torch.Tensor | None = None  # [N, R] float32
    turns: list[int] | None = None
    tool_calls: list[int] | None = None
    turn_rewards: list[list[tuple[int, float]]] | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


def slice_rollout(rollout: Rollout, lo: int, hi: int) -> Rollout:
    """Rows [lo, hi) of a rollout."""
    def cut(x: Any) -> Any:
        return None if x is None else x[lo:hi]

    return Rollout(rollout.prompt_ids[lo:hi], rollout.response_ids[lo:hi], rollout.ended[lo:hi],
                   rollout.logprobs[lo:hi], rollout.decode_steps, cut(rollout.policy_mask), cut(rollout.turns),
                   cut(rollout.tool_calls), cut(rollout.turn_rewards))


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Rows of several rollouts in order (log-probs and policy masks zero-padded to the widest; a part without
    episode fields counts as all-policy tokens, one turn, no calls, no turn rewards, when another part has them)."""
    width = max(p.logprobs.shape[1] for p in parts)
    logprobs = torch.cat([torch.nn.functional.pad(p.logprobs, (0, width - p.logprobs.shape[1])) for p in parts])
    rollout = Rollout([x for p in parts for x in p.prompt_ids], [x for p in parts for x in p.response_ids],
                      [x for p in parts for x in p.ended], logprobs, max(p.decode_steps for p in parts))
    if any(p.policy_mask is not None for p in parts):
        masks = [p.policy_mask if p.policy_mask is not None else
                 (torch.arange(p.logprobs.shape[1])[None, :] < torch.as_tensor(p.lengths)[:, None]).float()
                 for p in parts]
        rollout.policy_mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        rollout.turns = [x for p in parts for x in (p.turns or [1] * len(p.ended))]
        rollout.tool_calls = [x for p in parts for x in (p.tool_calls or [0] * len(p.ended))]
    if any(p.turn_rewards is not None for p in parts):
        rollout.turn_rewards = [list(x) for p in parts for x in (p.turn_rewards or [[]] * len(p.ended))]
    return rollout


class GenerationBackend(Protocol):
    """What a rollout engine provides (HF decode loop here; vLLM plugs in behind the same call)."""

    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 sampling: SamplingConfig, generator: torch.Generator) -> Rollout:
        """Sample ``num_samples`` responses per prompt; rows are prompt-major."""


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old
    name warns until 5.40, then goes); earlier 5.x releases know only ``past_key_values``. A PEFT wrapper
    forwards keywords to its base model, which decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(base))


def _eos_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.eos_token_id
    ids = list(ids) if isinstance(ids, list | tuple) else [ids]
    return [int(i) for i in ids if i is not None]


class HFGenerationBackend:
    """Batched sampling with a transformers KV cache, prefilling each prompt once for all its samples."""

    def __init__(self, tokenizer: Any, fast_decode: bool = True, compile_decode: bool = False):
        self.tokenizer = tokenizer
        self.fast_decode = fast_decode  # rlhfkit.rollout.fast_decode where the architecture allows
        self.compile_decode = compile_decode  # that step ahead-of-time compiled (rollout/compiled_decode.py)
        self._told_about_compile = False
        self.eos_ids = _eos_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def decode(self, rollout: Rollout, stop_strings: Sequence[str] = ()) -> list[str]:
        """Response texts without special tokens, each cut after its first stop string (in an episode, the first
        in the policy's last turn: earlier turns and forced turns may hold one)."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.response_ids]
        for i, text in enumerate(texts):
            start = self._last_turn_start(rollout, i) if stop_strings and rollout.policy_mask is not None else 0
            hits = [text.index(s, start) + len(s) for s in stop_strings if s and s in text[start:]]
            if hits:
                texts[i] = text[:min(hits)]
        return texts

    def _last_turn_start(self, rollout: Rollout, row: int) -> int:
        """Where row ``row``'s text after its last forced token starts (0 without forced tokens)."""
        ids = rollout.response_ids[row]
        forced = (rollout.policy_mask[row, :len(ids)] == 0).nonzero().flatten()
        if not len(forced):
            return 0
        return len(self.tokenizer.decode(ids[:int(forced[-1]) + 1], skip_special_tokens=True))

    def scored_ids(self, rollout: Rollout) -> list[list[int]]:
        """Response ids as a reward model should see them: a response cut at a stop string ended too, so it
        gets the EOS a reward model was trained to see."""
        eos = self.eos_ids[0]
        return [ids + [eos] if done and (not ids or ids[-1] not in self.eos_ids) else ids
                for ids, done in zip(rollout.response_ids, rollout.ended)]

    def _stop_hit(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        # Only the tail can complete a stop string that was not there one token earlier.
        longest = max(len(s) for s in stops)
        tail = self.tokenizer.decode(tokens[-(longest + 2):], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _end_at_stop_strings(self, stops: tuple[str, ...], tokens: torch.Tensor, step: int, lengths: torch.Tensor,
                             done: torch.Tensor) -> bool:
        """End the rows whose response completes a stop string at ``step``; whether every row has ended."""
        for row in (~done).nonzero().flatten().tolist():
            if self._stop_hit(tokens[row, :step + 1].tolist(), stops):
                lengths[row], done[row] = step + 1, True
        return bool(done.all())

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 sampling: SamplingConfig, generator: torch.Generator,
                 episodes: ForcedEpisodes | None = None) -> Rollout:
        """Sample ``num_samples`` responses per prompt (rows prompt-major). With ``episodes``, rows call tools or
        answer an environment and decode on after each forced turn in the same KV cache
        (:mod:`rlhfkit.rollout.episodes`)."""
        from transformers import DynamicCache

        sampling.check()
        device = next(model.parameters()).device
        n_prompts, width = len(prompt_ids), max(len(p) for p in prompt_ids)
        # Left padding puts every prompt's last token in the same column.
        ids = torch.full((n_prompts, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n_prompts, width), dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):
            ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = bool((mask == 0).any())

        was_training = model.training
        model.eval()
        try:
            cache = DynamicCache(config=getattr(model, "config", None))
            with_cache = {cache_keyword(model): cache, "use_cache": True}
            out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions,
                        logits_to_keep=1, **with_cache)
            logits = out.logits[:, -1]
            if num_samples > 1:  # one prefill per prompt, then the cache is copied for each sample
                cache.batch_repeat_interleave(num_samples)
                logits = logits.repeat_interleave(num_samples, dim=0)
                mask = mask.repeat_interleave(num_samples, dim=0)
            n, steps = logits.shape[0], sampling.max_new_tokens
            next_position = mask.sum(-1, keepdim=True)
            attention = torch.cat([mask, mask.new_ones((n, steps))], dim=1)
            fast = fast_decoder(model) if self.fast_decode else None
            if fast is not None and fast.fits(width + steps):
                fast.start(cache, attention, width + steps, next_position[:, 0])
                fast.compiled = self.compile_decode and fast.fused and device.type == "cpu"
                if not self._told_about_compile:  # once per backend
                    if self.compile_decode and not fast.compiled and device.type == "cpu":  # too big to fuse
                        self._told_about_compile = True
                        logger.info("decoding with the eager lean step: the compiled step covers CPU policies "
                                    "with up to %d MiB of fused decode weights", FastDecoder.FUSE_MAX_BYTES >> 20)
                    elif not self.compile_decode and fast.fused and device.type == "cpu":
                        self._told_about_compile = True
                        logger.info("decoding with the eager lean step (--compile-decode, the trainers' default, "
                                    "compiles it once and caches it: faster decode steps on CPU)")
            else:
                fast = None
            tokens = torch.full((n, steps), self.pad_id, dtype=torch.long, device=device)
            logps = torch.zeros((n, steps), dtype=torch.float32, device=device)
            lengths = torch.full((n,), steps, dtype=torch.long, device=device)
            done = torch.zeros(n, dtype=torch.bool, device=device)
            # every uniform of the rollout in one draw, one per step and row (sampling.sample_next), step-major:
            # the same stream as one draw per step
            uniforms = torch.rand(steps, n, generator=generator, device=generator.device).to(device)
            column = torch.zeros(1, dtype=torch.long, device=device)  # advanced by each draw
            record = (column, uniforms, tokens, logps, lengths, done, torch.as_tensor(self.eos_ids, device=device))
            stops = tuple(s for s in sampling.stop_strings if s)
            sample_args = (sampling.temperature, sampling.top_k, sampling.top_p)
            if episodes is not None:
                episodes.start(self.tokenizer, n, num_samples, steps, stops)
            for step in range(steps):
                if step and fast is not None:  # forward, draw and record in one (maybe compiled) step
                    all_done = fast.step(record, *sample_args)
                else:
                    if step:
                        logits = model(input_ids=tokens[:, step - 1:step],
                                       attention_mask=attention[:, :width + step] if padded else None,
                                       position_ids=next_position + step - 1, **with_cache).logits[:, -1]
                    all_done = draw_and_record(logits, *sample_args, *record)
                if episodes is not None:  # forced tokens, tool calls, turn ends and the policy's stop strings
                    all_done = episodes.after_step(step, tokens, logps, lengths, done)
                elif stops:
                    all_done = self._end_at_stop_strings(stops, tokens, step, lengths, done)
                if bool(all_done):
                    break
            # after a row's end: pad tokens and zero log-probs
            after = torch.arange(steps, device=device)[None, :] >= lengths[:, None]
            tokens.masked_fill_(after, self.pad_id)
            logps.masked_fill_(after, 0.0)
        finally:
            model.train(was_training)

        lengths_list = lengths.tolist()
        token_rows = tokens.tolist()
        responses = [row[:length] for row, length in zip(token_rows, lengths_list)]
        ended = done.tolist()
        prompts = [list(p) for p in prompt_ids for _ in range(num_samples)]
        rollout = Rollout(prompts, responses, ended, logps[:, :max(lengths_list)].float().cpu(), step + 1)
        return rollout if episodes is None else episodes.finish(rollout)
