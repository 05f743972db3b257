"""Shared fixtures: one tiny model + tokenizer built offline per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny causal LM (2 layers, hidden 64) with a locally trained BPE tokenizer."""
    from rlhfkit.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A run with --num-threads N sets torch's thread count for the whole process: restore it, so that a
    test's numbers do not depend on which tests ran before it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
