"""Direct preference optimisation and its variants against a frozen (or TR-DPO-synced) reference; the pair
batching and evaluation that the reference-free objectives (:mod:`.reference_free`) and KTO reuse."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..data import PREFERENCE_FORMATS, collate_groups, expand_to_pairs, prepare_preferences
from ..engine import Engine, MetricSums
from ..errors import ConfigError
from ..losses import (
    DPO_LOSS_TYPES,
    DPOLossOutput,
    dpo_loss,
    length_desensitised_logps,
    selected_token_logprobs,
)
from ..models import check_same_tokenizer, load_causal_lm, load_tokenizer
from ..models.attention import use_packed_attention
from ..models.dropout import apply_dropout_setting
from ..models.forward import loss_logits, loss_sequence_ids, loss_targets, num_sequences, to_device
from .common import (
    finish_run,
    iterate_batches,
    lora_settings,
    prepare_datasets,
    prompt_sharing,
    resolve_packing,
    start_run,
)
from .configs import DPOConfig

logger = logging.getLogger("rlhfkit")

# objective(policy logps [M], response lengths [M], reference logps [M] or None) -> per-pair losses and rewards;
# sequences are pairs: chosen at even rows, rejected at odd rows
PairObjective = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], DPOLossOutput]


def _cache_key(records: list[dict], ref_name: str) -> str:
    digest = hashlib.sha256(ref_name.encode())
    for rec in records:
        digest.update(json.dumps([rec["prompt_ids"], rec["responses"]]).encode())
    return digest.hexdigest()


def response_logps(model, batch, ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [M] of every sequence (LD-DPO-weighted within each pair when ``ld_alpha`` is
    set) and the responses' token counts [M]."""
    logits, _ = loss_logits(model, batch)
    token_logps = selected_token_logprobs(logits, loss_targets(batch))
    sequence, count = loss_sequence_ids(batch), num_sequences(batch)
    lengths = torch.bincount(sequence, minlength=count).to(token_logps.dtype)
    if ld_alpha is None:
        return token_logps.new_zeros(count).index_add(0, sequence, token_logps), lengths
    return length_desensitised_logps(token_logps, sequence, count // 2, ld_alpha), lengths


class DPOTask:
    """Each record is one pair; batches hold chosen at even rows and rejected at odd rows.

    The loss is ``objective`` (default: :func:`~rlhfkit.losses.dpo_loss` with the config's settings) on the
    policy's response log-probs and, unless the objective is reference-free, the reference's.
    """

    name = "dpo"

    def __init__(self, config, pad_token_id: int, packed: bool, ref_model, eval_records: list,
                 objective: PairObjective | None = None, uses_reference: bool = True, name: str | None = None,
                 share_prompts: bool = False):
        self.config, self.pad_token_id, self.packed = config, pad_token_id, packed
        self.share_prompts = packed and share_prompts  # a pair's two responses read one copy of its prompt
        self.ref_model = ref_model  # None: the policy with adapters disabled (LoRA), or no reference at all
        self.eval_records = eval_records
        self.objective = objective or self._dpo_objective
        self.uses_reference = uses_reference
        self.ld_alpha = getattr(config, "ld_alpha", None)
        self.reference_sync: ReferenceSync | None = None
        if name:
            self.name = name

    def _dpo_objective(self, logps, lengths, ref) -> DPOLossOutput:
        cfg = self.config
        return dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta=cfg.beta, loss_type=cfg.loss_type,
                        label_smoothing=cfg.label_smoothing, chosen_lengths=lengths[0::2],
                        rejected_lengths=lengths[1::2])

    def collate(self, records) -> dict[str, Any]:
        batch = collate_groups(list(records), self.pad_token_id, self.packed, self.share_prompts)
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
            return response_logps(self.ref_model, batch, self.ld_alpha)[0].float()
        inner = model.module if hasattr(model, "module") else model
        with inner.disable_adapter():
            return response_logps(inner, batch, self.ld_alpha)[0].float()

    def after_optimizer_step(self) -> None:
        """Called by the engine after each optimizer step: TR-DPO moves the reference then."""
        if self.reference_sync is not None:
            self.reference_sync.after_step()

    def _loss(self, model, batch):
        ref = self.reference_logps(model, batch) if self.uses_reference else None
        logps, lengths = response_logps(model, batch, self.ld_alpha)
        return self.objective(logps, lengths, ref), logps.detach(), lengths

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, MetricSums]:
        out, logps, lengths = self._loss(model, batch)
        n = float(out.losses.numel())
        margin = out.chosen_rewards - out.rejected_rewards
        sums = {
            "reward_accuracy": (float((margin > 0).float().sum()), n),
            "reward_margin": (float(margin.sum()), n),
            "chosen_reward": (float(out.chosen_rewards.sum()), n),
            "rejected_reward": (float(out.rejected_rewards.sum()), n),
            "chosen_logp": (float(logps[0::2].sum()), n),
            "rejected_logp": (float(logps[1::2].sum()), n),
        }
        if not self.uses_reference:  # the NLL the SFT / BC terms see, per token
            sums["chosen_nll"] = (float((-logps[0::2] / lengths[0::2].clamp(min=1)).sum()), n)
        return out.losses.sum(), sums

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


class ReferenceSync:
    """TR-DPO's reference update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
    Alignment"): after every ``every``-th optimizer step, for every parameter
        ref <- alpha * policy + (1 - alpha) * ref        (alpha = 1: hard copy)
    The engine calls it after each optimizer step (through the task's ``after_optimizer_step``); its state
    (the reference's weights and the step count) rides in every checkpoint, so a resumed run continues with
    the reference it had."""

    def __init__(self, engine: Engine, ref_model: torch.nn.Module, alpha: float, every: int):
        self.engine, self.ref_model, self.alpha, self.every = engine, ref_model, alpha, every
        self.updates = 0
        engine.accelerator.register_for_checkpointing(self)

    @torch.no_grad()
    def after_step(self) -> None:
        self.updates += 1
        if self.updates % self.every:
            return
        policy = dict(self.engine.unwrap(self.engine.model).named_parameters())
        for name, ref in self.ref_model.named_parameters():
            ref.mul_(1 - self.alpha).add_(policy[name].detach().to(ref.dtype), alpha=self.alpha)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "reference": self.ref_model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.ref_model.load_state_dict(state["reference"])


def precompute_reference(task: DPOTask, model, record_sets: list[list[dict]], cache: Path, batch_size: int,
                         ref_name: str, device: torch.device) -> None:
    """Attach ``ref_logps`` [chosen, rejected] to every record, from ``cache`` when it matches the data."""
    if getattr(task, "ld_alpha", None) is not None:  # LD-weighted reference log-probs are other numbers
        ref_name = f"{ref_name}|ld_alpha={task.ld_alpha}"
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


@dataclass
class PreferenceRun:
    """What every pair trainer starts from: the engine, tokenizer, pairs, the policy and the packing choice."""

    engine: Engine
    tokenizer: Any
    records: list
    eval_records: list
    train_rows: int
    lora: Any
    model: torch.nn.Module
    packed: bool

    def finish(self, task: DPOTask) -> dict[str, Any]:
        return finish_run(self.engine, task, self.model, self.records, self.tokenizer,
                          {"train_rows": self.train_rows, "train_pairs": len(self.records), "packing": self.packed,
                           "shared_prompts": task.share_prompts})


def start_preference_run(config) -> PreferenceRun:
    """Start the run, read preference or ranked data (ranked rows become all their pairs), load the policy
    (LoRA when asked) and choose packing."""
    engine = start_run(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    prepare = partial(prepare_preferences, max_length=config.max_length,
                      max_prompt_length=config.max_prompt_length)
    groups, eval_groups, report = prepare_datasets(config, tokenizer, PREFERENCE_FORMATS, prepare)
    lora, model, packed = load_policy(config, engine)
    return PreferenceRun(engine, tokenizer, expand_to_pairs(groups), expand_to_pairs(eval_groups),
                         report.total_rows, lora, model, packed)


def load_policy(config, engine: Engine) -> tuple[Any, torch.nn.Module, bool]:
    """The policy (LoRA when asked, dropout off unless --keep-dropout) on the engine's device, and whether
    batches are packed: (LoRA settings, model, packed)."""
    lora = lora_settings(config)
    model = load_causal_lm(config.model, lora=lora, trust_remote_code=config.trust_remote_code)
    apply_dropout_setting(model, config.keep_dropout, "policy")  # its log-ratios must not be noise
    model.to(engine.device)
    return lora, model, resolve_packing(config, model)


def load_reference(config, engine: Engine, tokenizer, lora, packed: bool) -> torch.nn.Module | None:
    """The frozen reference model, or None where the reference is the policy with its LoRA adapters off."""
    if lora.enabled and not config.ref_model:
        return None
    if config.ref_model and config.ref_model != config.model:
        check_same_tokenizer(tokenizer, load_tokenizer(config.ref_model), config.model, config.ref_model)
    ref_model = load_causal_lm(config.ref_model or config.model, trust_remote_code=config.trust_remote_code)
    apply_dropout_setting(ref_model, config.keep_dropout, "reference")
    if packed:
        use_packed_attention(ref_model)  # the reference scores the same packed batches
    return engine.prepare_frozen(ref_model)


def _check_dpo_flags(config: DPOConfig) -> None:
    if config.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"--loss-type must be one of {', '.join(DPO_LOSS_TYPES)}, not '{config.loss_type}'")
    if config.ld_alpha is not None and not 0.0 <= config.ld_alpha <= 1.0:
        raise ConfigError(f"--ld-alpha must be in [0, 1], not {config.ld_alpha}")
    if not config.sync_ref_model:
        return
    if config.precompute_ref:
        raise ConfigError("--sync-ref-model: the reference changes during training, so --precompute-ref cannot "
                          "cache its log-probs; drop one of them")
    if config.lora_r > 0:
        raise ConfigError("--sync-ref-model: with LoRA the reference is the adapter-free base model (or a separate "
                          "--ref-model) and cannot follow the adapters; train all weights (--lora-r 0) instead")
    if not 0.0 < config.ref_model_mixup_alpha <= 1.0:
        raise ConfigError(f"--ref-model-mixup-alpha must be in (0, 1], not {config.ref_model_mixup_alpha}")
    if config.ref_model_sync_steps < 1:
        raise ConfigError(f"--ref-model-sync-steps must be >= 1, not {config.ref_model_sync_steps}")


def run_dpo(config: DPOConfig) -> dict[str, Any]:
    """Train a policy with DPO (or a variant) on preference or ranked data."""
    _check_dpo_flags(config)
    run = start_preference_run(config)
    engine = run.engine
    if config.sync_ref_model and engine.sharded:
        raise ConfigError("--sync-ref-model mixes whole parameters: use DDP or one process, not FSDP / DeepSpeed")
    ref_name = config.ref_model or config.model
    ref_model = load_reference(config, engine, run.tokenizer, run.lora, run.packed)
    task = DPOTask(config, run.tokenizer.pad_token_id, run.packed, ref_model, run.eval_records,
                   share_prompts=prompt_sharing(config, run.packed, run.model, ref_model))
    if config.sync_ref_model:
        task.reference_sync = ReferenceSync(engine, ref_model, config.ref_model_mixup_alpha,
                                            config.ref_model_sync_steps)
    if config.precompute_ref:
        precompute_reference(task, run.model, [run.records, run.eval_records], engine.output_dir / "ref_logps.pt",
                             config.per_device_eval_batch_size, ref_name, engine.device)
        task.ref_model = None
        del ref_model
    return run.finish(task)
