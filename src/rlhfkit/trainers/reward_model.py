"""Reward modelling: a Bradley–Terry loss over every ranked pair of a prompt's responses."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch

from ..data import PREFERENCE_FORMATS, collate_groups, prepare_preferences
from ..engine import MetricSums
from ..losses import ranked_bradley_terry_loss
from ..models import load_reward_model, load_tokenizer
from ..models.dropout import apply_dropout_setting
from ..models.forward import LastTokenReward, to_device
from .common import (
    finish_run,
    iterate_batches,
    lora_settings,
    prepare_datasets,
    prompt_sharing,
    resolve_packing,
    start_run,
)
from .configs import RewardConfig

logger = logging.getLogger("rlhfkit")


class RewardTask:
    """One batch element is one prompt with its K responses; its loss averages over its K(K−1)/2 pairs."""

    name = "reward"

    def __init__(self, pad_token_id: int, packed: bool, center_rewards_coef: float, eval_records: list,
                 eval_batch_size: int, share_prompts: bool = False):
        self.pad_token_id, self.packed, self.share_prompts = pad_token_id, packed, packed and share_prompts
        self.center_rewards_coef = center_rewards_coef
        self.eval_records, self.eval_batch_size = eval_records, eval_batch_size

    def collate(self, records) -> dict[str, Any]:
        return collate_groups(list(records), self.pad_token_id, self.packed, self.share_prompts)

    def batch_weight(self, batch) -> float:
        return float(batch["num_groups"])

    def _losses(self, model, batch):
        scores = model(batch)
        group_losses, correct, pairs = ranked_bradley_terry_loss(
            scores, batch["ranks"], batch["group_index"], batch["num_groups"], margins=batch["margins"],
            center_rewards_coef=self.center_rewards_coef)
        return scores, group_losses, correct, pairs

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, MetricSums]:
        scores, group_losses, correct, pairs = self._losses(model, batch)
        n = float(scores.numel())
        return group_losses.sum(), {
            "accuracy": (float(correct.sum()), float(pairs.sum())),
            "reward_mean": (float(scores.detach().sum()), n),
            "reward_std": (float(scores.detach().std(unbiased=False)) * n if n > 1 else 0.0, n),
        }

    def evaluate(self, model) -> dict[str, float]:
        if not self.eval_records:
            return {}
        loss, groups, correct, pairs, rewards = 0.0, 0.0, 0.0, 0.0, []
        device = next(model.parameters()).device
        for chunk in iterate_batches(self.eval_records, self.eval_batch_size):
            batch = to_device(self.collate(chunk), device)
            scores, group_losses, right, count = self._losses(model, batch)
            loss += float(group_losses.sum())
            groups += float(batch["num_groups"])
            correct += float(right.sum())
            pairs += float(count.sum())
            rewards.append(scores.float().cpu())
        all_rewards = torch.cat(rewards)
        return {"loss": loss / max(groups, 1.0), "accuracy": correct / max(pairs, 1.0), "pairs": pairs,
                "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False))}


def run_reward(config: RewardConfig) -> dict[str, Any]:
    """Train a scalar reward model on preference or ranked data."""
    engine = start_run(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    # keep_template_tail: the exported model then scores apply_chat_template's rendering as it trained
    prepare = partial(prepare_preferences, max_length=config.max_length,
                      max_prompt_length=config.max_prompt_length, keep_template_tail=True)
    records, eval_records, report = prepare_datasets(config, tokenizer, PREFERENCE_FORMATS, prepare)
    model = load_reward_model(config.model, lora=lora_settings(config), trust_remote_code=config.trust_remote_code,
                              pad_token_id=tokenizer.pad_token_id)
    apply_dropout_setting(model, config.keep_dropout, "reward model")  # pairs compare two forwards
    model.to(engine.device)
    packed = resolve_packing(config, model, reward=True)
    task = RewardTask(tokenizer.pad_token_id, packed, config.center_rewards_coef, eval_records,
                      config.per_device_eval_batch_size, prompt_sharing(config, packed, model))
    return finish_run(engine, task, LastTokenReward(model), records, tokenizer,
                      {"train_rows": report.total_rows, "train_groups": len(records), "packing": packed,
                       "shared_prompts": task.share_prompts},
                      submodule="model")
