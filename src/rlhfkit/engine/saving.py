"""What the engine writes to disk besides metrics: crash-safe resumable checkpoints (every rank's part of the
accelerate state plus the run state), the final model that ``from_pretrained`` loads with no rlhfkit import,
the summary, and the hint an error gives about where to resume. A mixin of :class:`~rlhfkit.engine.Engine`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    commit_dir,
    fresh_staging_dir,
    fsync_tree,
    latest_checkpoint,
    prune_checkpoints,
    resume_hint,
    staging_dir,
    write_state,
)
from .metrics import write_summary


class SavingMixin:
    """The saving side of :class:`~rlhfkit.engine.Engine` (which supplies ``accelerator``, ``config``,
    ``output_dir``, ``is_main``, ``world_size`` and ``sharded``)."""

    accelerator: Any
    config: Any
    output_dir: Path

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
            write_state(tmp, {"step": step, "total_steps": total_steps, "world_size": self.world_size,
                              "config": self.config.as_dict()})
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

    def checkpoint_hint(self) -> str:
        """The end of a TrainingError's message: the last good checkpoint to rerun from with --resume."""
        return resume_hint(latest_checkpoint(self.output_dir))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            write_summary(self.output_dir, summary)
