"""The training settings every trainer shares. Trainer configs subclass :class:`TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def arg(default, help: str, **kwargs):  # noqa: A002 - mirrors argparse's keyword
    """A dataclass field whose ``help`` shows in ``--help`` (HfArgumentParser reads the metadata)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # what to train, on what
    model: str | None = arg(None, "Model to start from: a hub id or a local folder.")
    dataset: str | None = arg(None, "Training data: a .jsonl/.json/.parquet/.csv file, a folder (save_to_disk "
                              "or data files) or a hub dataset name.")
    dataset_split: str | None = arg(None, "Split of --dataset, by its own name (train_prefs, test_sft, ...). "
                                    "Default: the only split, else the only train/train_*/*_train one; "
                                    "otherwise an error lists the splits.")
    dataset_config: str | None = arg(None, "Configuration (subset) of a hub dataset or data folder that has "
                                     "several, e.g. main for openai/gsm8k; an error lists them when needed.")
    eval_dataset: str | None = arg(None, "Held-out data in the same formats, evaluated every --eval-steps "
                                   "and at the end.")
    eval_dataset_config: str | None = arg(None, "Configuration (subset) of --eval-dataset, as --dataset-config.")
    eval_split: str | None = arg(None, "Split of --eval-dataset. Default: the only split, else the only "
                                 "test/validation/eval one (also as test_*, *_test, ...).")
    columns: str | None = arg(None, "Rename dataset columns after loading, NEW=OLD comma-separated: "
                              "prompt=question,chosen=good (a YAML config may give a mapping). Applies to "
                              "--dataset and --eval-dataset.")
    prompt_format: str = arg("auto", "How string prompts meet the model: chat = one user turn (string "
                             "completions/chosen/rejected the assistant turn) in the tokenizer's chat "
                             "template; raw = plain text; auto = chat when the tokenizer has its own chat "
                             "template. Chat-message data always use the template.")
    output_dir: str | None = arg(None, "Where metrics.jsonl, summary.json, checkpoints and the final model go.")
    # length
    max_length: int = arg(512, "Longest prompt+response in tokens; longer rows are truncated (counted).")
    max_prompt_length: int | None = arg(None, "Longest prompt in tokens (default max_length // 2); the "
                                        "prompt keeps its end.")
    # schedule
    num_epochs: float = arg(1.0, "Passes over the training data (ignored when --max-steps > 0).")
    max_steps: int = arg(-1, "Optimizer steps to run; -1 = derive from --num-epochs.")
    per_device_batch_size: int = arg(8, "Examples per micro-batch on each device.")
    per_device_eval_batch_size: int = arg(16, "Examples per evaluation batch.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step; the loss is normalised over "
                                           "the whole step, so accumulation equals a larger batch.")
    learning_rate: float = arg(1e-5, "Peak learning rate (AdamW).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = arg("cosine", "Schedule after warm-up: linear, cosine, constant, ... "
                                 "(transformers.get_scheduler names).")
    warmup_ratio: float = arg(0.0, "Share of the steps spent warming the learning rate up from 0.")
    warmup_steps: int = arg(0, "Warm-up steps (overrides --warmup-ratio when > 0).")
    max_grad_norm: float = arg(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    seed: int = arg(42, "Seed for model init, data order and sampling.")
    # speed
    precision: str = arg("auto", "fp32, bf16, fp16 or auto (bf16 on GPUs that support it, fp32 on CPU: "
                         "bf16 without CPU bf16 units is many times slower).")
    packing: str = arg("auto", "Padding-free packing: sequences concatenated with position ids reset and no "
                       "attention across them. auto = on when the model supports it; on; off (padded).")
    force_precision: bool = arg(False, "Use --precision as given even where it would be slow (bf16 on a CPU "
                                "without bf16 units, which is otherwise refused).")
    gradient_checkpointing: bool = arg(False, "Recompute each decoder layer's activations in backward: less peak "
                                       "memory for more compute; for runs that would not fit without it.")
    num_threads: int = arg(0, "CPU threads for torch (0 = torch's default).")
    keep_large_blocks: bool = arg(True, "Linux/glibc: reuse freed tensors of 32 MiB and more from the heap instead "
                                  "of mapping them fresh (and page-faulting them in) at every step.")
    # LoRA
    lora_r: int = arg(0, "LoRA rank; 0 trains all weights.")
    lora_alpha: int = arg(16, "LoRA alpha.")
    lora_dropout: float = arg(0.0, "LoRA dropout.")
    lora_target_modules: str = arg("all-linear", "Comma-separated module names for LoRA, or all-linear.")
    # bookkeeping
    logging_steps: int = arg(1, "Write metrics every N optimizer steps.")
    eval_steps: int = arg(0, "Evaluate every N steps (0 = only at the end).")
    eval_on_start: bool = arg(True, "Evaluate once before training too (step 0), so runs show where they began.")
    save_steps: int = arg(0, "Save a resumable checkpoint every N steps (0 = only the final model).")
    save_total_limit: int = arg(2, "Keep at most this many resumable checkpoints (oldest deleted).")
    resume: bool = arg(False, "Resume from the newest complete checkpoint in --output-dir (a finished run "
                       "there: nothing to do).")
    overwrite: bool = arg(False, "Replace the run --output-dir holds (its metrics, checkpoints, summary and "
                          "model; other files stay). Without it a trainer refuses a folder that holds a run.")
    report_to: str = arg("none", "Extra trackers, comma-separated: tensorboard, wandb, mlflow (when "
                         "installed).")
    progress_bar: bool = arg(True, "Show a progress bar with loss, tokens/s and ETA.")
    trust_remote_code: bool = arg(False, "Allow model code from the hub.")
    keep_dropout: bool = arg(False, "Keep the model's dropout in RL and preference training (ppo, grpo, rloo, "
                             "dpo, rm), where it is off by default as in TRL: it makes pi/pi_old and the "
                             "log-ratios to the reference noisy. SFT always keeps it.")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SharedPromptOptions:
    """``--share-prompts``: a mixin of the configs of trainers that see several responses to one prompt."""

    share_prompts: bool = arg(True, "Packed batches: the responses to one prompt (a preference pair, a ranking, "
                              "the samples of an RL group) share one copy of it in every forward (same scores, "
                              "log-probs and gradients up to float rounding; the prompt's tokens are processed "
                              "once, not once per response). --no-share-prompts packs every response whole. "
                              "Needs rlhfkit's packed attention (not flash-attention).")
