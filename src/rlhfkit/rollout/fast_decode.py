"""A lean decode step for Llama-layout decoders (Llama, Mistral, Qwen2), used by the HF rollout backend.

Why: a rollout step of a small policy is bound by per-token overhead, not arithmetic. transformers'
forward rebuilds the attention mask and the rotary cos/sin at every decoded token and grows the KV cache
with ``torch.cat`` (a copy of the whole cache per token and layer); on the 5M-parameter bench model that is
~6 ms per token where the matrix products need < 1 ms. Here the prompt is still prefilled by the model's
own forward; the decoded tokens then go through the model's own modules (embedding, norms, projections,
MLP, LM head) with three things done once per rollout instead of once per token: a preallocated KV buffer
written in place, the rotary table for every position, and the key-padding mask.

Anything else (LoRA-wrapped layers, other architectures, dynamic RoPE, an active sliding window) returns
``None`` from :func:`fast_decoder` and the backend keeps the plain transformers loop. Tests check that both
paths give the same tokens and log-probs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# transformers model types whose decoder layer is: x + attn(input_layernorm(x)), then
# x + mlp(post_attention_layernorm(x)), attention = q/k/v/o projections with RoPE on q and k.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
# RoPE variants whose cos/sin depend on the position only (not on the sequence length seen so far).
STATIC_ROPE = ("default", "linear", "llama3")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastDecoder:
    """Decode steps with an in-place KV buffer over a model that :func:`fast_decoder` accepted."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = model.config.num_key_value_heads
        self.gqa = model.config.num_attention_heads != self.kv_heads
        self.sliding_window = getattr(model.config, "sliding_window", None) \
            if getattr(model.config, "use_sliding_window", True) else None

    def fits(self, total_length: int) -> bool:
        """An active sliding window shorter than the rollout changes attention: leave it to transformers."""
        return not self.sliding_window or total_length <= self.sliding_window

    def start(self, cache: Any, key_mask: torch.Tensor, total_length: int) -> None:
        """Copy the prefilled cache (batch already expanded to every sample) into buffers of
        ``total_length`` positions; ``key_mask`` [n, total_length] marks the real (non-padding) keys."""
        self.keys, self.values = [], []
        for layer in cache.layers:
            n, heads, filled, dim = layer.keys.shape
            keys = layer.keys.new_empty((n, heads, total_length, dim))
            values = layer.values.new_empty((n, heads, total_length, dim))
            keys[:, :, :filled] = layer.keys
            values[:, :, :filled] = layer.values
            self.keys.append(keys)
            self.values.append(values)
        self.filled = filled
        # SDPA boolean mask: True = attend. None when nothing is padded (the common case: no mask work).
        self.key_mask = None if bool(key_mask.all()) else key_mask.bool()[:, None, None, :]
        dtype = self.keys[0].dtype
        positions = torch.arange(total_length, device=key_mask.device)[None]
        dummy = torch.empty(0, dtype=dtype, device=key_mask.device)
        cos, sin = self.base.rotary_emb(dummy, positions)  # the model's own RoPE, once for every position
        self.cos, self.sin = cos[0], sin[0]  # [total_length, head_dim]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] for one new token per row at RoPE ``positions`` [n]; appends to the KV buffer."""
        n = tokens.shape[0]
        slot = self.filled
        self.filled += 1
        cos = self.cos[positions][:, None, None, :]  # [n, 1, 1, D], broadcast over heads
        sin = self.sin[positions][:, None, None, :]
        mask = None if self.key_mask is None else self.key_mask[..., :self.filled]
        hidden = self.base.embed_tokens(tokens[:, None])  # [n, 1, H]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, 1, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(n, 1, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(n, 1, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.keys[index], self.values[index]
            keys[:, :, slot:slot + 1] = k
            values[:, :, slot:slot + 1] = v
            out = F.scaled_dot_product_attention(q, keys[:, :, :self.filled], values[:, :, :self.filled],
                                                 attn_mask=mask, scale=attn.scaling, enable_gqa=self.gqa)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(n, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(self.base.norm(hidden))[:, 0]


def fast_decoder(model: torch.nn.Module) -> FastDecoder | None:
    """A :class:`FastDecoder` for ``model`` when its layout is one this module reproduces exactly, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in LLAMA_LAYOUT:
        return None
    if hasattr(model, "peft_config") or not hasattr(model, "lm_head") or not hasattr(model, "model"):
        return None
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        return None
    base = model.model
    if not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        # exact nn.Linear only: LoRA / quantised layers have their own forward semantics
        if attn is None or any(type(getattr(attn, p, None)) is not torch.nn.Linear for p in projections):
            return None
        if any(hasattr(attn, extra) for extra in ("q_norm", "k_norm")):
            return None
        if not all(hasattr(layer, m) for m in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return None
    return FastDecoder(model)
