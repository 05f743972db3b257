"""Do the rollout engine and the trainer agree on the log-probs of the sampled tokens?

PPO's ratio pi_theta / pi_old assumes both come from the same numbers. When the sampler (vLLM, or the HF
decode loop under another precision) and the trainer's forward disagree, the first minibatch already sees
ratios far from 1, clipping fires on noise and the KL estimates drift negative: the train/rollout mismatch
OpenRLHF and veRL users hit (TRL #1857, veRL #2996). Typical causes: a different temperature or top-k /
top-p processing on one side, stale weights in the engine, bf16 kernels, or EOS / stop handling that
scores a different token than the one sampled.

:func:`compare_logprobs` measures it over response tokens; :func:`check_logprob_match` turns a large
mean difference into a one-line error that says what to look at.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..data import pad_batch
from ..errors import RlhfkitError
from ..models.forward import loss_logits, loss_targets, to_device

__all__ = ["LogprobMatch", "LogprobMismatchError", "check_logprob_match", "compare_logprobs", "response_mask",
           "trainer_logprobs"]


class LogprobMismatchError(RlhfkitError):
    """The rollout engine's log-probs differ from the trainer's by more than the tolerance."""


@dataclass(frozen=True)
class LogprobMatch:
    """Differences over the response tokens of one rollout (trainer minus rollout engine, in nats)."""

    diff_mean: float  # mean |trainer - rollout|
    diff_max: float  # max |trainer - rollout|
    ratio_mean: float  # mean exp(trainer - rollout): the importance ratio PPO's first minibatch sees
    tokens: int

    def metrics(self, prefix: str = "rollout_logprob") -> dict[str, float]:
        """``{prefix}_diff_mean``, ``{prefix}_diff_max`` and ``rollout_importance_ratio_mean`` for the logger."""
        return {f"{prefix}_diff_mean": self.diff_mean, f"{prefix}_diff_max": self.diff_max,
                "rollout_importance_ratio_mean": self.ratio_mean}


def compare_logprobs(rollout_logps: torch.Tensor, trainer_logps: torch.Tensor,
                     mask: torch.Tensor) -> LogprobMatch:
    """Compare per-token log-probs [N, R] of the sampled tokens where ``mask`` [N, R] is true (response tokens).

    Computed in float64 so the statistics do not add round-off of their own. A non-finite value on either
    side makes ``diff_mean`` NaN, which :func:`check_logprob_match` refuses.
    """
    if rollout_logps.shape != trainer_logps.shape or rollout_logps.shape != mask.shape:
        raise ValueError(f"compare_logprobs: shapes {tuple(rollout_logps.shape)}, {tuple(trainer_logps.shape)} "
                         f"and mask {tuple(mask.shape)} differ")
    keep = mask.bool()
    count = int(keep.sum())
    if count == 0:
        return LogprobMatch(0.0, 0.0, 1.0, 0)
    delta = trainer_logps.double()[keep] - rollout_logps.double()[keep]
    diff = delta.abs()
    return LogprobMatch(float(diff.mean()), float(diff.max()), float(delta.exp().mean()), count)


def check_logprob_match(match: LogprobMatch, tolerance: float, where: str = "",
                        hint: str = "") -> None:
    """Raise :class:`LogprobMismatchError` when ``match.diff_mean`` exceeds ``tolerance`` (or is not finite).

    The message gives the three statistics, the tolerance and where to look; ``hint`` adds backend-specific
    advice (e.g. vLLM's processed log-probs under top-k / top-p).
    """
    if math.isfinite(match.diff_mean) and match.diff_mean <= tolerance:
        return
    stats = ", ".join(f"{k}={v:.4g}" for k, v in asdict(match).items())
    raise LogprobMismatchError(
        f"rollout and trainer log-probs disagree{where}: mean |Δ| {match.diff_mean:.4g} nats per token > "
        f"tolerance {tolerance:g} ({stats}); check that both use the same temperature and top-k/top-p "
        "handling, the same weights (synced after each update) and precision, and the same EOS/stop tokens"
        + (f"; {hint}" if hint else "") + " (raise --logprob-check-tolerance or set --logprob-check-steps -1 "
        "to go on anyway)")


def response_mask(lengths: list[int], width: int) -> torch.Tensor:
    """[N, width] float mask: 1 on the first ``lengths[i]`` columns of row i."""
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).float()


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: list[list[int]],
                     temperature: float, pad_token_id: int | None, batch_size: int = 16) -> torch.Tensor:
    """The trainer's log-probs [N, max response length] of the response tokens: one right-padded full forward
    per ``batch_size`` sequences, tempered logits, as the RL trainer scores a rollout (zeros after each end).
    """

    device = next(model.parameters()).device
    lengths = [len(r) for r in response_ids]
    width = max(lengths + [1])
    out = torch.zeros((len(lengths), width), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(lengths), batch_size):
            rows = range(start, min(start + batch_size, len(lengths)))
            sequences = [list(prompt_ids[i]) + list(response_ids[i]) for i in rows]
            masks = [[0] * len(prompt_ids[i]) + [1] * len(response_ids[i]) for i in rows]
            batch = to_device(pad_batch(sequences, masks, pad_token_id), device)
            logits, _ = loss_logits(model, batch)
            logps = torch.log_softmax(logits.float() / temperature, -1)
            flat = logps.gather(-1, loss_targets(batch)[:, None]).squeeze(-1).cpu()
            out[start:start + len(rows)][response_mask([lengths[i] for i in rows], width).bool()] = flat
    finally:
        model.train(was_training)
    return out
