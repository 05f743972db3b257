"""Model forwards on packed or padded batches: logits at the loss positions, per-sequence log-probs,
reward-model scores, and the probes that check a model class keeps packed sequences apart.

Everything that runs a model on a batch (trainers, rollouts, evaluation, the Ray workers) stands on these.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import ConfigError
from ..losses import selected_token_logprobs
from .attention import PACKED_ATTENTION, SHARED_PROMPTS

logger = logging.getLogger("rlhfkit")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant, as torch
    recommends). transformers 5 names it ``activation_checkpointing_enable`` and keeps the older
    ``gradient_checkpointing_enable`` as a deprecated alias; rlhfkit's wrappers define the new name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch to ``device`` (other values pass through)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs for a packed batch (position ids, no mask) or a padded one (attention mask).

    ``use_cache=False`` matters for packing: transformers only derives the per-sequence (block-diagonal)
    attention mask from reset position ids when no KV cache is in play.
    """
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if SHARED_PROMPTS in batch:  # shared-prompt packing (data.pack_shared_prompts): rlhfkit's attention only
        kwargs.update(position_ids=batch["position_ids"], **{SHARED_PROMPTS: batch[SHARED_PROMPTS]})
    elif "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
        # Sequence boundaries in the flash-attention varlen convention; our packed attention uses them too.
        ends = batch["last_index"].to(torch.int32) + 1
        cu = torch.cat([ends.new_zeros(1), ends])
        longest = int((cu[1:] - cu[:-1]).max())
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    return kwargs


def num_sequences(batch: dict[str, Any]) -> int:
    return int(batch["last_index"].shape[0])


def loss_positions(batch: dict[str, Any]) -> torch.Tensor:
    """Boolean [B, T]: position t is kept when the token it predicts (t + 1) is in the loss mask.
    (A shared-prompt batch names its predicting positions instead: ``loss_index``.)"""
    scored = batch["loss_mask"] > 0
    return torch.cat([scored[:, 1:], scored.new_zeros(scored.shape[0], 1)], dim=1)


def at_loss_positions(per_position: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The rows of a per-position tensor [B, T, ...] at the positions that predict the loss tokens: [n, ...],
    in the order of ``loss_targets`` (a shared prompt's last position once per response it starts)."""
    if "loss_index" in batch:
        return per_position[0, batch["loss_index"]]
    return per_position[loss_positions(batch)]


def loss_targets(batch: dict[str, Any]) -> torch.Tensor:
    """The loss tokens, flat [n] in (row, position) order: the targets of ``loss_logits``."""
    if "loss_targets" in batch:
        return batch["loss_targets"]
    return batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:] > 0]


def loss_sequence_ids(batch: dict[str, Any]) -> torch.Tensor:
    """Which sequence of the batch each flat loss token belongs to: [n] long (packed or padded)."""
    if "loss_sequence" in batch:
        return batch["loss_sequence"]
    select = batch["loss_mask"][:, 1:] > 0
    if "sequence_index" in batch:
        return batch["sequence_index"][:, 1:][select]
    rows = torch.arange(select.shape[0], device=select.device)[:, None].expand_as(select)
    return rows[select]


_LOGITS_MASK_SUPPORT: dict[type, bool] = {}
_LOGITS_INDEX_SUPPORT: dict[type, bool] = {}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP-style wrapper (``.module``), or the model itself."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _keeps_exactly(model: torch.nn.Module, cache: dict[type, bool], keep: list, index: bool) -> bool:
    """Check, once per model class, that ``logits_to_keep=keep`` (a bool [1, T] mask, or with ``index`` a
    [n] tensor of positions) returns exactly the kept rows of the full logits."""
    inner = unwrap_model(model)
    key = type(inner)
    if key not in cache:
        device = next(inner.parameters()).device
        ids = (torch.arange(3, 8, device=device) % inner.get_input_embeddings().num_embeddings)[None]
        keep_tensor = torch.tensor(keep, device=device)
        was_training = inner.training
        inner.eval()
        try:
            full = inner(input_ids=ids, use_cache=False).logits
            full = full[0, keep_tensor] if index else full[keep_tensor]
            kept = inner(input_ids=ids, use_cache=False, logits_to_keep=keep_tensor).logits
            kept = kept[0] if index else kept
            ok = kept.shape == full.shape and bool(torch.allclose(kept.float(), full.float(), atol=1e-5))
        except Exception as exc:  # an older or custom model: compute every logit and select afterwards
            logger.info("logits_to_keep %s not supported by %s: %s", "index" if index else "mask", key.__name__, exc)
            ok = False
        finally:
            inner.train(was_training)
        cache[key] = ok
    return cache[key]


def supports_logits_mask(model: torch.nn.Module) -> bool:
    """Check, once per model class, that ``logits_to_keep=<bool [B, T]>`` returns exactly the kept rows."""
    return _keeps_exactly(model, _LOGITS_MASK_SUPPORT, [[False, True, False, True, True]], index=False)


def supports_logits_index(model: torch.nn.Module) -> bool:
    """Check, once per model class, that ``logits_to_keep=<long [n]>`` (positions, repeats allowed) returns
    exactly those rows: how a shared-prompt batch asks for its logits."""
    return _keeps_exactly(model, _LOGITS_INDEX_SUPPORT, [1, 3, 3, 4], index=True)


def shares_prompts(*models: torch.nn.Module | None) -> bool:
    """Whether every given model (None: absent) can run shared-prompt batches: rlhfkit's packed attention,
    which reads the layout (flash-attention would let responses see their siblings)."""
    present = [m for m in models if m is not None]
    return bool(present) and all(
        getattr(getattr(unwrap_model(m), "config", None), "_attn_implementation", None) == PACKED_ATTENTION
        for m in present)


def loss_logits(model: torch.nn.Module, batch: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Logits [n, V] at the positions that predict a loss token (``loss_positions``), and the model output.

    The LM head runs only at those positions when the model takes a boolean ``logits_to_keep`` (prompt
    tokens need no [V]-wide projection, log-softmax or gradient); otherwise all logits are computed and the
    same rows selected.
    """
    if "loss_index" in batch:  # shared-prompt batch: positions, a shared prompt's last one repeated
        if supports_logits_index(model):
            out = model(**forward_inputs(batch), logits_to_keep=batch["loss_index"], **kwargs)
            # squeeze, not [0]: a view's backward is a view too, where indexing's zero-fills a [1, n, V] gradient
            return out.logits.squeeze(0), out
        out = model(**forward_inputs(batch), **kwargs)
        return at_loss_positions(out.logits, batch), out
    keep = loss_positions(batch)
    if supports_logits_mask(model):
        out = model(**forward_inputs(batch), logits_to_keep=keep, **kwargs)
        return out.logits, out
    out = model(**forward_inputs(batch), **kwargs)
    return out.logits[keep], out


def sequence_logps(model: torch.nn.Module, batch: dict[str, Any], temperature: float = 1.0) -> torch.Tensor:
    """Summed log-probabilities of the loss-masked (response) tokens of every sequence: shape [M]."""
    logits, _ = loss_logits(model, batch)
    token_logps = selected_token_logprobs(logits, loss_targets(batch), temperature)
    return token_logps.new_zeros(num_sequences(batch)).index_add(0, loss_sequence_ids(batch), token_logps)


def reward_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, score head) of a sequence-classification model, looking through DDP and peft wrappers."""
    inner = model.module if hasattr(model, "module") and not hasattr(model, "score") else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
    backbone = getattr(inner, inner.base_model_prefix, None) if hasattr(inner, "base_model_prefix") else None
    if head is None or backbone is None:
        raise ConfigError(f"{type(inner).__name__}: cannot find the backbone and score head of this reward model")
    return backbone, head


def reward_scores(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Scalar reward of every sequence, read at its last token: shape [M].

    We pool ourselves instead of relying on the model's pad-token search, which picks the wrong token when
    pad == eos and cannot work on packed batches.
    """
    backbone, head = reward_parts(model)
    hidden = backbone(**forward_inputs(batch)).last_hidden_state  # [B, T, H]
    last = batch["last_index"]
    if "position_ids" in batch:  # packed: one row, last_index are positions in the stream
        picked = hidden[0, last]
    else:
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked).squeeze(-1).float()


class LastTokenReward(torch.nn.Module):
    """A reward model whose forward(batch) is :func:`reward_scores`: the scores are computed *through* the
    module a DDP / FSDP / DeepSpeed wrapper sees, so its gradient reduction and unsharding hooks run (calling
    the backbone and head directly would bypass them). Saved as ``.model``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return reward_scores(self.model, batch)

    def activation_checkpointing_enable(self, **_: Any) -> None:
        enable_activation_checkpointing(self.model)

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()


_PACKING_SUPPORT: dict[tuple[type, str | None, bool], bool] = {}


@torch.no_grad()
def supports_packing(model: torch.nn.Module, forward_hidden: bool = False) -> bool:
    """Check, once per model class, that packed sequences give the same outputs as separate ones."""
    base = model
    # the answer depends on the attention implementation too, which resolve_packing may switch
    key = (type(base), getattr(base.config, "_attn_implementation", None), forward_hidden)
    if key in _PACKING_SUPPORT:
        return _PACKING_SUPPORT[key]
    device = next(base.parameters()).device
    vocab = base.get_input_embeddings().num_embeddings
    a = torch.arange(3, 3 + 5, device=device) % vocab
    b = torch.arange(11, 11 + 4, device=device) % vocab
    packed = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(5), torch.arange(4)]).to(device)[None]
    was_training = base.training
    base.eval()
    try:
        if forward_hidden:
            backbone, _ = reward_parts(base)
            run = lambda **kw: backbone(**kw).last_hidden_state  # noqa: E731
        else:
            run = lambda **kw: base(**kw).logits  # noqa: E731
        cu = torch.tensor([0, 5, 9], dtype=torch.int32, device=device)
        together = run(input_ids=packed, position_ids=position_ids, use_cache=False, cu_seq_lens_q=cu,
                       cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)[0, 5:]
        alone = run(input_ids=b[None], use_cache=False)[0]
        ok = bool(torch.allclose(together.float(), alone.float(), atol=1e-4, rtol=1e-3))
    except Exception as exc:  # any failure means: fall back to padding
        logger.info("packing probe failed for %s: %s", type(base).__name__, exc)
        ok = False
    finally:
        base.train(was_training)
    _PACKING_SUPPORT[key] = ok
    return ok
