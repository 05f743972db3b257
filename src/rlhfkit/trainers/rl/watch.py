"""The held-out watch: at every evaluation, sample on the held-out prompts and report reward, KL and length;
with ``--heldout-judge``, score the same responses with an independent judge, feed the reward-hacking
detector, and keep the policy with the best held-out score in OUTPUT_DIR/best_heldout."""

from __future__ import annotations

import logging
import math
import shutil
from typing import Any

import torch

from ...losses import kl_penalty
from ...rollout.logprob_check import response_mask
from .experience import split_rows
from .hacking import RewardHackingDetector

logger = logging.getLogger("rlhfkit")


class HeldoutWatch:
    """An independent judge's scores of the evaluation samples, the detector they feed, the best policy."""

    def __init__(self, judge: Any, detector: RewardHackingDetector):
        self.judge, self.detector = judge, detector

    def observe(self, task: Any, model: torch.nn.Module, metrics: dict[str, float]) -> None:
        """Feed the detector; keep the policy with the best held-out score (OUTPUT_DIR/best_heldout)."""
        engine, detector = task.engine, self.detector
        step = int(getattr(engine, "eval_step", 0) or 0)  # the step of this evaluation's metrics row
        was_fired = detector.fired
        detector.update(step, metrics["reward_mean"], metrics["heldout_reward"], metrics.get("heldout_reward_se"),
                        metrics.get("reward_se"))
        metrics["hacking_detected"] = float(detector.fired)
        if detector.fired and not was_fired:
            logger.warning("reward hacking suspected at step %d: %s; best held-out policy (step %s) is in %s",
                           step, detector.reason, detector.best_step, engine.output_dir / "best_heldout")
        if detector.best_step == step and engine.is_main:
            # written beside and renamed, so a crash never leaves a half-written best policy; a LoRA policy
            # saves its adapter (load it on top of --model)
            out, tmp = engine.output_dir / "best_heldout", engine.output_dir / ".best_heldout.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            engine.unwrap(model).policy.save_pretrained(tmp)
            task.tokenizer.save_pretrained(tmp)
            (tmp / "step.txt").write_text(f"{step}\n")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)

    def summary(self) -> dict[str, Any]:
        d = self.detector
        return {"fired": d.fired, "fired_step": d.fired_step, "reason": d.reason, "best_step": d.best_step,
                "best_heldout": d.best_heldout}


def evaluate_heldout(task: Any, model: torch.nn.Module) -> dict[str, float]:
    """Mean reward, KL and length of sampled responses on the held-out prompts (a fixed sampling seed)."""
    engine, cfg, watch = task.engine, task.config, task.heldout
    if not task.eval_prompts or engine is None:
        return {}
    totals: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        totals[name] = totals.get(name, 0.0) + value

    count = 0
    for start in range(0, len(task.eval_prompts), cfg.per_device_eval_batch_size):
        prompts = task.eval_prompts[start:start + cfg.per_device_eval_batch_size]
        generator = torch.Generator().manual_seed(cfg.seed + 104729 + start)
        unwrapped = engine.unwrap(model)
        with engine.full_parameters(model):
            task.sync_rollout_weights(unwrapped.policy)
            rollout = task.backend.generate(unwrapped.policy, [p["prompt_ids"] for p in prompts],
                                            cfg.eval_num_generations, task.sampling, generator)
        scores, _, by_source = task.score(prompts, rollout)
        for name, source_scores in by_source.items():  # eval_reward/<name> beside eval_reward_mean
            add(f"reward/{name}", float(source_scores.sum()))
        if watch is not None:
            held, _, _ = task.score(prompts, rollout, " (held-out judge)", source=watch.judge)
            add("heldout_reward", float(held.sum()))
            add("heldout_reward_sq", float(held.double().square().sum()))
        records = [{"prompt_ids": p, "response_ids": r} for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
        batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in task.collate(records).items()}
        width = max(rollout.lengths)
        ref = split_rows(task._reference_logps(unwrapped, batch).float().cpu(), rollout.lengths, width)
        own = rollout.logprobs[:, :width]
        k = len(rollout.lengths)
        add("reward_mean", float(scores.sum()))
        add("reward_sq", float(scores.double().square().sum()))
        add("kl", float((kl_penalty(own, ref, "k1") * response_mask(rollout.lengths, width)).sum()))
        add("response_length", float(sum(rollout.lengths)))
        add("no_eos_rate", float(k - sum(rollout.ended)))
        count += k
    metrics = {name: value / max(count, 1) for name, value in totals.items()}
    for name in ("reward", "heldout_reward"):  # standard errors of the means: the detector's noise floors
        if f"{name}_sq" in metrics:
            mean = metrics["reward_mean" if name == "reward" else name]
            variance = max(metrics.pop(f"{name}_sq") - mean ** 2, 0.0)
            metrics[f"{name}_se"] = math.sqrt(variance / max(count - 1, 1))
    if watch is not None:
        watch.observe(task, model, metrics)
    return metrics
