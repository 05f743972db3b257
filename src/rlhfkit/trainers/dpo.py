"""Direct preference optimisation (and IPO / hinge / robust variants) against a frozen reference."""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..data import PREFERENCE_FORMATS, collate_groups, expand_to_pairs, prepare_preferences
from ..engine import MetricSums
from ..errors import ConfigError
from ..losses import DPO_LOSS_TYPES, dpo_loss
from ..models import check_same_tokenizer, load_causal_lm, load_tokenizer
from ..models.attention import use_packed_attention
from ..models.dropout import apply_dropout_setting
from ..models.forward import sequence_logps, to_device
from .common import finish_run, iterate_batches, lora_settings, prepare_datasets, resolve_packing, start_run
from .configs import DPOConfig

logger = logging.getLogger("rlhfkit")


def _cache_key(records: list[dict], ref_name: str) -> str:
    digest = hashlib.sha256(ref_name.encode())
    for rec in records:
        digest.update(json.dumps([rec["prompt_ids"], rec["responses"]]).encode())
    return digest.hexdigest()


class DPOTask:
    """Each record is one pair; batches hold chosen at even rows and rejected at odd rows."""

    name = "dpo"

    def __init__(self, config: DPOConfig, pad_token_id: int, packed: bool, ref_model, eval_records: list):
        self.config, self.pad_token_id, self.packed = config, pad_token_id, packed
        self.ref_model = ref_model  # None: the policy with adapters disabled (LoRA)
        self.eval_records = eval_records

    def collate(self, records) -> dict[str, Any]:
        batch = collate_groups(list(records), self.pad_token_id, self.packed)
        if "ref_logps" in records[0]:
            batch["ref_logps"] = torch.tensor([v for r in records for v in r["ref_logps"]], dtype=torch.float32)
        return batch

    def batch_weight(self, batch) -> float:
        return float(batch["num_groups"])

    @torch.no_grad()
    def reference_logps(self, model, batch) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.ref_model is not None:
            return sequence_logps(self.ref_model, batch).float()
        inner = model.module if hasattr(model, "module") else model
        with inner.disable_adapter():
            return sequence_logps(inner, batch).float()

    def _loss(self, model, batch):
        ref = self.reference_logps(model, batch)
        logps = sequence_logps(model, batch)
        cfg = self.config
        return dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta=cfg.beta, loss_type=cfg.loss_type,
                        label_smoothing=cfg.label_smoothing), logps.detach()

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, MetricSums]:
        out, logps = self._loss(model, batch)
        n = float(out.losses.numel())
        margin = out.chosen_rewards - out.rejected_rewards
        return out.losses.sum(), {
            "reward_accuracy": (float((margin > 0).float().sum()), n),
            "reward_margin": (float(margin.sum()), n),
            "chosen_reward": (float(out.chosen_rewards.sum()), n),
            "rejected_reward": (float(out.rejected_rewards.sum()), n),
            "chosen_logp": (float(logps[0::2].sum()), n),
            "rejected_logp": (float(logps[1::2].sum()), n),
        }

    def evaluate(self, model) -> dict[str, float]:
        if not self.eval_records:
            return {}
        totals: dict[str, float] = {}
        count = 0.0
        device = next(model.parameters()).device
        for chunk in iterate_batches(self.eval_records, self.config.per_device_eval_batch_size):
            batch = to_device(self.collate(chunk), device)
            loss_sum, sums = self.compute_loss(model, batch)
            totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
            for name, (value, _) in sums.items():
                totals[name] = totals.get(name, 0.0) + value
            count += float(batch["num_groups"])
        return {name: value / max(count, 1.0) for name, value in totals.items()}


def precompute_reference(task: DPOTask, model, record_sets: list[list[dict]], cache: Path, batch_size: int,
                         ref_name: str, device: torch.device) -> None:
    """Attach ``ref_logps`` [chosen, rejected] to every record, from ``cache`` when it matches the data."""
    key = _cache_key([r for records in record_sets for r in records], ref_name)
    stored = torch.load(cache, weights_only=True) if cache.exists() else None
    if stored is not None and stored.get("key") == key:
        values = stored["values"]
        logger.info("reference log-probs: reused %s", cache)
    else:
        values = []
        model.eval()
        for records in record_sets:
            for chunk in iterate_batches(records, batch_size):
                batch = to_device(task.collate(chunk), device)
                values.append(task.reference_logps(model, batch).cpu())
        values = torch.cat(values) if values else torch.zeros(0)
        model.train()
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save({"key": key, "values": values}, tmp)
        tmp.replace(cache)
        logger.info("reference log-probs: computed for %d sequences, cached in %s", values.numel(), cache)
    flat = [r for records in record_sets for r in records]
    pairs = values.view(-1, 2).tolist()
    for rec, pair in zip(flat, pairs, strict=True):
        rec["ref_logps"] = pair


def run_dpo(config: DPOConfig) -> dict[str, Any]:
    """Train a policy with DPO on preference or ranked data (ranked rows become all their pairs)."""
    if config.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"--loss-type must be one of {', '.join(DPO_LOSS_TYPES)}, not '{config.loss_type}'")
    engine = start_run(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    prepare = partial(prepare_preferences, max_length=config.max_length,
                      max_prompt_length=config.max_prompt_length)
    groups, eval_groups, report = prepare_datasets(config, tokenizer, PREFERENCE_FORMATS, prepare)
    records, eval_records = expand_to_pairs(groups), expand_to_pairs(eval_groups)

    lora = lora_settings(config)
    model = load_causal_lm(config.model, lora=lora, trust_remote_code=config.trust_remote_code)
    apply_dropout_setting(model, config.keep_dropout, "policy")  # its log-ratios must not be noise
    model.to(engine.device)
    ref_name = config.ref_model or config.model
    ref_model = None
    if not lora.enabled or config.ref_model:
        if config.ref_model and config.ref_model != config.model:
            check_same_tokenizer(tokenizer, load_tokenizer(config.ref_model), config.model, config.ref_model)
        ref_model = load_causal_lm(ref_name, trust_remote_code=config.trust_remote_code)
        apply_dropout_setting(ref_model, config.keep_dropout, "reference")
    packed = resolve_packing(config, model)
    if packed and ref_model is not None:
        use_packed_attention(ref_model)  # the reference scores the same packed batches
    if ref_model is not None:
        ref_model = engine.prepare_frozen(ref_model)
    task = DPOTask(config, tokenizer.pad_token_id, packed, ref_model, eval_records)
    if config.precompute_ref:
        precompute_reference(task, model, [records, eval_records], engine.output_dir / "ref_logps.pt",
                             config.per_device_eval_batch_size, ref_name, engine.device)
        task.ref_model = None
        del ref_model
    return finish_run(engine, task, model, records, tokenizer,
                      {"train_rows": report.total_rows, "train_pairs": len(records), "packing": packed})
