"""How the engine's models sit on the ranks under DDP / FSDP / DeepSpeed: the DeepSpeed batch fields, frozen
models on every rank, whole parameters for code outside a forward, unwrapping, and sums and gathers across
the data-parallel ranks. A mixin of :class:`~rlhfkit.engine.Engine`, which supplies ``accelerator``,
``config``, ``device`` and ``world_size``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class ParallelMixin:
    """The data-parallel side of :class:`~rlhfkit.engine.Engine`."""

    accelerator: Any
    config: Any
    _unwrapped: tuple[torch.nn.Module, torch.nn.Module] | None

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: parameters and optimizer state are split over ranks, so saving is collective."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

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
