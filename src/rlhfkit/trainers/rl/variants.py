"""The later variants' steps, beside the task/experience spine they plug into (one update loop serves all):

- reward shaping per response: the missing-EOS penalty and DAPO's overlong penalty (``shaped_scores``);
- DAPO's dynamic sampling: groups whose rewards are all equal are replaced by groups of further prompts;
- critic-free advantages: GRPO / Dr. GRPO / RLOO with TRL's ``scale_rewards``, and REINFORCE++ (``advantages``);
- the policy surrogate: per-token PPO or GSPO's per-response ratio, weighted by truncated importance sampling
  when the rollout engine's log-probs are not the trainer's (``surrogate``, ``tis_weights``).
The equations are in :mod:`rlhfkit.losses.rl_variants`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ...engine import step_seed
from ...losses import (
    REINFORCE_PP_TYPES,
    PolicyLossOutput,
    clipped_policy_loss,
    group_advantages,
    group_reward_spread,
    overlong_penalty,
    reinforce_pp_advantages,
    scaled_group_advantages,
    sequence_policy_loss,
    truncated_importance_weights,
)
from ...models.forward import loss_sequence_ids
from ...rollout.generate import Rollout, concat_rollouts, slice_rollout
from ...rollout.logprob_check import response_mask
from .config import RLConfig


def shaped_scores(cfg: RLConfig, scores: torch.Tensor, ended: list[bool], lengths: list[int] | None,
                  stats: Any = None, gather: Callable | None = None) -> torch.Tensor:
    """The per-response shaping: minus the missing-EOS penalty, plus DAPO's overlong penalty (given ``lengths``);
    then, given ``stats`` (training scores), with ``--reward-normalize`` the running normaliser ``stats`` (updated here, so once per rollout; with
    ``gather``, with every data-parallel rank's scores: all ranks share one normaliser) and ``--reward-clip``."""
    scores = scores - cfg.missing_eos_penalty * (~torch.tensor(ended)).float()
    if cfg.overlong_buffer > 0 and lengths is not None:
        scores = scores + overlong_penalty(torch.tensor(lengths), cfg.max_new_tokens, cfg.overlong_buffer,
                                           cfg.overlong_penalty_factor)
    if stats is None:  # the shaped scores alone (dynamic sampling's spread)
        return scores
    if cfg.reward_normalize:
        stats.update(gather(scores) if gather is not None else scores)
        scores = stats.normalize(scores)
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores


def advantages(cfg: RLConfig, beta: float, scores: torch.Tensor, kl_tokens: torch.Tensor, kl_seq: torch.Tensor,
               mask: torch.Tensor, sum_across: Callable | None, gather: Callable) -> torch.Tensor:
    """Critic-free per-token advantages [N, T]: REINFORCE++ (the KL per token in the reward, whitened over the
    batch), or a group baseline over the sequence rewards (minus β·KL with ``kl_mode`` reward)."""
    if cfg.advantage in REINFORCE_PP_TYPES:
        kl_reward = kl_tokens if cfg.kl_mode == "reward" else torch.zeros_like(kl_tokens)
        return reinforce_pp_advantages(scores, kl_reward, mask, beta, cfg.advantage, cfg.num_generations, cfg.gamma,
                                       sum_across)
    seq_reward = scores - beta * kl_seq if cfg.kl_mode == "reward" else scores
    if cfg.scale_rewards == "group":  # the original call, kept as it was: results stay bit-identical
        return group_advantages(seq_reward, cfg.num_generations, cfg.advantage)[:, None] * mask
    return scaled_group_advantages(seq_reward, cfg.num_generations, cfg.scale_rewards, gather=gather)[:, None] * mask


def surrogate(cfg: RLConfig, logps: torch.Tensor, batch: dict[str, Any]) -> tuple[PolicyLossOutput, torch.Tensor]:
    """The clipped surrogate (per token, or GSPO's per response) and its per-token losses, TIS-weighted."""
    old, adv = batch["old_logps"], batch["advantages"]
    if cfg.importance_sampling_level == "sequence":
        policy = sequence_policy_loss(logps, old, adv, loss_sequence_ids(batch), cfg.clip_eps, cfg.clip_eps_high,
                                      batch.get("policy_mask"))  # a tool episode's s_i: the policy's tokens only
    else:
        policy = clipped_policy_loss(logps, old, adv, cfg.clip_eps, cfg.clip_eps_high)
    # TIS: the samples came from the rollout engine's numerics, not the trainer's (absent = weight 1, no op)
    return policy, policy.losses * batch["is_weights"] if "is_weights" in batch else policy.losses


def tis_weights(cfg: RLConfig, engine: Any, trainer_logps: torch.Tensor, rollout_logps: torch.Tensor,
                lengths: list[int]) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance weights [N, T] of a rollout engine that is not the trainer (None when --tis-cap is
    0), and the logged ratio statistics over every rank's response tokens."""
    if cfg.tis_cap <= 0:
        return None, {}
    weights, ratio = truncated_importance_weights(trainer_logps, rollout_logps, cfg.tis_cap)
    local = ratio[response_mask(lengths, ratio.shape[1]).bool()]
    # sums and a max, not a gather: the ranks' token counts differ
    total, count, capped = engine.sum_across_ranks(torch.stack(
        [local.sum(), torch.tensor(float(local.numel())), (local > cfg.tis_cap).sum().float()]))
    top = engine.gather_across_ranks(local.max().reshape(1)).max()
    return weights, {"tis_ratio_mean": float(total / count), "tis_ratio_max": float(top),
                     "tis_capped_share": float(capped / count)}


def dynamic_sampling(task: Any, engine: Any, model: Any, step: int, where: str,
                     first: tuple) -> tuple[list[dict], Rollout, torch.Tensor, list[str], dict, dict[str, float]]:
    """DAPO's dynamic sampling (Yu et al. 2025, eq. 11): keep the groups whose shaped rewards are not all equal;
    sample groups of further prompts (drawn from ``task.train_prompts``) until ``prompts_per_step`` are kept or
    ``dynamic_sampling_max_rounds`` extra rounds ran, then top the batch up with dropped groups (their group
    advantage is zero) so that its shape never changes. ``first``: (prompts, rollout, scores, texts, scores by
    source) of the step's own prompts. Returns the same for the batch, and the logged counts; ``first`` as it
    is, and no counts, without ``--dynamic-sampling``."""
    cfg, g = task.config, task.config.num_generations
    if not cfg.dynamic_sampling:
        return (*first, {})
    t0 = time.perf_counter()
    need = len(first[0])
    kept: list[tuple] = []
    dropped: list[tuple] = []

    def split(prompts: list[dict], rollout: Rollout, scores: torch.Tensor, texts: list[str], by_source: dict) -> None:
        spread = group_reward_spread(shaped_scores(cfg, scores, rollout.ended, rollout.lengths), g)
        for i, prompt in enumerate(prompts):
            rows = slice(i * g, (i + 1) * g)
            group = (prompt, slice_rollout(rollout, rows.start, rows.stop), scores[rows], texts[rows],
                     {name: values[rows] for name, values in by_source.items()})
            (kept if bool(spread[i]) else dropped).append(group)

    split(*first)
    rounds = 0
    while rounds < cfg.dynamic_sampling_max_rounds:
        # every rank takes the same number of rounds: sampling and scoring may be collective (FSDP, ZeRO-3)
        if float(engine.sum_across_ranks(torch.tensor([float(len(kept) < need)]))[0]) == 0:
            break
        rounds += 1
        pool = task.train_prompts or first[0]
        pick = torch.Generator().manual_seed(step_seed(cfg.seed, step, 200 + rounds)
                                             + 104729 * engine.accelerator.process_index)
        prompts = [pool[i] for i in torch.randint(len(pool), (need,), generator=pick).tolist()]
        rollout = task.generate(engine, model, prompts, step_seed(cfg.seed, step, 100 + rounds))
        split(prompts, rollout, *task.score(prompts, rollout, where))
    groups = kept[:need] + dropped[:max(0, need - len(kept))]
    counts = engine.sum_across_ranks(torch.tensor([float(len(dropped)), float(min(len(kept), need)), float(need)]))
    metrics = {"dynamic_sampling_dropped": float(counts[0]), "dynamic_sampling_rounds": float(rounds),
               "dynamic_sampling_kept_share": float(counts[1] / counts[2]),
               "dynamic_sampling_time_s": time.perf_counter() - t0}
    return ([grp[0] for grp in groups], concat_rollouts([grp[1] for grp in groups]),
            torch.cat([grp[2] for grp in groups]), [t for grp in groups for t in grp[3]],
            {name: torch.cat([grp[4][name] for grp in groups]) for name in groups[0][4]}, metrics)
