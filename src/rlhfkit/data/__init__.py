"""Data loading, format detection, tokenisation with exact boundaries, and batching."""

from .collate import collate_groups, collate_sequences, pack_batch, pack_shared_prompts, pad_batch
from .formats import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    DataFormat,
    describe_format,
    detect_format,
    split_implicit_prompt,
)
from .loading import LINE_COLUMN, dataset_source, load_rows, row_number
from .tokenize import PrepareReport, expand_to_pairs, prepare_preferences, prepare_prompts, prepare_sft

__all__ = [
    "LINE_COLUMN",
    "PREFERENCE_FORMATS",
    "PROMPT_FORMATS",
    "SFT_FORMATS",
    "DataFormat",
    "PrepareReport",
    "collate_groups",
    "collate_sequences",
    "dataset_source",
    "describe_format",
    "detect_format",
    "expand_to_pairs",
    "load_rows",
    "pack_batch",
    "pack_shared_prompts",
    "pad_batch",
    "prepare_preferences",
    "prepare_prompts",
    "prepare_sft",
    "row_number",
    "split_implicit_prompt",
]
