"""A minibatch of experience records made into one batch, and how its loss is normalised (``loss_aggregation``).

The engine divides the sum of every micro-batch's ``aggregate`` by the sum of their ``batch_weight`` (over every
rank), so each aggregation is a (sum, weight) pair per micro-batch: token_mean = (Σ token losses, tokens),
sequence_mean = (Σ token losses / own length, responses), dr_grpo = (Σ / max_new_tokens, responses), bnpo =
(this micro-batch's token mean, 1). Responses masked by ``--mask-truncated`` (``loss_keep``) count in neither,
and in tool episodes (``policy_mask``) the forced tokens count in no token count nor in a response's length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...data import pack_batch, pack_shared_prompts, pad_batch
from ...models.forward import loss_sequence_ids
from .experience import TOKEN_FIELDS


def collate_records(records: list[dict], share_prompts: bool, packed: bool, pad_id: int | None) -> dict[str, Any]:
    """Pack (a group's prompt once when ``share_prompts``) or pad the records; concatenate their token fields."""
    if share_prompts:
        batch = pack_shared_prompts([r["prompt_ids"] for r in records], [r["response_ids"] for r in records])
    else:
        sequences = [r["prompt_ids"] + r["response_ids"] for r in records]
        masks = [[0] * len(r["prompt_ids"]) + [1] * len(r["response_ids"]) for r in records]
        batch = pack_batch(sequences, masks) if packed else pad_batch(sequences, masks, pad_id)
    for key in TOKEN_FIELDS:
        if key in records[0]:
            batch[key] = torch.cat([r[key] for r in records])
    batch["response_lengths"] = torch.tensor([len(r["response_ids"]) if "policy_mask" not in r else
                                              max(float(r["policy_mask"].sum()), 1.0) for r in records],
                                             dtype=torch.float32)
    if "loss_keep" in batch:  # --mask-truncated, tool tokens: masked tokens count in no normalisation either
        batch["kept_tokens"] = int(batch["loss_keep"].sum())
        batch["kept_sequences"] = sum(int(bool(r["loss_keep"].any())) for r in records)
    return batch


def batch_weight(how: str, batch: dict[str, Any]) -> float:
    """This micro-batch's share of the step's normaliser for aggregation ``how``."""
    if how == "bnpo":  # each micro-batch is one item: its own token mean (aggregate) weighs 1
        return 1.0
    if how == "token_mean":
        return float(batch.get("kept_tokens", batch["num_loss_tokens"]))
    return float(batch.get("kept_sequences", batch["num_sequences"]))


def aggregate(how: str, max_new_tokens: int, per_token: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the per-item losses for aggregation ``how`` (the engine divides by the step's weight)."""
    if how == "token_mean":
        return per_token.sum()
    if how == "bnpo":
        return per_token.sum() / max(batch.get("kept_tokens", batch["num_loss_tokens"]), 1)
    if how == "dr_grpo":
        return per_token.sum() / max_new_tokens
    lengths = batch["response_lengths"].to(per_token.device)
    return (per_token / lengths[loss_sequence_ids(batch)]).sum()


def token_sums(batch: dict[str, Any], like: torch.Tensor) -> tuple[Callable[[torch.Tensor], float], float]:
    """(sum over the logged tokens, their count): every response token, or in a tool episode the policy's own
    (a forced token has no rollout log-prob, so its ratio and KL are meaningless)."""
    seen = batch.get("policy_mask")
    if seen is None:
        return (lambda t: float(t.sum())), float(like.numel())
    seen = seen.to(like.device)
    return (lambda t: float((t * seen).sum())), float(seen.sum())
