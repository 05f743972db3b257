"""PPO (and GRPO / RLOO) on Ray: every role in its own actor group, the single-process step spread out.

Roles and what runs in them (all the math is the single-process trainer's, ``trainers/rl.py``):
  policy    training group: N actors, each an :class:`~rlhfkit.engine.Engine` (accelerate) with
            torch.distributed env vars set, so data parallelism inside the group is the code path of
            ``accelerate launch``; each step it runs ``RLTask.update`` (clipped policy loss) on its share.
  critic    training group (PPO with GAE): a value model (from ``--reward-model`` with ``--critic
            reward_model``, else the policy checkpoint with a zeroed score head); values for the rollout,
            then ``RLTask.update`` with the clipped value loss.
  reference inference group: reference log-probs of the responses.
  reward    inference group: the reward source (model, function, HTTP, ensemble) of ``build_reward_source``.
  rollout   sampling workers: ``HFGenerationBackend`` over their copy of the policy, which policy rank 0
            refreshes before every rollout with a collective broadcast (gloo, or NCCL on GPUs) over a process
            group of {policy rank 0, rollout workers}: no state dict pickled through the object store.
The driver gathers the pieces and calls ``RLTask.shape_scores`` and ``RLTask.experience`` (missing-EOS
penalty, reward normalisation, per-token KL, GAE, whitening) and the adaptive KL controller, writes
metrics.jsonl / samples.jsonl with the single-process keys, and saves checkpoints (each training group's
accelerate state + the driver's KL controller and reward statistics) that ``--resume`` continues.

Every wait is bounded (``--ray-timeout-s`` on calls and collectives, ``--ray-startup-timeout-s`` on placement
and start-up): a worker that dies ends the run with a :class:`TrainingError` naming its role and the last
checkpoint; when its process held no training rank, the training groups are intact and a checkpoint of the
last finished step is saved first.

Placement: ``per_role`` gives every (role, rank) an actor and a bundle of its own; ``colocated`` runs rank i of
every role in actor i (one bundle: on GPUs, one device), where a rollout worker copies the weights of the
policy rank beside it instead of receiving the broadcast.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..data import PROMPT_FORMATS, prepare_prompts
from ..engine import (
    Engine,
    TrainingError,
    atomic_dir_write,
    atomic_write_text,
    latest_checkpoint,
    resolve_precision,
)
from ..engine.checkpoint import STATE_FILE, prune_checkpoints, read_state, truncate_jsonl
from ..errors import ConfigError, RlhfkitError
from ..models import check_same_tokenizer, load_causal_lm, load_reward_model, load_tokenizer
from ..models.forward import at_loss_positions, to_device
from ..rollout.generate import HFGenerationBackend, Rollout
from ..rollout.rewards import build_reward_source
from ..trainers.common import prepare_datasets, require, resolve_packing
from ..trainers.rl import ActorCritic, RLConfig, RLTask, _write_samples, rollout_seed

logger = logging.getLogger("rlhfkit")

PLACEMENTS = ("colocated", "per_role")
TRAINING_ROLES = ("policy", "critic")
_BUCKET_ELEMENTS = 1 << 26  # weights are broadcast in flat buffers of at most this many elements


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'rlhfkit[distributed]'") from None
    return ray


# ----------------------------------------------------------------------------- pure helpers


def check_ray_config(config: RLConfig) -> None:
    """One-line ConfigErrors for settings a Ray run cannot honour (checked before any actor starts)."""
    if config.ray_placement not in PLACEMENTS:
        raise ConfigError(f"--ray-placement must be one of {', '.join(PLACEMENTS)}, not '{config.ray_placement}'")
    for role in ("policy", "critic", "ref", "reward", "rollout"):
        if getattr(config, f"ray_{role}_workers") < 1:
            raise ConfigError(f"--ray-{role}-workers must be >= 1")
    if min(config.ray_cpus_per_worker, config.ray_timeout_s, config.ray_startup_timeout_s) <= 0:
        raise ConfigError("--ray-cpus-per-worker, --ray-timeout-s and --ray-startup-timeout-s must be > 0")
    unsupported = {"lora_r": "LoRA", "eval_dataset": "--eval-dataset", "heldout_judge": "--heldout-judge",
                   "report_to": "--report-to"}
    for name, what in unsupported.items():
        if getattr(config, name) and getattr(config, name) != "none":
            raise ConfigError(f"{what} is not supported with --ray yet (run without --ray, or evaluate the saved "
                              "policy with `rlhfkit eval`)")
    prompts = config.prompts_per_step * config.ray_policy_workers
    for role in ("rollout", "reward", "ref"):
        if getattr(config, f"ray_{role}_workers") > prompts:
            raise ConfigError(f"--ray-{role}-workers ({getattr(config, f'ray_{role}_workers')}) is more than the "
                              f"{prompts} prompts of a step: some workers would get nothing")
    if config.ray_placement == "colocated" and config.advantage == "gae" and \
            config.ray_critic_workers != config.ray_policy_workers:
        raise ConfigError("--ray-placement colocated runs policy rank i and critic rank i in one process (one "
                          "data-parallel group): --ray-critic-workers must equal --ray-policy-workers")
    sequences = prompts * config.num_generations
    if config.advantage == "gae" and sequences // config.ray_critic_workers < config.num_minibatches:
        raise ConfigError(f"--ray-critic-workers {config.ray_critic_workers}: each critic worker needs at least "
                          f"--num-minibatches ({config.num_minibatches}) of the {sequences} sequences of a step")


def roles_of(config: RLConfig) -> dict[str, int]:
    """Worker count of every role of this run (no critic group without GAE)."""
    counts = {"policy": config.ray_policy_workers, "critic": config.ray_critic_workers,
              "reference": config.ray_ref_workers, "reward": config.ray_reward_workers,
              "rollout": config.ray_rollout_workers}
    if config.advantage != "gae":
        del counts["critic"]
    return counts


def placement_plan(counts: dict[str, int], placement: str,
                   cpus: float, use_gpu: bool) -> tuple[list[list[dict[str, float]]], list[tuple[int, int, list]]]:
    """Placement groups (lists of bundles) and the actors: (group, bundle, [(role, rank), ...]) for each.

    colocated: one group of max(counts) bundles; actor i hosts rank i of every role (roles share the process,
    its CPUs and GPU, and a rollout worker copies its co-hosted policy rank's weights). per_role: one group per
    role, one actor per rank, each in a bundle of its own.
    """
    bundle = {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}
    if placement == "colocated":
        width = max(counts.values())
        hosts = [(0, i, [(role, i) for role, n in counts.items() if n > i]) for i in range(width)]
        return [[dict(bundle) for _ in range(width)]], hosts
    groups, hosts = [], []
    for role, n in counts.items():
        hosts += [(len(groups), rank, [(role, rank)]) for rank in range(n)]
        groups.append([dict(bundle) for _ in range(n)])
    return groups, hosts


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [lo, hi) slices of range(n) (the first n % parts one longer)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def step_prompts(prompts: Sequence[Any], step: int, n: int, seed: int, pad: bool,
                 cache: dict[int, list[int]]) -> list:
    """The ``n`` prompts of step ``step``: the single-process engine's order (a seeded permutation per
    epoch, ``Engine._records_for`` with one rank), wrapped around when ``pad`` so every rank gets a share."""
    per_epoch = max(math.ceil(len(prompts) / n), 1)
    epoch, pos = divmod(step, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = torch.randperm(len(prompts),
                                      generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    order = cache[epoch]
    chunk = order[pos * n:(pos + 1) * n]
    if pad and len(chunk) < n:
        chunk = chunk + order[:n - len(chunk)]
    return [prompts[i] for i in chunk]


def slice_rollout(rollout: Rollout, lo: int, hi: int) -> Rollout:
    """Rows [lo, hi) of a rollout."""
    return Rollout(rollout.prompt_ids[lo:hi], rollout.response_ids[lo:hi], rollout.ended[lo:hi],
                   rollout.logprobs[lo:hi], rollout.decode_steps)


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Rows of several rollouts in order (log-probs zero-padded to the widest)."""
    width = max(p.logprobs.shape[1] for p in parts)
    logprobs = torch.cat([torch.nn.functional.pad(p.logprobs, (0, width - p.logprobs.shape[1])) for p in parts])
    return Rollout([x for p in parts for x in p.prompt_ids], [x for p in parts for x in p.response_ids],
                   [x for p in parts for x in p.ended], logprobs, max(p.decode_steps for p in parts))


def param_digests(module: torch.nn.Module) -> list[str]:
    """SHA-256 of the bytes of every parameter, in ``named_parameters`` order (exact-equality check)."""
    return [hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for _, p in module.named_parameters()]


def _buckets(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one dtype and device, at most ``_BUCKET_ELEMENTS`` per bucket (or one)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if out and out[-1][0].dtype == p.dtype and out[-1][0].device == p.device \
                and size + p.numel() <= _BUCKET_ELEMENTS:
            out[-1].append(p)
            size += p.numel()
        else:
            out.append([p])
            size = p.numel()
    return out


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(kind, 0):g} {kind}s" for kind in ("CPU", "GPU"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _autocast(device: torch.device, precision: str):
    mixed, _ = resolve_precision(precision)
    if mixed == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mixed == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- the weight broadcast


class WeightGroup:
    """A process group of {policy rank 0 (rank 0), rollout workers (ranks 1..R)} for the weight broadcast.

    Built from its own TCPStore, apart from the default process group (which the policy group's DDP owns),
    with a timeout on every collective so a dead peer raises instead of hanging.
    """

    def __init__(self, address: str, port: int, rank: int, size: int, timeout_s: float, backend: str):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.size, self.timeout = rank, size, timeout
        self.store = dist.TCPStore(address, port, size, rank == 0, timeout=timeout)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(self.store, rank, size, options)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, size, timeout)

    def broadcast(self, params: list[torch.Tensor]) -> None:
        """Rank 0's ``params`` into everyone's, in place: one flat buffer per bucket, one collective each."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        options.timeout = self.timeout
        with torch.no_grad():
            for bucket in _buckets(params):
                if self.rank == 0:
                    flat = _flatten_dense_tensors([p.detach() for p in bucket])
                else:
                    flat = torch.empty(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
                self.group.broadcast([flat], options).wait(self.timeout)
                if self.rank != 0:
                    for p, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                        p.copy_(value)


# ----------------------------------------------------------------------------- actors


class _Worker:
    """What every role's actor has: its config, role and rank, a device and a tokenizer."""

    def __init__(self, config: RLConfig, role: str, rank: int):
        self.config, self.role, self.rank = config, role, rank
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role}[{rank}] %(levelname)s %(message)s")
        # Ray gives fractional-CPU actors one OpenMP thread; torch would otherwise take every core
        torch.set_num_threads(max(1, int(config.ray_cpus_per_worker)) if config.num_threads <= 0
                              else config.num_threads)
        use_gpu = config.ray_use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.weights: WeightGroup | None = None

    def info(self) -> dict[str, Any]:
        """Node address, a free port there (for groups this actor leads), pid."""
        import ray

        return {"ip": ray.util.get_node_ip_address(), "port": _free_port(), "pid": os.getpid()}

    def _task(self, packed: bool = False, ref_model: torch.nn.Module | None = None, reward: Any = None) -> RLTask:
        return RLTask(self.config, self.tokenizer, packed, ref_model, reward,
                      HFGenerationBackend(self.tokenizer, self.config.fast_decode, self.config.compile_decode), [])

    def _weights_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def join_weight_group(self, address: str, port: int, rank: int, size: int) -> list[tuple[str, list[int], str]]:
        """Join the weight-broadcast group; returns (name, shape, dtype) of the broadcast parameters."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.weights = WeightGroup(address, port, rank, size, self.config.ray_timeout_s, backend)
        return [(n, list(p.shape), str(p.dtype)) for n, p in self._weights_module().named_parameters()]

    def sync_weights(self) -> float:
        """Take part in the broadcast of the policy's parameters; returns the seconds it took."""
        t0 = time.perf_counter()
        self.weights.broadcast([p for _, p in self._weights_module().named_parameters()])
        return time.perf_counter() - t0

    def policy_digests(self) -> list[str]:
        return param_digests(self._weights_module())

    def policy_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the policy parameters (tests compare them across workers)."""
        return {n: p.detach().cpu().clone() for n, p in self._weights_module().named_parameters()}


class TrainWorker(_Worker):
    """One rank of the policy or critic training group: the shared Engine (accelerate) and RLTask.update."""

    def setup(self, address: str, port: int, world_size: int, total_steps: int, resume_from: str | None) -> str:
        import torch.distributed as dist

        cfg = self.config
        if world_size > 1 and dist.is_initialized():  # colocated: the policy rank in this process made it
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, world_size):
                raise ConfigError(f"{self.role} rank {self.rank} shares a process with rank {dist.get_rank()} of "
                                  f"another group of {dist.get_world_size()}: colocated groups must match")
        elif world_size > 1:
            # accelerate reads these, as under `accelerate launch`; the group is made here first so that its
            # collectives get --ray-timeout-s (accelerate keeps an initialised group)
            os.environ.update({"MASTER_ADDR": address, "MASTER_PORT": str(port), "RANK": str(self.rank),
                               "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
            if self.device.type == "cpu":  # what `accelerate launch --cpu` sets: gloo DDP on CPU processes
                os.environ["ACCELERATE_USE_CPU"] = "true"
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=cfg.ray_timeout_s))
        self.engine = engine = Engine(cfg)
        if engine.world_size != world_size:  # accelerate must see the whole group, or DDP is not in play
            raise TrainingError(f"{self.role} rank {self.rank}: accelerate sees {engine.world_size} processes, "
                                f"not the group's {world_size}")
        device = engine.device
        if self.role == "policy":
            policy = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code).to(device)
            model = ActorCritic(policy, None)
            packed = resolve_packing(cfg, policy)
        else:
            start = cfg.reward_model.split(",")[0] if cfg.critic == "reward_model" else cfg.model
            value_model = load_reward_model(start, trust_remote_code=cfg.trust_remote_code,
                                            pad_token_id=self.tokenizer.pad_token_id)
            if cfg.critic != "reward_model":  # a fresh head on the policy's weights: values start at 0
                head = getattr(value_model, "score", None) or value_model.classifier
                torch.nn.init.zeros_(head.weight)
                if getattr(head, "bias", None) is not None:
                    torch.nn.init.zeros_(head.bias)
            model = ActorCritic(None, "reward_model", value_model.to(device))
            packed = resolve_packing(cfg, value_model, reward=True)
        self.task = self._task(packed)
        self.task._engine = engine
        engine.prepare_training(model, total_steps)  # the driver owns the loop, the engine the optimizer step
        if resume_from:
            engine.accelerator.load_state(resume_from)
        return engine.precision_note

    @property
    def _unwrapped(self) -> ActorCritic:
        return self.engine.unwrap(self.engine.model)

    def _weights_module(self) -> torch.nn.Module:
        return self._unwrapped.policy

    def values(self, records: list[dict]) -> torch.Tensor:
        """Critic values of the response tokens, flat in (sequence, position) order (as ``rollout_step``)."""
        cfg, model = self.config, self._unwrapped
        out = []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(records), cfg.per_device_eval_batch_size):
                batch = to_device(self.task.collate(records[start:start + cfg.per_device_eval_batch_size]),
                                  self.engine.device)
                with self.engine.accelerator.autocast():
                    _, values = model(batch, with_logits=False)
                out.append(at_loss_positions(values, batch).float().cpu())
        model.train()
        return torch.cat(out)

    def update(self, records: list[dict], step: int, beta: float, epochs: int | None) -> dict[str, float]:
        """The PPO epochs of ``RLTask.update`` on this rank's share, then the once-per-step LR schedule."""
        self.engine.step = step
        self.task.kl_controller.beta = beta  # the driver owns the controller; --kl-mode loss reads β here
        row, _ = self.task.update(self.engine, records, step, epochs)
        row["learning_rate"] = self.engine.scheduler.get_last_lr()[0]
        self.engine.scheduler.step()
        return row

    def save_state(self, path: str) -> None:
        """Every rank calls this (accelerate writes the model/optimizer on rank 0, RNG states on each)."""
        self.engine.accelerator.save_state(path)

    def save_final(self) -> None:
        if self.role == "policy":
            self.engine.save_final(self._unwrapped.policy, self.tokenizer)
        elif self.rank == 0:
            self._unwrapped.value_model.save_pretrained(self.engine.output_dir / "critic")


class ReferenceWorker(_Worker):
    """Reference log-probs of the response tokens (the frozen starting policy, or --ref-model)."""

    def setup(self) -> None:
        cfg = self.config
        ref = load_causal_lm(cfg.ref_model or cfg.model, trust_remote_code=cfg.trust_remote_code)
        ref.to(self.device).eval().requires_grad_(False)
        self.task = self._task(resolve_packing(cfg, ref), ref_model=ref)

    def logps(self, records: list[dict]) -> torch.Tensor:
        cfg = self.config
        out = []
        for start in range(0, len(records), cfg.per_device_eval_batch_size):
            batch = to_device(self.task.collate(records[start:start + cfg.per_device_eval_batch_size]), self.device)
            with _autocast(self.device, cfg.precision):
                out.append(self.task._reference_logps(None, batch).float().cpu())
        return torch.cat(out)


class RewardWorker(_Worker):
    """The reward source of the single-process trainer, scoring a share of the rollout."""

    def setup(self) -> None:
        cfg = self.config
        reward = build_reward_source(
            [s for s in (cfg.reward_model or "").split(",") if s], [s for s in (cfg.reward_fn or "").split(",") if s],
            [s for s in (cfg.reward_url or "").split(",") if s], self.tokenizer, device=self.device,
            ensemble=cfg.reward_ensemble, std_coef=cfg.reward_std_coef, batch_size=cfg.reward_batch_size,
            trust_remote_code=cfg.trust_remote_code)
        self.task = self._task(reward=reward)

    def score(self, prompts: list[dict], rollout: Rollout, where: str) -> tuple[torch.Tensor, list[str]]:
        with _autocast(self.device, self.config.precision):
            return self.task.score(prompts, rollout, where)


class RolloutWorker(_Worker):
    """Samples responses with the shared decode loop from a copy of the policy refreshed by broadcast."""

    def setup(self) -> None:
        cfg = self.config
        self.model = load_causal_lm(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.model.to(self.device).eval().requires_grad_(False)
        self.task = self._task()

    def _weights_module(self) -> torch.nn.Module:
        return self.model

    def generate(self, prompt_ids: list[list[int]], step: int, shard: int) -> tuple[Rollout, float]:
        """Responses to ``prompt_ids`` (``--num-generations`` each) and the seconds it took. Shard 0's
        generator is the single-process trainer's, so one rollout worker samples what it would."""
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(rollout_seed(self.config.seed, step) + 104_729 * shard)
        with _autocast(self.device, self.config.precision):
            rollout = self.task.backend.generate(self.model, prompt_ids, self.config.num_generations,
                                                 self.task.sampling, generator)
        return rollout, time.perf_counter() - t0


_WORKER_CLASSES = {"policy": TrainWorker, "critic": TrainWorker, "reference": ReferenceWorker,
                   "reward": RewardWorker, "rollout": RolloutWorker}


class RoleHost:
    """One Ray actor (one process) hosting one or more role workers (several when colocated)."""

    def __init__(self, config: RLConfig, roles: list[tuple[str, int]]):
        self.workers = {(role, rank): _WORKER_CLASSES[role](config, role, rank) for role, rank in roles}

    def run(self, role: str, rank: int, method: str, *args: Any) -> Any:
        """``method(*args)`` of the hosted worker (role, rank)."""
        return getattr(self.workers[role, rank], method)(*args)

    def info(self) -> dict[str, Any]:
        return next(iter(self.workers.values())).info()

    def copy_policy(self, policy_rank: int, rollout_rank: int) -> float:
        """The weight sync of a rollout worker that shares this process with a policy rank: a local copy (every
        policy rank holds the same weights). Returns the seconds it took."""
        t0 = time.perf_counter()
        source = self.workers["policy", policy_rank]._weights_module()
        target = self.workers["rollout", rollout_rank]._weights_module()
        with torch.no_grad():
            for (name, a), (other, b) in zip(source.named_parameters(), target.named_parameters(), strict=True):
                if name != other or a.shape != b.shape:
                    raise TrainingError(f"rollout worker {rollout_rank}'s parameter {other} does not match the "
                                        f"policy's {name}")
                b.copy_(a)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the driver


class WorkerFailure(Exception):
    """A worker call failed: it died, hung past the timeout, or raised."""

    def __init__(self, kind: str, role: str, rank: int, phase: str, cause: BaseException | None = None,
                 others: Sequence[tuple[str, int]] = ()):
        super().__init__(f"{kind}: {role}[{rank}] in {phase}")
        self.kind, self.role, self.rank, self.phase, self.cause = kind, role, rank, phase, cause
        self.others = list(others)  # roles sharing its process (colocated): they died with it
        self.waited = 0.0  # seconds waited, for a timeout


class RayCluster:
    """The actors of one run: placement groups, the hosts of every (role, rank), bounded waits, teardown."""

    def __init__(self, config: RLConfig, ray: Any):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config, self.ray = config, ray
        self.timeout = config.ray_timeout_s
        self.counts = roles_of(config)
        groups, plan = placement_plan(self.counts, config.ray_placement, config.ray_cpus_per_worker,
                                      config.ray_use_gpu)
        self.hosts: list[Any] = []
        self.host_roles = [roles for _, _, roles in plan]
        self.host_of = {key: i for i, roles in enumerate(self.host_roles) for key in roles}
        self.placement_groups = [placement_group(bundles, strategy="PACK") for bundles in groups]
        ready = [pg.ready() for pg in self.placement_groups]
        if len(ray.wait(ready, num_returns=len(ready), timeout=config.ray_startup_timeout_s)[0]) < len(ready):
            need = sum(b.get("CPU", 0) for g in groups for b in g)
            self.shutdown()
            raise ConfigError(f"Ray could not place the workers within {config.ray_startup_timeout_s:g}s: they "
                              f"need {need:g} CPUs"
                              f"{' and GPUs' if config.ray_use_gpu else ''} in {config.ray_placement} bundles, the "
                              f"cluster has {_resources(ray.cluster_resources())} ({_resources(ray.available_resources())}"
                              " free); lower --ray-cpus-per-worker or the --ray-*-workers counts")
        remote = ray.remote(max_restarts=0)(RoleHost)
        for group, bundle, roles in plan:
            strategy = PlacementGroupSchedulingStrategy(self.placement_groups[group],
                                                        placement_group_bundle_index=bundle)
            self.hosts.append(remote.options(num_cpus=groups[group][bundle]["CPU"],
                                             num_gpus=groups[group][bundle].get("GPU", 0),
                                             scheduling_strategy=strategy).remote(config, roles))

    def call(self, role: str, method: str, args_per_rank: Sequence[tuple] | None = None, phase: str = "",
             ranks: Sequence[int] | None = None) -> list:
        """Call ``method`` on ranks of ``role`` (all by default) and wait for every answer (bounded)."""
        return self.gather(self.submit(role, method, args_per_rank, ranks), phase or method)

    def submit(self, role: str, method: str, args_per_rank: Sequence[tuple] | None = None,
               ranks: Sequence[int] | None = None) -> list[tuple[Any, str, int]]:
        """Start ``method`` on ranks of ``role``; an actor runs its calls in the order they were submitted."""
        ranks = list(range(self.counts[role])) if ranks is None else list(ranks)
        args_per_rank = args_per_rank or [()] * len(ranks)
        return [(self.hosts[self.host_of[role, rank]].run.remote(role, rank, method, *args), role, rank)
                for rank, args in zip(ranks, args_per_rank)]

    def submit_host(self, role: str, rank: int, method: str, *args: Any) -> tuple[Any, str, int]:
        """Start a RoleHost method on the actor of (role, rank)."""
        return getattr(self.hosts[self.host_of[role, rank]], method).remote(*args), role, rank

    def gather(self, calls: Sequence[tuple[Any, str, int]], phase: str) -> list:
        """Results of ``calls`` in order; the first death, error or the timeout raises WorkerFailure."""
        ray = self.ray
        pending = {ref: (role, rank) for ref, role, rank in calls}
        results: dict[Any, Any] = {}
        timeout = self.config.ray_startup_timeout_s if phase.startswith("start-up") else self.timeout
        deadline = time.monotonic() + timeout
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                role, rank = next(iter(pending.values()))
                failure = WorkerFailure("timeout", role, rank, phase, others=self.co_hosted(role, rank))
                failure.waited = timeout
                raise failure
            for ref in ready:
                role, rank = pending.pop(ref)
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the method raised: keep its error
                    raise WorkerFailure("error", role, rank, phase, exc.cause or exc,
                                        self.co_hosted(role, rank)) from None
                except ray.exceptions.RayError as exc:  # the actor process is gone
                    raise WorkerFailure("died", role, rank, phase, exc, self.co_hosted(role, rank)) from None
        return [results[ref] for ref, _, _ in calls]

    def co_hosted(self, role: str, rank: int) -> list[tuple[str, int]]:
        """The other (role, rank) in the process of (role, rank)."""
        return [key for key in self.host_roles[self.host_of[role, rank]] if key != (role, rank)]

    def wait_idle(self, calls: Sequence[tuple[Any, str, int]]) -> bool:
        """Wait (bounded) for calls still running; True when all finished without error."""
        try:
            self.gather(calls, "draining")
            return True
        except WorkerFailure:
            return False

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for host in self.hosts:
            with contextlib.suppress(Exception):
                self.ray.kill(host, no_restart=True)
        for pg in self.placement_groups:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)


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
    if checkpoint is None:
        return f"{what}; no checkpoint was saved yet (use --save-steps)"
    how = "saved now, at the last finished step" if saved else "the last good checkpoint"
    return f"{what}; {how}: {checkpoint} (fix the cause, then rerun with --resume)"


def run_ray_rl(config: RLConfig, on_sync: Callable[[int, RayCluster], None] | None = None) -> dict[str, Any]:
    """Train with PPO / GRPO / RLOO on Ray (see the module docstring); returns the summary.

    ``on_sync(step, cluster)`` runs after every weight sync (tests fetch and compare worker weights there).
    """
    require(config, "model", "dataset", "output_dir")
    check_ray_config(config)
    if not (config.reward_model or config.reward_fn or config.reward_url):
        raise ConfigError("give a reward source: --reward-model, --reward-fn or --reward-url")
    if config.critic == "reward_model" and config.advantage == "gae" and not config.reward_model:
        raise ConfigError("--critic reward_model needs --reward-model (the value model starts from it)")
    ray = _import_ray()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    if config.ref_model and config.ref_model != config.model:
        check_same_tokenizer(tokenizer, load_tokenizer(config.ref_model), config.model, config.ref_model)
    prepare = partial(prepare_prompts, max_prompt_length=config.max_prompt_length or config.max_length // 2)
    prompts, _, report = prepare_datasets(config, tokenizer, PROMPT_FORMATS, prepare)
    # the driver's RLTask: the KL controller, reward statistics and experience() of the single-process step
    task = RLTask(config, tokenizer, False, None, None, HFGenerationBackend(tokenizer, config.fast_decode, config.compile_decode), [])
    n_policy = config.ray_policy_workers
    per_step = config.prompts_per_step * n_policy
    total_steps = config.max_steps if config.max_steps > 0 else max(
        math.ceil(config.num_epochs * len(prompts) / per_step), 1)

    checkpoint = latest_checkpoint(out) if config.resume else None
    start_step = 0
    if config.resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", out)
    if checkpoint is not None:
        if not (checkpoint / "policy").is_dir():
            raise ConfigError(f"{checkpoint} was not written by a --ray run; resume it without --ray")
        start_step = int(read_state(checkpoint)["step"])
        state = json.loads((checkpoint / "driver_state.json").read_text())
        task.kl_controller.load_state_dict(state["kl_controller"])
        task.reward_stats.load_state_dict(state["reward_stats"])
        for log in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(out / log, start_step)
        logger.info("resumed from %s (step %d of %d)", checkpoint, start_step, total_steps)
    else:
        for log in ("metrics.jsonl", "samples.jsonl"):
            (out / log).unlink(missing_ok=True)

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
    summary.update({"train_prompts": len(prompts), "prompt_rows": report.total_rows, "algorithm": config.algorithm,
                    "ray": {"placement": config.ray_placement, "workers": roles_of(config)}})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
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
            (tmp / STATE_FILE).write_text(json.dumps({"step": done, "total_steps": self.total_steps,
                                                      "config": self.config.as_dict()}, default=str))

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
        hint = f" (step {step + 1}{self._hint()})"
        bounds = shard_bounds(len(chosen), c.counts["reward"])
        scored = c.call("reward", "score", [([{"prompt": p["prompt"]} for p in chosen[lo:hi]],
                                             slice_rollout(rollout, lo * g, hi * g), hint) for lo, hi in bounds],
                        "scoring")
        scores = torch.cat([s for s, _ in scored])
        texts = [t for _, part in scored for t in part]
        raw, scores = task.shape_scores(scores, rollout.ended)

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
                              f"step {step + 1}", self._hint())

        records, beta = exp["records"], task.kl_controller.beta
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
        task.kl_controller.update(float(exp["kl_seq"].mean()), len(records))

        row = {**exp["metrics"], **policy_row}
        if critic_row is not None:  # the single-process loss is policy + vf_coef · value, on one model
            row["loss"] = policy_row["loss"] + critic_row["loss"]
            row["value_loss"], row["value_clip_frac"] = critic_row["value_loss"], critic_row["value_clip_frac"]
            if "grad_norm" in critic_row:
                row["critic_grad_norm"] = critic_row["grad_norm"]
        row["weight_sync_s"] = sync_s
        if cfg.sample_steps > 0 and (step + 1) % cfg.sample_steps == 0 or step == 0:
            _write_samples(_MainOnly(self.out), step + 1, exp["samples"])
        return row, exp["tokens"]

    def _hint(self) -> str:
        last = latest_checkpoint(self.out)
        if last is None:
            return "; no checkpoint was saved yet (use --save-steps)"
        return f"; the last good checkpoint is {last} (fix the cause, then rerun with --resume)"

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
                    with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in task_keys(row)})
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


def task_keys(row: dict[str, Any]) -> list[str]:
    """The progress-bar keys of the single-process RL trainer."""
    return [k for k in RLTask.progress_keys + ("tokens_per_s",) if isinstance(row.get(k), int | float)]


class _MainOnly:
    """The two attributes ``_write_samples`` reads from an engine: the driver writes, as rank 0 does."""

    is_main = True

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
