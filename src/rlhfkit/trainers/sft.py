"""Supervised fine-tuning: next-token loss on completion tokens (all assistant turns by default)."""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import torch

from ..data import SFT_FORMATS, collate_sequences, prepare_sft
from ..engine import MetricSums
from ..losses import selected_token_logprobs
from ..models import load_causal_lm, load_tokenizer
from ..models.forward import loss_logits, loss_targets, to_device
from .common import finish_run, iterate_batches, lora_settings, prepare_datasets, resolve_packing, start_run
from .configs import SFTConfig

logger = logging.getLogger("rlhfkit")


class SFTTask:
    """Loss = −Σ log p(completion tokens), normalised by the completion-token count of the whole step."""

    name = "sft"

    def __init__(self, pad_token_id: int, packed: bool, eval_records: list, eval_batch_size: int):
        self.pad_token_id, self.packed = pad_token_id, packed
        self.eval_records, self.eval_batch_size = eval_records, eval_batch_size

    def collate(self, records) -> dict[str, Any]:
        return collate_sequences(list(records), self.pad_token_id, self.packed)

    def batch_weight(self, batch) -> float:
        return float(batch["num_loss_tokens"])

    def _nll_sum(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = loss_logits(model, batch)  # only the positions that predict a completion token
        targets = loss_targets(batch)
        correct = (logits.detach().argmax(-1) == targets).sum()
        return -selected_token_logprobs(logits, targets).sum(), correct

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, MetricSums]:
        nll, correct = self._nll_sum(model, batch)
        return nll, {"token_accuracy": (float(correct), float(batch["num_loss_tokens"]))}

    def evaluate(self, model) -> dict[str, float]:
        if not self.eval_records:
            return {}
        nll, correct, tokens = 0.0, 0.0, 0.0
        for chunk in iterate_batches(self.eval_records, self.eval_batch_size):
            batch = to_device(self.collate(chunk), next(model.parameters()).device)
            loss_sum, right = self._nll_sum(model, batch)
            nll += float(loss_sum)
            correct += float(right)
            tokens += float(batch["num_loss_tokens"])
        loss = nll / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1.0)}


def run_sft(config: SFTConfig) -> dict[str, Any]:
    """Train a causal LM on SFT data; returns the summary written to ``OUTPUT_DIR/summary.json``."""
    engine = start_run(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    prepare = partial(prepare_sft, max_length=config.max_length, completion_only_loss=config.completion_only_loss)
    records, eval_records, report = prepare_datasets(config, tokenizer, SFT_FORMATS, prepare)
    model = load_causal_lm(config.model, lora=lora_settings(config), trust_remote_code=config.trust_remote_code)
    model.to(engine.device)
    packed = resolve_packing(config, model)
    task = SFTTask(tokenizer.pad_token_id, packed, eval_records, config.per_device_eval_batch_size)
    return finish_run(engine, task, model, records, tokenizer,
                      {"train_rows": report.total_rows, "train_examples": len(records), "packing": packed})
