"""A run's folder: what an earlier run left there, the refusal to train over it, and the run's record.

Runs are the user's work. A trainer refuses an ``--output-dir`` that holds a finished run, a saved model, a
run's checkpoints or its metrics unless ``--overwrite`` is given (which removes only what rlhfkit writes);
``--resume`` on a finished run does nothing. Every run writes ``config.yaml``: its options, which
``--config`` reads back, and a ``_run`` block (versions, command, host, dataset sizes and hashes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RlhfkitError
from .checkpoint import list_checkpoints

logger = logging.getLogger("rlhfkit")

CONFIG_FILE = "config.yaml"
RUN_KEY = "_run"  # the provenance block of config.yaml; load_yaml_config skips it
LOGS = ("metrics.jsonl", "samples.jsonl")
# the final model's weights (save_pretrained, sharded or not; a LoRA run also keeps adapter/)
_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
# what save_pretrained writes beside the weights (model config, tokenizer), removed with them
_MODEL_SIDECARS = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json"}
# other files and folders the trainers write: DPO's reference cache, the RL best held-out policy, the Ray
# run's worker list and critic; staging folders a crash left (.checkpoint-N.tmp, .final.tmp, ...)
_OTHER_ARTEFACTS = {"summary.json", "ref_logps.pt", "best_heldout", "critic", "ray_workers.json", "adapter"}
_STAGING = re.compile(r"^\.(checkpoint-\d+|final|best_heldout|summary\.json|metrics\.jsonl|samples\.jsonl|"
                      r"config\.yaml)\.(tmp|old)$|^ref_logps\.pt\.tmp$")
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


class RunFinished(RlhfkitError):
    """``--resume`` on a finished run: nothing to train. ``summary`` is the run's summary.json (``run_trainer``
    returns it; a direct call of a trainer's run function sees this exception)."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass
class RunFolder:
    """What an output folder holds of an earlier run."""

    path: Path
    summary: dict[str, Any] | None = None
    weights: list[str] = field(default_factory=list)
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """A summary or a final model: the run ended (the model is saved after the last step)."""
        return self.summary is not None or bool(self.weights)

    @property
    def holds_run(self) -> bool:
        return self.finished or bool(self.checkpoints or self.logs)

    @property
    def step(self) -> int | None:
        """The step the run reached: the summary's steps, else the newest checkpoint, else the last log row."""
        if self.summary and isinstance(self.summary.get("steps"), int):
            return self.summary["steps"]
        if self.checkpoints:
            return self.checkpoints[-1][0]
        steps = [_last_step(self.path / name) for name in self.logs]
        return max((s for s in steps if s is not None), default=None)

    def names(self, limit: int = 5) -> str:
        """The run's files as the error names them: ``summary.json, model.safetensors, checkpoint-40``."""
        found = (["summary.json"] if self.summary is not None else []) + self.weights[:2] + \
            [p.name for _, p in self.checkpoints[-2:]] + self.logs
        return ", ".join(found[:limit]) + (", ..." if len(found) > limit else "")


def _last_step(path: Path) -> int | None:
    """The ``step`` of the last complete row of a JSONL log (read from its end: logs can be long)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(fh.tell() - 8192, 0))
        lines = fh.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def inspect_run_folder(path: str | Path) -> RunFolder:
    folder = RunFolder(Path(path))
    if not folder.path.is_dir():
        return folder
    summary = folder.path / "summary.json"
    if summary.is_file():
        try:
            loaded = json.loads(summary.read_text(encoding="utf-8"))
            folder.summary = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            folder.summary = {}  # still a finished run's file: refuse to train over it
    folder.weights = sorted(p.name for p in folder.path.iterdir() if _WEIGHTS.match(p.name) and p.is_file())
    if (folder.path / "adapter" / "adapter_config.json").is_file():
        folder.weights.append("adapter/")
    folder.checkpoints = list_checkpoints(folder.path)
    folder.logs = [name for name in LOGS if (folder.path / name).is_file()]
    return folder


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds an earlier run's summary, model, checkpoints or metrics."""
    return inspect_run_folder(path).holds_run


def check_output_dir(config: Any) -> RunFolder:
    """Before any model loads: refuse a folder that holds a run unless --overwrite or --resume says what to
    do with it (ConfigError); ``--resume`` on a finished run raises :class:`RunFinished` with its summary."""
    out = config.output_dir
    if config.resume and getattr(config, "overwrite", False):
        raise ConfigError(f"--resume continues the run in {out} and --overwrite replaces it: pass one of them")
    for name in ("model", "ref_model", "reward_model"):
        for given in str(getattr(config, name, None) or "").split(","):
            if given and Path(given).exists() and Path(given).resolve() == Path(out).resolve():
                raise ConfigError(f"--output-dir {out} is also --{name.replace('_', '-')}: the run would write over "
                                  "the model it starts from; choose another folder")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    folder = inspect_run_folder(out)
    foreign = folder.path / CONFIG_FILE
    if foreign.is_file() and not _written_by_rlhfkit(foreign):
        raise ConfigError(f"--output-dir {out} holds a {CONFIG_FILE} that rlhfkit did not write (each run writes "
                          f"its own there): move it, or choose another folder")
    if getattr(config, "overwrite", False) or not folder.holds_run:
        return folder
    step = folder.step
    at = f"; step {step}" if step is not None else ""
    if folder.finished:
        what = "a finished run" if folder.summary is not None else "a saved model"
        if config.resume:
            raise RunFinished(f"nothing to do: the run in {out} is finished" + (f" (step {step})" if at else "")
                              if folder.summary is not None else
                              f"nothing to do: {out} holds a final model ({folder.names()}) and no summary; "
                              "pass --overwrite to train a new one there", dict(folder.summary or {}))
        raise ConfigError(f"--output-dir {out} holds {what} ({folder.names()}{at}); pass --overwrite to replace "
                          "it, or choose another folder")
    if config.resume:
        return folder  # checkpoints to continue from, or a start that crashed before its first one
    if folder.checkpoints:
        raise ConfigError(f"--output-dir {out} holds an unfinished run ({folder.names()}{at}); pass --resume to "
                          "continue it from its last checkpoint, --overwrite to replace it, or choose another folder")
    raise ConfigError(f"--output-dir {out} holds an unfinished run with no checkpoint ({folder.names()}{at}); "
                      "pass --overwrite to start it again, or choose another folder")


def check_report_outputs(out: str | Path, report: str, others: Sequence[str],
                         inputs: Sequence[str | Path] = ()) -> None:
    """Before a command writes its ``report`` file and ``others`` into folder ``out``: a one-line ConfigError
    rather than write over one of its own ``inputs`` (``--pairs d/pairs.jsonl --output-dir d``), or over any of
    ``others`` with no ``report`` beside it (they belong to something else: a training run's samples.jsonl).
    An earlier run of the same command (its report there) is replaced, as running it again asks."""
    out = Path(out)
    given = {Path(p).resolve() for p in inputs if isinstance(p, (str, Path)) and Path(p).is_file()}
    for name in (report, *others):
        if (out / name).is_file() and (out / name).resolve() in given:
            raise ConfigError(f"--output-dir {out}: writing {name} there would replace the input {out / name}; "
                              "choose another folder")
    taken = [name for name in others if (out / name).exists()]
    if taken and not (out / report).is_file():
        raise ConfigError(f"--output-dir {out} holds {', '.join(taken)} with no {report} beside it (not written by "
                          "this command; a training run's?); choose another folder")


def _written_by_rlhfkit(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get(RUN_KEY), dict)


def clear_run_folder(path: str | Path) -> list[str]:
    """Remove what rlhfkit wrote in ``path`` (logs, checkpoints, summary, config.yaml, the final model and its
    tokenizer, caches, staging folders); any other file stays. Returns the names removed."""
    folder = inspect_run_folder(path)
    if not folder.path.is_dir():
        return []
    removed = []
    for item in sorted(folder.path.iterdir()):
        name = item.name
        ours = (name in LOGS or name in _OTHER_ARTEFACTS or _WEIGHTS.match(name) or _CHECKPOINT.match(name)
                or _STAGING.match(name) or (name == CONFIG_FILE and _written_by_rlhfkit(item))
                or (name in _MODEL_SIDECARS and folder.weights))
        if not ours:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
        removed.append(name)
    return removed


def begin_run(config: Any, trainer: str | None = None) -> None:
    """Main process, after the checks: clear the folder when the run starts afresh over an earlier one
    (--overwrite, or --resume with nothing to resume from), then write config.yaml."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = inspect_run_folder(out)
    resumed_from = folder.checkpoints[-1][1].name if config.resume and folder.checkpoints else None
    if resumed_from:
        _warn_changed_options(config, folder.checkpoints[-1][1])
    if getattr(config, "overwrite", False) or (config.resume and not folder.checkpoints):
        removed = clear_run_folder(out)
        if removed and getattr(config, "overwrite", False):
            logger.info("--overwrite: removed the earlier run from %s (%d files and folders; others kept)",
                        out, len(removed))
    write_run_config(config, out, trainer=trainer, resumed_from=resumed_from)


def _warn_changed_options(config: Any, checkpoint: Path) -> None:
    """A resume with options other than the checkpoint's continues a different recipe: say which ones."""
    from .checkpoint import read_state

    try:
        before = read_state(checkpoint).get("config") or {}
    except (OSError, ValueError):
        return
    now = json.loads(json.dumps(config.as_dict(), default=str))
    changed = [f"{k} {before[k]!r} -> {v!r}" for k, v in now.items()
               if k in before and before[k] != v and k not in ("resume", "overwrite", "output_dir", "progress_bar")]
    if changed:
        logger.warning("--resume: %s was written with other options (%s)", checkpoint, ", ".join(changed))


# ----------------------------------------------------------------------------- config.yaml


def _yaml_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _yaml_value(v) for k, v in value.items()}
    return str(value)


def run_options(config: Any) -> dict[str, Any]:
    """The options config.yaml records: every field of the config, except that --resume and --overwrite are
    false: they act on a folder, so a repeat from this file never continues or replaces another run."""
    options = {name: _yaml_value(value) for name, value in config.as_dict().items()}
    for name in ("resume", "overwrite"):
        if name in options:
            options[name] = False
    return options


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256) of a file, streamed; of a folder: its files' total size and the sha256 of
    the lines ``<file sha256>  <relative path>`` in path order (``sha256sum`` of each file, then of that list)."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return path.stat().st_size, digest.hexdigest()
    total, listing = 0, hashlib.sha256()
    for file in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
        size, sha = file_digest(file)
        total += size
        listing.update(f"{sha}  {file.relative_to(path).as_posix()}\n".encode())
    return total, listing.hexdigest()


def _inputs(config: Any) -> dict[str, Any]:
    """Datasets (and reward function files) as given: local ones with size and sha256, others as named."""
    out: dict[str, Any] = {}
    for name, value in config.as_dict().items():
        if not value or not isinstance(value, str):
            continue
        if name == "dataset" or name.endswith("_dataset"):
            paths = [value]
        elif name == "reward_fn":
            paths = [spec.rsplit(":", 1)[0] for spec in value.split(",") if spec.strip()]
        else:
            continue
        entries = []
        for given in paths:
            local = Path(given)
            if local.exists():
                size, sha = file_digest(local)
                entries.append({"path": given, "kind": "folder" if local.is_dir() else "file", "bytes": size,
                                "sha256": sha})
            else:  # a hub id (datasets) or an importable module (reward functions), as given
                entries.append({"hub" if name != "reward_fn" else "module": given})
        out[name] = entries[0] if len(entries) == 1 else entries
    return out


def _command_line(argv: list[str]) -> list[str]:
    """The process's command line, ``rlhfkit ...`` when it ran the CLI (script or ``python -m rlhfkit``)."""
    script = Path(argv[0]) if argv else Path()
    if script.name == "rlhfkit" or (script.name == "__main__.py" and script.parent.name == "rlhfkit"):
        return ["rlhfkit", *argv[1:]]
    return list(argv)


def provenance(config: Any, trainer: str | None = None, resumed_from: str | None = None) -> dict[str, Any]:
    import datetime
    import os
    import platform
    import shlex
    import socket
    import sys
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("rlhfkit", "torch", "transformers", "datasets", "accelerate", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    record: dict[str, Any] = {
        "trainer": trainer, "config_class": f"{type(config).__module__}.{type(config).__qualname__}",
        "versions": versions, "command": shlex.join(_command_line(sys.argv)), "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": _inputs(config)}
    if resumed_from:
        record["resumed_from"] = resumed_from
    return record


def write_run_config(config: Any, output_dir: str | Path, trainer: str | None = None,
                     resumed_from: str | None = None) -> Path:
    """OUTPUT_DIR/config.yaml: every option (``--config`` reads it back) and the ``_run`` provenance block."""
    import yaml

    from .checkpoint import atomic_write_text

    path = Path(output_dir) / CONFIG_FILE
    command = f"rlhfkit {trainer}" if trainer else "rlhfkit <trainer>"
    header = (f"# The options of this run and, under {RUN_KEY}, where it came from. Repeat it with:\n"
              f"#   {command} --config {path} --output-dir NEW_FOLDER\n")
    body = yaml.safe_dump({**run_options(config), RUN_KEY: provenance(config, trainer, resumed_from)},
                          sort_keys=False, allow_unicode=True, width=120)
    atomic_write_text(path, header + body)
    return path
