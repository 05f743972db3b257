"""Text from a checkpoint: a causal LM sampled in batches with rlhfkit's KV-cache decode, prompts in (strings
or chat messages, rendered with the chat template) and decoded responses out. The demo's preference
collection, Constitutional AI and the labelling app's ``generate`` all sample through :class:`TextSampler`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data import prepare_prompts
from ..errors import ConfigError
from ..models import load_causal_lm, load_tokenizer
from .generate import HFGenerationBackend, SamplingConfig

__all__ = ["TextSampler", "sample_responses"]


def _messages(prompt: Any) -> Any:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class TextSampler:
    """A frozen causal LM and its tokenizer, loaded once; ``sample`` decodes responses to many prompts."""

    def __init__(self, model_path: str, sampling: SamplingConfig, max_prompt_length: int = 256,
                 batch_size: int = 32, device: str | None = None, need_chat_template: bool = False):
        self.tokenizer = load_tokenizer(model_path)
        if need_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{model_path}: the tokenizer has no chat template (CAI needs multi-turn prompts)")
        self.model = load_causal_lm(model_path).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.backend = HFGenerationBackend(self.tokenizer)
        self.sampling = sampling
        self.sampling.check()
        self.max_prompt_length, self.batch_size, self.source = int(max_prompt_length), int(batch_size), model_path

    def sample(self, prompts: Sequence[Any], num_samples: int, generator: torch.Generator) -> list[list[str]]:
        """``num_samples`` stripped responses per prompt (a user-turn string or a list of chat messages)."""
        import datasets

        ds = datasets.Dataset.from_list([{"prompt": _messages(p)} for p in prompts])
        records, _ = prepare_prompts(ds, self.tokenizer, max_prompt_length=self.max_prompt_length, source=self.source)
        if len(records) != len(prompts):
            raise ConfigError(f"{self.source}: {len(prompts) - len(records)} prompt(s) came out empty")
        out: list[list[str]] = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start:start + self.batch_size]
            rollout = self.backend.generate(self.model, [r["prompt_ids"] for r in chunk], num_samples,
                                            self.sampling, generator)
            texts = [t.strip() for t in self.backend.decode(rollout)]
            out += [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(chunk))]
        return out


def sample_responses(model_path: str, prompts: list[str], num_samples: int, temperature: float,
                     max_new_tokens: int, seed: int, batch_size: int = 32) -> list[list[str]]:
    """``num_samples`` decoded responses per (user-turn) prompt from a checkpoint, seeded."""
    sampler = TextSampler(model_path, SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens),
                          batch_size=batch_size)
    return sampler.sample(prompts, num_samples, torch.Generator().manual_seed(seed))
