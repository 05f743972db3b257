"""Load rows from JSONL / JSON / Parquet / CSV files, saved datasets, local dataset folders or hub names.

JSON is parsed here and JSONL in :mod:`.jsonl`, line by line, instead of by ``datasets``: its errors name
neither the file nor the line, and a user with 100k rows needs "train.jsonl, row 5213: malformed JSON" to
fix the data. Folders written by ``save_to_disk`` go through :func:`datasets.load_from_disk`; other folders
and hub names through :func:`datasets.load_dataset`. A source with several splits gives one split, chosen by
:func:`choose_split` (never merged). A column map (``prompt=question``) renames columns right after loading.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from ..errors import ConfigError, DataError
from .jsonl import json_kind, numbered_rows

__all__ = ["LINE_COLUMN", "apply_column_map", "choose_split", "dataset_source", "load_rows", "one_line",
           "parse_column_map", "row_number"]

# Hidden column holding the 1-based source line of every JSONL row. A column (rather than a side list)
# survives shuffle/select/filter, so messages keep naming the right line. Columns starting with "__" are
# ignored by format detection and by the prepare_* functions.
LINE_COLUMN = "__line__"

# Suffixes that make a missing path a "file not found" rather than a hub dataset name.
_FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz"}

# Source names of loaded datasets (for messages when the caller does not pass one). Weak keys so that
# datasets are not kept alive by this table.
_SOURCES: weakref.WeakKeyDictionary[datasets.Dataset, str] = weakref.WeakKeyDictionary()


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception message squeezed onto one short line (library errors often span many lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dataset_source(ds: datasets.Dataset, default: str = "") -> str:
    """The source name :func:`load_rows` recorded for ``ds`` (the path or hub name as given)."""
    try:
        return _SOURCES.get(ds, default)
    except TypeError:  # not weak-referenceable
        return default


def row_number(ds_or_row: datasets.Dataset | Mapping[str, Any], index: int) -> int:
    """The row number to show in messages for row ``index`` (0-based) of a dataset, or for a row dict.

    JSONL rows report their 1-based line number in the file (blank lines count); any other source reports
    ``index + 1``.
    """
    if isinstance(ds_or_row, datasets.Dataset):
        if LINE_COLUMN in ds_or_row.column_names:
            return int(ds_or_row[index][LINE_COLUMN])
        return index + 1
    line = ds_or_row.get(LINE_COLUMN)
    return int(line) if line is not None else index + 1


def load_rows(source: str, split: str | None = None, *, columns: Any = None, purpose: str = "train",
              split_flag: str | None = None, config: str | None = None,
              config_flag: str | None = None) -> datasets.Dataset:
    """Load ``source`` as a :class:`datasets.Dataset`.

    ``source`` is a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.tsv`` file, a folder written by
    ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, a folder of data files (``train.jsonl``,
    ``test.jsonl``, ...) or, when nothing exists at that path, a hub dataset name. ``split`` picks a split
    by its own name; None applies :func:`choose_split`'s rule for ``purpose`` ("train" or "eval");
    ``split_flag`` is the flag named in messages (default ``--dataset-split`` / ``--eval-split``).
    ``columns`` (``"prompt=question,chosen=good"`` or a mapping NEW -> OLD) renames columns after loading.
    ``config`` names the configuration (subset) of a hub dataset or data folder that has several
    (``config_flag``, default ``--dataset-config`` / ``--eval-dataset-config``, is named in messages).
    Any problem raises :class:`DataError` with a one-line message naming the source (and the line).
    """
    source = str(source)
    flag = split_flag or ("--eval-split" if purpose == "eval" else "--dataset-split")
    config_flag = config_flag or ("--eval-dataset-config" if purpose == "eval" else "--dataset-config")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if config and (path.is_file() or (path.is_dir() and _saved_to_disk(path))):
        raise DataError(f"{config_flag} {config}: a file or a save_to_disk folder has no configurations; "
                        f"drop {config_flag}", source=source)
    if path.is_file():
        _check_single_split(source, split, flag, path.stem)
        if suffix == ".jsonl":
            ds = _from_rows(numbered_rows(path, source), source, lines=True)
        elif suffix == ".json":
            rows, lines = _read_json(path, source)
            ds = _from_rows(rows, source, lines=lines)
        elif suffix == ".parquet":
            ds = _load(source, "parquet", data_files=str(path), split="train")
        elif suffix in (".csv", ".tsv"):
            ds = _load(source, "csv", data_files=str(path), split="train",
                       **({"sep": "\t"} if suffix == ".tsv" else {}))
        else:
            raise DataError(f"unsupported file type '{suffix or path.name}': use .jsonl, .json, .parquet or "
                            ".csv, a dataset folder or a hub dataset name", source=source)
    elif path.is_dir() and _saved_to_disk(path):
        ds = _from_disk(source, path, split, purpose, flag)
    elif path.is_dir():
        ds = _load_split(source, str(path), split, purpose, flag, config, config_flag)
    elif _looks_like_file(source):
        raise DataError("file not found", source=source)
    else:
        ds = _load_split(source, source, split, purpose, flag, config, config_flag)
    ds = apply_column_map(ds, parse_column_map(columns), source)
    if len(ds) == 0:
        raise DataError("no rows", source=source)
    try:
        _SOURCES[ds] = source
    except TypeError:
        pass
    return ds


# Split names a trainer takes without being told: train, train_prefs, sft_train, ... (and the eval kinds).
_SPLIT_WORDS = {"train": ("train",), "eval": ("test", "validation", "valid", "val", "eval", "dev")}


def _is_kind(name: str, words: tuple[str, ...]) -> bool:
    low = name.lower()
    return any(low == w or low.startswith(w + "_") or low.endswith("_" + w) for w in words)


def choose_split(names: list[str], split: str | None, source: str, purpose: str = "train",
                 flag: str = "--dataset-split") -> str:
    """The split to use among ``names``: the named one, else the only one, else the only one of its kind.

    Kinds by name: ``train``, ``train_*`` or ``*_train`` for training; test / validation / eval (the same
    way) for ``purpose="eval"``. Splits are never merged: an ambiguous or unknown name is a DataError
    listing the splits there are.
    """
    listed = ", ".join(names) if names else "(none)"
    if split is not None:
        if split not in names:
            raise DataError(f"no split '{split}'; it has splits {listed} (pick one with {flag})", source=source)
        return split
    if len(names) == 1:
        return names[0]
    kind = [n for n in names if _is_kind(n, _SPLIT_WORDS.get(purpose, _SPLIT_WORDS["train"]))]
    if len(kind) == 1:
        return kind[0]
    raise DataError(f"has splits {listed}: pick one with {flag}", source=source)


def _check_single_split(source: str, split: str | None, flag: str, own: str | None) -> None:
    """A single file (or saved Dataset) is one split, which ``datasets`` calls "train"."""
    if split is not None and split not in ("train", own):
        raise DataError(f"no split '{split}'; it is a single split (train): drop {flag}", source=source)


def _saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _from_disk(source: str, path: Path, split: str | None, purpose: str, flag: str) -> datasets.Dataset:
    """A folder written by ``save_to_disk``: a Dataset, or one split of a DatasetDict."""
    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load saved dataset: {one_line(exc)}", source=source) from None
    if isinstance(obj, datasets.DatasetDict):
        return obj[choose_split(list(obj), split, source, purpose, flag)]
    _check_single_split(source, split, flag, str(obj.split) if obj.split else None)
    return obj


def _load_split(source: str, path: str, split: str | None, purpose: str, flag: str, config: str | None = None,
                config_flag: str = "--dataset-config") -> datasets.Dataset:
    """One split of one configuration of a folder of data files or a hub dataset (names are read first)."""
    try:
        configs = list(datasets.get_dataset_config_names(path))
        if config is None and len(configs) > 1 and datasets.get_dataset_default_config_name(path) is None:
            raise DataError(f"has configurations {', '.join(configs)}: pick one with {config_flag}", source=source)
        if config is not None and configs and config not in configs:
            raise DataError(f"no configuration '{config}'; it has {', '.join(configs)} (pick one with "
                            f"{config_flag})", source=source)
        names = list(datasets.get_dataset_split_names(path, config))
    except DataError:
        raise
    except Exception as exc:  # no such hub dataset, offline, unreadable folder, ...
        raise DataError(f"cannot load dataset: {one_line(exc)}", source=source) from None
    return _load(source, path, name=config, split=choose_split(names, split, source, purpose, flag))


def parse_column_map(spec: Any) -> dict[str, str]:
    """``"prompt=question,chosen=good"`` (or a mapping, from YAML) -> ``{"prompt": "question", ...}``."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        pairs = [(str(k).strip(), str(v).strip()) for k, v in spec.items()]
    elif isinstance(spec, str):
        pairs = []
        for item in (p.strip() for p in spec.split(",")):
            new, sep, old = item.partition("=")
            if not item:
                continue
            if not sep:
                raise ConfigError(f"--columns '{item}': expected NEW=OLD, e.g. prompt=question")
            pairs.append((new.strip(), old.strip()))
    else:
        raise ConfigError(f"--columns: expected NEW=OLD pairs or a mapping, got {type(spec).__name__}")
    out: dict[str, str] = {}
    for new, old in pairs:
        if not new or not old:
            raise ConfigError(f"--columns '{new}={old}': expected NEW=OLD, e.g. prompt=question")
        if new in out:
            raise ConfigError(f"--columns: '{new}' is given twice")
        out[new] = old
    olds = list(out.values())
    for old in olds:
        if olds.count(old) > 1:
            raise ConfigError(f"--columns: column '{old}' is mapped twice")
    return out


def apply_column_map(ds: datasets.Dataset, mapping: Mapping[str, str], source: str) -> datasets.Dataset:
    """Rename columns (NEW -> OLD); a missing OLD or a NEW that would overwrite a column is a DataError."""
    if not mapping:
        return ds
    present = [c for c in ds.column_names if not c.startswith("__")]
    renamed = {old for new, old in mapping.items() if new != old}
    for new, old in mapping.items():
        if old not in ds.column_names:
            raise DataError(f"--columns {new}={old}: no column '{old}'; columns: {', '.join(present)}",
                            source=source)
        if new != old and new in ds.column_names and new not in renamed:
            raise DataError(f"--columns {new}={old}: there is already a column '{new}' (it would be lost); "
                            f"map it to another name too, e.g. {new}_orig={new}", source=source)
    return ds.rename_columns({old: new for new, old in mapping.items() if new != old})


def _looks_like_file(source: str) -> bool:
    # Hub names are "name" or "org/name"; anything with a data-file suffix or path syntax is a local path.
    if Path(source).suffix.lower() in _FILE_SUFFIXES:
        return True
    path = source.replace(os.sep, "/")
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1


def _load(source: str, path: str, **kwargs: Any) -> datasets.Dataset:
    """``datasets.load_dataset`` with its (often multi-line) failures turned into a one-line DataError."""
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types (ConnectionError, ValueError, ...)
        raise DataError(f"cannot load dataset: {one_line(exc)}", source=source) from None
    if not isinstance(ds, datasets.Dataset):  # e.g. an IterableDataset or a DatasetDict
        raise DataError(f"expected one split, got {type(ds).__name__}", source=source)
    return ds


def _read_json(path: Path, source: str) -> tuple[list[tuple[int, Any]], bool]:
    """Rows of a ``.json`` file: a list of objects, or {"data"/"train": [...]}; JSONL content is accepted."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 (byte {exc.start})", source=source) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: it is JSON Lines under a .json name
            return numbered_rows(path, source), True
        raise DataError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                        source=source) from None
    if isinstance(obj, dict):
        for key in ("data", "train", "rows"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise DataError("expected a list of objects (or {\"data\": [...]}), got an object with keys "
                            + ", ".join(list(obj)[:10]), source=source)
    if not isinstance(obj, list):
        raise DataError(f"expected a list of objects, got {json_kind(obj)}", source=source)
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, got {json_kind(item)}", source=source, row=i + 1)
    return list(enumerate(obj, start=1)), False


def _from_rows(rows: list[tuple[int, Any]], source: str, lines: bool = False) -> datasets.Dataset:
    """Build an Arrow-backed dataset; inconsistent column types become a DataError naming column and row."""
    if not rows:
        raise DataError("no rows", source=source)
    # Union of keys in first-seen order: Dataset.from_list would only keep the first row's keys.
    columns: dict[str, None] = {}
    for _, obj in rows:
        for key in obj:
            columns.setdefault(key, None)
    data = {key: [obj.get(key) for _, obj in rows] for key in columns}
    if lines:
        data[LINE_COLUMN] = [line for line, _ in rows]
    try:
        return datasets.Dataset.from_dict(data)
    except Exception as exc:  # pyarrow raises ArrowInvalid / ArrowTypeError / OverflowError
        failed = []  # (first bad row, column, detail, the column's own error), for every column that fails
        for key in columns:
            try:
                datasets.Dataset.from_dict({key: data[key]})
            except Exception as column_exc:
                line, detail = _first_inconsistent(rows, key)
                failed.append((line, key, detail, column_exc))
        if failed:  # the earliest bad row, whichever column it is in: what the user fixes first
            line, key, detail, column_exc = min(failed, key=lambda f: (f[0] is None, f[0] or 0))
            rest = [repr(f[1]) for f in failed if f[1] != key]
            others = f"; also column{'s' if len(rest) > 1 else ''} {', '.join(rest)}" if rest else ""
            raise DataError(f"values of inconsistent types{detail} ({one_line(column_exc, 120)}){others}",
                            source=source, row=line, field=key) from None
        raise DataError(f"cannot build a table: {one_line(exc)}", source=source) from None


def _first_inconsistent(rows: list[tuple[int, Any]], key: str) -> tuple[int | None, str]:
    """The first row whose value's JSON kind differs from the column's first non-null value."""
    first_kind = None
    for line, obj in rows:
        value = obj.get(key)
        if value is None:
            continue
        kind = json_kind(value)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            return line, f": expected {first_kind} like the earlier rows, got {kind}"
    return None, ""
