"""Data loading, format detection, tokenisation with exact boundaries, and batching.

Modules: ``loading`` (files and datasets -> rows, with file and line in every error), ``jsonl`` (the one
JSONL reader and writer), ``formats`` (which layout a dataset has), ``tokenize`` (the conventions and
helpers the ``prepare_*`` functions share) with ``sft``, ``preferences`` and ``prompts``, and ``collate``
(padding and packing). The names below are imported on first use, so that light modules (the report,
the labelling app) can use ``rlhfkit.data.jsonl`` without loading torch, datasets and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .collate import collate_groups, collate_sequences, pack_batch, pack_shared_prompts, pad_batch
    from .formats import (
        KTO_FORMATS,
        PREFERENCE_FORMATS,
        PROMPT_FORMATS,
        SFT_FORMATS,
        DataFormat,
        describe_format,
        detect_format,
        split_implicit_prompt,
    )
    from .kto import count_labels, mismatched_completions, prepare_kto
    from .loading import (
        LINE_COLUMN,
        apply_column_map,
        choose_split,
        dataset_source,
        load_rows,
        parse_column_map,
        row_number,
    )
    from .preferences import expand_to_pairs, prepare_preferences
    from .prompts import prepare_prompts
    from .sft import prepare_sft
    from .tokenize import (
        PROMPT_FORMAT_CHOICES,
        PrepareReport,
        has_own_chat_template,
        resolve_prompt_format,
        template_tail_ids,
    )

# name -> the module that defines it
_HOMES = {
    "collate_groups": "collate", "collate_sequences": "collate", "pack_batch": "collate",
    "pack_shared_prompts": "collate", "pad_batch": "collate",
    "KTO_FORMATS": "formats", "PREFERENCE_FORMATS": "formats", "PROMPT_FORMATS": "formats", "SFT_FORMATS": "formats",
    "DataFormat": "formats", "describe_format": "formats", "detect_format": "formats",
    "split_implicit_prompt": "formats",
    "LINE_COLUMN": "loading", "dataset_source": "loading", "load_rows": "loading", "row_number": "loading",
    "apply_column_map": "loading", "choose_split": "loading", "parse_column_map": "loading",
    "expand_to_pairs": "preferences", "prepare_preferences": "preferences",
    "count_labels": "kto", "mismatched_completions": "kto", "prepare_kto": "kto",
    "prepare_prompts": "prompts",
    "prepare_sft": "sft",
    "PrepareReport": "tokenize", "PROMPT_FORMAT_CHOICES": "tokenize", "has_own_chat_template": "tokenize",
    "resolve_prompt_format": "tokenize", "template_tail_ids": "tokenize",
}

__all__ = [
    "KTO_FORMATS",
    "LINE_COLUMN",
    "PREFERENCE_FORMATS",
    "PROMPT_FORMAT_CHOICES",
    "PROMPT_FORMATS",
    "SFT_FORMATS",
    "DataFormat",
    "PrepareReport",
    "apply_column_map",
    "choose_split",
    "collate_groups",
    "collate_sequences",
    "count_labels",
    "dataset_source",
    "describe_format",
    "detect_format",
    "expand_to_pairs",
    "has_own_chat_template",
    "load_rows",
    "mismatched_completions",
    "pack_batch",
    "pack_shared_prompts",
    "pad_batch",
    "parse_column_map",
    "prepare_kto",
    "prepare_preferences",
    "prepare_prompts",
    "prepare_sft",
    "resolve_prompt_format",
    "row_number",
    "split_implicit_prompt",
    "template_tail_ids",
]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
