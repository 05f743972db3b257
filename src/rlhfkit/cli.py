"""Command line: ``rlhfkit <command> [--config FILE.yaml] [--flags]`` (flags override the file)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, RlhfkitError
from .options import (
    EarlierSummary,
    OneLineParser,
    closest,
    parse_trainer_args,
    run_trainer,
    trainer_config_class,
)
from .registry import TRAINERS

logger = logging.getLogger("rlhfkit")


def tiny_model_main(argv: Sequence[str]) -> int:
    from .models.tiny import build_tiny_model

    p = OneLineParser(prog="rlhfkit tiny-model",
                                description="Build a tiny random-init model and a locally trained tokenizer "
                                            "(no network), loadable with from_pretrained.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", nargs="?", help="the folder to write (or --output-dir, as the trainers take it)")
    p.add_argument("--output-dir", dest="output_dir", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that already holds files (the model's files are replaced)")
    p.add_argument("--reward", action="store_true", help="a sequence-classification reward model (1 output)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary size (upper bound)")
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", help="text file (one document per line) to train the tokenizer on")
    a = p.parse_args(argv)
    if a.out_dir and a.output_dir and Path(a.out_dir) != Path(a.output_dir):
        p.error(f"two output folders: {a.out_dir} and --output-dir {a.output_dir}")
    out_dir = a.out_dir or a.output_dir
    if not out_dir:
        p.error("the output folder is required: rlhfkit tiny-model OUT_DIR")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"{out_dir} is a file; the tiny model is written to a folder")
    held = sorted(Path(out_dir).iterdir()) if Path(out_dir).is_dir() else []
    if held and not a.overwrite:  # a trained model there would be replaced by random weights
        raise ConfigError(f"{out_dir} already holds {len(held)} files or folders ({', '.join(h.name for h in held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}); pass --overwrite to write the tiny model over them, "
                          "or choose a new folder")
    corpus = None
    if a.corpus:
        if not Path(a.corpus).exists():
            raise ConfigError(f"{a.corpus}: corpus file not found")
        corpus = Path(a.corpus).read_text(encoding="utf-8", errors="replace").splitlines()
    out = build_tiny_model(out_dir, reward=a.reward, layers=a.layers, hidden=a.hidden, heads=a.heads,
                           vocab=a.vocab, max_positions=a.max_positions, seed=a.seed, corpus=corpus)
    print(f"tiny {'reward model' if a.reward else 'causal LM'} written to {out}")
    return 0


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each message (callers may redirect it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[rlhfkit] %(message)s"))
        logger.addHandler(handler)
        # under torchrun / accelerate launch, only rank 0 tells the story; the others report problems
        logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
        logger.propagate = False
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _only_errors(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_libraries() -> None:
    """One progress bar per run (rlhfkit's own): no transformers loading/saving bars, no datasets map/filter
    bars, and no DeepSpeed banner when DeepSpeed is not the launcher. Hub download bars stay."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    if "datasets" in sys.modules:  # already imported (rlhfkit used in-process): tell it directly
        sys.modules["datasets"].disable_progress_bars()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        # accelerate imports deepspeed (when installed) to recognise its wrappers, and deepspeed logs on import
        deepspeed_logger = logging.getLogger("DeepSpeed")
        if _only_errors not in deepspeed_logger.filters:
            deepspeed_logger.addFilter(_only_errors)
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()  # this also turns the hub's bars off: back on
    huggingface_hub.utils.enable_progress_bars()


# the summary keys worth a line at the end of a run, in this order (eval_* metrics follow)
_HEADLINE = ("train_loss", "train_reward_mean", "train_kl", "train_accuracy", "train_reward_accuracy")


def end_block(command: str, summary: dict, output_dir: str | None, seconds: float) -> str:
    """The few lines a finished run ends with: where the model is, how long it took, its headline metrics."""
    minutes, secs = divmod(int(round(seconds)), 60)
    took = f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"
    steps = summary.get("steps")
    lines = [f"{command} finished in {took}" + (f" ({steps} steps)" if steps is not None else ""),
             f"model: {output_dir} (summary.json and metrics.jsonl beside it)"]
    scalar = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    keys = [k for k in _HEADLINE if k in scalar] + [k for k in scalar if k.startswith("eval_")][:4]
    if keys:
        lines.append("metrics: " + ", ".join(f"{k} {scalar[k]:.4g}" for k in keys))
    return "\n".join(lines)


# command -> (module, function(argv) -> exit code, one line of help) of the commands that are not trainers;
# imported on use, so that `rlhfkit sft` need not load FastAPI or plotly
SUBCOMMANDS = {
    "eval": (".eval.runner", "main", "compare policies under a judge: win rates with CIs, LC win rate, reward, KL, "
             "length"),
    "eval-rm": (".eval.rm_report", "main", "reward-model report: accuracy per subset, calibration, length bias"),
    "grade": (".eval.grading_run", "main", "grade policies' answers to multi-turn questions 1-10 with a judge "
              "(MT-Bench style)"),
    "audit-judge": (".eval.judge_audit", "main", "audit a pairwise judge on labelled pairs: accuracy, position, "
                    "length and self-preference bias"),
    "red-team": (".eval.red_team", "main", "red-team a model: mutated attacks, ASR by category and mutation "
                 "with CIs, over-refusal on look-alikes, refusal pairs"),
    "report": (".report", "main", "self-contained HTML report (plots, tables, samples) of a run or pipeline folder"),
    "label": (".label.cli", "main", "human-feedback labelling web app: serve, import, generate, labellers, "
              "agreement, export"),
    "serve-rm": (".rollout.reward_server", "main", "serve a reward model over HTTP (for --reward-url): POST /score, "
                 "GET /health"),
    "judge": (".judges.judge_pairs", "main", "label candidate responses with an AI judge into preference pairs "
              "(resumable)"),
    "cai": (".cai", "main", "Constitutional AI: critique -> revision against a constitution; SFT data and pairs"),
    "tiny-model": (".cli", "tiny_model_main", "build a tiny offline model + tokenizer"),
    "pipeline": (".pipeline", "pipeline_main", "run a chain of stages from one YAML file (skips stages already "
                 "done)"),
    "demo": (".demo", "run_demo", "the offline end-to-end run: pretrain, SFT, preferences, RM, PPO, DPO, eval, "
             "report"),
}


def usage() -> str:
    """The command list: the registry's trainers, then the other commands."""
    rows = [(name, t.help) for name, t in TRAINERS.items()] + [(c, h) for c, (_, _, h) in SUBCOMMANDS.items()]
    return ("usage: rlhfkit <command> [options]\n\ncommands:\n"
            + "\n".join(f"  {name:<12} {text}" for name, text in rows)
            + "\n\nRun 'rlhfkit <command> --help' for the options of a command.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    _setup_logging()
    try:
        if command in SUBCOMMANDS:
            module_name, function_name, _ = SUBCOMMANDS[command]
            if command not in ("report", "label") and not {"-h", "--help"} & set(rest):
                quiet_libraries()
            return getattr(importlib.import_module(module_name, __package__), function_name)(rest)
        if command not in TRAINERS:
            hint = closest(command, [*TRAINERS, *SUBCOMMANDS], quote="'")
            print(f"rlhfkit: error: unknown command '{command}'{hint} (rlhfkit --help lists them)", file=sys.stderr)
            return 2
        trainer = TRAINERS[command]
        config = parse_trainer_args(trainer_config_class(trainer), rest, f"rlhfkit {command}", trainer.help)
        quiet_libraries()
        start = time.perf_counter()
        summary = run_trainer(trainer, config)
        from .engine import shutdown_distributed

        shutdown_distributed()
        # under torchrun / accelerate launch the logger speaks for rank 0 only
        if not isinstance(summary, EarlierSummary):  # --resume on a finished run said "nothing to do" already
            logger.info("%s", end_block(command, summary, config.output_dir, time.perf_counter() - start)
                        .replace("\n", "\n[rlhfkit] "))
        if not sys.stdout.isatty() and int(os.environ.get("RANK", "0")) == 0:  # piped: the summary for scripts
            print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict | list)},
                             indent=2, default=str))
        return 0
    except RlhfkitError as exc:
        print(f"rlhfkit {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhfkit {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
