"""Load causal LMs, reward models and tokenizers by hub id or local path, with optional LoRA."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError

logger = logging.getLogger("rlhfkit")


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft). ``r == 0`` disables LoRA."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")

    @property
    def enabled(self) -> bool:
        return self.r > 0


def _hub_kwargs(name_or_path: str, trust_remote_code: bool, revision: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    return kwargs


# the files a saved tokenizer leaves in its folder (fast, sentencepiece, BPE and WordPiece layouts)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (``org/name``): it starts with
    / ./ ../ ~, has more than one '/', uses backslashes, or its parent folder exists here."""
    text = str(name_or_path)
    if text.startswith(("/", "./", "../", "~", ".\\")) or text in (".", "..") or "\\" in text:
        return True
    if text.count("/") > 1:
        return True
    parent = Path(text).expanduser().parent
    return text.count("/") == 1 and parent.is_dir()


def check_model_path(name_or_path: str, flag: str = "") -> None:
    """A path that does not exist is a one-line ModelError, before transformers takes it for a hub id."""
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ModelError(f"{flag + ' ' if flag else ''}{name_or_path}: no such file or folder")


def check_tokenizer_folder(name_or_path: str) -> None:
    """A local model folder must hold its tokenizer; else one sentence saying what to do."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(f"{name_or_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}): save the "
                         f"tokenizer the model was trained with into it, e.g. "
                         f"AutoTokenizer.from_pretrained(BASE).save_pretrained('{name_or_path}').")


def _load(loader, name_or_path: str, what: str, **kwargs):
    check_model_path(name_or_path)
    # transformers >= 5 swaps layers for Hub kernels by default on CUDA (``use_kernels``), downloading them at
    # the first ``model.train()``: offline that fails, online it changes the numerics under rlhfkit's own
    # packed attention and decode step. rlhfkit's models run the code their checkpoint names, nothing fetched.
    kwargs.setdefault("use_kernels", False)
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:  # transformers raises these for unknown ids / broken folders
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {what} from '{name_or_path}': {first_line}") from exc


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """Load a tokenizer and make it usable for training.

    A tokenizer without a pad token gets ``pad = eos`` (one-line warning); without either it is an error.
    A tokenizer without a chat template gets rlhfkit's default template.
    """
    from transformers import AutoTokenizer

    from .tiny import DEFAULT_CHAT_TEMPLATE

    check_tokenizer_folder(name_or_path)
    tok = _load(AutoTokenizer.from_pretrained, name_or_path, "tokenizer",
                **_hub_kwargs(name_or_path, trust_remote_code, revision))
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"tokenizer '{name_or_path}' has neither a pad nor an eos token; add one")
        tok.pad_token = tok.eos_token
        logger.warning("tokenizer '%s' has no pad token: using eos '%s' for padding", name_or_path,
                       tok.eos_token)
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer '{name_or_path}' has no eos token: responses could never end")
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def tokenizers_match(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    if a is b:
        return True
    if len(a) != len(b) or a.eos_token_id != b.eos_token_id:
        return False
    return a.get_vocab() == b.get_vocab()


def check_same_tokenizer(a, b, name_a: str, name_b: str) -> None:
    """Raise a one-line ModelError when two models that must share token ids do not."""
    if not tokenizers_match(a, b):
        raise ModelError(
            f"'{name_a}' and '{name_b}' use different tokenizers (vocab {len(a)} vs {len(b)}); "
            "they must share one here, or decode to text and re-tokenise"
        )


def _apply_lora(model, lora: LoraSettings, task_type: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type=task_type,
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d: %d of %d parameters trainable (%.2f%%)", lora.r, trainable, total,
                100 * trainable / max(total, 1))
    return model


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """Load any causal LM that ``AutoModelForCausalLM`` loads; wrap it in LoRA adapters if asked."""
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(name_or_path, trust_remote_code, revision)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _load(AutoModelForCausalLM.from_pretrained, name_or_path, "causal LM", dtype=dtype, **kwargs)
    if lora is not None and lora.enabled:
        model = _apply_lora(model, lora, "CAUSAL_LM")
    return model


def load_reward_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    pad_token_id: int | None = None,
):
    """Load a sequence-classification model with one output (a scalar reward).

    A causal LM checkpoint works too: transformers adds a freshly initialised score head.
    """
    from transformers import AutoModelForSequenceClassification

    kwargs = _hub_kwargs(name_or_path, trust_remote_code, revision)
    model = _load(AutoModelForSequenceClassification.from_pretrained, name_or_path, "reward model",
                  dtype=dtype, num_labels=1, **kwargs)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if lora is not None and lora.enabled:
        model = _apply_lora(model, lora, "SEQ_CLS")
    return model


def is_local_path(name_or_path: str) -> bool:
    return Path(name_or_path).exists()
