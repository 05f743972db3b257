"""Batch token sequences: right-padded [B, T] tensors or one padding-free packed [1, N] stream.

Both layouts share the keys the trainers read: ``input_ids``, ``loss_mask`` (float32, 1.0 = the token is
scored), ``last_index`` (where each sequence's last real token is), ``num_tokens`` and
``num_loss_tokens`` (python ints, for loss normalisation across micro-batches). A padded batch adds
``attention_mask``; a packed batch adds ``position_ids`` and ``sequence_index`` and has no
``attention_mask`` key at all: transformers only derives the per-sequence (block-diagonal) attention
from reset position ids when attention_mask is None (callers also pass ``use_cache=False``).

Position 0 of every sequence always gets loss mask 0, whatever the records say: nothing predicts it,
and in a packed stream its "prediction" would come from the previous sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate_groups", "collate_sequences", "pack_batch", "pack_shared_prompts", "pad_batch"]


def _checked(sequences: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]]) -> list[list[int]]:
    if len(sequences) != len(loss_masks):
        raise ValueError(f"{len(sequences)} sequences but {len(loss_masks)} loss masks")
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    masks = []
    for i, (seq, mask) in enumerate(zip(sequences, loss_masks)):
        if len(seq) == 0:
            raise ValueError(f"sequence {i} is empty")
        if len(seq) != len(mask):
            raise ValueError(f"sequence {i} has {len(seq)} tokens but a loss mask of {len(mask)}")
        mask = [1 if m else 0 for m in mask]
        mask[0] = 0
        masks.append(mask)
    return masks


def pad_batch(
    sequences: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    pad_token_id: int | None,
) -> dict[str, Any]:
    """Right-pad to the longest sequence.

    Returns ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long, ``loss_mask`` [B, T] float32,
    ``last_index`` [B] long (index of each sequence's last real token), ``num_sequences`` B,
    ``num_tokens`` and ``num_loss_tokens`` (ints). A tokenizer without a pad token may pass None: padded positions are
    masked out everywhere, so id 0 is used.
    """
    masks = _checked(sequences, loss_masks)
    pad = 0 if pad_token_id is None else int(pad_token_id)
    batch, width = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.float32)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        n = len(seq)
        input_ids[row, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.as_tensor(mask, dtype=torch.float32)
    lengths = [len(s) for s in sequences]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "last_index": torch.as_tensor(lengths, dtype=torch.long) - 1,
        "num_sequences": batch,
        "num_tokens": sum(lengths),
        "num_loss_tokens": sum(sum(m) for m in masks),
    }


def pack_batch(sequences: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Concatenate the sequences into one row without padding.

    Returns ``input_ids`` [1, N] long, ``position_ids`` [1, N] long (restarting at 0 for each sequence),
    ``loss_mask`` [1, N] float32, ``sequence_index`` [1, N] long (which sequence each token belongs to),
    ``last_index`` [B] long (each sequence's last token in the stream), ``num_sequences`` B, and
    ``num_tokens`` / ``num_loss_tokens`` (ints). No ``attention_mask`` (see the module docstring).
    """
    masks = _checked(sequences, loss_masks)
    ids: list[int] = []
    positions: list[int] = []
    flat_mask: list[int] = []
    seq_index: list[int] = []
    last: list[int] = []
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        ids.extend(int(t) for t in seq)
        positions.extend(range(len(seq)))
        flat_mask.extend(mask)
        seq_index.extend([i] * len(seq))
        last.append(len(ids) - 1)
    return {
        "input_ids": torch.as_tensor(ids, dtype=torch.long)[None],
        "position_ids": torch.as_tensor(positions, dtype=torch.long)[None],
        "loss_mask": torch.as_tensor(flat_mask, dtype=torch.float32)[None],
        "sequence_index": torch.as_tensor(seq_index, dtype=torch.long)[None],
        "last_index": torch.as_tensor(last, dtype=torch.long),
        "num_sequences": len(sequences),
        "num_tokens": len(ids),
        "num_loss_tokens": sum(flat_mask),
    }


def pack_shared_prompts(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Pack (prompt, response) pairs into one row in which adjacent pairs with the same prompt share one copy.

    The samples of a GRPO/RLOO group (or of any prompt sampled several times) then cost their prompt's
    tokens once in a forward and backward instead of once per sample. The row holds, per run of equal
    adjacent prompts: the prompt, then each response. Positions restart at 0 for each prompt and continue
    from the prompt's length for every response, so each response sees the positions it was sampled at.
    The attention that keeps a response from seeing its siblings is :mod:`rlhfkit.models.attention`'s,
    which reads ``prompt_groups``.

    A loss token's predicting position is no longer "the previous token": the first token of every response
    is predicted from the shared prompt's last token. So this layout carries the loss tokens explicitly:
    ``loss_index`` [n] long (stream position that predicts each loss token, repeats allowed),
    ``loss_targets`` [n] and ``loss_sequence`` [n] (the pair each belongs to), in pair order, then position
    order, as the other layouts order them. Also ``input_ids`` / ``position_ids`` [1, N], ``last_index`` [B]
    (each response's last token in the row), ``prompt_groups`` (``(start, prompt length, response
    lengths)`` per shared prompt), ``num_sequences``, ``num_tokens`` (tokens in the row) and
    ``num_loss_tokens``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    ids: list[int] = []
    positions: list[int] = []
    loss_index: list[int] = []
    targets: list[int] = []
    owners: list[int] = []
    last: list[int] = []
    groups: list[tuple[int, int, tuple[int, ...]]] = []
    first = 0
    while first < len(prompts):
        prompt = [int(t) for t in prompts[first]]
        if not prompt:
            raise ValueError(f"sequence {first} has an empty prompt")
        end = first + 1
        while end < len(prompts) and len(prompts[end]) == len(prompt) and list(prompts[end]) == prompt:
            end += 1
        start, width = len(ids), len(prompt)
        ids.extend(prompt)
        positions.extend(range(width))
        lengths = []
        for pair in range(first, end):
            response = [int(t) for t in responses[pair]]
            at = len(ids)
            ids.extend(response)
            positions.extend(range(width, width + len(response)))
            if response:  # token 0 is predicted by the prompt's last token, token j by response token j - 1
                loss_index.append(start + width - 1)
                loss_index.extend(range(at, at + len(response) - 1))
            targets.extend(response)
            owners.extend([pair] * len(response))
            last.append(len(ids) - 1 if response else start + width - 1)
            lengths.append(len(response))
        groups.append((start, width, tuple(lengths)))
        first = end
    return {
        "input_ids": torch.as_tensor(ids, dtype=torch.long)[None],
        "position_ids": torch.as_tensor(positions, dtype=torch.long)[None],
        "loss_index": torch.as_tensor(loss_index, dtype=torch.long),
        "loss_targets": torch.as_tensor(targets, dtype=torch.long),
        "loss_sequence": torch.as_tensor(owners, dtype=torch.long),
        "last_index": torch.as_tensor(last, dtype=torch.long),
        "prompt_groups": tuple(groups),
        "num_sequences": len(prompts),
        "num_tokens": len(ids),
        "num_loss_tokens": len(targets),
    }


def collate_groups(groups: Sequence[dict[str, Any]], pad_token_id: int | None, packed: bool,
                   share_prompts: bool = False) -> dict[str, Any]:
    """Batch response groups (from :func:`prepare_preferences`) as one sequence per response.

    Each sequence is ``prompt_ids + response`` with loss mask 0 on the prompt and 1 on the response. The
    order is group-major: group 0's responses first, in their stored order. For pairwise groups
    (``responses = [chosen, rejected]``) chosen sequences are the even rows (0, 2, ...) and rejected
    sequences the odd rows. Adds ``group_index`` [M] long (the group of each sequence), ``ranks`` [M]
    float32 (lower = better, ties equal), ``margins`` [num_groups] float32 and ``num_groups``.

    ``share_prompts`` (a packed layout): a group's responses share one copy of its prompt
    (:func:`pack_shared_prompts`, which needs rlhfkit's packed attention in the model). Scores and
    log-probs are those of the separate sequences up to float rounding; a pair's prompt is processed once
    instead of twice, a ranking's once instead of K times.
    """
    prompts: list[list[int]] = []
    responses: list[list[int]] = []
    group_index: list[int] = []
    ranks: list[float] = []
    margins: list[float] = []
    for g, group in enumerate(groups):
        prompt = list(group["prompt_ids"])
        if len(group["ranks"]) != len(group["responses"]):
            raise ValueError(f"group {g}: {len(group['ranks'])} ranks for {len(group['responses'])} responses")
        for response, rank in zip(group["responses"], group["ranks"]):
            prompts.append(prompt)
            responses.append(list(response))
            group_index.append(g)
            ranks.append(float(rank))
        margins.append(float(group.get("margin", 0.0) or 0.0))
    if share_prompts and all(prompts):  # a prompt-less row (no BOS either) has nothing to share
        batch = pack_shared_prompts(prompts, responses)
    else:
        sequences = [p + r for p, r in zip(prompts, responses)]
        masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
        batch = pack_batch(sequences, masks) if packed else pad_batch(sequences, masks, pad_token_id)
    batch["group_index"] = torch.as_tensor(group_index, dtype=torch.long)
    batch["ranks"] = torch.as_tensor(ranks, dtype=torch.float32)
    batch["margins"] = torch.as_tensor(margins, dtype=torch.float32)
    batch["num_groups"] = len(groups)
    return batch


def collate_sequences(records: Sequence[dict[str, Any]], pad_token_id: int | None, packed: bool) -> dict[str, Any]:
    """Batch SFT records (``{"input_ids", "loss_mask"}`` from :func:`prepare_sft`), padded or packed."""
    sequences = [r["input_ids"] for r in records]
    masks = [r["loss_mask"] for r in records]
    return pack_batch(sequences, masks) if packed else pad_batch(sequences, masks, pad_token_id)
