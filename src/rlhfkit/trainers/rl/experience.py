"""A rollout made into training data: per-token KL to the reference, rewards, advantages and returns.

PPO puts the score on the last response token and the KL penalty on every token, then runs GAE with the
critic's values (an environment's turn rewards on each turn's last token); GRPO / RLOO give every token of a
response its group-relative advantage. In a tool or environment episode (``rollout.policy_mask``) only the
policy's own tokens count: the forced turns' tokens get no KL, reward,
advantage or loss, and GAE runs over the policy tokens of a row as one sequence (:func:`rlhfkit.losses.gae`
skips the holes); group baselines stay per row (per episode). Per-sequence
tensors stay tensors (no tensor -> list -> tensor trip per minibatch): ``RLTask.collate`` concatenates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...engine import TrainingError
from ...losses import gae, kl_penalty, whiten
from ...rollout.generate import Rollout
from ...rollout.logprob_check import response_mask
from .config import RLConfig
from .env_rollouts import scores_at_tokens
from .variants import advantages as critic_free_advantages

# the per-token tensors of a record, flat in (sequence, position) order once collated
TOKEN_FIELDS = ("old_logps", "ref_logps", "advantages", "returns", "old_values",  # and, from .variants,
                "loss_keep", "is_weights",  # 0 on truncated responses (--mask-truncated) and tool tokens; TIS
                "policy_mask")  # tool episodes: 1 = the policy's token, 0 = forced (no rollout log-prob)


@dataclass
class Experience:
    """One rollout, ready for the update."""

    records: list[dict[str, Any]]  # per sequence: prompt_ids, response_ids and TOKEN_FIELDS (1-D float32)
    metrics: dict[str, float]      # the rollout's statistics, over every data-parallel rank
    samples: list[dict[str, Any]]  # a few decoded responses for samples.jsonl
    kl_seq: torch.Tensor           # KL per response, every rank's: what steers the adaptive β
    tokens: int                    # prompt + response tokens of this rank's rollout


def split_rows(flat: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Flat per-token values (sequence-major) -> [N, width] response-aligned, zero-padded."""
    out = flat.new_zeros((len(lengths), width))
    out[response_mask(lengths, width).bool()] = flat
    return out


def build_experience(config: RLConfig, beta: float, prompts: list[dict], rollout: Rollout, texts: list[str],
                     raw: torch.Tensor, scores: torch.Tensor, ref_flat: torch.Tensor, value_flat: torch.Tensor | None,
                     rollout_time: float, where: str, hint: str = "", *, old_logps: torch.Tensor | None = None,
                     extra_metrics: dict[str, float] | None = None, is_weights: torch.Tensor | None = None,
                     sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Experience:
    """Per-token KL, rewards, advantages (GAE with the critic's values, or a group baseline), whitening.

    ``ref_flat`` / ``value_flat`` are the reference log-probs / values of the response tokens, flat in
    (sequence, position) order; ``old_logps`` replaces the sampler's log-probs; ``is_weights`` [N, width]: TIS
    weights (.variants). With data-parallel ranks,
    ``sum_across`` (an all-reduce) whitens with the whole batch's statistics and ``gather`` makes the metrics
    and the KL that steers β those of every rank's rollouts.
    """
    cfg = config
    gather = gather or (lambda t: t)
    lengths = rollout.lengths
    width = max(lengths)
    mask = response_mask(lengths, width)
    policy_mask = None if rollout.policy_mask is None else rollout.policy_mask[:, :width].float() * mask
    mask = mask if policy_mask is None else policy_mask  # from here on "the response": the policy's own tokens
    if old_logps is None:
        old_logps = rollout.logprobs[:, :width]
    ended = torch.tensor(rollout.ended)
    ref_logps = split_rows(ref_flat, lengths, width)
    for name, tensor in (("policy", old_logps), ("reference", ref_logps)):
        if not torch.isfinite(tensor[mask.bool()]).all():
            raise TrainingError(f"{where}: non-finite {name} log-probs in the rollout{hint}")

    # 1. per-token KL to the reference, summed per response
    kl_tokens = kl_penalty(old_logps, ref_logps, cfg.kl_estimator) * mask
    kl_seq = kl_tokens.sum(-1)
    # 2. advantages: GAE over r_t = -β·KL_t (+ score at the last token), or a group baseline per response
    values = returns = None
    if cfg.advantage == "gae":
        rewards = -beta * kl_tokens if cfg.kl_mode == "reward" else torch.zeros_like(kl_tokens)
        rewards += scores_at_tokens(scores, mask, rollout.turn_rewards)  # env episodes: each turn's at its end
        values = split_rows(value_flat, lengths, width) if value_flat is not None else torch.zeros_like(rewards)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    else:  # a group baseline or REINFORCE++ (.variants)
        advantages = critic_free_advantages(cfg, beta, scores, kl_tokens, kl_seq, mask, sum_across, gather)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask, sum_across=sum_across)
    # 3. one record per sequence, its tensors cut to its length (cloned: a record travels alone, e.g. to Ray)
    per_token = {"old_logps": old_logps, "ref_logps": ref_logps, "advantages": advantages}
    if value_flat is not None and values is not None:
        per_token.update(old_values=values, returns=returns)
    keep = ended.float()[:, None].expand(-1, width) if cfg.mask_truncated else None  # DAPO
    if policy_mask is not None:  # forced tool tokens carry no loss (policy, KL in the loss, value)
        keep = policy_mask if keep is None else keep * policy_mask
        per_token["policy_mask"] = policy_mask
    per_token.update({"loss_keep": keep} if keep is not None else {},
                     **({"is_weights": is_weights} if is_weights is not None else {}))
    records = [{"prompt_ids": p, "response_ids": r,
                **{k: t[i, :lengths[i]].float().clone() for k, t in per_token.items()}}
               for i, (p, r) in enumerate(zip(rollout.prompt_ids, rollout.response_ids))]

    # 4. the logged statistics and the KL that steers β are over every rank's rollouts
    tokens = sum(lengths)
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
    if value_flat is not None and values is not None:
        valid = mask.bool()
        var_returns = returns[valid].var()
        metrics["explained_variance"] = float(1 - (returns[valid] - values[valid]).var() / var_returns) \
            if var_returns > 0 else 0.0
        metrics["value_mean"] = float(values[valid].mean())
    samples = [{"prompt": prompts[i // cfg.num_generations]["prompt"], "response": texts[i],
                "reward": float(raw[i]), "ended": rollout.ended[i]}
               for i in range(min(cfg.num_logged_samples, len(texts)))]
    return Experience(records, metrics, samples, kl_seq, tokens + sum(len(p) for p in rollout.prompt_ids))
