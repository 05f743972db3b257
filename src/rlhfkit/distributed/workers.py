"""The actors' side of a Ray run: one worker class per role (policy / critic training ranks on the shared
:class:`~rlhfkit.engine.Engine`, reference and reward inference, rollout sampling), and the process group
over which policy rank 0 broadcasts its weights into the rollout workers.

All the math is the single-process trainer's (:class:`~rlhfkit.trainers.rl.RLTask`); a worker runs its part.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import socket
import time
from typing import Any

import torch

from ..engine import Engine, TrainingError, resolve_precision, step_seed
from ..errors import ConfigError
from ..models import load_causal_lm, load_reward_model, load_tokenizer
from ..models.dropout import apply_dropout_setting
from ..models.forward import at_loss_positions, to_device
from ..rollout.generate import HFGenerationBackend, Rollout
from ..rollout.rewards import build_reward_source, parse_reward_weights
from ..trainers.common import resolve_packing
from ..trainers.rl import ActorCritic, RLConfig, RLTask

_BUCKET_ELEMENTS = 1 << 26  # weights are broadcast in flat buffers of at most this many elements


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _autocast(device: torch.device, precision: str):
    mixed, _ = resolve_precision(precision, force=True)  # the worker's Engine already applied the check
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
            apply_dropout_setting(policy, cfg.keep_dropout, "policy")
            model = ActorCritic(policy, None)
            packed = resolve_packing(cfg, policy)
        else:
            start = cfg.reward_model.split(",")[0] if cfg.critic == "reward_model" else cfg.model
            value_model = load_reward_model(start, trust_remote_code=cfg.trust_remote_code,
                                            pad_token_id=self.tokenizer.pad_token_id)
            apply_dropout_setting(value_model, cfg.keep_dropout, "value model")
            if cfg.critic != "reward_model":  # a fresh head on the policy's weights: values start at 0
                head = getattr(value_model, "score", None) or value_model.classifier
                torch.nn.init.zeros_(head.weight)
                if getattr(head, "bias", None) is not None:
                    torch.nn.init.zeros_(head.bias)
            model = ActorCritic(None, "reward_model", value_model.to(device))
            packed = resolve_packing(cfg, value_model, reward=True)
        self.task = self._task(packed)
        self.task.engine = engine
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
            trust_remote_code=cfg.trust_remote_code, weights=parse_reward_weights(cfg.reward_weights))
        self.task = self._task(reward=reward)

    def score(self, prompts: list[dict], rollout: Rollout,
              where: str) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
        """Scores of a share of the rollout, its texts, and each source's scores (``reward/<name>``).
        ``prompts`` are the share's prompt records (prompt, raw_prompt, columns) for reward functions."""
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
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, step, 1) + 104_729 * shard)
        with _autocast(self.device, self.config.precision):
            rollout = self.task.backend.generate(self.model, prompt_ids, self.config.num_generations,
                                                 self.task.sampling, generator)
        return rollout, time.perf_counter() - t0


WORKER_CLASSES = {"policy": TrainWorker, "critic": TrainWorker, "reference": ReferenceWorker,
                   "reward": RewardWorker, "rollout": RolloutWorker}
