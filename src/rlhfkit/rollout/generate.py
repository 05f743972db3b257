"""Sampling responses from a policy: a batched decode loop over a KV cache, behind a backend interface.

HF ``generate`` spends most of a small model's decode step in per-token Python (logits processors,
stopping criteria, cache bookkeeping). The loop here does only what RLHF rollouts need: one forward per
new token over the cache, temperature / top-k / top-p sampling from a seeded generator, and the
log-probability of every sampled token under the temperature-scaled policy. Those log-probs are what
the trainer scores with (same temperature), so they double as PPO's "old" log-probs: the policy is not
run a second time over its own rollout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from .fast_decode import fast_decoder

__all__ = ["GenerationBackend", "HFGenerationBackend", "Rollout", "SamplingConfig", "filter_logits"]


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
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]
    logprobs: torch.Tensor  # [N, R] float32
    decode_steps: int = 0

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


class GenerationBackend(Protocol):
    """What a rollout engine provides (HF decode loop here; vLLM plugs in behind the same call)."""

    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 sampling: SamplingConfig, generator: torch.Generator) -> Rollout:
        """Sample ``num_samples`` responses per prompt; rows are prompt-major."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k and outside the smallest set with probability >= top_p.

    The most likely token always survives. Operates on [N, V] logits already divided by the temperature.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_categorical(logits: torch.Tensor, generator: torch.Generator,
                       probs: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from softmax(logits) [N, V] by inverting the CDF with one uniform per row.

    torch.multinomial draws an exponential variate for every vocabulary entry (V per row); one uniform
    per row and a search in the cumulative sum is exact too and costs a fraction of that per decode step.
    ``probs`` (unnormalised is fine), when the caller already has them, saves the softmax.
    """
    cdf = (torch.softmax(logits.float(), dim=-1) if probs is None else probs).cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=generator.device).to(cdf.device)
    # right side: zero-probability tokens own an empty interval; scaling by the total absorbs round-off
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return index.clamp(max=logits.shape[-1] - 1).squeeze(-1)


def _eos_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.eos_token_id
    ids = list(ids) if isinstance(ids, list | tuple) else [ids]
    return [int(i) for i in ids if i is not None]


class HFGenerationBackend:
    """Batched sampling with a transformers KV cache, prefilling each prompt once for all its samples."""

    def __init__(self, tokenizer: Any, fast_decode: bool = True):
        self.tokenizer = tokenizer
        self.fast_decode = fast_decode  # rlhfkit.rollout.fast_decode where the architecture allows
        self.eos_ids = _eos_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def decode(self, rollout: Rollout, stop_strings: Sequence[str] = ()) -> list[str]:
        """Response texts without special tokens, each cut after its first stop string."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.response_ids]
        for i, text in enumerate(texts):
            hits = [text.index(s) + len(s) for s in stop_strings if s and s in text]
            if hits:
                texts[i] = text[:min(hits)]
        return texts

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

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], num_samples: int,
                 sampling: SamplingConfig, generator: torch.Generator) -> Rollout:
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
            out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
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
            else:
                fast = None
            tokens = torch.full((n, steps), self.pad_id, dtype=torch.long, device=device)
            logps = torch.zeros((n, steps), dtype=torch.float32, device=device)
            lengths = torch.full((n,), steps, dtype=torch.long, device=device)
            done = torch.zeros(n, dtype=torch.bool, device=device)
            eos = torch.as_tensor(self.eos_ids, device=device)
            stops = tuple(s for s in sampling.stop_strings if s)
            step = 0
            filtering = sampling.top_k > 0 or sampling.top_p < 1.0
            for step in range(steps):
                scaled = logits.float()
                if sampling.temperature != 1.0:
                    scaled = scaled / sampling.temperature
                logp_all = torch.log_softmax(scaled, dim=-1)
                if filtering:
                    sampled = sample_categorical(filter_logits(scaled, sampling.top_k, sampling.top_p), generator)
                else:  # the unfiltered distribution is exp(logp_all): no second softmax
                    sampled = sample_categorical(scaled, generator, probs=logp_all.exp())
                # rows already done keep sampling (their draws are discarded below): no per-step masking
                tokens[:, step] = sampled
                logps[:, step] = logp_all.gather(-1, sampled[:, None]).squeeze(-1)
                finished = (sampled == self.eos_ids[0] if len(self.eos_ids) == 1 else torch.isin(sampled, eos)).logical_and_(~done)
                if stops:
                    for row in (~done & ~finished).nonzero().flatten().tolist():
                        if self._stop_hit(tokens[row, :step + 1].tolist(), stops):
                            finished[row] = True
                lengths = torch.where(finished, step + 1, lengths)
                done |= finished
                if step == steps - 1 or bool(done.all()):
                    break
                if fast is not None:
                    logits = fast.step(sampled)
                    continue
                out = model(input_ids=sampled[:, None],
                            attention_mask=attention[:, :width + step + 1] if padded else None,
                            position_ids=next_position + step, past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1]
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
        return Rollout(prompts, responses, ended, logps[:, :max(lengths_list)].float().cpu(), step + 1)
