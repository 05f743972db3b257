"""Per-sequence attention for padding-free packed batches on devices without flash-attention varlen.

transformers isolates packed sequences with a block-diagonal mask over the whole packed row, so attention
costs O(N²) for N packed tokens. This attention function instead runs causal SDPA on each sequence's
slice (O(Σ nᵢ²)), using the same ``cu_seq_lens_q`` boundaries that flash-attention's varlen kernel takes.
Without those boundaries (padded batches, generation) it is plain SDPA.

It also runs the shared-prompt layout of :func:`rlhfkit.data.pack_shared_prompts` (the ``prompt_groups``
keyword, which transformers hands through to the attention function): each prompt attends causally to
itself, and each response to the whole prompt plus its own earlier tokens, never to its siblings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_ATTENTION = "rlhfkit_packed_sdpa"
SHARED_PROMPTS = "prompt_groups"  # the model keyword that carries a shared-prompt layout to the attention


def _runs(lengths: list[int] | tuple[int, ...]) -> list[list[int]]:
    """Consecutive equal lengths as [length, count] (zeros dropped): one batched SDPA call per run, since at
    small sizes the per-call cost, not the arithmetic, is what adds up."""
    runs: list[list[int]] = []
    for n in lengths:
        if n == 0:
            continue
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return runs


def _causal(q, k, v, dropout: float, scaling: float | None, window: int | None) -> torch.Tensor:
    """Causal SDPA over [.., n, dim] q/k/v; with a sliding ``window`` shorter than n (Mistral, Phi-3, Gemma's
    local layers) a query sees only the keys less than ``window`` positions back, as transformers' mask does."""
    n = q.shape[-2]
    if window is None or n <= window:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    rows = torch.arange(n, device=q.device)[:, None]
    cols = torch.arange(n, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(cols <= rows) & (cols > rows - window),
                                          dropout_p=dropout, scale=scaling)


def _shared_prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: tuple,
                             dropout: float, scaling: float | None, window: int | None = None) -> torch.Tensor:
    """[1, heads, N, dim] q/k/v (kv heads already repeated) of a shared-prompt row -> [1, heads, N, dim].

    Per group: causal SDPA over the prompt; then per run of equal-length responses one batched call whose
    keys are the prompt's (broadcast to every response) followed by the response's own, under the mask
    ``key j visible from query i  <=>  j < P  or  j - P <= i`` (P = prompt length); for responses longer than
    their prompt, the same attention as causal SDPA over prompt + response (the prompt's rows dropped)."""
    plan = [(prompt_length, _runs(lengths)) for _, prompt_length, lengths in groups]
    spans: list[int] = []
    for prompt_length, runs in plan:
        spans.append(prompt_length)
        spans.extend(n * count for n, count in runs)
    if sum(spans) != query.shape[2]:
        raise ValueError(f"shared-prompt attention: the layout covers {sum(spans)} tokens of a row of "
                         f"{query.shape[2]}")
    heads, dim = query.shape[1], query.shape[3]
    # split, not slices: see packed_sdpa_attention
    pieces_q, pieces_k, pieces_v = (t.split(spans, dim=2) for t in (query, key, value))
    out, at = [], 0
    for prompt_length, runs in plan:
        prompt_q, prompt_k, prompt_v = pieces_q[at], pieces_k[at], pieces_v[at]
        out.append(_causal(prompt_q, prompt_k, prompt_v, dropout, scaling, window))
        at += 1
        for n, count in runs:
            q, k, v = (t[at].view(heads, count, n, dim).transpose(0, 1) for t in (pieces_q, pieces_k, pieces_v))
            k = torch.cat([prompt_k.expand(count, -1, -1, -1), k], dim=2)
            v = torch.cat([prompt_v.expand(count, -1, -1, -1), v], dim=2)
            if prompt_length < n:
                # Long responses: each response with the prompt's queries in front is one causal sequence of
                # P + n tokens, and the prompt rows' outputs are dropped. Causal SDPA skips the blocks above
                # the diagonal, ~(P + n)²/2 scores, where the mask below makes it compute all n·(P + n):
                # fewer whenever P < n (a reward pair of 150-token prompts and ~1,750-token responses:
                # 1.8x fewer).
                q = torch.cat([prompt_q.expand(count, -1, -1, -1), q], dim=2)
                attended = _causal(q, k, v, dropout, scaling, window)[:, :, prompt_length:]
            else:
                rows = torch.arange(n, device=query.device)[:, None]
                cols = torch.arange(prompt_length + n, device=query.device)[None, :]
                mask = (cols < prompt_length) | (cols - prompt_length <= rows)  # [n, P + n]
                if window is not None:  # a key's column is its position; response token i sits at P + i
                    mask &= cols > prompt_length + rows - window
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                          scale=scaling)
            out.append(attended.transpose(0, 1).reshape(1, heads, n * count, dim))
            at += 1
    return torch.cat(out, dim=2)


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query/key/value: [1, heads, N, head_dim] -> ([1, N, heads, head_dim], None), as transformers expects."""
    shared = kwargs.get(SHARED_PROMPTS)
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if shared is None and (cu_seq_lens is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if kwargs.get("softcap") is not None:  # as transformers' SDPA: it cannot soft-cap scores (Gemma-2)
        raise ValueError("rlhfkit's packed attention does not support soft-capped attention scores")
    p = dropout if module.training else 0.0
    window = kwargs.get("sliding_window")
    if shared is not None:
        return _shared_prompt_attention(query, key, value, shared, p, scaling,
                                        window).transpose(1, 2).contiguous(), None
    bounds = cu_seq_lens.tolist()
    if bounds[0] != 0 or bounds[-1] > query.shape[2]:
        raise ValueError(f"packed attention: sequence boundaries {bounds[0]}..{bounds[-1]} do not fit a row of "
                         f"{query.shape[2]} tokens")
    if bounds[-1] < query.shape[2]:  # a padded tail attends to itself only; it is never scored
        bounds.append(query.shape[2])
    # consecutive sequences of one length (a group of samples that all ran to max_new_tokens) go through
    # one batched SDPA call
    runs = _runs([e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
    heads, dim = query.shape[1], query.shape[3]
    spans = [n * count for n, count in runs]
    pieces = []
    # split, not one slice per run: a slice's backward writes its gradient into a zero-filled tensor of the
    # full packed size, runs x 3 tensors per layer; split's backward is a single concatenation.
    for q, k, v, (n, count) in zip(query.split(spans, dim=2), key.split(spans, dim=2),
                                   value.split(spans, dim=2), runs, strict=True):
        q, k, v = (t.view(heads, count, n, dim).transpose(0, 1) for t in (q, k, v))  # [count, heads, n, dim]
        out = _causal(q, k, v, p, scaling, window)
        pieces.append(out.transpose(0, 1).reshape(1, heads, n * count, dim))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA/eager model to per-sequence packed attention; keep flash-attention as it is."""
    current = getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", "eager", None):
        return False
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True
