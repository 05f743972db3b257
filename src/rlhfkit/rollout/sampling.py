"""One sampling step, shared by the decode loops: logits → (token, its log-probability) per row, recorded
into the rollout's buffers."""

from __future__ import annotations

import torch

__all__ = ["draw_and_record", "filter_logits", "sample_next"]


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


def sample_next(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int,
                top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N] drawn from softmax(filter(logits / T)) and their log-probabilities under the unfiltered
    log softmax(logits / T) (what the trainer scores), from one uniform per row ``uniform`` [N, 1].

    The draw inverts the CDF: with c = cumsum(p), the token is the first i with c_i > u·c_V. torch.multinomial
    draws an exponential variate for every vocabulary entry instead; one uniform per row is exact too and
    costs a fraction of that per decode step. Pure (the caller draws ``uniform``), so a compiled decode step
    can take it in.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    if top_k > 0 or top_p < 1.0:
        probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    else:  # the unfiltered distribution is exp(logp_all): no second softmax
        probs = logp_all.exp()
    cdf = probs.cumsum(-1)
    # right side: zero-probability tokens own an empty interval; scaling by the total absorbs round-off
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1)
    return index.squeeze(-1), logp_all.gather(-1, index).squeeze(-1)


def draw_and_record(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, column: torch.Tensor,
                    uniforms: torch.Tensor, tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor,
                    done: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Draw decode step ``column`` [1] from ``logits`` [n, V] (:func:`sample_next`, with the uniforms of that
    row of ``uniforms`` [steps, n]) and record it: the token and its log-probability go to that column of
    ``tokens`` / ``logps`` [n, steps], a row that draws one of the ``eos`` ids ends (``lengths`` [n] = column + 1,
    ``done`` [n] set), and ``column`` advances. Returns whether every row has ended ([] bool).

    Rows already ended keep drawing (the caller masks their tail): no per-step masking. All in place on
    tensors, so a compiled decode step takes it in and the decode loop does no per-token bookkeeping of its own.
    """
    sampled, logp = sample_next(logits, uniforms.index_select(0, column).view(-1, 1), temperature, top_k,
                                top_p)
    tokens.index_copy_(1, column, sampled[:, None])
    logps.index_copy_(1, column, logp[:, None].to(logps.dtype))
    ended = (sampled[:, None] == eos).any(-1).logical_and_(~done)
    lengths.copy_(torch.where(ended, column + 1, lengths))
    done.logical_or_(ended)
    column.add_(1)
    return done.all()
