"""One online RL step for the engine: sample and score a rollout, make it experience, update in minibatches.

The loss of a minibatch is PPO's clipped objective on the policy tokens (+ β·KL in the loss for GRPO, an
entropy bonus) and, where the model has a critic, vf_coef · the clipped value loss. The algorithms differ
only in their configuration (:mod:`.config`) and in how :func:`.experience.build_experience` computes
advantages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ...engine import Engine, MetricSums, StepResult, TrainingError, step_seed
from ...losses import (
    RunningMoments,
    approx_kl,
    clipped_value_loss,
    kl_penalty,
    selected_token_logprobs_and_entropy,
)
from ...models.forward import at_loss_positions, loss_logits, loss_targets
from ...rollout.generate import HFGenerationBackend, Rollout, SamplingConfig
from ...rollout.logprob_check import check_logprob_match, compare_logprobs, response_mask
from ...rollout.rewards import source_metrics
from .batches import aggregate, batch_weight, collate_records, token_sums
from .config import RLConfig, build_kl_controller
from .env_rollouts import episode_rollouts, score_rollout
from .experience import Experience, build_experience, split_rows
from .policy import ActorCritic, response_logps, rollout_forwards, tempered_logits
from .variants import dynamic_sampling, shaped_scores, surrogate, tis_weights
from .watch import evaluate_heldout


class RLTask:
    """The per-minibatch loss for the engine (``Task`` protocol) plus the rollout side of a step."""

    progress_keys = ("reward_mean", "kl", "beta")
    heldout: Any = None  # the held-out judge and its watch (.watch.HeldoutWatch), when --heldout-judge is set

    def __init__(self, config: RLConfig, tokenizer: Any, packed: bool, ref_model: torch.nn.Module | None,
                 reward, backend: HFGenerationBackend, eval_prompts: list[dict], share_prompts: bool = False):
        self.config, self.tokenizer, self.packed = config, tokenizer, packed
        # packed batches in which a prompt's adjacent samples share one copy of it (data.pack_shared_prompts)
        self.share_prompts = packed and share_prompts
        self.name = config.algorithm
        self.ref_model = ref_model  # None: policy with adapters disabled
        self.reward, self.backend, self.eval_prompts = reward, backend, eval_prompts
        self.sampling = SamplingConfig(config.temperature, config.top_k, config.top_p, config.max_new_tokens,
                                       tuple(s for s in config.stop_strings.split(",") if s))
        self.sampling.check()
        self.kl_controller = build_kl_controller(config)
        self.reward_stats = RunningMoments()
        self.pad_id = tokenizer.pad_token_id
        self.train_prompts: list[dict] = []  # where DAPO's dynamic sampling draws further prompts (run_rl sets it)
        self.policy_version, self._synced_version = 0, None  # optimizer updates made / pushed to the engine
        self.engine: Engine | None = None
        self.tool_rollouts = episode_rollouts(config, tokenizer)  # --tools / --env: every rollout is episodes

    # ------------------------------------------------------------------ batches and losses
    def collate(self, records: list[dict]) -> dict[str, Any]:
        return collate_records(records, self.share_prompts, self.packed, self.pad_id)

    def batch_weight(self, batch: dict[str, Any]) -> float:
        return batch_weight(self.config.loss_aggregation, batch)

    def _aggregate(self, per_token: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return aggregate(self.config.loss_aggregation, self.config.max_new_tokens, per_token, batch)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        """Clipped policy loss (+ KL, entropy) where the model gives logits, + vf_coef · clipped value loss
        where it gives values: an actor-critic gets both, a Ray run's policy and critic groups one each."""
        logits, values = model(batch)
        loss, sums = self._policy_loss(logits, batch) if logits is not None else (None, {})
        if values is not None:
            value_loss, value_sums = self._value_loss(values, batch)
            loss = value_loss if loss is None else loss + value_loss
            sums.update(value_sums)
        return loss, sums

    def _policy_loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        cfg = self.config
        logps, entropy = selected_token_logprobs_and_entropy(tempered_logits(logits, cfg.temperature),
                                                             loss_targets(batch), entropy_grad=cfg.entropy_coef > 0)
        old = batch["old_logps"]
        policy, pg_losses = surrogate(cfg, logps, batch)  # PPO's or GSPO's, TIS-weighted (.variants)
        per_token = pg_losses
        if cfg.kl_mode == "loss" and self.kl_controller.beta > 0:
            per_token = per_token + self.kl_controller.beta * kl_penalty(logps, batch["ref_logps"], cfg.kl_estimator)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy
        if "loss_keep" in batch:  # --mask-truncated, tool tokens
            per_token = per_token * batch["loss_keep"]
        total, n = token_sums(batch, logps)
        return self._aggregate(per_token, batch), {
            "policy_loss": (total(pg_losses.detach()), n),
            "clip_frac": (total(policy.clipped), n),
            "approx_kl": (total(approx_kl(logps.detach(), old)), n),
            "entropy": (total(entropy.detach()), n),
            "ratio": (total(policy.ratio.detach()), n),
            "logprob_abs_diff": (total((logps.detach() - old).abs()), n)}

    def _value_loss(self, values: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        cfg = self.config
        token_values = at_loss_positions(values, batch).float()
        value = clipped_value_loss(token_values, batch["old_values"], batch["returns"], cfg.value_clip or None)
        total, n = token_sums(batch, token_values)
        losses = value.losses * batch["loss_keep"] if "loss_keep" in batch else value.losses
        return cfg.vf_coef * self._aggregate(losses, batch), {
            "value_loss": (total(value.losses.detach()), n),
            "value_clip_frac": (total(value.clipped), n)}

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _reference_logps(self, model: ActorCritic | None, batch: dict[str, Any]) -> torch.Tensor:
        if self.ref_model is not None:
            logits, _ = loss_logits(self.ref_model, batch)
        else:
            with model.policy.disable_adapter():
                logits, _ = loss_logits(model.policy, batch)
        return response_logps(logits, batch, self.config.temperature)[0]

    def score(self, prompts: list[dict], rollout: Rollout, where: str = "",
              source: Any = None) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
        """Scores by the reward source (or ``source``), checked finite; the texts; the scores per source name."""
        texts = self.backend.decode(rollout, self.sampling.stop_strings)
        scores, by_source = score_rollout(self.reward if source is None else source, prompts, texts, rollout,
                                          self.backend.scored_ids(rollout), TrainingError, where)
        return scores, texts, by_source

    def shape_scores(self, scores: torch.Tensor, ended: list[bool],
                     gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw scores, training scores: :func:`.variants.shaped_scores` with this run's normaliser; once per
        rollout, as it updates the normaliser)."""
        return scores.clone(), shaped_scores(self.config, scores, ended, lengths, self.reward_stats, gather)

    def experience(self, *args: Any, **kwargs: Any) -> Experience:
        """:func:`.experience.build_experience` with this run's config and current β."""
        return build_experience(self.config, self.kl_controller.beta, *args, **kwargs)

    def rollout_step(self, engine: Engine, model: ActorCritic, prompts: list[dict], step: int) -> Experience:
        """Sample, score, and run the reference (and critic) over one step's rollout: its experience."""
        cfg = self.config
        t0 = time.perf_counter()
        rollout = self.generate(engine, model, prompts, step_seed(cfg.seed, step, 1))
        rollout_time = time.perf_counter() - t0
        where = f" (step {step + 1}{engine.checkpoint_hint()})"
        prompts, rollout, scores, texts, by_source, sampling_metrics = dynamic_sampling(  # (when --dynamic-sampling)
            self, engine, model, step, where, (prompts, rollout, *self.score(prompts, rollout, where)))
        raw, scores = self.shape_scores(scores, rollout.ended, engine.gather_across_ranks, rollout.lengths)

        records = [{"prompt_ids": p, "response_ids": r} for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
        every = cfg.logprob_check_steps  # by step number, so a resumed run checks where the original did
        check = (every > 0 and step % every == 0) or (every == 0 and step == 0)
        recompute = check or getattr(self.backend, "recompute_logprobs", False)
        size = cfg.per_device_eval_batch_size
        batches = (self.collate(records[start:start + size]) for start in range(0, len(records), size))
        ref_flat, value_flat, own_flat = rollout_forwards(engine, engine.unwrap(model), batches, self._reference_logps,
                                                          recompute, cfg.temperature)
        width = max(rollout.lengths)
        old_logps = rollout.logprobs[:, :width]
        extra_metrics = source_metrics(by_source, engine.gather_across_ranks)  # reward/<name>
        extra_metrics.update(sampling_metrics)
        if self.tool_rollouts is not None:
            extra_metrics.update(self.tool_rollouts.metrics(rollout, engine.sum_across_ranks))
        is_weights = None
        if recompute:
            trainer_logps = split_rows(torch.cat(own_flat), rollout.lengths, width)
            if check:
                sampled = response_mask(rollout.lengths, width) if rollout.policy_mask is None else \
                    rollout.policy_mask[:, :width]  # forced tool tokens have no sampling log-prob
                match = compare_logprobs(old_logps, trainer_logps, sampled)
                extra_metrics.update(match.metrics())
                where = f" at step {step + 1} ({cfg.rollout_backend} rollouts, {match.tokens} response tokens)"
                check_logprob_match(match, cfg.logprob_check_tolerance, where)
            if getattr(self.backend, "recompute_logprobs", False):
                is_weights, tis_metrics = tis_weights(cfg, engine, trainer_logps, old_logps, rollout.lengths)
                extra_metrics.update(tis_metrics)
                old_logps = trainer_logps  # PPO's old log-probs from the trainer's numerics, not the engine's
        return self.experience(prompts, rollout, texts, raw, scores, torch.cat(ref_flat),
                               torch.cat(value_flat) if value_flat else None, rollout_time,
                               f"step {step + 1}", engine.checkpoint_hint(), old_logps=old_logps,
                               extra_metrics=extra_metrics, sum_across=engine.sum_across_ranks,
                               gather=engine.gather_across_ranks, is_weights=is_weights)

    def generate(self, engine: Engine, model: ActorCritic, prompts: list[dict], seed: int) -> Rollout:
        """``num_generations`` samples of each prompt from the current policy, the sampler seeded ``seed``."""
        policy = engine.unwrap(model).policy
        prompt_ids, episodes = self.tool_rollouts.episodes(prompts) if self.tool_rollouts is not None else \
            ([p["prompt_ids"] for p in prompts], None)
        with engine.full_parameters(model):  # sampling and weight sync read whole weights on each rank
            self.sync_rollout_weights(policy)
            rollout = self.backend.generate(policy, list(prompt_ids), self.config.num_generations, self.sampling,
                                            torch.Generator().manual_seed(seed), **({"episodes": episodes}
                                                                                   if episodes else {}))
        return rollout

    def sync_rollout_weights(self, policy: torch.nn.Module) -> None:
        """Push the policy into a rollout engine that keeps its own copy (vLLM) once per update phase; the
        first rollout of a process syncs too (a resumed run's policy is not the checkpoint vLLM loaded)."""
        if getattr(self.backend, "needs_weight_sync", False) and self._synced_version != self.policy_version:
            self.backend.sync_weights(policy)
            self._synced_version = self.policy_version

    # ------------------------------------------------------------------ update
    def update(self, engine: Engine, records: list[dict], step: int,
               epochs: int | None = None) -> tuple[dict[str, float], int]:
        """PPO epochs over minibatches of the rollout; each minibatch is one engine optimizer step.

        ``epochs`` caps the passes (a Ray critic group runs as many as its policy group ran); a model without
        a policy (critic alone) has no approximate KL, so it never stops early by itself."""
        cfg = self.config
        generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, 2))
        n = len(records)
        bounds = [round(i * n / cfg.num_minibatches) for i in range(cfg.num_minibatches + 1)]
        totals: dict[str, list[float]] = {}

        def add(name: str, value: float, count: float) -> None:
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] += value
            acc[1] += count

        updates, tokens, mismatch, epochs_run = 0, 0, None, 0
        t0 = time.perf_counter()
        for _ in range(cfg.ppo_epochs if epochs is None else min(epochs, cfg.ppo_epochs)):
            epochs_run += 1
            order = torch.randperm(n, generator=generator).tolist()
            epoch_kl = [0.0, 0.0]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                # a minibatch in rollout order keeps each group's samples adjacent, so they share their prompt
                # (the loss is a sum over its tokens: the order inside a minibatch does not change it)
                chosen = [records[i] for i in (sorted(order[lo:hi]) if self.share_prompts else order[lo:hi])]
                micro = [self.collate(chosen[s:s + cfg.per_device_batch_size])
                         for s in range(0, len(chosen), cfg.per_device_batch_size)]
                result: StepResult = engine.optimizer_step(self, micro)
                updates += 1
                tokens += result.tokens
                if mismatch is None and "logprob_abs_diff" in result.sums:
                    # before any update, the trainer's log-probs should equal the sampler's
                    mismatch = result.sums["logprob_abs_diff"][0] / max(result.sums["logprob_abs_diff"][1], 1)
                for name, (s, c) in result.sums.items():
                    add(name, s, c)
                if result.grad_norm is not None:
                    add("grad_norm", result.grad_norm, 1)
                add("loss", result.loss_sum / result.total_weight, 1)
                kl_sum, kl_count = result.sums.get("approx_kl", (0.0, 0.0))
                epoch_kl = [epoch_kl[0] + kl_sum, epoch_kl[1] + kl_count]
            if cfg.approx_kl_stop is not None and epoch_kl[0] / max(epoch_kl[1], 1) > cfg.approx_kl_stop:
                break
        self.policy_version += updates  # a rollout engine with its own weights needs them again
        row = {name: s / max(c, 1e-12) for name, (s, c) in totals.items()}
        row.update({"ppo_epochs_run": epochs_run, "optimizer_updates": updates,
                    "rollout_logprob_mismatch": mismatch or 0.0,
                    "train_tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)})
        return row, tokens

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Reward, KL and length on the held-out prompts (and the held-out judge's watch): .watch."""
        return evaluate_heldout(self, model)
