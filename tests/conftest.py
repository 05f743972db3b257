"""Shared fixtures: one tiny model + tokenizer built offline per test session, and a programmatic RL task."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The online trainers compile their CPU decode step by default, once per model shape and sampling setting:
# across the suite's many tiny models that would be dozens of ~30 s builds. The tests that check the
# compiled step turn it on themselves (tests/test_rollout.py).
os.environ.setdefault("RLHFKIT_COMPILE_DECODE", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny causal LM (2 layers, hidden 64) with a locally trained BPE tokenizer."""
    from rlhfkit.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


COUNT_E_REWARD = "def count_e(prompts, responses):\n    return [r.count('e') / 4.0 for r in responses]\n"


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny model with a sharpened head (rollout and tool-episode tests), one per test module."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():  # a sharper-than-random model, so greedy decoding has clear winners
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def count_e_files(tmp_path_factory):
    """A programmatic RL task: reward.py (count_e: the letters e of a response / 4) and 64 short prompts."""
    root = tmp_path_factory.mktemp("count_e")
    (root / "reward.py").write_text(COUNT_E_REWARD)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n"
                                                for i in range(64)))
    return root


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A run with --num-threads N sets torch's thread count for the whole process: restore it, so that a
    test's numbers do not depend on which tests ran before it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def postgres_databases():
    """One throwaway PostgreSQL cluster for the session (started only if a test asks for it); yields
    ``new_database()`` -> SQLAlchemy URL of a fresh empty database. Missing binaries fail, never skip."""
    from rlhfkit.label.testing import postgres_missing, temporary_postgres

    problem = postgres_missing()
    if problem:
        pytest.fail(problem, pytrace=False)
    with temporary_postgres() as new_database:
        yield new_database


@pytest.fixture(params=["sqlite", "postgresql"])
def label_db(request, tmp_path) -> str:
    """A fresh labelling database as ``--db`` takes it: a SQLite file (the default backend) or a new
    database in the session's PostgreSQL cluster, so one test body covers both backends."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return request.getfixturevalue("postgres_databases")()
