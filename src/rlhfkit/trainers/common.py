"""Pieces the thin trainers share: packing and LoRA settings, data loading, run set-up and finish.

Model forwards on batches live in :mod:`rlhfkit.models.forward`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..data import DataFormat, detect_format, load_rows, resolve_prompt_format
from ..engine import Engine, TrainConfig
from ..engine.run_folder import begin_run, check_output_dir
from ..errors import ConfigError
from ..models import LoraSettings
from ..models.attention import use_packed_attention
from ..models.forward import shares_prompts, supports_packing

logger = logging.getLogger("rlhfkit")


def resolve_packing(config: TrainConfig, model: torch.nn.Module, reward: bool = False) -> bool:
    mode = config.packing.lower()
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--packing must be auto, on or off, not '{config.packing}'")
    if mode == "off":
        return False
    use_packed_attention(model)
    ok = supports_packing(model, forward_hidden=reward)
    if not ok:
        if mode == "on":
            raise ConfigError(f"--packing on: {type(model).__name__} lets packed sequences attend to each "
                              "other; use --packing off")
        logger.info("packing: %s does not isolate packed sequences; using padded batches",
                    type(model).__name__)
    return ok


def prompt_sharing(config: TrainConfig, packed: bool, *models: torch.nn.Module | None) -> bool:
    """Whether a run's batches give each prompt one copy for all its responses (``--share-prompts``): asked,
    packed, and every model that reads the batches (None: absent) runs rlhfkit's packed attention."""
    return bool(getattr(config, "share_prompts", False)) and packed and shares_prompts(*models)


def lora_settings(config: TrainConfig) -> LoraSettings:
    targets = config.lora_target_modules
    modules: list[str] | str = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    return LoraSettings(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        target_modules=modules)


def require(config: TrainConfig, *names: str) -> None:
    for name in names:
        if not getattr(config, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")


def load_split(source: str, split: str | None, allowed: tuple[DataFormat, ...], columns: Any = None,
               purpose: str = "train", config: str | None = None):
    """Load rows (one split, columns renamed by ``columns``) and check that their layout is one this trainer
    reads."""
    ds = load_rows(source, split=split, columns=columns, purpose=purpose, config=config)
    fmt = detect_format(ds.column_names, allowed=allowed, source=source)
    return ds, fmt


def iterate_batches(records: list, batch_size: int):
    for start in range(0, len(records), batch_size):
        yield records[start:start + batch_size]


def start_run(config: TrainConfig) -> Engine:
    """Validate the common flags, check --output-dir (before any model loads: refused when it holds another
    run; :class:`~rlhfkit.engine.run_folder.RunFinished` for --resume on a finished one), create the engine
    (which seeds everything before models load) and write the run's config.yaml."""
    require(config, "model", "dataset", "output_dir")
    if config.per_device_batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise ConfigError("--per-device-batch-size and --gradient-accumulation-steps must be >= 1")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ConfigError(f"--max-steps {config.max_steps}: give a number of optimizer steps >= 1, or -1 to "
                          "derive it from --num-epochs")
    check_output_dir(config)
    engine = Engine(config)
    if engine.is_main:
        begin_run(config, trainer_name(config))
    engine.accelerator.wait_for_everyone()  # the other ranks read the folder only once it is cleared
    return engine


def trainer_name(config: TrainConfig) -> str | None:
    """The registry name of the trainer whose config this is (``sft``, ``ppo``, ...), for config.yaml."""
    from ..registry import TRAINERS

    by_config = {t.config_name: name for name, t in TRAINERS.items()}
    return next((by_config[cls.__name__] for cls in type(config).__mro__ if cls.__name__ in by_config), None)


def prepare_datasets(config: TrainConfig, tokenizer, formats: tuple[DataFormat, ...],
                     prepare: Callable[..., tuple[list, Any]]) -> tuple[list, list, Any]:
    """Load, check and tokenise --dataset and --eval-dataset; log one report line for each.

    ``prepare(ds, tokenizer, source=..., prompt_format=...)`` is one of the ``rlhfkit.data.prepare_*``
    functions with its length settings bound. --columns renames both datasets' columns; --prompt-format is
    resolved (and logged) once. Returns (train records, eval records, train report).
    """
    columns = getattr(config, "columns", None)
    prompt_format = resolve_prompt_format(tokenizer, getattr(config, "prompt_format", "auto"), config.model or "",
                                          log=True)
    train_ds, _ = load_split(config.dataset, config.dataset_split, formats, columns,
                             config=getattr(config, "dataset_config", None))
    records, report = prepare(train_ds, tokenizer, source=config.dataset, prompt_format=prompt_format)
    report.log(logger, config.dataset)
    eval_records: list = []
    if config.eval_dataset:
        eval_ds, _ = load_split(config.eval_dataset, config.eval_split, formats, columns, purpose="eval",
                                config=getattr(config, "eval_dataset_config", None))
        eval_records, eval_report = prepare(eval_ds, tokenizer, source=config.eval_dataset,
                                            prompt_format=prompt_format)
        eval_report.log(logger, config.eval_dataset)
    return records, eval_records, report


def finish_run(engine: Engine, task: Any, model: torch.nn.Module, records: list, tokenizer,
               extra: dict[str, Any], submodule: str | None = None) -> dict[str, Any]:
    """Train, then save the final model (``model.<submodule>`` when given) and summary.json."""
    summary = engine.train(task, model, records)
    summary.update(extra)
    engine.save_final(engine.trained_model, tokenizer, submodule=submodule)
    engine.write_summary(summary)
    return summary
