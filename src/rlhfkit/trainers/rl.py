"""Online RL against a reward source on a KL leash to the reference: PPO, GRPO and RLOO in one trainer.

One step = one rollout + one update phase:
  1. sample G responses for each of P prompts (KV-cache decode; the sampling log-probs are kept as the
     "old" log-probs, so the policy never re-scores its own rollout);
  2. score them (reward model, function, HTTP, ensemble), optionally normalise / clip, penalise missing EOS;
  3. one reference forward gives per-token KL = estimator(log π − log π_ref);
  4. advantages: PPO -> GAE over per-token rewards r_t = −β·KL_t (+ score at the last token) with a critic;
     GRPO / RLOO -> a group baseline over the G samples of each prompt (no critic);
  5. ``ppo_epochs`` passes over ``num_minibatches`` minibatches, each one optimizer step of the shared engine
     (micro-batches of ``per_device_batch_size`` sequences, exact normalisation), stopping early when the
     approximate KL to the rollout policy passes ``approx_kl_stop``;
  6. the adaptive controller moves β toward ``kl_target``.
The algorithms differ only in configuration defaults and in step 4: there is one loop.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..data import PROMPT_FORMATS, pack_batch, pack_shared_prompts, pad_batch, prepare_prompts
from ..engine import Engine, MetricSums, StepResult, TrainConfig, TrainingError, arg
from ..errors import ConfigError
from ..losses import (
    GROUP_ADVANTAGE_TYPES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    RunningMoments,
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_penalty,
    selected_token_logprobs,
    selected_token_logprobs_and_entropy,
    whiten,
)
from ..models import check_same_tokenizer, load_causal_lm, load_reward_model, load_tokenizer
from ..models.attention import use_packed_attention
from ..models.forward import (
    at_loss_positions,
    forward_inputs,
    loss_logits,
    loss_sequence_ids,
    loss_targets,
    reward_parts,
    shares_prompts,
)
from ..rollout.generate import HFGenerationBackend, Rollout, SamplingConfig
from ..rollout.logprob_check import check_logprob_match, compare_logprobs
from ..rollout.rewards import REWARD_ENSEMBLES, ModelReward, ScoringBatch, build_reward_source, checked_scores
from ..rollout.vllm_backend import build_rollout_backend
from .common import lora_settings, prepare_datasets, resolve_packing, start_run

logger = logging.getLogger("rlhfkit")

ADVANTAGE_TYPES = ("gae",) + GROUP_ADVANTAGE_TYPES
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo")
KL_MODES = ("reward", "loss")
CRITICS = ("value_head", "reward_model")
ROLLOUT_BACKENDS = ("hf", "vllm")


@dataclass
class RLConfig(TrainConfig):
    """Settings shared by ``rlhfkit ppo``, ``grpo`` and ``rloo`` (they differ in defaults only)."""

    # data and batch shape
    max_prompt_length: int | None = arg(256, "Longest prompt in tokens (prompts keep their end).")
    prompts_per_step: int = arg(8, "Prompts sampled per step on each device.")
    num_generations: int = arg(1, "Responses sampled per prompt (the group size of GRPO / RLOO).")
    per_device_batch_size: int = arg(8, "Sequences per micro-batch in the update.")
    num_minibatches: int = arg(1, "Optimizer steps per pass over a rollout (the rollout is split in this many).")
    ppo_epochs: int = arg(1, "Passes over each rollout.")
    learning_rate: float = arg(1e-6, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = arg("constant", "LR schedule after warm-up (stepped once per rollout).")
    # sampling
    temperature: float = arg(1.0, "Sampling temperature; the policy is also scored at this temperature.")
    top_k: int = arg(0, "Sample from the k most likely tokens (0 = off).")
    top_p: float = arg(1.0, "Nucleus sampling mass (1.0 = off).")
    max_new_tokens: int = arg(64, "Longest response in tokens.")
    stop_strings: str = arg("", "Comma-separated strings that end a response (kept, text after cut).")
    fast_decode: bool = arg(True, "Decode Llama/Mistral/Qwen2 policies with rlhfkit's lean step (in-place KV "
                            "buffer; same tokens and log-probs); --no-fast-decode keeps the transformers loop.")
    share_prompts: bool = arg(True, "Packed batches: the samples of a prompt share one copy of it in the reference "
                              "and update forwards (same log-probs and gradients up to float rounding; the prompt's "
                              "tokens are processed once per group, not once per sample). --no-share-prompts "
                              "packs every sample whole. Needs rlhfkit's packed attention (not flash-attention).")
    compile_decode: bool = arg(False, "CPU: run that decode step ahead-of-time compiled (torch.export + AOTInductor; "
                               "needs a C++ compiler). Built once in a child process (~25 s on 2 cores) and cached "
                               "in $RLHFKIT_CACHE (default ~/.cache/rlhfkit); same samples, ~1.5-2x faster steps for "
                               "small policies. Falls back to the eager step, with a warning, if the build fails.")
    rollout_backend: str = arg("hf", "Rollout engine: hf (rlhfkit's KV-cache decode loop) or vllm (needs vLLM and a "
                               "CUDA GPU; its weights are synced after each update and the trainer re-scores its "
                               "samples for PPO's old log-probs).")
    vllm_gpu_memory_utilization: float = arg(0.3, "Share of the GPU vLLM may take (weights + KV cache); the "
                                             "trainer uses the rest.")
    vllm_dtype: str = arg("auto", "vLLM weight dtype: auto (the checkpoint's), bfloat16, float16 or float32.")
    vllm_enforce_eager: bool = arg(False, "Run vLLM without CUDA graphs (faster start, less memory, slower decode).")
    vllm_sleep: bool = arg(False, "Put vLLM to sleep between rollouts (KV cache freed, weights offloaded to CPU).")
    logprob_check_steps: int = arg(0, "Compare the rollout engine's log-probs of the sampled tokens with the "
                                   "trainer's forward: 0 = at the first step, N = every N steps (1, N+1, ...), "
                                   "-1 = never. Logged as rollout_logprob_diff_mean / _max and "
                                   "rollout_importance_ratio_mean.")
    logprob_check_tolerance: float = arg(0.1, "Stop the run when that mean |Δ log-prob| per response token exceeds "
                                         "this many nats (inf = log only).")
    missing_eos_penalty: float = arg(0.0, "Subtracted from the score of a response that did not end (no EOS "
                                     "or stop string within --max-new-tokens).")
    # reward
    reward_model: str | None = arg(None, "Reward model(s): hub id or path, comma-separated for an ensemble.")
    reward_fn: str | None = arg(None, "Reward function(s) 'path/to/file.py:function', comma-separated; called "
                                "as function(prompts, responses) -> list of floats.")
    reward_url: str | None = arg(None, "HTTP reward endpoint(s) (POST {prompts, responses} -> {scores}).")
    reward_ensemble: str = arg("mean", f"How several reward sources combine: {', '.join(REWARD_ENSEMBLES)}.")
    reward_std_coef: float = arg(1.0, "k in mean − k·std for --reward-ensemble mean_minus_std.")
    reward_batch_size: int = arg(16, "Sequences per reward-model forward.")
    reward_normalize: bool = arg(False, "Normalise scores by a running mean/std (saved in checkpoints).")
    reward_clip: float = arg(0.0, "Clip (normalised) scores to [−c, c]; 0 = off.")
    # KL leash
    ref_model: str | None = arg(None, "Reference model (default: --model). With LoRA the reference is the "
                                "policy with its adapters disabled.")
    kl_coef: float = arg(0.05, "β: weight of the KL penalty (initial value when --kl-target is set).")
    kl_estimator: str = arg("k1", f"Per-token KL estimator: {', '.join(KL_ESTIMATORS)} (k1 = log π − log "
                            "π_ref, unbiased; k3 = always ≥ 0, lower variance).")
    kl_mode: str = arg("reward", "Where the KL goes: 'reward' (per-token penalty in the reward, classic "
                       "RLHF) or 'loss' (β·KL added to the loss, as GRPO does).")
    kl_target: float | None = arg(None, "Adaptive β (Ziegler et al.): target KL per response; unset = fixed β.")
    kl_horizon: int = arg(10000, "Adaptive β horizon in samples.")
    # advantages and losses
    advantage: str = arg("gae", f"Advantage estimator: {', '.join(ADVANTAGE_TYPES)}.")
    gamma: float = arg(1.0, "GAE discount γ.")
    lam: float = arg(0.95, "GAE λ.")
    whiten_advantages: bool = arg(True, "Whiten advantages over the rollout (mean 0, std 1).")
    clip_eps: float = arg(0.2, "PPO ratio clip ε.")
    clip_eps_high: float | None = arg(None, "Upper ratio clip (DAPO clip-higher); default = --clip-eps.")
    loss_aggregation: str = arg("token_mean", "token_mean (every token of the minibatch equal; DAPO), "
                                "sequence_mean (mean per response, then over responses; GRPO) or dr_grpo "
                                "(token sum / max_new_tokens per response).")
    critic: str = arg("value_head", "PPO critic: value_head (a linear head on the policy's backbone) or "
                      "reward_model (a separate value model initialised from the first --reward-model).")
    vf_coef: float = arg(0.1, "Weight of the value loss.")
    value_clip: float = arg(0.2, "Clip range of the value loss around the rollout's values (0 = off).")
    entropy_coef: float = arg(0.0, "Entropy bonus weight.")
    approx_kl_stop: float | None = arg(None, "Stop the PPO epochs of a rollout once the approximate KL to the "
                                       "rollout policy exceeds this.")
    # logging
    sample_steps: int = arg(10, "Write a few samples to OUTPUT_DIR/samples.jsonl every N steps.")
    num_logged_samples: int = arg(4, "Samples written each time.")
    eval_num_generations: int = arg(1, "Responses per eval prompt.")
    # reward hacking
    heldout_judge: str | None = arg(None, "An independent judge (spec as in `rlhfkit eval --judge`: a reward "
                                    "model folder, fn:FILE.py:FUNCTION, http:URL, gold:WORLD_DIR) that also "
                                    "scores the --eval-dataset responses at every evaluation: logged as "
                                    "eval_heldout_reward, fed to the reward-hacking detector, and the policy "
                                    "with the best held-out score is kept in OUTPUT_DIR/best_heldout.")
    hacking_window: int = arg(3, "Reward-hacking detector: evaluations averaged for smoothing.")
    hacking_min_drop: float = arg(0.1, "Reward-hacking detector: share of its gain the held-out score must give "
                                  "back (while the training reward rises) to count.")
    hacking_patience: int = arg(2, "Reward-hacking detector: consecutive suspicious evaluations to fire.")
    hacking_z: float = arg(2.0, "Reward-hacking detector: the held-out drop must also exceed this many standard "
                           "errors (of the difference of the smoothed held-out means), so evaluation noise "
                           "alone does not fire it.")
    # Ray (extra 'distributed'): one actor group per role
    ray: bool = arg(False, "Run on Ray (pip install 'rlhfkit[distributed]'): the policy and critic train in "
                    "their own actor groups (DDP inside a group, as under accelerate launch), the reference "
                    "and reward model score in inference groups, rollout workers sample and get the policy's "
                    "weights by a collective broadcast (gloo/NCCL) after every update. --prompts-per-step is "
                    "per policy worker.")
    ray_address: str | None = arg(None, "Ray cluster to join (e.g. auto or ray://host:10001); default: the one "
                                  "this process already started, else a new local one.")
    ray_placement: str = arg("per_role", "Where the actors go: colocated (one placement group; rank i of every "
                             "role runs in actor i, sharing its process, CPUs and GPU, and a rollout worker beside "
                             "a policy rank copies its weights in place; needs as many critic as policy workers) "
                             "or per_role (one placement group per role, an actor and a bundle per rank).")
    ray_policy_workers: int = arg(1, "Policy training workers (data parallel inside the group).")
    ray_critic_workers: int = arg(1, "Critic training workers (PPO with GAE only).")
    ray_ref_workers: int = arg(1, "Reference-model inference workers.")
    ray_reward_workers: int = arg(1, "Reward inference workers (each holds the whole reward source).")
    ray_rollout_workers: int = arg(1, "Rollout (sampling) workers.")
    ray_cpus_per_worker: float = arg(1.0, "CPUs of one placement bundle, i.e. of one actor (colocated: shared "
                                     "by the roles of one rank). Fractions are allowed.")
    ray_use_gpu: bool = arg(False, "One GPU per bundle (colocated roles share it); NCCL for the weight "
                            "broadcast.")
    ray_timeout_s: float = arg(600.0, "Longest wait for one worker call or collective; a worker "
                               "that dies or hangs ends the run with an error naming it, not a hang.")
    ray_startup_timeout_s: float = arg(1800.0, "Longest wait for the Ray workers to be placed, start and load "
                                       "their models.")
    ray_check_sync: bool = arg(False, "After every weight sync, compare a checksum of every policy tensor "
                               "on each rollout worker with policy rank 0 (an error when one differs).")

    algorithm = "ppo"


@dataclass
class PPOConfig(RLConfig):
    ppo_epochs: int = arg(4, "Passes over each rollout.")
    learning_rate: float = arg(3e-6, "Peak learning rate (AdamW).")


@dataclass
class GRPOConfig(RLConfig):
    num_generations: int = arg(8, "Responses sampled per prompt (the group size).")
    prompts_per_step: int = arg(1, "Prompts sampled per step on each device.")
    advantage: str = arg("grpo", f"Advantage estimator: {', '.join(ADVANTAGE_TYPES)}.")
    kl_mode: str = arg("loss", "Where the KL goes: 'loss' (β·KL in the loss, GRPO) or 'reward'.")
    kl_estimator: str = arg("k3", f"Per-token KL estimator: {', '.join(KL_ESTIMATORS)}.")
    kl_coef: float = arg(0.04, "β: weight of the KL term.")
    whiten_advantages: bool = arg(False, "Whiten advantages over the rollout (the group baseline already "
                                  "centres them).")
    loss_aggregation: str = arg("sequence_mean", "token_mean (DAPO), sequence_mean (GRPO) or dr_grpo.")

    algorithm = "grpo"


@dataclass
class RLOOConfig(RLConfig):
    num_generations: int = arg(8, "Responses sampled per prompt (the group size, ≥ 2).")
    prompts_per_step: int = arg(1, "Prompts sampled per step on each device.")
    advantage: str = arg("rloo", f"Advantage estimator: {', '.join(ADVANTAGE_TYPES)}.")
    whiten_advantages: bool = arg(False, "Whiten advantages over the rollout.")
    loss_aggregation: str = arg("token_mean", "token_mean, sequence_mean or dr_grpo.")

    algorithm = "rloo"


def _check(config: RLConfig) -> None:
    choices = {"kl_estimator": KL_ESTIMATORS, "kl_mode": KL_MODES, "advantage": ADVANTAGE_TYPES,
               "loss_aggregation": LOSS_AGGREGATIONS, "critic": CRITICS, "reward_ensemble": REWARD_ENSEMBLES}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                              f"not '{getattr(config, name)}'")
    if config.advantage in ("grpo", "rloo") and config.num_generations < 2:
        raise ConfigError(f"--advantage {config.advantage} needs --num-generations >= 2 (a group baseline)")
    for name in ("prompts_per_step", "num_generations", "num_minibatches", "ppo_epochs", "max_new_tokens"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if config.prompts_per_step * config.num_generations < config.num_minibatches:
        raise ConfigError("--num-minibatches is larger than the number of sequences per rollout")
    if config.kl_coef < 0:
        raise ConfigError("--kl-coef must be >= 0")
    if config.rollout_backend not in ROLLOUT_BACKENDS:
        raise ConfigError(f"--rollout-backend must be one of {', '.join(ROLLOUT_BACKENDS)}, "
                          f"not '{config.rollout_backend}'")
    if config.logprob_check_steps < -1 or not config.logprob_check_tolerance > 0:
        raise ConfigError("--logprob-check-steps must be >= -1 and --logprob-check-tolerance > 0")


class ActorCritic(torch.nn.Module):
    """The trained modules: the policy and, for PPO, a critic (value head on the policy, or a value model).

    ``forward`` returns (logits, values-or-None) so distributed wrappers see a single forward call.
    ``policy=None`` with a value model is a critic alone (the critic group of a Ray run): logits are None.
    """

    def __init__(self, policy: torch.nn.Module | None, critic: str | None,
                 value_model: torch.nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic_kind = critic
        self.value_head = None
        self.value_model = value_model
        if critic == "value_head":
            hidden = policy.get_input_embeddings().embedding_dim
            self.value_head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(self.value_head.weight)  # values start at 0: no random critic noise
            torch.nn.init.zeros_(self.value_head.bias)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        if self.policy is not None:
            self.policy.gradient_checkpointing_enable(**kwargs)
        if self.value_model is not None:
            self.value_model.gradient_checkpointing_enable(**kwargs)

    def forward(self, batch: dict[str, Any], with_logits: bool = True) -> tuple[torch.Tensor | None,
                                                                                  torch.Tensor | None]:
        logits = values = None
        if self.policy is not None and (with_logits or self.value_head is not None):
            logits, out = loss_logits(self.policy, batch, output_hidden_states=self.value_head is not None)
            if self.value_head is not None:
                values = self.value_head(out.hidden_states[-1]).squeeze(-1)
        if self.value_model is not None:
            backbone, head = reward_parts(self.value_model)
            values = head(backbone(**forward_inputs(batch)).last_hidden_state).squeeze(-1)
        return logits, values


def tempered_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits divided by the sampling temperature (the distribution the rollout sampled from)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def response_logps(logits: torch.Tensor, batch: dict[str, Any], temperature: float) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Log-probs of the response tokens at ``temperature``, flat [n] in (sequence, position) order, from the
    predicting logits [n, V] of ``loss_logits``; and those logits (float32, tempered)."""
    picked = tempered_logits(logits, temperature)
    return selected_token_logprobs(picked, loss_targets(batch)), picked


def rollout_seed(seed: int, step: int) -> int:
    """Seed of the sampling generator of step ``step`` (0-based)."""
    return seed * 1_000_003 + 7919 * step + 1


def _split_rows(flat: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Flat per-token values (sequence-major) -> [N, width] response-aligned, zero-padded."""
    out = flat.new_zeros((len(lengths), width))
    mask = torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]
    out[mask] = flat
    return out


class RLTask:
    """The per-minibatch loss for the engine (``Task`` protocol) plus the rollout side of a step."""

    name = "rl"
    progress_keys = ("reward_mean", "kl", "beta")

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
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.reward_stats = RunningMoments()
        self.pad_id = tokenizer.pad_token_id
        self.policy_version, self._synced_version = 0, None  # optimizer updates made / pushed to the engine

    # ------------------------------------------------------------------ batches
    def collate(self, records: list[dict]) -> dict[str, Any]:
        if self.share_prompts:
            batch = pack_shared_prompts([r["prompt_ids"] for r in records], [r["response_ids"] for r in records])
        else:
            sequences = [r["prompt_ids"] + r["response_ids"] for r in records]
            masks = [[0] * len(r["prompt_ids"]) + [1] * len(r["response_ids"]) for r in records]
            batch = pack_batch(sequences, masks) if self.packed else pad_batch(sequences, masks, self.pad_id)
        for key in ("old_logps", "ref_logps", "advantages", "returns", "old_values"):
            if key in records[0]:
                batch[key] = torch.tensor([v for r in records for v in r[key]], dtype=torch.float32)
        batch["response_lengths"] = torch.tensor([len(r["response_ids"]) for r in records], dtype=torch.float32)
        return batch

    def batch_weight(self, batch: dict[str, Any]) -> float:
        if self.config.loss_aggregation == "token_mean":
            return float(batch["num_loss_tokens"])
        return float(batch["num_sequences"])

    def _aggregate(self, per_token: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Sum of the per-item losses for the chosen aggregation (the engine divides by the step's weight)."""
        how = self.config.loss_aggregation
        if how == "token_mean":
            return per_token.sum()
        if how == "dr_grpo":
            return per_token.sum() / self.config.max_new_tokens
        seq = loss_sequence_ids(batch)
        lengths = batch["response_lengths"].to(per_token.device)
        return (per_token / lengths[seq]).sum()

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
                                                             loss_targets(batch),
                                                             entropy_grad=cfg.entropy_coef > 0)
        old, adv = batch["old_logps"], batch["advantages"]
        policy = clipped_policy_loss(logps, old, adv, cfg.clip_eps, cfg.clip_eps_high)
        per_token = policy.losses
        if cfg.kl_mode == "loss" and cfg.kl_coef > 0:
            per_token = per_token + self.kl_controller.beta * kl_penalty(logps, batch["ref_logps"],
                                                                         cfg.kl_estimator)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy
        loss = self._aggregate(per_token, batch)
        n = float(logps.numel())
        sums: MetricSums = {
            "policy_loss": (float(policy.losses.detach().sum()), n),
            "clip_frac": (float(policy.clipped.sum()), n),
            "approx_kl": (float(approx_kl(logps.detach(), old).sum()), n),
            "entropy": (float(entropy.detach().sum()), n),
            "ratio": (float(policy.ratio.detach().sum()), n),
            "logprob_abs_diff": (float((logps.detach() - old).abs().sum()), n),
        }
        return loss, sums

    def _value_loss(self, values: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        cfg = self.config
        token_values = at_loss_positions(values, batch).float()
        value = clipped_value_loss(token_values, batch["old_values"], batch["returns"], cfg.value_clip or None)
        n = float(token_values.numel())
        return cfg.vf_coef * self._aggregate(value.losses, batch), {
            "value_loss": (float(value.losses.detach().sum()), n),
            "value_clip_frac": (float(value.clipped.sum()), n)}

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _reference_logps(self, model: ActorCritic, batch: dict[str, Any]) -> torch.Tensor:
        if self.ref_model is not None:
            logits, _ = loss_logits(self.ref_model, batch)
        else:
            with model.policy.disable_adapter():
                logits, _ = loss_logits(model.policy, batch)
        return response_logps(logits, batch, self.config.temperature)[0]

    def score(self, prompts: list[dict], rollout: Rollout, where: str = "",
              source: Any = None) -> tuple[torch.Tensor, list[str]]:
        """Scores of ``rollout`` by the reward source (or by ``source``), checked finite; and the texts."""
        texts = self.backend.decode(rollout, self.sampling.stop_strings)
        g = len(rollout.response_ids) // len(prompts)
        prompt_texts = [p["prompt"] for p in prompts for _ in range(g)]
        batch = ScoringBatch(prompt_texts, texts, rollout.prompt_ids, self.backend.scored_ids(rollout),
                             rollout.ended)
        return checked_scores(self.reward if source is None else source, batch, TrainingError, where), texts

    def shape_scores(self, scores: torch.Tensor, ended: list[bool],
                     gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
        """(raw scores, training scores): the missing-EOS penalty, then the running normaliser (updated here,
        so call it once per rollout; with ``gather``, with every data-parallel rank's scores, so that all
        ranks share one normaliser) and the clip."""
        cfg = self.config
        raw = scores.clone()
        scores = scores - cfg.missing_eos_penalty * (~torch.tensor(ended)).float()
        if cfg.reward_normalize:
            self.reward_stats.update(gather(scores) if gather is not None else scores)
            scores = self.reward_stats.normalize(scores)
        if cfg.reward_clip > 0:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return raw, scores

    def rollout_step(self, engine: Engine, model: ActorCritic, prompts: list[dict], step: int) -> dict[str, Any]:
        """Sample, score and build the experience records of one step; returns them and the rollout metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(rollout_seed(cfg.seed, step))
        policy = engine.unwrap(model).policy
        with engine.full_parameters(model):  # sampling and weight sync read whole weights on each rank
            self._sync_rollout_weights(policy)
            rollout = self.backend.generate(policy, [p["prompt_ids"] for p in prompts], cfg.num_generations,
                                            self.sampling, generator)
        rollout_time = time.perf_counter() - t0
        scores, texts = self.score(prompts, rollout, f" (step {step + 1}{engine._checkpoint_hint()})")
        raw, scores = self.shape_scores(scores, rollout.ended, engine.gather_across_ranks)

        records = [{"prompt_ids": p, "response_ids": r} for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
        lengths = rollout.lengths
        width = max(lengths)
        mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).float()
        every = cfg.logprob_check_steps  # by step number, so a resumed run checks where the original did
        check = (every > 0 and step % every == 0) or (every == 0 and step == 0)
        recompute = check or getattr(self.backend, "recompute_logprobs", False)
        ref_flat, value_flat, own_flat = [], [], []
        device = engine.device
        unwrapped = engine.unwrap(model)
        unwrapped.eval()
        for start in range(0, len(records), cfg.per_device_eval_batch_size):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in self.collate(records[start:start + cfg.per_device_eval_batch_size]).items()}
            with engine.accelerator.autocast():
                ref_flat.append(self._reference_logps(unwrapped, batch).float().cpu())
                if unwrapped.critic_kind is not None or recompute:
                    with torch.no_grad():
                        logits, values = unwrapped(batch, with_logits=recompute)
                    if recompute:  # the trainer's own log-probs of the sampled tokens
                        own_flat.append(response_logps(logits, batch, cfg.temperature)[0].float().cpu())
                    if values is not None:
                        value_flat.append(at_loss_positions(values, batch).float().cpu())
        unwrapped.train()
        old_logps = rollout.logprobs[:, :width]
        logprob_metrics: dict[str, float] = {}
        if recompute:
            trainer_logps = _split_rows(torch.cat(own_flat), lengths, width)
            if check:
                match = compare_logprobs(old_logps, trainer_logps, mask)
                logprob_metrics = match.metrics()
                where = f" at step {step + 1} ({cfg.rollout_backend} rollouts, {match.tokens} response tokens)"
                check_logprob_match(match, cfg.logprob_check_tolerance, where)
            if getattr(self.backend, "recompute_logprobs", False):
                old_logps = trainer_logps  # PPO's old log-probs from the trainer's numerics, not the engine's
        return self.experience(prompts, rollout, texts, raw, scores, torch.cat(ref_flat),
                               torch.cat(value_flat) if value_flat else None, rollout_time,
                               f"step {step + 1}", engine._checkpoint_hint(), old_logps=old_logps,
                               extra_metrics=logprob_metrics, sum_across=engine.sum_across_ranks,
                               gather=engine.gather_across_ranks)

    def experience(self, prompts: list[dict], rollout: Rollout, texts: list[str], raw: torch.Tensor,
                   scores: torch.Tensor, ref_flat: torch.Tensor, value_flat: torch.Tensor | None,
                   rollout_time: float, where: str, hint: str = "", *, old_logps: torch.Tensor | None = None,
                   extra_metrics: dict[str, float] | None = None,
                   sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
        """Per-token KL, rewards, advantages (GAE with the critic's values, or a group baseline), whitening:
        the experience records of one rollout plus its metrics. ``ref_flat`` / ``value_flat`` are the
        reference log-probs / values of the response tokens, flat in (sequence, position) order;
        ``old_logps`` replaces the sampler's log-probs. With data-parallel ranks, ``sum_across`` (an
        all-reduce) whitens with the whole batch's statistics and ``gather`` makes the metrics and the KL
        that steers beta those of every rank's rollouts."""
        cfg = self.config
        gather = gather or (lambda t: t)
        records = [{"prompt_ids": p, "response_ids": r} for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
        lengths = rollout.lengths
        width = max(lengths)
        mask = (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).float()
        if old_logps is None:
            old_logps = rollout.logprobs[:, :width]
        ended = torch.tensor(rollout.ended)
        ref_logps = _split_rows(ref_flat, lengths, width)
        for name, tensor in (("policy", old_logps), ("reference", ref_logps)):
            if not torch.isfinite(tensor[mask.bool()]).all():
                raise TrainingError(f"{where}: non-finite {name} log-probs in the rollout{hint}")
        kl_tokens = kl_penalty(old_logps, ref_logps, cfg.kl_estimator) * mask
        kl_seq = kl_tokens.sum(-1)
        beta = self.kl_controller.beta

        values = None
        if cfg.advantage == "gae":
            rewards = -beta * kl_tokens if cfg.kl_mode == "reward" else torch.zeros_like(kl_tokens)
            rewards[torch.arange(len(lengths)), torch.as_tensor(lengths) - 1] += scores
            values = (_split_rows(value_flat, lengths, width) if value_flat is not None
                      else torch.zeros_like(rewards))
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        else:
            seq_reward = scores - beta * kl_seq if cfg.kl_mode == "reward" else scores
            advantages = group_advantages(seq_reward, cfg.num_generations, cfg.advantage)[:, None] * mask
            returns = None
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask, sum_across=sum_across)

        for i, rec in enumerate(records):
            n = lengths[i]
            rec["old_logps"] = old_logps[i, :n].tolist()
            rec["ref_logps"] = ref_logps[i, :n].tolist()
            rec["advantages"] = advantages[i, :n].tolist()
            if values is not None and value_flat is not None:
                rec["old_values"] = values[i, :n].tolist()
                rec["returns"] = returns[i, :n].tolist()

        tokens = sum(lengths)
        # the logged statistics and the KL that steers beta are over every rank's rollouts
        raw, scores, kl_seq = (gather(t) for t in (raw, scores, kl_seq))
        ended_share = gather(ended.float()).mean()
        all_lengths = gather(torch.tensor(lengths, dtype=torch.float32))
        metrics = {
            "reward_mean": float(raw.mean()),
            "reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
            "score_mean": float(scores.mean()),
            "kl": float(kl_seq.mean()),
            "reward_penalized": float((scores - beta * kl_seq).mean()),
            "beta": beta,
            "response_length": float(all_lengths.mean()),
            "no_eos_rate": float(1 - ended_share),
            "rollout_tokens_per_s": tokens / max(rollout_time, 1e-9),
            "rollout_time_s": rollout_time,
            **(extra_metrics or {}),
        }
        if values is not None and value_flat is not None:
            valid = mask.bool()
            var_returns = returns[valid].var()
            metrics["explained_variance"] = float(1 - (returns[valid] - values[valid]).var() / var_returns) \
                if var_returns > 0 else 0.0
            metrics["value_mean"] = float(values[valid].mean())
        samples = [{"prompt": prompts[i // cfg.num_generations]["prompt"], "response": texts[i],
                    "reward": float(raw[i]), "ended": rollout.ended[i]}
                   for i in range(min(cfg.num_logged_samples, len(texts)))]
        return {"records": records, "metrics": metrics, "samples": samples, "kl_seq": kl_seq,
                "tokens": tokens + sum(len(p) for p in rollout.prompt_ids)}

    # ------------------------------------------------------------------ the step
    def update(self, engine: Engine, records: list[dict], step: int,
               epochs: int | None = None) -> tuple[dict[str, float], int]:
        """PPO epochs over minibatches of the rollout; each minibatch is one engine optimizer step.

        ``epochs`` caps the passes (a Ray critic group runs as many as its policy group ran); a model without
        a policy (critic alone) has no approximate KL, so it never stops early by itself."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * step + 2)
        n = len(records)
        bounds = [round(i * n / cfg.num_minibatches) for i in range(cfg.num_minibatches + 1)]
        totals: dict[str, list[float]] = {}
        updates, tokens, mismatch = 0, 0, None
        t0 = time.perf_counter()
        epochs_run = 0
        for _ in range(cfg.ppo_epochs if epochs is None else min(epochs, cfg.ppo_epochs)):
            epochs_run += 1
            order = torch.randperm(n, generator=generator).tolist()
            epoch_kl = [0.0, 0.0]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                # a minibatch in rollout order keeps each group's samples adjacent, so they share their prompt
                # (the loss is a sum over its tokens: the order inside a minibatch does not change it)
                picked = sorted(order[lo:hi]) if self.share_prompts else order[lo:hi]
                chosen = [records[i] for i in picked]
                micro = [self.collate(chosen[s:s + cfg.per_device_batch_size])
                         for s in range(0, len(chosen), cfg.per_device_batch_size)]
                result: StepResult = engine.optimizer_step(self, micro)
                updates += 1
                tokens += result.tokens
                if mismatch is None and "logprob_abs_diff" in result.sums:
                    # before any update, the trainer's log-probs should equal the sampler's
                    mismatch = result.sums["logprob_abs_diff"][0] / max(result.sums["logprob_abs_diff"][1], 1)
                for name, (s, c) in result.sums.items():
                    acc = totals.setdefault(name, [0.0, 0.0])
                    acc[0] += s
                    acc[1] += c
                if result.grad_norm is not None:
                    totals.setdefault("grad_norm", [0.0, 0.0])
                    totals["grad_norm"][0] += result.grad_norm
                    totals["grad_norm"][1] += 1
                totals.setdefault("loss", [0.0, 0.0])
                totals["loss"][0] += result.loss_sum / result.total_weight
                totals["loss"][1] += 1
                kl_sum, kl_count = result.sums.get("approx_kl", (0.0, 0.0))
                epoch_kl[0] += kl_sum
                epoch_kl[1] += kl_count
            if cfg.approx_kl_stop is not None and epoch_kl[0] / max(epoch_kl[1], 1) > cfg.approx_kl_stop:
                break
        self.policy_version += updates  # a rollout engine with its own weights needs them again
        row = {name: s / max(c, 1e-12) for name, (s, c) in totals.items()}
        row.update({"ppo_epochs_run": epochs_run, "optimizer_updates": updates,
                    "rollout_logprob_mismatch": mismatch or 0.0,
                    "train_tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)})
        return row, tokens

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean reward, KL and length of sampled responses on the held-out prompts (a fixed sampling seed)."""
        if not self.eval_prompts or self._engine is None:
            return {}
        cfg = self.config
        totals: dict[str, float] = {}
        count = 0
        for start in range(0, len(self.eval_prompts), cfg.per_device_eval_batch_size):
            prompts = self.eval_prompts[start:start + cfg.per_device_eval_batch_size]
            generator = torch.Generator().manual_seed(cfg.seed + 104729 + start)
            unwrapped = self._engine.unwrap(model)
            with self._engine.full_parameters(model):
                self._sync_rollout_weights(unwrapped.policy)
                rollout = self.backend.generate(unwrapped.policy, [p["prompt_ids"] for p in prompts],
                                                cfg.eval_num_generations, self.sampling, generator)
            scores, _ = self.score(prompts, rollout)
            if self.heldout is not None:
                held, _ = self.score(prompts, rollout, " (held-out judge)", source=self.heldout)
                totals["heldout_reward"] = totals.get("heldout_reward", 0.0) + float(held.sum())
                totals["heldout_reward_sq"] = totals.get("heldout_reward_sq", 0.0) + float(held.double().square().sum())
            records = [{"prompt_ids": p, "response_ids": r}
                       for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
            batch = {k: v.to(self._engine.device) if torch.is_tensor(v) else v
                     for k, v in self.collate(records).items()}
            ref = _split_rows(self._reference_logps(unwrapped, batch).float().cpu(), rollout.lengths,
                              max(rollout.lengths))
            own = rollout.logprobs[:, :ref.shape[1]]
            mask = (torch.arange(ref.shape[1])[None, :] < torch.as_tensor(rollout.lengths)[:, None]).float()
            k = len(rollout.lengths)
            totals["reward_mean"] = totals.get("reward_mean", 0.0) + float(scores.sum())
            totals["kl"] = totals.get("kl", 0.0) + float((kl_penalty(own, ref, "k1") * mask).sum())
            totals["response_length"] = totals.get("response_length", 0.0) + float(sum(rollout.lengths))
            totals["no_eos_rate"] = totals.get("no_eos_rate", 0.0) + float(k - sum(rollout.ended))
            count += k
        metrics = {name: value / max(count, 1) for name, value in totals.items()}
        if "heldout_reward_sq" in metrics:  # standard error of the held-out mean: the detector's noise floor
            variance = max(metrics.pop("heldout_reward_sq") - metrics["heldout_reward"] ** 2, 0.0)
            metrics["heldout_reward_se"] = math.sqrt(variance / max(count - 1, 1))
        if self.heldout is not None:
            self._watch_for_hacking(model, metrics)
        return metrics

    def _sync_rollout_weights(self, policy: torch.nn.Module) -> None:
        """Push the policy into a rollout engine that keeps its own copy (vLLM) once per update phase; the
        first rollout of a process syncs too (a resumed run's policy is not the checkpoint vLLM loaded)."""
        if getattr(self.backend, "needs_weight_sync", False) and self._synced_version != self.policy_version:
            self.backend.sync_weights(policy)
            self._synced_version = self.policy_version

    def _watch_for_hacking(self, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        """Feed the detector; keep the policy with the best held-out score (OUTPUT_DIR/best_heldout)."""
        engine = self._engine
        step = int(getattr(engine, "step", 0) or 0)
        was_fired = self.detector.fired
        self.detector.update(step, metrics["reward_mean"], metrics["heldout_reward"], metrics.get("heldout_reward_se"))
        metrics["hacking_detected"] = float(self.detector.fired)
        if self.detector.fired and not was_fired:
            logger.warning("reward hacking suspected at step %d: %s; best held-out policy (step %s) is in %s",
                           step, self.detector.reason, self.detector.best_step, engine.output_dir / "best_heldout")
        if self.detector.best_step == step and engine.is_main:
            # written beside and renamed, so a crash never leaves a half-written best policy; a LoRA policy
            # saves its adapter (load it on top of --model)
            out, tmp = engine.output_dir / "best_heldout", engine.output_dir / ".best_heldout.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            engine.unwrap(model).policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "step.txt").write_text(f"{step}\n")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)

    _engine: Engine | None = None
    heldout: Any = None


def _write_samples(engine: Engine, step: int, samples: list[dict]) -> None:
    if not engine.is_main or not samples:
        return
    with open(engine.output_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps({"step": step, **sample}) + "\n")


def run_rl(config: RLConfig) -> dict[str, Any]:
    """Train a policy online with PPO, GRPO or RLOO (set by the config class); returns the summary."""
    _check(config)
    if config.ray:  # same losses, advantages and KL code, spread over Ray actor groups
        from ..distributed import run_ray_rl

        return run_ray_rl(config)
    engine = start_run(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    prepare = partial(prepare_prompts, max_prompt_length=config.max_prompt_length or config.max_length // 2)
    prompts, eval_prompts, report = prepare_datasets(config, tokenizer, PROMPT_FORMATS, prepare)

    # the reward source first: its configuration errors are cheap to find
    reward = build_reward_source(
        [s for s in (config.reward_model or "").split(",") if s],
        [s for s in (config.reward_fn or "").split(",") if s],
        [s for s in (config.reward_url or "").split(",") if s],
        tokenizer, device=engine.device, ensemble=config.reward_ensemble, std_coef=config.reward_std_coef,
        batch_size=config.reward_batch_size, trust_remote_code=config.trust_remote_code)
    lora = lora_settings(config)
    policy = load_causal_lm(config.model, lora=lora, trust_remote_code=config.trust_remote_code)
    policy.to(engine.device)
    ref_model = None
    if not lora.enabled or config.ref_model:
        ref_name = config.ref_model or config.model
        if config.ref_model and config.ref_model != config.model:
            check_same_tokenizer(tokenizer, load_tokenizer(config.ref_model), config.model, config.ref_model)
        ref_model = load_causal_lm(ref_name, trust_remote_code=config.trust_remote_code)


    critic = None
    value_model = None
    if config.advantage == "gae":
        critic = config.critic
        if critic == "reward_model":
            if not config.reward_model:
                raise ConfigError("--critic reward_model needs --reward-model (the value model starts from it)")
            value_model = load_reward_model(config.reward_model.split(",")[0],
                                            trust_remote_code=config.trust_remote_code).to(engine.device)
    model = ActorCritic(policy, critic, value_model)
    packed = resolve_packing(config, policy) and (value_model is None or resolve_packing(config, value_model,
                                                                                         reward=True))
    if packed and ref_model is not None:
        use_packed_attention(ref_model)
    if ref_model is not None:
        ref_model = engine.prepare_frozen(ref_model)
    for source in getattr(reward, "sources", [reward]):  # reward models run like the reference
        if isinstance(source, ModelReward):
            source.model = engine.prepare_frozen(source.model)
    share = config.share_prompts and config.num_generations > 1 and shares_prompts(policy, ref_model, value_model)
    task = RLTask(config, tokenizer, packed, ref_model, reward, build_rollout_backend(config, tokenizer),
                  eval_prompts, share_prompts=share)
    task._engine = engine
    checkpointed: list[Any] = [task.kl_controller, task.reward_stats]
    if config.heldout_judge:
        from ..eval.hacking import RewardHackingDetector
        from ..eval.runner import load_judge

        task.heldout = load_judge(config.heldout_judge, tokenizer, engine.device)
        task.detector = RewardHackingDetector(config.hacking_window, config.hacking_min_drop,
                                              patience=config.hacking_patience, z=config.hacking_z)
        checkpointed.append(task.detector)

    total_steps = config.max_steps if config.max_steps > 0 else max(
        math.ceil(config.num_epochs * len(prompts) / (config.prompts_per_step * engine.world_size)), 1)
    order_cache: dict[int, list[int]] = {}

    def step_fn(step: int) -> tuple[dict[str, Any], int]:
        chosen = engine._records_for(prompts, step, order_cache, batch_size=config.prompts_per_step)
        rollout = task.rollout_step(engine, engine.model, chosen, step)
        train_row, train_tokens = task.update(engine, rollout["records"], step)
        task.kl_controller.update(float(rollout["kl_seq"].mean()), len(rollout["records"]))
        if config.sample_steps > 0 and (step + 1) % config.sample_steps == 0 or step == 0:
            _write_samples(engine, step + 1, rollout["samples"])
        return {**rollout["metrics"], **train_row}, rollout["tokens"]

    summary = engine.run(task, model, total_steps, step_fn, checkpoint_objects=checkpointed,
                         extra_logs=["samples.jsonl"])
    if config.heldout_judge:
        d = task.detector
        summary["hacking"] = {"fired": d.fired, "fired_step": d.fired_step, "reason": d.reason,
                              "best_step": d.best_step, "best_heldout": d.best_heldout}
    summary.update({"train_prompts": len(prompts), "prompt_rows": report.total_rows, "packing": packed,
                    "shared_prompts": task.share_prompts,
                    "algorithm": config.algorithm})
    engine.save_final(engine.trained_model, tokenizer, submodule="policy")
    engine.write_summary(summary)
    return summary
