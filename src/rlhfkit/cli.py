"""Command line: ``rlhfkit <command> [--config FILE.yaml] [--flags]`` (flags override the file)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, RlhfkitError

logger = logging.getLogger("rlhfkit")


def _trainers() -> dict[str, tuple[type, Callable[[Any], dict], str]]:
    from .trainers.dpo import DPOConfig, run_dpo
    from .trainers.reward import RewardConfig, run_reward
    from .trainers.rl import GRPOConfig, PPOConfig, RLOOConfig, run_rl
    from .trainers.sft import SFTConfig, run_sft

    return {
        "sft": (SFTConfig, run_sft, "Supervised fine-tuning of a causal LM."),
        "rm": (RewardConfig, run_reward, "Train a Bradley–Terry reward model on preference or ranked data."),
        "dpo": (DPOConfig, run_dpo, "Direct preference optimisation (sigmoid, ipo, hinge, robust)."),
        "ppo": (PPOConfig, run_rl, "PPO against a reward source on a KL leash to the reference (actor-critic)."),
        "grpo": (GRPOConfig, run_rl, "GRPO: group-relative advantages over several samples per prompt."),
        "rloo": (RLOOConfig, run_rl, "RLOO: REINFORCE with a leave-one-out baseline over the group."),
    }


def coerce_options(config_cls: type, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Values converted to the config field's type: YAML reads ``5e-5`` as a string (it wants ``5.0e-5``)."""
    import typing

    hints = typing.get_type_hints(config_cls)
    out = {}
    for name, value in options.items():
        kinds = typing.get_args(hints.get(name)) or (hints.get(name),)
        if isinstance(value, str) and str not in kinds:
            for kind in (int, float, bool):
                if kind not in kinds:
                    continue
                try:
                    value = {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
                    break
                except (ValueError, KeyError):
                    continue
            else:
                raise ConfigError(f"{where}: option '{name}' = {value!r} is not a "
                                  f"{' or '.join(k.__name__ for k in kinds if k is not type(None))}")
        elif isinstance(value, int) and not isinstance(value, bool) and float in kinds and int not in kinds:
            value = float(value)
        out[name] = value
    return out


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's contents ({} when empty); a missing file or bad YAML is a one-line ConfigError."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None


def load_yaml_config(path: str, config_cls: type) -> dict[str, Any]:
    """Read a YAML config; keys may use dashes or underscores; unknown keys are an error."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    known = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown option '{key}' (see --help for the list)")
        out[name] = value
    return coerce_options(config_cls, out, path)


def parse_trainer_args(config_cls: type, argv: Sequence[str], prog: str, description: str):
    """Build the config dataclass from ``--config FILE`` and flags (flags win)."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(config_cls, prog=prog, description=description)
    parser.add_argument("--config", help="YAML file of options (flags given on the command line override it).")
    if known.config:
        parser.set_defaults(**load_yaml_config(known.config, config_cls))
    # the extra --config attribute comes back as a second namespace, which we ignore
    config = parser.parse_args_into_dataclasses(args=list(rest), look_for_args_file=False)[0]
    return config


def _tiny_model(argv: Sequence[str]) -> int:
    from .models.tiny import build_tiny_model

    p = argparse.ArgumentParser(prog="rlhfkit tiny-model",
                                description="Build a tiny random-init model and a locally trained tokenizer "
                                            "(no network), loadable with from_pretrained.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--reward", action="store_true", help="a sequence-classification reward model (1 output)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary size (upper bound)")
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", help="text file (one document per line) to train the tokenizer on")
    a = p.parse_args(argv)
    corpus = None
    if a.corpus:
        if not Path(a.corpus).exists():
            raise ConfigError(f"{a.corpus}: corpus file not found")
        corpus = Path(a.corpus).read_text(encoding="utf-8", errors="replace").splitlines()
    out = build_tiny_model(a.out_dir, reward=a.reward, layers=a.layers, hidden=a.hidden, heads=a.heads,
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


USAGE = """usage: rlhfkit <command> [options]

commands:
  sft          supervised fine-tuning
  rm           reward model (Bradley–Terry) on preference / ranked data
  dpo          direct preference optimisation
  ppo          RLHF with PPO (policy + critic) against a reward model, function or endpoint
  grpo         RL with group-relative advantages (no critic)
  rloo         RL with a leave-one-out baseline (no critic)
  eval         compare policies under a judge: win rates with CIs, LC win rate, reward, KL, length
  report       self-contained HTML report (plots, tables, samples) of a run or pipeline folder
  label        human-feedback labelling web app: serve, import, generate, labellers, agreement, export
  serve-rm     serve a reward model over HTTP (for --reward-url): POST /score, GET /health
  judge        label candidate responses with an AI judge into preference pairs (resumable)
  cai          Constitutional AI: critique -> revision against a constitution; SFT data and pairs
  tiny-model   build a tiny offline model + tokenizer
  pipeline     run a chain of stages from one YAML file (skips stages already done)
  demo         the offline end-to-end run: pretrain, SFT, preferences, RM, PPO, DPO, eval, report

Run 'rlhfkit <command> --help' for the options of a command."""


# command -> (module, function(argv) -> exit code) of the commands that are not trainers
SUBCOMMANDS = {
    "eval": (".eval.runner", "main"),
    "report": (".report", "main"),
    "label": (".label.cli", "main"),
    "serve-rm": (".rollout.reward_server", "main"),
    "judge": (".judges.label", "main"),
    "cai": (".cai", "main"),
    "pipeline": (".pipeline", "pipeline_main"),
    "demo": (".demo", "run_demo"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    _setup_logging()
    try:
        if command == "tiny-model":
            return _tiny_model(rest)
        if command in SUBCOMMANDS:  # imported on use: `rlhfkit sft` need not load FastAPI or plotly
            module_name, function_name = SUBCOMMANDS[command]
            return getattr(importlib.import_module(module_name, __package__), function_name)(rest)
        trainers = _trainers()
        if command not in trainers:
            print(f"rlhfkit: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
            return 2
        config_cls, run, description = trainers[command]
        config = parse_trainer_args(config_cls, rest, f"rlhfkit {command}", description)
        summary = run(config)
        from .engine.loop import shutdown_distributed

        shutdown_distributed()
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate launch: rank 0 reports
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
