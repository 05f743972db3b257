"""Load rows from JSONL / JSON / Parquet files, local dataset folders or hub dataset names.

JSON is parsed here and JSONL in :mod:`.jsonl`, line by line, instead of by ``datasets``: its errors name
neither the file nor the line, and a user with 100k rows needs "train.jsonl, row 5213: malformed JSON" to
fix the data.
Everything else goes through :func:`datasets.load_dataset`.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError
from .jsonl import json_kind, numbered_rows

__all__ = ["LINE_COLUMN", "dataset_source", "load_rows", "one_line", "row_number"]

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


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """Load ``source`` as a :class:`datasets.Dataset`.

    ``source`` is a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, a local dataset folder (loaded
    with ``datasets.load_dataset(folder, split=split)``) or, when nothing exists at that path, a hub
    dataset name. ``split`` applies to folders and hub datasets; a single file is always its own split.
    Any problem raises :class:`DataError` with a one-line message naming the source (and the line).
    """
    source = str(source)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
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
    elif path.is_dir():
        ds = _load(source, str(path), split=split)
    elif _looks_like_file(source):
        raise DataError("file not found", source=source)
    else:
        ds = _load(source, source, split=split)
    if len(ds) == 0:
        raise DataError("no rows", source=source)
    try:
        _SOURCES[ds] = source
    except TypeError:
        pass
    return ds


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
        for key in columns:
            try:
                datasets.Dataset.from_dict({key: data[key]})
            except Exception:
                line, detail = _first_inconsistent(rows, key)
                raise DataError(f"values of inconsistent types{detail} ({one_line(exc, 120)})",
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
