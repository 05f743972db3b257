"""The lean decode step itself: pure functions of the step's inputs, run eagerly or compiled.

:func:`decode_step` runs one token per row through a Llama-layout decoder given as plain tensors (the
embedding, a per-layer plan of fused or separate projections with their norms, in-place KV buffers, the
attention mask and the RoPE tables) and :func:`decode_and_record` adds the draw from its logits, recorded
in place (:func:`rlhfkit.rollout.sampling.draw_and_record`). :class:`rlhfkit.rollout.fast_decode.FastDecoder`
prepares those inputs and calls this step eagerly; :mod:`rlhfkit.rollout.compiled_decode` exports and
compiles exactly this code, so everything here must stay traceable (no Python branching on tensor values).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .sampling import draw_and_record

__all__ = ["decode_and_record", "decode_step"]


def _project(x: torch.Tensor, parts: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]) -> torch.Tensor:
    """x·W (+ b) for one ([in, out] weight, bias) pair, or for several concatenated along the output."""
    if len(parts) > 1:
        return torch.cat([_project(x, (part,)) for part in parts], dim=-1)
    weight, bias = parts[0]
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


def _add_linear(hidden: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """hidden + x·Wᵀ (+ b) for 2-D rows, the residual add done inside the matrix product (addmm)."""
    out = torch.addmm(hidden, x, weight_t)
    return out if bias is None else out + bias


def _one_query_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attend: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """softmax(q·Kᵀ·scaling, masked by ``attend``)·V for one query token per row: query [n, Hq, D] against the
    buffers [n, Hkv, T, D] -> [n, Hq·D]. The query heads that share a key/value head (grouped-query
    attention) are that head's query rows.

    Compiled (:mod:`rlhfkit.rollout.compiled_decode`), two batched products and a masked softmax, which
    fuse into one kernel: a compiled step of the bench model took ~5% less time than with SDPA, whose CPU
    flash kernel sets up blocks and converts the mask at every call. Eagerly, SDPA (one op instead of five).
    """
    n, kv_heads, _, head_dim = keys.shape
    if not torch.compiler.is_exporting():  # eagerly, the one SDPA call beats five small ops
        return F.scaled_dot_product_attention(query[:, :, None], keys, values, attn_mask=attend, scale=scaling,
                                              enable_gqa=query.shape[1] != kv_heads).reshape(n, -1)
    grouped = query.view(n, kv_heads, -1, head_dim)  # [n, Hkv, Hq/Hkv, D]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scaling  # [n, Hkv, Hq/Hkv, T]
    probs = torch.softmax(scores.masked_fill(~attend, float("-inf")), dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(values.dtype), values).view(n, -1)


def decode_step(tokens: torch.Tensor, slot: torch.Tensor, embed: torch.Tensor, plan: tuple, head: tuple,
                keys: list[torch.Tensor], values: list[torch.Tensor], attend: torch.Tensor, cos: torch.Tensor,
                sin_signed: torch.Tensor, shape: tuple[int, int, int, int], act: Any) -> torch.Tensor:
    """One decoder step over in-place KV buffers: logits [n, V] for ``tokens`` [n] written at buffer slot
    ``slot`` [1] (advanced by one here). Shapes never change within a rollout, so the step can be compiled
    once (:mod:`rlhfkit.rollout.compiled_decode`); ``attend`` [n, 1, 1, T] gains the new slot."""
    n = tokens.shape[0]
    head_dim, q_heads, kv_heads, intermediate = shape
    qk_heads = q_heads + kv_heads
    attend.index_fill_(-1, slot, True)
    cos_now = cos.index_select(1, slot).view(n, 1, head_dim)
    sin_now = sin_signed.index_select(1, slot).view(n, 1, head_dim)
    hidden = F.embedding(tokens, embed)  # [n, H]
    width = (hidden.shape[-1],)
    for (w_in, eps_in, qkv_parts, (o_weight_t, o_bias), scaling, w_post, eps_post, gate_up_parts,
         (down_weight_t, down_bias)), key_buffer, value_buffer in zip(plan, keys, values):
        qkv = _project(F.rms_norm(hidden, width, w_in, eps_in), qkv_parts)  # [n, (Hq + 2·Hkv)·D]
        qk = qkv[:, :qk_heads * head_dim].view(n, qk_heads, head_dim)
        swapped = qk.view(n, qk_heads, 2, head_dim // 2).flip(2).view(n, qk_heads, head_dim)  # (x2, x1)
        qk = torch.addcmul(qk * cos_now, swapped, sin_now)  # RoPE on q and k at once
        key_buffer.index_copy_(2, slot, qk[:, q_heads:, None])
        value_buffer.index_copy_(2, slot, qkv[:, qk_heads * head_dim:].view(n, kv_heads, 1, head_dim))
        out = _one_query_attention(qk[:, :q_heads], key_buffer, value_buffer, attend, scaling)
        hidden = _add_linear(hidden, out, o_weight_t, o_bias)
        gate_up = _project(F.rms_norm(hidden, width, w_post, eps_post), gate_up_parts)
        hidden = _add_linear(hidden, act(gate_up[:, :intermediate]) * gate_up[:, intermediate:],
                             down_weight_t, down_bias)
    slot.add_(1)
    final_weight, final_eps, head_weight, head_bias = head
    return _project(F.rms_norm(hidden, width, final_weight, final_eps), ((head_weight, head_bias),))


def decode_and_record(temperature: float, top_k: int, top_p: float, record: tuple[torch.Tensor, ...],
                      *step_args: Any) -> torch.Tensor:
    """:func:`decode_step` on each row's token in the previous column of the rollout's token buffer, then the
    draw from its logits, recorded (:func:`rlhfkit.rollout.sampling.draw_and_record`; ``record`` as it takes
    it). Returns whether every row has ended."""
    column, tokens = record[0], record[2]
    fed = tokens.index_select(1, column - 1).view(-1)
    return draw_and_record(decode_step(fed, *step_args), temperature, top_k, top_p, *record)
