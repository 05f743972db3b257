"""Reward sources for RL trainers: a local reward model, a Python function, an HTTP server, or an ensemble.

Every source has a ``name`` (used in messages and logs) and ``score(batch) -> Tensor``: float32 of shape
[N] on the CPU, one scalar per response, in the batch's order. The protocol, the batch and the checks on
returned scores are in :mod:`rlhfkit.rollout.scoring`, the HTTP source in :mod:`rlhfkit.rollout.http_reward`;
both are re-exported here, so ``rlhfkit.rollout.rewards`` names every source.

Non-finite scores (NaN, +-inf) from a function, a server or a model are returned as they are: the trainer
checks every reward for NaN/inf and stops with a message that names the source. Ensembles propagate
them (the mean, min or std of anything with a NaN is NaN).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.collate import pad_batch
from ..errors import ConfigError, ModelError, RlhfkitError
from ..models.forward import reward_scores, to_device
from ..models.loading import load_reward_model, load_tokenizer, tokenizers_match
from .http_reward import API_KEY_ENV, HTTPReward, describe_request_error, post_with_retries
from .scoring import RewardSource, ScoringBatch, _as_scores, _one_line, checked_scores

logger = logging.getLogger("rlhfkit")

__all__ = [
    "API_KEY_ENV",
    "REWARD_ENSEMBLES",
    "EnsembleReward",
    "FunctionReward",
    "HTTPReward",
    "ModelReward",
    "RewardSource",
    "ScoringBatch",
    "build_reward_source",
    "checked_scores",
    "describe_request_error",
    "load_reward_function",
    "post_with_retries",
]

REWARD_ENSEMBLES = ("mean", "min", "mean_minus_std")


class ModelReward:
    """A frozen sequence-classification reward model run locally; the score is read at the last token.

    ``model_name_or_path`` is a hub id / folder (loaded with its own tokenizer unless ``tokenizer`` is
    given) or an already loaded model (its tokenizer is ``tokenizer``, or the policy's when None). The
    model is put in eval mode with ``requires_grad`` off and moved to ``device``.

    When the reward model's tokenizer matches the policy's, ``prompt_ids + response_ids`` are scored as
    they are. Otherwise the text is re-tokenised: ``rm_tok(prompt).input_ids`` (with its special tokens;
    a doubled BOS, from a prompt whose text already starts with the BOS string, is dropped once) +
    ``rm_tok(response, add_special_tokens=False).input_ids`` + the RM's EOS when the response ended.

    Sequences longer than the model's ``max_position_embeddings`` keep their last tokens (the end of the
    prompt and the response); ``num_truncated`` counts them and the first one is logged as a warning.
    """

    def __init__(
        self,
        model_name_or_path: str | torch.nn.Module,
        policy_tokenizer,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        tokenizer=None,
        trust_remote_code: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"reward model batch size must be >= 1, not {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if isinstance(model_name_or_path, torch.nn.Module):
            model = model_name_or_path
            config = getattr(model, "config", None)
            self.name = getattr(config, "_name_or_path", "") or type(model).__name__
            rm_tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
        else:
            path = str(model_name_or_path)
            self.name = path
            rm_tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
                path, trust_remote_code=trust_remote_code)
            model = load_reward_model(path, trust_remote_code=trust_remote_code,
                                      pad_token_id=rm_tokenizer.pad_token_id)
            architectures = getattr(model.config, "architectures", None) or []
            if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
                logger.warning("reward model '%s' is a %s checkpoint: its score head is freshly initialised "
                               "(random rewards)", path, architectures[0])
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ModelError(f"reward model '{self.name}' has {num_labels} outputs; a reward model needs exactly 1")
        model.eval()
        model.requires_grad_(False)
        self.model = model.to(self.device)
        self.tokenizer = rm_tokenizer
        self.pad_token_id = rm_tokenizer.pad_token_id
        self.retokenize = not tokenizers_match(policy_tokenizer, rm_tokenizer)
        self.max_length: int | None = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.num_truncated = 0
        self._warned_truncation = False
        if self.retokenize:
            logger.info("reward model '%s' uses a different tokenizer than the policy (vocab %d vs %d): "
                        "re-tokenising prompt and response text for it", self.name, len(rm_tokenizer),
                        len(policy_tokenizer))

    def _sequences(self, batch: ScoringBatch) -> list[list[int]]:
        if self.retokenize:
            tok = self.tokenizer
            prompts = tok(list(batch.prompts)).input_ids
            responses = tok(list(batch.responses), add_special_tokens=False).input_ids
            bos = tok.bos_token_id
            sequences = []
            for prompt, response, ended in zip(prompts, responses, batch.ended):
                prompt = list(prompt)
                if bos is not None and len(prompt) >= 2 and prompt[0] == prompt[1] == bos:
                    prompt = prompt[1:]
                sequences.append(prompt + list(response) + ([tok.eos_token_id] if ended else []))
        else:
            sequences = [list(p) + list(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
        for i, seq in enumerate(sequences):
            if not seq:
                raise RlhfkitError(f"reward model '{self.name}': response {i} and its prompt are both empty")
            if self.max_length and len(seq) > self.max_length:
                if not self._warned_truncation:
                    logger.warning("reward model '%s': a %d-token sequence exceeds its %d positions; keeping the "
                                   "last %d tokens (later ones are counted, not logged)", self.name, len(seq),
                                   self.max_length, self.max_length)
                    self._warned_truncation = True
                self.num_truncated += 1
                sequences[i] = seq[-self.max_length:]
        return sequences

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        n = len(batch.responses)
        out = torch.zeros(n, dtype=torch.float32)
        if n == 0:
            return out
        sequences = self._sequences(batch)
        order = sorted(range(n), key=lambda i: len(sequences[i]))  # similar lengths together: less padding
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                rows = order[start:start + self.batch_size]
                chunk = [sequences[i] for i in rows]
                padded = pad_batch(chunk, [[0] * len(s) for s in chunk], self.pad_token_id)
                scores = reward_scores(self.model, to_device(padded, self.device))
                out[torch.as_tensor(rows)] = scores.detach().to("cpu", torch.float32)
        return out


class FunctionReward:
    """A Python function ``fn(prompts, responses) -> sequence of numbers`` (one per response).

    The result may be a list, tuple, numpy array or tensor; a wrong length or a non-number raises a
    one-line RlhfkitError naming the function. Exceptions raised inside ``fn`` propagate unchanged, with
    their traceback. NaN/inf are returned as they are (the trainer checks for them).
    """

    def __init__(self, fn: Callable[[list[str], list[str]], Any], name: str):
        if not callable(fn):
            raise ConfigError(f"reward function '{name}' is not callable")
        self.fn = fn
        self.name = name

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        n = len(batch.responses)
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        result = self.fn(list(batch.prompts), list(batch.responses))
        return _as_scores(result, n, f"reward function '{self.name}'")


def load_reward_function(spec: str) -> FunctionReward:
    """Load ``path/to/file.py:function`` as a FunctionReward named ``spec``.

    The file is imported as a fresh module (its folder is not added to ``sys.path``).
    """
    path_text, sep, func_name = spec.strip().rpartition(":")
    if not sep or not path_text or not func_name.strip():
        raise ConfigError(f"reward function '{spec}': expected path/to/file.py:function_name")
    func_name = func_name.strip()
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"reward function file '{path_text}' does not exist")
    module_name = f"_rlhfkit_reward_fn_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward function file '{path_text}' cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so dataclasses / pickling inside the file work
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"reward function file '{path_text}' failed to import: {type(exc).__name__}: "
                          f"{_one_line(exc)}") from exc
    if not hasattr(module, func_name):
        raise ConfigError(f"reward function file '{path_text}' has no function '{func_name}'")
    fn = getattr(module, func_name)
    if not callable(fn):
        raise ConfigError(f"'{func_name}' in reward function file '{path_text}' is a {type(fn).__name__}, "
                          "not a function")
    return FunctionReward(fn, name=spec.strip())


class EnsembleReward:
    """Combine several sources: ``mean``, elementwise ``min``, or ``mean_minus_std`` = mean - std_coef * std.

    The std is over the sources for each response, with ``unbiased=False`` (divide by the number of
    sources) so that two sources give half their absolute difference rather than an inflated value.
    ``last_scores`` holds each source's scores from the latest call (aligned with ``sources``) for logging.
    """

    def __init__(self, sources: Sequence[RewardSource], reduce: str = "mean", std_coef: float = 1.0):
        if reduce not in REWARD_ENSEMBLES:
            raise ConfigError(f"reward ensemble '{reduce}' is not one of: {', '.join(REWARD_ENSEMBLES)}")
        if not sources:
            raise ConfigError("a reward ensemble needs at least one source")
        self.sources = list(sources)
        self.reduce = reduce
        self.std_coef = float(std_coef)
        self.name = f"{reduce}({', '.join(s.name for s in self.sources)})"
        self.last_scores: list[torch.Tensor] = []

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        n = len(batch.responses)
        per_source = []
        for source in self.sources:
            scores = source.score(batch)
            if not torch.is_tensor(scores) or tuple(scores.shape) != (n,):
                shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
                raise RlhfkitError(f"reward source '{source.name}' returned {shape} for {n} responses; "
                                   f"expected a tensor of shape ({n},)")
            per_source.append(scores.detach().to("cpu", torch.float32))
        self.last_scores = per_source
        stacked = torch.stack(per_source)  # [S, N]
        if self.reduce == "mean":
            return stacked.mean(0)
        if self.reduce == "min":
            return stacked.min(0).values
        return stacked.mean(0) - self.std_coef * stacked.std(0, unbiased=False)


def build_reward_source(
    reward_models: Sequence[str] | None,
    reward_fns: Sequence[str] | None,
    reward_urls: Sequence[str] | None,
    policy_tokenizer,
    device: torch.device | str = "cpu",
    ensemble: str = "mean",
    std_coef: float = 1.0,
    batch_size: int = 16,
    trust_remote_code: bool = False,
) -> RewardSource:
    """One source per --reward-model / --reward-fn / --reward-url; one is returned bare, several ensembled
    (in that order: models, functions, URLs).

    ``batch_size`` is the reward models' forward batch size (HTTP sources use their own default chunking).
    """
    if ensemble not in REWARD_ENSEMBLES:
        raise ConfigError(f"reward ensemble '{ensemble}' is not one of: {', '.join(REWARD_ENSEMBLES)}")
    models, fns, urls = list(reward_models or []), list(reward_fns or []), list(reward_urls or [])
    if not (models or fns or urls):
        raise ConfigError("give a reward source: --reward-model, --reward-fn or --reward-url")
    fn_sources = [load_reward_function(spec) for spec in fns]  # cheap checks before any model loads
    url_sources = [HTTPReward(url) for url in urls]
    sources: list[RewardSource] = [ModelReward(path, policy_tokenizer, device=device, batch_size=batch_size,
                                               trust_remote_code=trust_remote_code) for path in models]
    sources += fn_sources + url_sources
    if len(sources) == 1:
        return sources[0]
    return EnsembleReward(sources, reduce=ensemble, std_coef=std_coef)
