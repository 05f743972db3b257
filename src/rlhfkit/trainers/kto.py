"""Kahneman-Tversky optimisation (KTO) on unpaired desirable / undesirable rows against a frozen reference.

Batching, reference log-probs (live, LoRA-disabled or precomputed) and evaluation are DPO's
(:class:`~rlhfkit.trainers.dpo.DPOTask`): a KTO record is a "group" of two responses under its prompt, its
own completion and the mismatched completion its KL estimate reads (:func:`rlhfkit.data.mismatched_completions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..data import KTO_FORMATS, collate_groups, count_labels, mismatched_completions, prepare_kto
from ..engine import MetricSums
from ..errors import ConfigError
from ..losses import KTO_RATIO_RANGE, KTO_WEIGHT_BALANCE, balanced_kto_weights, kto_loss, kto_weight_ratio
from ..models import load_tokenizer
from ..models.forward import sequence_logps
from .common import finish_run, prepare_datasets, start_run
from .configs import KTOConfig
from .dpo import DPOTask, load_policy, load_reference, precompute_reference

logger = logging.getLogger("rlhfkit")

_KL = "kl_"  # prefix of the mismatched pairs' batch keys


def _sub_batch(batch: dict[str, Any], kl: bool) -> dict[str, Any]:
    """The rows' batch or (``kl``) the mismatched pairs' batch out of one collated KTO batch."""
    if kl:
        return {k[len(_KL):]: v for k, v in batch.items() if k.startswith(_KL)}
    return {k: v for k, v in batch.items() if not k.startswith(_KL) and k != "ref_logps"}


class KTOTask(DPOTask):
    """Each record is one labelled row; a batch holds the rows and, under ``kl_`` keys, their mismatched pairs.

    Reference log-probs come interleaved [row 0, pair 0, row 1, pair 1, ...], as DPO's [chosen, rejected], so
    that :func:`~rlhfkit.trainers.dpo.precompute_reference` caches them unchanged.
    """

    name = "kto"
    progress_keys = ("loss", "kl", "reward_accuracy")

    def __init__(self, config: KTOConfig, pad_token_id: int, packed: bool, ref_model, eval_records: list,
                 weights: tuple[float, float], gather: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(config, pad_token_id, packed, ref_model, eval_records)
        self.desirable_weight, self.undesirable_weight = weights
        self.gather = gather  # z0 is the whole global micro-batch's estimate (TRL gathers it over processes too)
        self._eval_rewards: list[tuple[torch.Tensor, torch.Tensor]] = []

    def collate(self, records) -> dict[str, Any]:
        def groups(i: int) -> list[dict[str, Any]]:
            return [{"prompt_ids": r["prompt_ids"], "responses": [r["responses"][i]], "ranks": [0]} for r in records]

        rows = collate_groups(groups(0), self.pad_token_id, self.packed)
        pairs = collate_groups(groups(1), self.pad_token_id, self.packed)
        batch = {**rows, **{_KL + k: v for k, v in pairs.items()}}
        batch["num_tokens"] = rows["num_tokens"] + pairs["num_tokens"]  # both are forwarded
        batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in records])
        if "ref_logps" in records[0]:
            batch["ref_logps"] = torch.tensor([v for r in records for v in r["ref_logps"]], dtype=torch.float32)
        return batch

    @torch.no_grad()
    def reference_logps(self, model, batch) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        rows = super().reference_logps(model, _sub_batch(batch, kl=False))
        pairs = super().reference_logps(model, _sub_batch(batch, kl=True))
        return torch.stack([rows, pairs], dim=1).flatten()

    def compute_loss(self, model, batch) -> tuple[torch.Tensor, MetricSums]:
        ref = self.reference_logps(model, batch)
        logps = sequence_logps(model, _sub_batch(batch, kl=False))
        with torch.no_grad():  # z0 is detached: its forward needs no graph
            kl_logps = sequence_logps(model, _sub_batch(batch, kl=True)).float()
        kl_ref = ref[1::2]
        if model.training:  # evaluation runs the same records on every rank: nothing to gather
            kl_logps, kl_ref = self.gather(kl_logps), self.gather(kl_ref)
        desirable = batch["desirable"]
        out = kto_loss(logps, ref[0::2], desirable, kl_logps, kl_ref, beta=self.config.beta,
                       desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        if not model.training:
            self._eval_rewards.append((out.rewards.cpu(), desirable.cpu()))
        n = float(out.losses.numel())
        above = out.rewards > self.config.beta * out.z0  # r > z0: the row counts as a gain
        n_good = float(desirable.sum())
        return out.losses.sum(), {
            "kl": (float(out.z0) * n, n),
            "reward_accuracy": (float((above == desirable).float().sum()), n),
            "desirable_reward": (float(out.rewards[desirable].sum()), n_good),
            "undesirable_reward": (float(out.rewards[~desirable].sum()), n - n_good),
            "desirable_logp": (float(logps.detach()[desirable].sum()), n_good),
            "undesirable_logp": (float(logps.detach()[~desirable].sum()), n - n_good),
        }

    def evaluate(self, model) -> dict[str, float]:
        self._eval_rewards = []
        metrics = super().evaluate(model)
        # DPOTask.evaluate divides every sum by the number of rows; a class's means divide by its own rows
        n_good, n_bad = count_labels(self.eval_records)
        for name, n_class in (("desirable", n_good), ("undesirable", n_bad)):
            for metric in (f"{name}_reward", f"{name}_logp"):
                if metric in metrics:
                    metrics[metric] = metrics[metric] * len(self.eval_records) / max(n_class, 1)
        if self._eval_rewards:
            rewards = torch.cat([r for r, _ in self._eval_rewards])
            desirable = torch.cat([d for _, d in self._eval_rewards])
            metrics.update(reward_auc_metrics(rewards, desirable))
        self._eval_rewards = []
        return metrics


def reward_auc_metrics(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, float]:
    """``reward_auc``: the share of (desirable, undesirable) row pairs whose implicit rewards are ordered
    right (ties count half); what a held-out set says about KTO's ranking, free of the threshold z0."""
    good, bad = rewards[desirable], rewards[~desirable]
    if not good.numel() or not bad.numel():
        return {}
    diff = good[:, None] - bad[None, :]
    return {"reward_auc": float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())}


def resolve_weights(config: KTOConfig, records: list[dict[str, Any]]) -> tuple[float, float]:
    """λ_D, λ_U after the paper's rule λ_D·n_D / (λ_U·n_U) in [1, 4/3]: warn, set them (auto) or refuse."""
    if config.weight_balance not in KTO_WEIGHT_BALANCE:
        raise ConfigError(f"--weight-balance must be one of {', '.join(KTO_WEIGHT_BALANCE)}, "
                          f"not '{config.weight_balance}'")
    if config.desirable_weight < 0 or config.undesirable_weight < 0:
        raise ConfigError("--desirable-weight and --undesirable-weight must be >= 0")
    n_good, n_bad = count_labels(records)
    weights = (config.desirable_weight, config.undesirable_weight)
    ratio = kto_weight_ratio(n_good, n_bad, *weights)
    low, high = KTO_RATIO_RANGE
    if low <= ratio <= high or not n_good or not n_bad:
        if not n_good or not n_bad:
            logger.warning("kto: the training rows are all %s; z0 is the only reference point",
                           "undesirable" if n_good == 0 else "desirable")
        return weights
    balanced = balanced_kto_weights(n_good, n_bad, *weights)
    advice = (f"{n_good} desirable and {n_bad} undesirable rows with weights {weights[0]:g}/{weights[1]:g} give "
              f"λ_D·n_D/(λ_U·n_U) = {ratio:.3g}, outside the KTO paper's [1, 4/3]; "
              f"--desirable-weight {balanced[0]:.4g} --undesirable-weight {balanced[1]:.4g} fits")
    if config.weight_balance == "refuse":
        raise ConfigError(f"{advice} (or --weight-balance auto sets it)")
    if config.weight_balance == "warn":
        logger.warning("kto: %s (--weight-balance auto sets it)", advice)
        return weights
    logger.info("kto: weights set to λ_D = %.4g, λ_U = %.4g (--weight-balance auto)", *balanced)
    return balanced


def run_kto(config: KTOConfig) -> dict[str, Any]:
    """Train a policy with KTO on unpaired labelled rows, or on preference / ranked rows split into such rows."""
    if config.beta <= 0:
        raise ConfigError(f"--beta must be > 0, not {config.beta}")
    engine = start_run(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    prepare = partial(prepare_kto, max_length=config.max_length, max_prompt_length=config.max_prompt_length)
    rows, eval_rows, report = prepare_datasets(config, tokenizer, KTO_FORMATS, prepare)
    weights = resolve_weights(config, rows)
    records = mismatched_completions(rows, config.max_length)
    eval_records = mismatched_completions(eval_rows, config.max_length) if eval_rows else []

    lora, model, packed = load_policy(config, engine)
    ref_name = config.ref_model or config.model
    ref_model = load_reference(config, engine, tokenizer, lora, packed)
    task = KTOTask(config, tokenizer.pad_token_id, packed, ref_model, eval_records, weights,
                   engine.gather_across_ranks)
    if config.precompute_ref:
        precompute_reference(task, model, [records, eval_records], engine.output_dir / "ref_logps.pt",
                             config.per_device_eval_batch_size, ref_name, engine.device)
        task.ref_model = None
        del ref_model
    n_good, n_bad = count_labels(rows)
    return finish_run(engine, task, model, records, tokenizer,
                      {"train_rows": report.total_rows, "train_desirable": n_good, "train_undesirable": n_bad,
                       "desirable_weight": weights[0], "undesirable_weight": weights[1], "packing": packed})
