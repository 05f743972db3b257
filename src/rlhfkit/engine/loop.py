"""The one training loop every trainer shares.

A trainer supplies a :class:`Task` (how to collate records, how many loss items a batch holds, the loss sum
of a batch, and an evaluation); the :class:`Engine` owns everything else: data order, gradient
accumulation with exact normalisation, clipping, the LR schedule, precision, seeding, metrics, progress,
crash-safe checkpoints and resume.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import ConfigError, RlhfkitError
from .checkpoint import (
    STATE_FILE,
    atomic_write_text,
    commit_dir,
    fresh_staging_dir,
    fsync_tree,
    latest_checkpoint,
    prune_checkpoints,
    read_state,
    staging_dir,
    truncate_jsonl,
)
from .config import TrainConfig

logger = logging.getLogger("rlhfkit")

MetricSums = dict[str, tuple[float, float]]  # name -> (sum, count), averaged over a whole optimizer step


class TrainingError(RlhfkitError):
    """Training cannot go on (e.g. a non-finite loss); the message names the last good checkpoint."""


@dataclass
class StepResult:
    """What one optimizer update measured: the loss and metric sums over all its micro-batches."""

    total_weight: float
    loss_sum: float = 0.0
    tokens: int = 0
    grad_norm: float | None = None
    sums: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, float]:
        """Step averages: the loss over the step's weight, every metric over its own count."""
        out = {"loss": self.loss_sum / self.total_weight}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out.update({name: s / max(c, 1e-12) for name, (s, c) in self.sums.items()})
        return out


def task_postfix(task: Any, row: dict[str, Any]) -> list[str]:
    """Keys shown on the progress bar: the task's choice (``progress_keys``) or the loss."""
    keys = getattr(task, "progress_keys", ("loss",)) + ("tokens_per_s",)
    return [k for k in keys if isinstance(row.get(k), int | float)]


class Task(Protocol):
    """What a trainer hands the engine."""

    name: str

    def collate(self, records: Sequence[Any]) -> dict[str, Any]:
        """Turn records into a model-ready batch (must include ``num_tokens``: useful, non-pad tokens)."""

    def batch_weight(self, batch: dict[str, Any]) -> float:
        """How many loss items (tokens, pairs, groups) the batch's loss sum is summed over."""

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        """Return the *sum* of the per-item losses and metric sums; the engine divides by the step total."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (keys without the ``eval_`` prefix); {} when there is no eval data."""


_TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def resolve_precision(requested: str) -> tuple[str, str]:
    """Map ``--precision`` to accelerate's mixed_precision value, with the reason for the log line."""
    requested = requested.lower()
    aliases = {"fp32": "no", "float32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}
    if requested == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "auto: GPU with bf16 support"
        return "no", "auto: no GPU with bf16; bf16 on a CPU without bf16 units is many times slower"
    if requested not in aliases:
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, not '{requested}'")
    if aliases[requested] == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return aliases[requested], "as requested"


def distributed_on_cpu() -> bool:
    """Launched with several processes (torchrun, accelerate launch) on a machine with no GPU: accelerate
    only sets up the gloo process group when told ``cpu=True``; otherwise every process would train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


def _cpu_process_group() -> None:
    """Set up accelerate's process state for a multi-process run on CPU (gloo).

    accelerate only builds the gloo group when told ``cpu=True``, and then files the run as MULTI_CPU,
    which turns FSDP off. Under an FSDP launch the state is re-filed as a multi-device run, so that
    accelerate's own FSDP2 path (``fully_shard`` on a CPU mesh) runs: the same code as on GPUs.
    DeepSpeed (``DS_ACCELERATOR=cpu``) builds the group itself once it is told the backend (gloo).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        PartialState(backend="gloo")
        return
    state = PartialState(cpu=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        state.distributed_type = DistributedType.MULTI_GPU


def shutdown_distributed() -> None:
    """End a multi-process run together: wait for every rank, then tear the process group down.

    A rank that leaves while another is still writing the checkpoint, with the gloo group alive, can
    abort at interpreter exit ("terminate called without an active exception"): the launcher then
    reports the whole run as failed although its work was done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _trackers(report_to: str) -> list[str]:
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in _TRACKER_MODULES:
            raise ConfigError(f"--report-to: unknown tracker '{name}' (choose from tensorboard, wandb, mlflow)")
        if not any(importlib.util.find_spec(m) for m in _TRACKER_MODULES[name]):
            raise ConfigError(f"--report-to {name}: the '{name}' package is not installed (pip install {name})")
    return names


class Engine:
    """Runs a :class:`Task` under accelerate. Create one per training run."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if not config.output_dir:
            raise ConfigError("--output-dir is required")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        mixed_precision, why = resolve_precision(config.precision)
        self.trackers = _trackers(config.report_to)
        self._unwrapped: tuple[torch.nn.Module, torch.nn.Module] | None = None
        if distributed_on_cpu():
            _cpu_process_group()
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            log_with=self.trackers or None,
            project_dir=str(self.output_dir),
        )
        self.precision_note = f"precision: {'fp32' if mixed_precision == 'no' else mixed_precision} ({why})"
        if self.is_main:
            logger.info(self.precision_note)
            if self.world_size > 1:
                state = self.accelerator.state
                logger.info("distributed: %s over %d processes (%s backend)", state.distributed_type.value,
                            self.world_size, state.backend)
        set_seed(config.seed)
        self._stop_signal: int | None = None
        self.step = 0  # the step being run (0-based), for messages

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def _micro_batches_per_epoch(self, n_records: int, batch_size: int | None = None) -> int:
        global_batch = (batch_size or self.config.per_device_batch_size) * self.world_size
        return max(math.ceil(n_records / global_batch), 1)

    def total_steps(self, n_records: int) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        micro = self._micro_batches_per_epoch(n_records)
        return max(math.ceil(self.config.num_epochs * micro / self.config.gradient_accumulation_steps), 1)

    def _records_for(self, records: Sequence[Any], micro_index: int, cache: dict[int, list[int]],
                     batch_size: int | None = None) -> list:
        """Records of one micro-batch for this rank; the order is a pure function of (seed, epoch)."""
        b, w = batch_size or self.config.per_device_batch_size, self.world_size
        per_epoch = self._micro_batches_per_epoch(len(records), b)
        epoch, pos = divmod(micro_index, per_epoch)
        if epoch not in cache:
            cache.clear()
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(len(records), generator=gen).tolist()
        order = cache[epoch]
        chunk = order[pos * b * w:(pos + 1) * b * w]
        if len(chunk) < b * w and w > 1:  # every rank needs a slice: wrap around, as DistributedSampler pads
            chunk = chunk + order[: b * w - len(chunk)]
        return [records[i] for i in chunk[self.accelerator.process_index::w]]

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        cfg = self.config
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
            # one fused kernel per step instead of a loop over tensors (~3x faster step on CPU)
            fused=all(p.dtype.is_floating_point for p in decay + no_decay),
        )

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """The LR schedule, on the *prepared* optimizer: DeepSpeed regroups the parameters it partitions,
        so a schedule built before ``prepare`` would set the rates of groups that no longer exist."""
        from transformers import get_scheduler

        cfg = self.config
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_steps)
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps)

    # ------------------------------------------------------------------ metrics
    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (rank 0 only) and to any trackers."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        if self.trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
            self.accelerator.log(numeric, step=int(row["step"]))

    def _truncate_log(self, path: Path, step: int) -> None:
        if self.is_main:
            truncate_jsonl(path, step)

    # ------------------------------------------------------------------ checkpoints
    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: parameters and optimizer state are split over ranks, so saving is collective."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save_checkpoint(self, step: int, total_steps: int) -> Path:
        """Every rank writes its part (model/optimizer shards, its RNG state) into one staging folder; rank 0
        adds the run state and renames the folder into place, so ``checkpoint-N`` is always complete."""
        path = self.output_dir / f"checkpoint-{step}"
        tmp = staging_dir(path)
        if self.is_main:
            fresh_staging_dir(path)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "total_steps": total_steps,
                                                      "world_size": self.world_size,
                                                      "config": self.config.as_dict()}, default=str))
            commit_dir(tmp, path)
            prune_checkpoints(self.output_dir, self.config.save_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def save_final(self, model: torch.nn.Module, tokenizer: Any, extra_files: dict[str, str] | None = None,
                   submodule: str | None = None) -> None:
        """Save a model ``from_pretrained`` loads with no rlhfkit import (LoRA merged) into output_dir.

        ``model`` is the trained (possibly wrapped) model; ``submodule`` names the part to save (e.g. the
        policy of an actor-critic). Under FSDP / DeepSpeed ZeRO-3 the full weights are gathered first: a
        collective, so every rank calls this.
        """
        self.accelerator.wait_for_everyone()
        state_dict = None
        if self.sharded:
            state_dict = self.accelerator.get_state_dict(model)  # (ZeRO-3: None on ranks other than 0)
            if submodule and state_dict is not None:
                state_dict = {k[len(submodule) + 1:]: v for k, v in state_dict.items()
                              if k.startswith(submodule + ".")}
        if not self.is_main:
            return
        unwrapped = self.accelerator.unwrap_model(model)
        if submodule:
            unwrapped = getattr(unwrapped, submodule)
        if hasattr(unwrapped, "merge_and_unload"):  # peft: ship the merged weights, keep the adapter too
            unwrapped.save_pretrained(self.output_dir / "adapter", state_dict=state_dict)
            if state_dict is not None:  # the sharded model cannot merge in place: merge into a fresh base
                from peft import PeftModel

                from ..models.loading import load_causal_lm

                base = load_causal_lm(unwrapped.peft_config["default"].base_model_name_or_path)
                unwrapped, state_dict = PeftModel.from_pretrained(base, self.output_dir / "adapter"), None
            unwrapped = unwrapped.merge_and_unload()

        # Saved into a temporary folder, made durable, then each file renamed into output_dir: a crash
        # never leaves a half-written weights file where from_pretrained would find it.
        staging = self.output_dir / ".final.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        unwrapped.save_pretrained(staging, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        fsync_tree(staging)
        for item in staging.iterdir():
            os.replace(item, self.output_dir / item.name)
        staging.rmdir()

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self) -> dict:
        def handler(signum, _frame):
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                previous[sig] = signal.signal(sig, handler)
        return previous

    def evaluate(self, task: Task, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            metrics = task.evaluate(model)
        model.train()
        return {f"eval_{k}": float(v) for k, v in metrics.items()}

    def train(self, task: Task, model: torch.nn.Module, records: Sequence[Any]) -> dict[str, Any]:
        """Train ``model`` on ``records`` (offline data); returns the summary (final train and eval metrics)."""
        if not records:
            raise ConfigError("no training records")
        accum = max(self.config.gradient_accumulation_steps, 1)
        per_epoch = self._micro_batches_per_epoch(len(records))
        order_cache: dict[int, list[int]] = {}

        def step_fn(step: int) -> tuple[dict[str, Any], int]:
            batches = [task.collate(self._records_for(records, step * accum + i, order_cache))
                       for i in range(accum)]
            result = self.optimizer_step(task, batches)
            row = {"epoch": round((step + 1) * accum / per_epoch, 4), **result.row()}
            return row, result.tokens

        return self.run(task, model, self.total_steps(len(records)), step_fn)

    def optimizer_step(self, task: Task, batches: Sequence[dict[str, Any]]) -> StepResult:
        """One optimizer update over ``batches`` (micro-batches), normalised by their total weight.

        The loss of every micro-batch is a *sum*; dividing all of them by the weight of the whole step (on
        every rank) makes accumulation and data parallelism equal one large batch exactly. A non-finite loss
        stops the run before the update touches the weights.
        """
        model, optimizer = self.model, self.optimizer
        deepspeed = self.accelerator.state.deepspeed_plugin is not None
        batches = [self._to_device(b) for b in batches]
        local_weight = sum(float(task.batch_weight(b)) for b in batches)
        total_weight = float(self.accelerator.reduce(torch.tensor(local_weight, device=self.device),
                                                     reduction="sum"))
        total_weight = max(total_weight, 1e-12)
        result = StepResult(total_weight=total_weight)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            if deepspeed:  # DeepSpeed reduces and steps inside backward at the boundary we mark here
                self.accelerator.gradient_state._set_sync_gradients(sync)
            ctx = contextlib.nullcontext() if sync or deepspeed else self.accelerator.no_sync(model)
            with ctx:
                with self.accelerator.autocast():
                    loss_sum, metric_sums = task.compute_loss(model, batch)
                loss_value = float(loss_sum.detach())
                if not math.isfinite(loss_value):
                    raise TrainingError(f"{task.name}: the loss became {loss_value} at step {self.step + 1}"
                                        f"{self._checkpoint_hint()}")
                # DDP averages gradients over ranks, so scale by world size to get the global mean.
                # (DeepSpeed would also divide by its accumulation count: the step weight already did that.)
                self.accelerator.backward(loss_sum * (self.world_size / total_weight),
                                          **({"scale_wrt_gas": False} if deepspeed else {}))
            result.loss_sum += loss_value
            result.tokens += int(batch["num_tokens"])
            for name, (value, count) in metric_sums.items():
                acc = result.sums.setdefault(name, [0.0, 0.0])
                acc[0] += float(value)
                acc[1] += float(count)
        if self.config.max_grad_norm > 0:
            norm = float(self.accelerator.clip_grad_norm_(model.parameters(), self.config.max_grad_norm))
            if not math.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingError(f"{task.name}: the gradient norm became {norm} at step {self.step + 1}"
                                    f"{self._checkpoint_hint()}")
            result.grad_norm = norm
        optimizer.step()  # (a no-op under DeepSpeed: the engine stepped in backward)
        optimizer.zero_grad(set_to_none=True)
        if self.world_size > 1:  # one all-reduce for the loss and every metric: the logged row is global
            names = sorted(result.sums)
            local = [result.loss_sum] + [v for n in names for v in result.sums[n]]
            total = self.accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=self.device),
                                            reduction="sum").tolist()
            result.loss_sum = total[0]
            result.sums = {n: total[1 + 2 * i:3 + 2 * i] for i, n in enumerate(names)}
        return result

    def prepare_training(self, model: torch.nn.Module, total_steps: int,
                         checkpoint_objects: Sequence[Any] = ()) -> tuple[torch.nn.Module, Any, Any]:
        """The set-up half of :meth:`run` (for loops owned elsewhere, e.g. a Ray driver): gradient
        checkpointing, the optimizer, ``accelerate.prepare`` (DDP / FSDP / DeepSpeed), the LR schedule, and the
        objects every checkpoint carries. Sets ``self.model``, ``self.optimizer``, ``self.scheduler``."""
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        optimizer = self.build_optimizer(model)
        self._configure_deepspeed()
        model, optimizer = self.accelerator.prepare(model, optimizer)
        # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it once
        # per process); it is registered so that checkpoints carry it.
        scheduler = self.build_scheduler(optimizer, total_steps)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator.register_for_checkpointing(scheduler)
        for obj in checkpoint_objects:
            self.accelerator.register_for_checkpointing(obj)
        return model, optimizer, scheduler

    def _configure_deepspeed(self) -> None:
        """Fill the DeepSpeed config's batch fields from ours (accelerate needs them before ``prepare``).

        Accumulation boundaries are marked per step by :meth:`optimizer_step`, so a step may hold any
        number of micro-batches (RL minibatches do); clipping is DeepSpeed's, at ``--max-grad-norm``.
        """
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        cfg, ds = self.config, plugin.deepspeed_config
        accum = max(cfg.gradient_accumulation_steps, 1)
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_batch_size
        ds["gradient_accumulation_steps"] = accum
        ds["train_batch_size"] = cfg.per_device_batch_size * accum * self.world_size
        ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
        ds.setdefault("steps_per_print", 10**9)  # our progress bar and metrics.jsonl do the reporting

    def sum_across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``tensor`` over the data-parallel ranks (itself with one process)."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum").to(tensor.device)

    def gather_across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on each) concatenated along dim 0, in rank order."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.gather(tensor.to(self.device)).to(tensor.device)

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Ready a frozen model (reference policy, reward model) for forward passes on every rank.

        Under DeepSpeed ZeRO-3 transformers loads every model partitioned, so the frozen one runs in a
        DeepSpeed inference engine that gathers each layer as it goes (no optimizer, no gradients), as the
        trained model does; everywhere else it is a whole copy on this rank's device.
        """
        model.eval().requires_grad_(False)
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None or plugin.zero_stage != 3:
            return model.to(self.device)
        import deepspeed

        self._configure_deepspeed()
        config = {k: v for k, v in plugin.deepspeed_config.items() if k not in ("optimizer", "scheduler")}
        frozen, *_ = deepspeed.initialize(model=model, config=config)
        frozen.eval()
        return frozen

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``accelerator.unwrap_model``, remembered for the last model asked about: accelerate walks the
        wrappers on every call (~1 ms here), and an RL step asks twice."""
        if self._unwrapped is None or self._unwrapped[0] is not model:
            self._unwrapped = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped[1]

    @contextlib.contextmanager
    def full_parameters(self, model: torch.nn.Module):
        """Whole (unsharded) parameters inside the block, for code that calls the model's layers directly
        outside its forward (sampling, the lean decode step): gathered under ZeRO-3, unsharded under FSDP2,
        as they are everywhere else. A collective: every rank enters it."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()

    def _checkpoint_hint(self) -> str:
        last = latest_checkpoint(self.output_dir)
        if last is None:
            return "; no checkpoint was saved yet (use --save-steps)"
        return f"; the last good checkpoint is {last} (fix the cause, then rerun with --resume)"

    def run(self, task: Task, model: torch.nn.Module, total_steps: int,
            step_fn: Callable[[int], tuple[dict[str, Any], int]],
            checkpoint_objects: Sequence[Any] = (), extra_logs: Sequence[str] = ()) -> dict[str, Any]:
        """The loop: ``step_fn(step)`` performs step ``step`` (0-based) with :meth:`optimizer_step` and
        returns its metrics row and the tokens it processed; the engine owns the optimizer, schedule (stepped
        once per step), resume, evaluation, metrics, progress, checkpoints and signals.

        ``checkpoint_objects`` (anything with state_dict/load_state_dict, e.g. an adaptive KL controller)
        are saved in every checkpoint and restored on resume. ``extra_logs`` are per-step JSONL files in
        output_dir (rows with a ``step`` key) handled like metrics.jsonl: cut back to the checkpoint on
        resume, started afresh otherwise.
        """
        cfg = self.config
        model, _, scheduler = self.prepare_training(model, total_steps, checkpoint_objects)
        if self.trackers:
            self.accelerator.init_trackers(task.name, config={k: str(v) for k, v in cfg.as_dict().items()})

        start_step = 0
        if cfg.resume:
            ckpt = latest_checkpoint(self.output_dir)
            if ckpt is None:
                logger.warning("--resume: no complete checkpoint in %s, starting from scratch", self.output_dir)
            else:
                self.accelerator.load_state(str(ckpt))
                start_step = int(read_state(ckpt)["step"])
                for log in (self.metrics_path, *(self.output_dir / name for name in extra_logs)):
                    self._truncate_log(log, start_step)
                if self.is_main:
                    logger.info("resumed from %s (step %d of %d)", ckpt, start_step, total_steps)
        elif self.is_main:  # a fresh run starts fresh logs
            for log in (self.metrics_path, *(self.output_dir / name for name in extra_logs)):
                log.unlink(missing_ok=True)
        self.step = start_step

        initial_eval: dict[str, float] = {}
        if cfg.eval_on_start and start_step == 0:
            initial_eval = self.evaluate(task, model)
            if initial_eval:
                self.log_metrics({"step": 0, **initial_eval})

        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=task.name, dynamic_ncols=True,
                   disable=not (cfg.progress_bar and self.is_main))
        previous_handlers = self._install_signal_handlers()
        last: dict[str, Any] = {}
        window_tokens, window_start = 0, time.perf_counter()
        model.train()
        try:
            for step in range(start_step, total_steps):
                self.step = step
                t0 = time.perf_counter()
                step_row, step_tokens = step_fn(step)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                done = step + 1
                window_tokens += step_tokens
                bar.update(1)

                if done % max(cfg.logging_steps, 1) == 0 or done == total_steps:
                    elapsed = time.perf_counter() - window_start
                    row = {"step": done, **step_row, "learning_rate": lr,
                           "tokens_per_s": window_tokens * self.world_size / max(elapsed, 1e-9),
                           "step_time_s": time.perf_counter() - t0}
                    self.log_metrics(row)
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in task_postfix(task, row)})
                    last.update(row)
                    window_tokens, window_start = 0, time.perf_counter()
                if cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done != total_steps:
                    eval_row = self.evaluate(task, model)
                    if eval_row:
                        self.log_metrics({"step": done, **eval_row})
                if (cfg.save_steps > 0 and done % cfg.save_steps == 0 and done != total_steps) or (
                        self._stop_signal is not None):
                    self.save_checkpoint(done, total_steps)
                if self._stop_signal is not None:
                    bar.close()
                    logger.warning("stopped by signal %d at step %d: checkpoint saved; rerun with --resume",
                                   self._stop_signal, done)
                    raise SystemExit(128 + self._stop_signal)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            bar.close()

        eval_row = self.evaluate(task, model)
        if eval_row:
            self.log_metrics({"step": total_steps, **eval_row})
        summary = {"task": task.name, "steps": total_steps, "precision": self.precision_note,
                   **{f"train_{k}": v for k, v in last.items() if k != "step"}, **eval_row,
                   **{f"initial_{k}": v for k, v in initial_eval.items()}}
        if self.trackers:
            self.accelerator.end_training()
        self.unwrapped_model = self.accelerator.unwrap_model(model)
        self.trained_model = model
        return summary

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2, default=str))
