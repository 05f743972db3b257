"""Token log-probabilities and masked reductions.

Everything here is a pure tensor function, so the engine and every trainer (SFT, reward modelling,
DPO, PPO/GRPO/RLOO) share one implementation of "log p(token | prefix)" and of the loss normalisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["masked_mean", "masked_sum", "selected_token_logprobs", "selected_token_logprobs_and_entropy",
           "sequence_logprob_sums", "token_logprobs"]

# Upper bound on the number of logit elements processed at once (2**21 float32 elements = 8 MiB). logsumexp
# needs an exp() temporary of its input's size, and low-precision logits need an upcast copy; chunking keeps
# both bounded instead of growing to a second [B, T, V] tensor. Why this small: on the 2-core CPU of
# bench/, the forward and backward of 512 x 16,384 logits took about half as long in 8 MiB chunks as in one
# 32 MiB block, and 2,048-4,096 rows of 16-32k vocabulary 30-50% less (likely because glibc maps temporaries
# of 32 MiB and more fresh from the OS each time); smaller chunks gained nothing more.
_MAX_CHUNK_ELEMENTS = 1 << 21


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log-probabilities are computed and returned in: float64 and float32 stay, bf16 / fp16
    logits are upcast to float32 (a logsumexp in them loses several digits)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Log-probability of each observed token under the model's prediction from the previous position.

    Formula (logits [B, T, V], input_ids [B, T], output [B, T]):
        out[b, 0] = 0                                   (nothing predicts the first token)
        out[b, t] = logits[b, t-1, y] - log sum_v exp(logits[b, t-1, v]),   y = input_ids[b, t],  t >= 1
    i.e. out[b, t] = log_softmax(logits[b, t-1])[input_ids[b, t]].

    Computed as "gathered target logit minus logsumexp over the vocabulary" rather than a full
    log_softmax, so no second [B, T, V] tensor is materialised. Low-precision logits (bf16/fp16) are upcast
    to float32 chunk by chunk over T; the result is float32 for them and keeps the dtype otherwise.

    Packed batches (B = 1, several sequences concatenated) work unchanged: position t of a sequence start
    holds a "prediction" from the previous sequence's last token, which is meaningless — the caller
    guarantees such positions are never in the loss mask.
    """
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"expected logits [B, T, V] and input_ids [B, T], got {tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    batch, seq_len, vocab = logits.shape
    out_dtype = result_dtype(logits.dtype)
    first = logits.new_zeros((batch, 1), dtype=out_dtype)
    if seq_len < 2:
        return first

    pred_logits = logits[:, :-1]  # position t-1 predicts token t
    targets = input_ids[:, 1:].long()
    steps = seq_len - 1
    chunk = max(1, min(steps, _MAX_CHUNK_ELEMENTS // max(1, batch * vocab)))

    pieces = [first]
    for part, tgt in zip(pred_logits.split(chunk, dim=1), targets.split(chunk, dim=1)):  # see _row_chunking
        if part.dtype != out_dtype:
            part = part.to(out_dtype)  # logsumexp in bf16/fp16 loses several digits; upcast only this chunk
        target_logit = part.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        pieces.append(target_logit - torch.logsumexp(part, dim=-1))
    return torch.cat(pieces, dim=1)


def _row_chunking(logits: Tensor, targets: Tensor) -> tuple[int, torch.dtype, int]:
    """Checks [N, V] logits against [N] targets; returns N, the result dtype (float32 for low-precision
    logits) and the rows per chunk that keep an upcast / exp temporary under ``_MAX_CHUNK_ELEMENTS``.

    Callers take the chunks with ``split``, not slices: a slice's backward writes its gradient into a
    zero-filled tensor the size of all N rows, once per chunk; split's backward is one concatenation."""
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    rows, vocab = logits.shape
    out_dtype = result_dtype(logits.dtype)
    return rows, out_dtype, max(1, _MAX_CHUNK_ELEMENTS // max(1, vocab))


def selected_token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each target under its own row of predicting logits.

    Formula (logits [N, V], targets [N], output [N]):
        out[n] = z[n, y_n] - log sum_v exp(z[n, v]),   z = logits / temperature,  y_n = targets[n]
    i.e. log_softmax(logits[n] / temperature)[targets[n]].

    The rows are the positions that predict a loss token, already picked out (the trainers ask the model
    for logits at those positions only); ``token_logprobs`` is the same formula on a full [B, T, V] tensor.
    Low-precision logits are upcast to float32 chunk by chunk (result float32); float64 stays float64.
    The gradient is :class:`_SelectedLogprob`'s, by hand.
    """
    _, _, chunk = _row_chunking(logits, targets)
    return _SelectedLogprob.apply(logits, targets.long(), temperature, chunk)


class _SelectedLogprob(torch.autograd.Function):
    """z[n, y_n] - logsumexp(z[n]) per row of z = logits / T, in row chunks, with its gradient by hand.

    Naive equivalent (what autograd would run, one chunk)::

        z = logits.float() / T
        logp = z.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(z, -1)

    Why by hand: autograd's backward of that runs, per chunk, exp(z - lse) times the gradient, a zero-filled
    [rows, V] tensor for the gather, their sum, and then a concatenation of the chunks: five passes over
    vocabulary-wide memory where d logp_n / d logits_nv = (1[v = y_n] - p_nv) / T needs one exp and one
    product, written straight into the [N, V] gradient. Only the per-row logsumexp is kept for it; the
    logits are kept anyway (the forward's input).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, y: Tensor, temperature: float, chunk: int) -> Tensor:
        out_dtype = result_dtype(logits.dtype)
        logp = logits.new_empty(logits.shape[0], dtype=out_dtype)
        lse = torch.empty_like(logp)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            z = _tempered(logits[rows], out_dtype, temperature)
            torch.logsumexp(z, -1, out=lse[rows])
            torch.sub(z.gather(-1, y[rows, None]).squeeze(-1), lse[rows], out=logp[rows])
        ctx.save_for_backward(logits, y, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor) -> tuple[Tensor, None, None, None]:
        logits, y, lse = ctx.saved_tensors
        scaled = grad_logp.to(lse.dtype) / ctx.temperature  # d logp / d logits carries 1/T
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            block = grad[rows]
            work = block if block.dtype == lse.dtype else torch.empty_like(block, dtype=lse.dtype)
            torch.sub(_tempered(logits[rows], lse.dtype, ctx.temperature), lse[rows, None], out=work).exp_()
            _onehot_minus(work, y[rows], scaled[rows], out=work)
            if work is not block:
                block.copy_(work)
        return grad, None, None, None


def _tempered(part: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """A chunk of logits in ``dtype`` divided by the temperature; a view of ``part`` when neither applies."""
    part = part.to(dtype)
    return part if temperature == 1.0 else part / temperature


def _onehot_minus(probs: Tensor, y: Tensor, grad_logp: Tensor, out: Tensor | None = None) -> Tensor:
    """(onehot(y) - probs) * grad_logp[:, None], the gradient of log p_y with respect to the logits times the
    upstream gradient, written into ``out`` (``probs`` itself for an in-place update; a new tensor if None)."""
    return torch.mul(probs, -grad_logp[:, None], out=out).scatter_add_(-1, y[:, None], grad_logp[:, None])


def sequence_logprob_sums(
    token_logps: Tensor,
    mask: Tensor,
    sequence_index: Tensor | None = None,
    num_sequences: int | None = None,
) -> Tensor:
    """Sum the masked token log-probabilities of each sequence.

    Padded batch (sequence_index is None), token_logps and mask [B, T]:
        out[b] = sum_t token_logps[b, t] * mask[b, t]                     -> [B]
    Packed batch, sequence_index a LongTensor shaped like token_logps with values in 0..S-1:
        out[s] = sum_{positions p with sequence_index[p] = s} token_logps[p] * mask[p]   -> [S]

    S = num_sequences, or max(sequence_index) + 1 if not given (that costs a device sync). Positions with
    mask 0 may carry any index (e.g. -1 for padding); they are routed to sequence 0 with weight 0.
    The packed reduction uses index_add, which is differentiable w.r.t. token_logps.
    """
    weighted = token_logps * mask.to(token_logps.dtype)
    if sequence_index is None:
        return weighted.sum(-1)
    if sequence_index.shape != token_logps.shape:
        raise ValueError(
            f"sequence_index shape {tuple(sequence_index.shape)} != token_logps shape {tuple(token_logps.shape)}"
        )
    index = sequence_index.reshape(-1).long()
    # Masked-out positions contribute exactly 0, so their index only needs to be a valid one.
    index = torch.where(mask.reshape(-1) != 0, index, torch.zeros_like(index))
    if num_sequences is None:
        num_sequences = int(index.max().item()) + 1 if index.numel() > 0 else 0
    out = weighted.new_zeros(num_sequences)
    return out.index_add(0, index, weighted.reshape(-1))


def selected_token_logprobs_and_entropy(logits: Tensor, targets: Tensor,
                                        entropy_grad: bool = False) -> tuple[Tensor, Tensor]:
    """Log-probability of each target and the entropy of each row, from one log-softmax per chunk.

    Formula (logits [N, V] already divided by any temperature, targets [N], outputs [N] and [N]):
        ℓ = log_softmax(logits[n]),   out[n] = ℓ[y_n],   H[n] = -sum_v exp(ℓ_v) · ℓ_v

    What an RL policy loss needs from one forward: :func:`selected_token_logprobs` plus
    ``entropy_from_logits`` computed separately pass over the [N, V] logits about twice as often. The
    entropy carries a gradient only with ``entropy_grad`` (an entropy bonus); otherwise it is a statistic.
    The logits must be finite (a model's are; ``entropy_from_logits`` takes top-k-masked ones).
    Low-precision logits are upcast chunk by chunk (results float32); float64 stays float64.
    """
    _, out_dtype, chunk = _row_chunking(logits, targets)
    if not (entropy_grad and torch.is_grad_enabled()):
        return _LogprobAndEntropy.apply(logits, targets.long(), chunk)
    logps, entropies = [logits.new_zeros(0, dtype=out_dtype)], [logits.new_zeros(0, dtype=out_dtype)]
    for part, picked in zip(logits.split(chunk), targets.split(chunk)):  # split: see _row_chunking
        log_probs = torch.log_softmax(part.to(out_dtype), dim=-1)
        logps.append(log_probs.gather(-1, picked.long()[:, None]).squeeze(-1))
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.cat(logps), torch.cat(entropies)


class _LogprobAndEntropy(torch.autograd.Function):
    """(log_softmax(z)[y], -Σ_v p_v log p_v) per row of z [N, V] in row chunks, the entropy a statistic (no
    gradient).

    Naive equivalent (what autograd would run, one chunk)::

        log_probs = torch.log_softmax(z, -1)
        logp = log_probs.gather(-1, y[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1).detach()

    Why by hand: over a vocabulary-wide [N, V] block every elementwise pass costs about as much as the next,
    and autograd's version adds a zero-filled [N, V] gradient for the gather, a log-softmax backward that
    recomputes exp(log p) and a concatenation of the chunks' gradients. Here p = exp(log p), which the
    entropy needs anyway, is kept (one tensor per chunk) for the backward, d logp_n / d z_nv = 1[v = y_n] -
    p_nv: one product and a scatter per chunk, written straight into the [N, V] gradient.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, y: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        out_dtype = result_dtype(z.dtype)
        logp, entropy = z.new_empty(z.shape[0], dtype=out_dtype), z.new_empty(z.shape[0], dtype=out_dtype)
        kept = []
        for start in range(0, z.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_probs = torch.log_softmax(z[rows].to(out_dtype), dim=-1)
            torch.gather(log_probs, -1, y[rows, None], out=logp[rows, None])
            probs = log_probs.exp()
            torch.neg(torch.linalg.vecdot(probs, log_probs), out=entropy[rows])
            kept.append(probs)
        ctx.save_for_backward(y, *kept)
        ctx.chunk, ctx.z_dtype = chunk, z.dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, _grad_entropy: Tensor | None) -> tuple[Tensor, None, None]:
        y, *kept = ctx.saved_tensors
        grad = grad_logp.new_empty((y.shape[0], kept[0].shape[-1]), dtype=ctx.z_dtype)
        grad_logp = grad_logp.to(kept[0].dtype)
        for start, probs in zip(range(0, y.shape[0], ctx.chunk), kept):
            rows = slice(start, start + ctx.chunk)
            block = grad[rows]
            if block.dtype == probs.dtype:  # (1[v = y] - p) g, written into the gradient
                _onehot_minus(probs, y[rows], grad_logp[rows], out=block)
            else:
                block.copy_(_onehot_minus(probs, y[rows], grad_logp[rows]))
        return grad, None, None


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of the selected elements: sum_i values[i] * mask[i] (a 0-dim tensor)."""
    return (values * mask.to(values.dtype)).sum()


def masked_mean(values: Tensor, mask: Tensor, num_items: float | Tensor | None = None) -> Tensor:
    """Masked mean with an explicit denominator.

    Formula:
        masked_mean = sum_i values[i] * mask[i] / D,
        D = num_items            if given
            max(sum_i mask[i], 1) otherwise (the clamp keeps an all-masked batch at 0 instead of NaN)

    Gradient accumulation: with micro-batches k = 1..K (and data-parallel ranks) making up one optimizer
    step, the large-batch token mean is  sum_k sum_i v_ki m_ki / N,  N = total unmasked tokens of the
    WHOLE global batch. Passing num_items = N to every micro-batch and summing the (already scaled) losses
    reproduces that loss, and therefore its gradient, exactly. Averaging per-micro-batch means,
    (1/K) sum_k (sum_i v_ki m_ki / n_k), instead weights every token by 1/(K n_k): tokens in short
    micro-batches count more, so the result differs whenever the n_k are unequal (see TRL issue #3021).
    """
    total = masked_sum(values, mask)
    if num_items is None:
        denom = mask.to(values.dtype).sum().clamp(min=1)
    elif isinstance(num_items, Tensor):
        denom = num_items.to(values.dtype)
    else:
        denom = float(num_items)
    return total / denom
