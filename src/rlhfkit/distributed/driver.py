"""The driver of a Ray run: the step loop that spreads one single-process PPO / GRPO / RLOO step over the
actor groups of :mod:`.cluster`, and the run around it (resume, checkpoints, metrics, the final save).

It reuses the engine's helpers, so a Ray run writes what a single-process run writes: the data order and
sampling seeds (:func:`~rlhfkit.engine.epoch_seed`, :func:`~rlhfkit.engine.step_seed`), metrics.jsonl rows,
checkpoint state, pruning and the resume hint of errors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..data import PROMPT_FORMATS, prepare_prompts
from ..engine import TrainingError, atomic_dir_write, atomic_write_text, epoch_seed, latest_checkpoint
from ..engine.checkpoint import prune_checkpoints, read_state, resume_checkpoint, resume_hint, write_state
from ..engine.metrics import append_row, restart_logs, task_postfix, write_summary
from ..engine.run_folder import begin_run, check_output_dir
from ..errors import ConfigError, RlhfkitError
from ..models import check_same_tokenizer, load_tokenizer
from ..rollout.generate import HFGenerationBackend, concat_rollouts, slice_rollout
from ..rollout.rewards import source_metrics
from ..trainers.common import prepare_datasets, require, trainer_name
from ..trainers.rl import RLConfig, RLTask, write_samples
from ..trainers.rl.run import check_reward_inputs
from .cluster import TRAINING_ROLES, RayCluster, WorkerFailure, import_ray, roles_of
from .options import RayOptions, check_ray_config

logger = logging.getLogger("rlhfkit")

_LOGS = ("metrics.jsonl", "samples.jsonl")  # the per-step logs of a run


# ----------------------------------------------------------------------------- how a step's work is split


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [lo, hi) slices of range(n) (the first n % parts one longer)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def step_prompts(prompts: Sequence[Any], step: int, n: int, seed: int, pad: bool,
                 cache: dict[int, list[int]]) -> list:
    """The ``n`` prompts of step ``step``: the single-process engine's order (a seeded permutation per
    epoch, ``Engine.records_for`` with one rank), wrapped around when ``pad`` so every rank gets a share."""
    per_epoch = max(math.ceil(len(prompts) / n), 1)
    epoch, pos = divmod(step, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = torch.randperm(len(prompts),
                                      generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()
    order = cache[epoch]
    chunk = order[pos * n:(pos + 1) * n]
    if pad and len(chunk) < n:
        chunk = chunk + order[:n - len(chunk)]
    return [prompts[i] for i in chunk]


# ----------------------------------------------------------------------------- the run


def _failure_message(failure: WorkerFailure, step: int, checkpoint: Path | None, saved: bool) -> str:
    """The one-line error of a failed run: which worker, what happened, in which phase, and the checkpoint."""
    who = f"Ray {failure.role} worker {failure.rank}"
    if failure.others:
        who += f" (its process also ran {', '.join(f'{role}[{rank}]' for role, rank in failure.others)})"
    if failure.kind == "died":
        what = f"{who} died during {failure.phase} at step {step + 1}"
    elif failure.kind == "timeout":
        what = f"{who} did not answer within {failure.waited:g}s during {failure.phase} at step {step + 1}"
    else:
        cause = str(failure.cause).strip().splitlines()
        what = f"{who} failed during {failure.phase} at step {step + 1}: {type(failure.cause).__name__}: " \
               f"{cause[-1] if cause else ''}"
    how = "saved now, at the last finished step:" if saved else "the last good checkpoint:"
    return what + resume_hint(checkpoint, how)


def run_ray_rl(config: RLConfig, on_sync: Callable[[int, RayCluster], None] | None = None) -> dict[str, Any]:
    """Train with PPO / GRPO / RLOO on Ray (see :mod:`rlhfkit.distributed`); returns the summary.

    ``config`` is an RL config with the Ray options: ``with_ray_options(PPOConfig)(...)`` (what ``rlhfkit ppo
    --ray`` builds). ``on_sync(step, cluster)`` runs after every weight sync (tests fetch and compare worker
    weights there).
    """
    if not (isinstance(config, RLConfig) and isinstance(config, RayOptions)):
        raise ConfigError(f"run_ray_rl needs an RL config with the Ray options (with_ray_options({type(config).__name__})"
                          "(...)), not a plain one")
    require(config, "model", "dataset", "output_dir")
    check_ray_config(config)
    if not (config.reward_model or config.reward_fn or config.reward_url):
        raise ConfigError("give a reward source: --reward-model, --reward-fn or --reward-url")
    if config.critic == "reward_model" and config.advantage == "gae" and not config.reward_model:
        raise ConfigError("--critic reward_model needs --reward-model (the value model starts from it)")
    check_output_dir(config)  # before Ray starts: refused, or --resume on a finished run
    ray = import_ray()
    out = Path(config.output_dir)
    begin_run(config, trainer_name(config))  # --overwrite clears the folder; config.yaml
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    if config.ref_model and config.ref_model != config.model:
        check_same_tokenizer(tokenizer, load_tokenizer(config.ref_model), config.model, config.ref_model)
    prepare = partial(prepare_prompts, max_prompt_length=config.max_prompt_length or config.max_length // 2)
    prompts, _, report = prepare_datasets(config, tokenizer, PROMPT_FORMATS, prepare)
    check_reward_inputs(config, prompts, [])  # weights and reward-function columns, before any actor starts
    # the driver's RLTask: the KL controller, reward statistics and experience() of the single-process step
    task = RLTask(config, tokenizer, False, None, None,
                  HFGenerationBackend(tokenizer, config.fast_decode, config.compile_decode), [])
    n_policy = config.ray_policy_workers
    per_step = config.prompts_per_step * n_policy
    total_steps = config.max_steps if config.max_steps > 0 else max(
        math.ceil(config.num_epochs * len(prompts) / per_step), 1)

    checkpoint = resume_checkpoint(out) if config.resume else None
    start_step = 0
    if checkpoint is not None:
        if not (checkpoint / "policy").is_dir():
            raise ConfigError(f"{checkpoint} was not written by a --ray run; resume it without --ray")
        start_step = int(read_state(checkpoint)["step"])
        state = json.loads((checkpoint / "driver_state.json").read_text())
        task.kl_controller.load_state_dict(state["kl_controller"])
        task.reward_stats.load_state_dict(state["reward_stats"])
        restart_logs([out / log for log in _LOGS], start_step)
        logger.info("resumed from %s (step %d of %d)", checkpoint, start_step, total_steps)
    else:
        restart_logs([out / log for log in _LOGS], None)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
    cluster = None
    try:
        cluster = RayCluster(config, ray)
        driver = _Driver(config, cluster, task, prompts, total_steps, out, tokenizer)
        summary = driver.run(start_step, checkpoint, on_sync)
    finally:
        if cluster is not None:
            cluster.shutdown()
        if started_ray:
            ray.shutdown()
    summary.update({"kl_coef_final": task.kl_controller.beta, "train_prompts": len(prompts),
                    "prompt_rows": report.total_rows, "algorithm": config.algorithm,
                    "ray": {"placement": config.ray_placement, "workers": roles_of(config)}})
    write_summary(out, summary)
    return summary


class _Driver:
    """The step loop of a Ray run (the driver side of ``Engine.run`` + ``run_rl``'s step function)."""

    def __init__(self, config: RLConfig, cluster: RayCluster, task: RLTask, prompts: list[dict], total_steps: int,
                 out: Path, tokenizer: Any):
        self.config, self.cluster, self.task, self.prompts = config, cluster, task, prompts
        self.total_steps, self.out, self.tokenizer = total_steps, out, tokenizer
        self.has_critic = "critic" in cluster.counts
        self.local: dict[int, int] = {}  # rollout rank -> the policy rank in its process
        self.remote: list[int] = []  # rollout ranks that get the weights by broadcast

    # -------------------------------------------------------------- set-up
    def _setup(self, checkpoint: Path | None) -> str:
        c = self.cluster
        infos = c.gather([c.submit_host(*roles[0], "info") for roles in c.host_roles], "start-up")
        atomic_write_text(self.out / "ray_workers.json", json.dumps(
            [{"role": role, "rank": rank, "pid": info["pid"], "ip": info["ip"]}
             for roles, info in zip(c.host_roles, infos) for role, rank in roles], indent=2))
        calls = []
        for role in TRAINING_ROLES:
            if role in c.counts:
                lead = infos[c.host_of[role, 0]]
                resume = str(checkpoint / role) if checkpoint is not None else None
                calls += c.submit(role, "setup", [(lead["ip"], lead["port"], c.counts[role], self.total_steps,
                                                   resume)] * c.counts[role])
        for role in ("reference", "reward", "rollout"):
            calls += c.submit(role, "setup")
        notes = c.gather(calls, "start-up")
        # a rollout worker in the process of a policy rank copies its weights there; the others get them by a
        # broadcast from policy rank 0 over a group of their own (rank 0 = policy rank 0)
        policy_hosts = {c.host_of["policy", r]: r for r in range(c.counts["policy"])}
        self.local = {r: policy_hosts[c.host_of["rollout", r]] for r in range(c.counts["rollout"])
                      if c.host_of["rollout", r] in policy_hosts}
        self.remote = [r for r in range(c.counts["rollout"]) if r not in self.local]
        if self.remote:
            lead = c.gather([c.submit_host("policy", 0, "info")], "start-up")[0]
            size = 1 + len(self.remote)
            specs = c.gather(c.submit("policy", "join_weight_group", [(lead["ip"], lead["port"], 0, size)], [0])
                             + c.submit("rollout", "join_weight_group",
                                        [(lead["ip"], lead["port"], 1 + i, size) for i in range(len(self.remote))],
                                        self.remote), "start-up (weight group)")
            for rank, spec in zip(self.remote, specs[1:]):
                if spec != specs[0]:
                    raise ConfigError(f"rollout worker {rank}'s model has other parameters than the policy's")
        return notes[0]

    def _sync(self, step: int, on_sync: Callable | None) -> float:
        """Policy weights into every rollout worker: local copies and one broadcast, at once."""
        c = self.cluster
        calls = [c.submit_host("rollout", r, "copy_policy", p, r) for r, p in self.local.items()]
        if self.remote:
            calls += c.submit("policy", "sync_weights", ranks=[0]) + c.submit("rollout", "sync_weights",
                                                                              ranks=self.remote)
        seconds = c.gather(calls, "weight sync")
        if self.config.ray_check_sync:
            digests = c.gather(c.submit("policy", "policy_digests", ranks=[0]) + c.submit("rollout", "policy_digests"),
                               "weight check")
            for rank, got in enumerate(digests[1:]):
                if got != digests[0]:
                    bad = sum(a != b for a, b in zip(got, digests[0]))
                    raise TrainingError(f"step {step + 1}: rollout worker {rank} has {bad} tensor(s) that differ "
                                        "from policy rank 0's after the weight sync")
        if on_sync is not None:
            on_sync(step, c)
        return max(seconds)

    # -------------------------------------------------------------- checkpoints
    def _save(self, done: int, driver_state: dict[str, Any]) -> Path:
        c = self.cluster

        def write(tmp: Path) -> None:
            calls = []
            for role in TRAINING_ROLES:
                if role in c.counts:
                    calls += c.submit(role, "save_state", [(str(tmp / role),)] * c.counts[role])
            c.gather(calls, "checkpoint")
            (tmp / "driver_state.json").write_text(json.dumps(driver_state))
            write_state(tmp, {"step": done, "total_steps": self.total_steps, "config": self.config.as_dict()})

        path = atomic_dir_write(self.out / f"checkpoint-{done}", write)
        prune_checkpoints(self.out, self.config.save_total_limit)
        return path

    def _driver_state(self) -> dict[str, Any]:
        return {"kl_controller": self.task.kl_controller.state_dict(),
                "reward_stats": self.task.reward_stats.state_dict()}

    # -------------------------------------------------------------- one step
    def _step(self, step: int, order: dict[int, list[int]], on_sync: Callable | None) -> tuple[dict[str, Any], int]:
        cfg, c, task = self.config, self.cluster, self.task
        self.phase_calls: list = []
        sync_s = self._sync(step, on_sync)

        n_policy = c.counts["policy"]
        chosen = step_prompts(self.prompts, step, cfg.prompts_per_step * n_policy, cfg.seed, n_policy > 1, order)
        bounds = shard_bounds(len(chosen), c.counts["rollout"])
        parts = c.call("rollout", "generate", [([p["prompt_ids"] for p in chosen[lo:hi]], step, shard)
                                               for shard, (lo, hi) in enumerate(bounds)], "rollout")
        rollout = concat_rollouts([r for r, _ in parts])
        rollout_time = max(t for _, t in parts)

        g = cfg.num_generations
        hint = f" (step {step + 1}{self.checkpoint_hint()})"
        bounds = shard_bounds(len(chosen), c.counts["reward"])
        rows = [{k: p[k] for k in ("prompt", "raw_prompt", "columns") if k in p} for p in chosen]  # for reward fns
        scored = c.call("reward", "score", [(rows[lo:hi], slice_rollout(rollout, lo * g, hi * g), hint)
                                            for lo, hi in bounds], "scoring")
        scores = torch.cat([s for s, _, _ in scored])
        texts = [t for _, part, _ in scored for t in part]
        source_scores = {name: torch.cat([by_source[name] for _, _, by_source in scored]) for name in scored[0][2]}
        raw, scores = task.shape_scores(scores, rollout.ended, lengths=rollout.lengths)

        records = [{"prompt_ids": p, "response_ids": r} for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
        ref_bounds = shard_bounds(len(records), c.counts["reference"])
        calls = c.submit("reference", "logps", [(records[lo:hi],) for lo, hi in ref_bounds])
        if self.has_critic:
            value_bounds = shard_bounds(len(records), c.counts["critic"])
            self.phase_calls = c.submit("critic", "values", [(records[lo:hi],) for lo, hi in value_bounds])
            calls = calls + self.phase_calls
        results = c.gather(calls, "reference and values")
        ref_flat = torch.cat(results[:len(ref_bounds)])
        value_flat = torch.cat(results[len(ref_bounds):]) if self.has_critic else None
        self.phase_calls = []
        exp = task.experience(chosen, rollout, texts, raw, scores, ref_flat, value_flat, rollout_time,
                              f"step {step + 1}", self.checkpoint_hint(), extra_metrics=source_metrics(source_scores))

        records, beta = exp.records, task.kl_controller.beta
        per_rank = cfg.prompts_per_step * g
        policy_calls = c.submit("policy", "update", [(records[r * per_rank:(r + 1) * per_rank], step, beta, None)
                                                     for r in range(n_policy)])
        critic_args = []
        if self.has_critic:
            critic_args = [(records[lo:hi], step, beta) for lo, hi in shard_bounds(len(records),
                                                                                   c.counts["critic"])]
        if self.has_critic and cfg.approx_kl_stop is None:  # both groups train at once
            rows = c.gather(policy_calls + c.submit("critic", "update", [a + (None,) for a in critic_args]), "update")
            policy_row, critic_row = rows[0], rows[n_policy]
        else:  # the critic runs as many epochs as the policy did before its approximate KL stopped it
            rows = c.gather(policy_calls, "update")
            policy_row, critic_row = rows[0], None
            if self.has_critic:
                epochs = int(policy_row["ppo_epochs_run"])
                critic_row = c.call("critic", "update", [a + (epochs,) for a in critic_args], "update")[0]
        task.kl_controller.update(float(exp.kl_seq.mean()), len(records))

        row = {**exp.metrics, **policy_row}
        if critic_row is not None:  # the single-process loss is policy + vf_coef · value, on one model
            row["loss"] = policy_row["loss"] + critic_row["loss"]
            row["value_loss"], row["value_clip_frac"] = critic_row["value_loss"], critic_row["value_clip_frac"]
            if "grad_norm" in critic_row:
                row["critic_grad_norm"] = critic_row["grad_norm"]
        row["weight_sync_s"] = sync_s
        if cfg.sample_steps > 0 and (step + 1) % cfg.sample_steps == 0 or step == 0:
            write_samples(_MainOnly(self.out), step + 1, exp.samples)
        return row, exp.tokens

    def checkpoint_hint(self) -> str:
        """The engine's resume hint (``Engine.checkpoint_hint``) for this run's output folder."""
        return resume_hint(latest_checkpoint(self.out))

    # -------------------------------------------------------------- the loop
    def run(self, start_step: int, checkpoint: Path | None, on_sync: Callable | None) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.config
        step, self.phase_calls = start_step, []
        state_before = self._driver_state()
        bar = None
        try:
            precision = self._setup(checkpoint)
            bar = tqdm(total=self.total_steps, initial=start_step, desc=f"{cfg.algorithm} (ray)",
                       dynamic_ncols=True, disable=not cfg.progress_bar)
            order: dict[int, list[int]] = {}
            last: dict[str, Any] = {}
            for step in range(start_step, self.total_steps):
                state_before = self._driver_state()  # what a checkpoint of the last finished step holds
                t0 = time.perf_counter()
                row, tokens = self._step(step, order, on_sync)
                done = step + 1
                bar.update(1)
                if done % max(cfg.logging_steps, 1) == 0 or done == self.total_steps:
                    elapsed = time.perf_counter() - t0
                    row = {"step": done, **row, "tokens_per_s": tokens / max(elapsed, 1e-9), "step_time_s": elapsed}
                    append_row(self.out / "metrics.jsonl", row)
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in task_postfix(RLTask, row)})
                    last.update(row)
                if cfg.save_steps > 0 and done % cfg.save_steps == 0 and done != self.total_steps:
                    self._save(done, self._driver_state())
            c = self.cluster
            c.gather([call for role in TRAINING_ROLES if role in c.counts for call in c.submit(role, "save_final")],
                     "final save")
        except WorkerFailure as failure:
            raise self._fail(failure, step, state_before) from failure.cause
        finally:
            if bar is not None:
                bar.close()
        self.tokenizer.save_pretrained(self.out)
        return {"task": cfg.algorithm, "steps": self.total_steps, "precision": precision,
                **{f"train_{k}": v for k, v in last.items() if k != "step"}}

    def _fail(self, failure: WorkerFailure, step: int, state_before: dict[str, Any]) -> RlhfkitError:
        """The error for a failed worker; first a checkpoint of the last finished step when the training
        groups are intact (an inference or rollout worker died outside the weight broadcast)."""
        if failure.kind == "error" and isinstance(failure.cause, RlhfkitError):
            return failure.cause  # e.g. a NaN reward: the worker's message already names the checkpoint
        saved = False
        checkpoint = latest_checkpoint(self.out)
        lost = [failure.role] + [role for role, _ in failure.others]
        if failure.kind == "died" and not set(lost) & set(TRAINING_ROLES) and \
                failure.phase in ("rollout", "scoring", "reference and values") and step > 0:
            if self.cluster.wait_idle(self.phase_calls):
                try:
                    checkpoint, saved = self._save(step, state_before), True
                except WorkerFailure:
                    logger.warning("could not save a checkpoint after the failure of %s[%d]", failure.role,
                                   failure.rank)
        return TrainingError(_failure_message(failure, step, checkpoint, saved))


class _MainOnly:
    """The two attributes ``write_samples`` reads from an engine: the driver writes, as rank 0 does."""

    is_main = True

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
