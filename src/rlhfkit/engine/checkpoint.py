"""Crash-safe checkpoints: written to a temporary folder, fsynced, then renamed into place.

A rename is atomic on POSIX file systems, so a folder named ``checkpoint-N`` is always complete; a crash
leaves at most a ``.tmp`` folder behind, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("rlhfkit")

STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(final: Path) -> Path:
    """The temporary folder a checkpoint is written into before :func:`commit_dir` renames it."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp"


def fresh_staging_dir(final: Path) -> Path:
    """Create an empty :func:`staging_dir` for ``final`` (removing a crash's leftover)."""
    tmp = staging_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> Path:
    """Make ``tmp`` durable, then rename it to ``final`` (swapping out an older folder of that name)."""
    final = Path(final)
    fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): swap, then delete the old one
        trash = final.parent / f".{final.name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def atomic_dir_write(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, make it durable, then rename ``tmp_dir`` to ``final``."""
    tmp = fresh_staging_dir(final)
    write(tmp)
    return commit_dir(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of a per-step JSONL log up to ``step``: after a resume the later ones are written again
    (a line cut short by the crash is dropped)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for child in Path(output_dir).iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_dir() and (child / STATE_FILE).exists():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resume_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest complete one (a warning when there is none)."""
    found = latest_checkpoint(output_dir)
    if found is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", output_dir)
    return found


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def write_state(folder: Path, state: dict) -> None:
    """Write the run state (step, total_steps, config, ...) that marks ``folder`` as a complete checkpoint."""
    (Path(folder) / STATE_FILE).write_text(json.dumps(state, default=str))


def resume_hint(checkpoint: Path | None, label: str = "the last good checkpoint is") -> str:
    """The end of the message of an error that stopped a run: the checkpoint to rerun from with --resume."""
    if checkpoint is None:
        return "; no checkpoint was saved yet (use --save-steps)"
    return f"; {label} {checkpoint} (fix the cause, then rerun with --resume)"


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep`` (and stale temp folders)."""
    found = list_checkpoints(output_dir)
    for _, path in found[: max(len(found) - max(keep, 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
