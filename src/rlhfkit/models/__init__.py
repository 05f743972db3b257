"""Model loading (causal LM, reward model, tokenizer), LoRA, and the offline tiny-model builder."""

from .loading import (
    LoraSettings,
    check_same_tokenizer,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    tokenizers_match,
)
from .tiny import build_tiny_model, train_tokenizer

__all__ = [
    "LoraSettings",
    "build_tiny_model",
    "check_same_tokenizer",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "tokenizers_match",
    "train_tokenizer",
]
