"""Reward sources for RL trainers: a local reward model, a Python function, an HTTP server, or an ensemble.

Every source has a ``name`` (used in messages and logs) and ``score(batch) -> Tensor``: float32 of shape
[N] on the CPU, one scalar per response, in the batch's order. The protocol, the batch and the checks on
returned scores are in :mod:`rlhfkit.rollout.scoring`, the HTTP source in :mod:`rlhfkit.rollout.http_reward`;
both are re-exported here, so ``rlhfkit.rollout.rewards`` names every source.

A reward function also sees the dataset row of each response (:class:`FunctionReward`: the prompt as
written and every other column as a keyword). Several sources combine by an ensemble (mean, min,
mean - k·std) or by weights (Σ_i w_i r_i); each source has a short ``metric_name`` so that trainers log
its mean as ``reward/<name>`` beside the combined reward (:func:`scores_by_source`).

Non-finite scores (NaN, +-inf) from a function, a server or a model are returned as they are: the trainer
checks every reward for NaN/inf and stops with a message that names the source. Ensembles propagate
them (the mean, min or std of anything with a NaN is NaN).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.collate import pad_batch
from ..data.tokenize import template_tail_ids
from ..errors import ConfigError, ModelError, RlhfkitError
from ..models.forward import reward_scores, to_device
from ..models.loading import load_reward_model, load_tokenizer, tokenizers_match
from .http_reward import API_KEY_ENV, HTTPReward, describe_request_error, post_with_retries
from .options import REWARD_ENSEMBLES
from .scoring import RewardSource, ScoringBatch, _as_scores, checked_scores, row_fields
from .user_code import load_functions

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
    "check_reward_columns",
    "check_reward_weights",
    "checked_scores",
    "describe_request_error",
    "load_reward_function",
    "metric_name",
    "parse_reward_weights",
    "post_with_retries",
    "row_fields",
    "score_records",
    "scores_by_source",
    "source_metrics",
    "unique_metric_names",
]

_TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")  # what TRL passes a reward function besides columns


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
            self.metric_name = Path(self.name).name or self.name
            rm_tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
        else:
            path = str(model_name_or_path)
            self.name = path
            self.metric_name = Path(path.rstrip("/\\")).name or path  # a folder's or hub id's last part
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
        # the text its own chat template writes after EOS: reward models train (rlhfkit rm) and are read there
        self.tail_ids = template_tail_ids(rm_tokenizer)
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
        if self.tail_ids:
            sequences = [s + self.tail_ids if ended else s for s, ended in zip(sequences, batch.ended)]
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
    """A Python function that scores responses: ``fn(prompts, responses, **columns)`` -> one number each.

    It is called with two positional lists, ``prompts`` (the chat-rendered text the policy saw) and
    ``responses`` (the decoded responses), and the dataset row's columns as keywords, each a list with one
    value per response (a prompt's value repeated for each of its samples): ``prompt`` holds the prompt as
    the user wrote it (a string or a list of messages), every other column comes under its own name
    (``answer=[...]``). The signature is read once: a function with ``**kwargs`` gets every column, any
    other only the columns its parameters name, so ``fn(prompts, responses)`` gets none. A required
    parameter that names no column is a one-line ConfigError from :meth:`check_columns` (trainers call it
    before training) or at the first call.

    TRL's convention is recognised by a parameter named ``completions``: the function is then called as TRL
    calls it, with keywords only: ``prompts`` = the prompts as written, ``completions`` = the responses
    (text, or ``[{"role": "assistant", "content": text}]`` where the prompt is a list of messages),
    ``completion_ids`` (policy token ids) and the columns, so ``def reward(completions, answer, **kwargs)``
    works unchanged.

    The result may be a list, tuple, numpy array or tensor; a wrong length or a non-number raises a
    one-line RlhfkitError naming the function. Exceptions raised inside ``fn`` propagate unchanged, with
    their traceback. NaN/inf are returned as they are (the trainer checks for them).
    """

    def __init__(self, fn: Callable[..., Any], name: str, metric_name: str | None = None):
        if not callable(fn):
            raise ConfigError(f"reward function '{name}' is not callable")
        self.fn = fn
        self.name = name
        own = getattr(fn, "__name__", "")
        self.metric_name = metric_name or (own if own.isidentifier() else name)
        self._read_signature()

    def _read_signature(self) -> None:
        """Which keywords the function takes: ``fixed`` (passed as prompts/responses), ``wanted`` (columns
        it names), ``required`` (named columns without a default), ``all_columns`` (it has ``**kwargs``)."""
        kinds = inspect.Parameter
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):  # a callable without a readable signature: the two lists only
            self.trl, self.all_columns, self.fixed, self.wanted, self.required = False, False, set(), set(), set()
            return
        by_name = [p for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
        self.named = {p.name for p in by_name}
        self.all_columns = any(p.kind is kinds.VAR_KEYWORD for p in params)
        self.trl = any(p.name == "completions" for p in by_name)
        if self.trl:
            self.fixed = set(_TRL_ARGUMENTS)
        else:
            positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
            if len(positional) < 2 and not any(p.kind is kinds.VAR_POSITIONAL for p in params):
                raise ConfigError(f"reward function '{self.name}' takes {len(positional)} positional "
                                  "parameter(s); it is called as fn(prompts, responses, **columns) (or TRL's "
                                  "fn(completions, **kwargs))")
            self.fixed = {p.name for p in positional[:2]}
        self.wanted = {p.name for p in by_name if p.name not in self.fixed}
        self.required = {p.name for p in by_name if p.name not in self.fixed and p.default is kinds.empty}

    def check_columns(self, available: Sequence[str], where: str = "the dataset") -> None:
        """A one-line ConfigError when a required parameter names none of ``available`` (``prompt`` and the
        row's other columns) or of TRL's arguments."""
        names = ["prompt"] + [c for c in available if c != "prompt"]
        missing = sorted(self.required - set(names))
        if missing:
            raise ConfigError(f"reward function '{self.name}' has a required parameter '{missing[0]}' that is "
                              f"not a column of {where} (columns: {', '.join(names)}); rename one to it "
                              f"(--columns {missing[0]}=OLD) or give the parameter a default")

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        n = len(batch.responses)
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        columns = {"prompt": list(batch.raw_prompts), **batch.columns}
        if self.required - set(columns):
            self.check_columns(list(batch.columns), "the scored batch")
        kwargs = {k: list(v) for k, v in columns.items()
                  if (self.all_columns or k in self.wanted) and k not in self.fixed}
        if self.trl:
            trl = {"prompts": list(batch.raw_prompts),
                   "completions": [[{"role": "assistant", "content": r}] if isinstance(p, list) else r
                                   for p, r in zip(batch.raw_prompts, batch.responses)],
                   "completion_ids": [list(ids) for ids in batch.response_ids]}
            kwargs.update({k: v for k, v in trl.items() if self.all_columns or k in self.named})
            result = self.fn(**kwargs)
        else:
            result = self.fn(list(batch.prompts), list(batch.responses), **kwargs)
        return _as_scores(result, n, f"reward function '{self.name}'")


def load_reward_function(spec: str) -> FunctionReward:
    """Load ``path/to/file.py:function`` (or ``package.module:function``) as a FunctionReward named ``spec``.

    A file is imported as a fresh module (its folder is not added to ``sys.path``).
    """
    [(func_name, fn)] = load_functions(spec, "reward function")
    return FunctionReward(fn, name=spec.strip(), metric_name=func_name)


def metric_name(source: Any) -> str:
    """A short readable name of a source for ``reward/<name>`` metrics: a function's name, a reward model
    folder's basename, a URL's host (each source's ``metric_name``), else its ``name``."""
    return str(getattr(source, "metric_name", None) or getattr(source, "name", None) or type(source).__name__)


def unique_metric_names(sources: Sequence[Any]) -> list[str]:
    """:func:`metric_name` of each source, a colliding one suffixed ``_2``, ``_3``, ... in build order."""
    names: list[str] = []
    for source in sources:
        base = candidate = metric_name(source)
        k = 1
        while candidate in names:
            k += 1
            candidate = f"{base}_{k}"
        names.append(candidate)
    return names


def scores_by_source(reward: Any, scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each source's scores of the latest batch by metric name: an ensemble's ``last_scores``, or ``scores``
    (what ``reward`` just returned) under a single source's name."""
    sources, last = getattr(reward, "sources", None), getattr(reward, "last_scores", None)
    if sources and last and len(last) == len(sources):
        return dict(zip(getattr(reward, "metric_names", None) or unique_metric_names(sources), last))
    return {metric_name(reward): scores}


def source_metrics(by_source: dict[str, torch.Tensor],
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """``reward/<name>``: each source's mean score (over every data-parallel rank's with ``gather``)."""
    return {f"reward/{name}": float((gather(t.float()) if gather else t.float()).mean())
            for name, t in by_source.items()}


def score_records(source: RewardSource, records: Sequence[dict], responses: list[str], prompt_ids: list[list[int]],
                  response_ids: list[list[int]], ended: list[bool], error: type[RlhfkitError] = RlhfkitError,
                  where: str = "") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score the responses to prompt records (G adjacent samples each; the batch carries each record's row
    for reward functions): the scores, checked finite, and each source's scores by metric name."""
    batch = ScoringBatch(responses=responses, prompt_ids=prompt_ids, response_ids=response_ids, ended=ended,
                         **row_fields(records, len(responses) // max(len(records), 1)))
    scores = checked_scores(source, batch, error, where)
    return scores, scores_by_source(source, scores)


def parse_reward_weights(value: Any) -> list[float] | None:
    """``--reward-weights`` as floats: "1.0,0.5" (or a YAML list / a number); None when unset."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) \
        else [value]
    weights = []
    for item in items:
        try:
            weight = float(str(item).strip())
        except ValueError:
            raise ConfigError(f"--reward-weights: '{str(item).strip()}' is not a number (give one per reward "
                              "source, e.g. --reward-weights 1.0,0.5)") from None
        if not math.isfinite(weight):
            raise ConfigError(f"--reward-weights: '{str(item).strip()}' is not a finite number")
        weights.append(weight)
    return weights


def check_reward_weights(weights: Sequence[float] | None, source_names: Sequence[str], ensemble: str) -> None:
    """One weight per source (models, functions, URLs, in that order), and only with the ``mean`` ensemble,
    which weights turn into the weighted sum; else a one-line ConfigError."""
    if weights is None:
        return
    if len(weights) != len(source_names):
        raise ConfigError(f"--reward-weights has {len(weights)} weight(s) for {len(source_names)} reward "
                          f"source(s) ({', '.join(source_names)}; order: --reward-model, --reward-fn, "
                          "--reward-url, --reward-judge); give one per source")
    if ensemble != "mean":
        raise ConfigError(f"--reward-weights makes the reward the weighted sum of its sources; it cannot be "
                          f"combined with --reward-ensemble {ensemble} (leave the ensemble at mean)")


class EnsembleReward:
    """Combine several sources: ``mean``, elementwise ``min``, ``mean_minus_std`` = mean - std_coef * std, or,
    with ``weights`` (one per source, ``mean`` only), the weighted sum Σ_i w_i r_i.

    The std is over the sources for each response, with ``unbiased=False`` (divide by the number of
    sources) so that two sources give half their absolute difference rather than an inflated value.
    ``last_scores`` holds each source's scores from the latest call (aligned with ``sources`` and with the
    unique ``metric_names``) for logging.
    """

    def __init__(self, sources: Sequence[RewardSource], reduce: str = "mean", std_coef: float = 1.0,
                 weights: Sequence[float] | None = None):
        if reduce not in REWARD_ENSEMBLES:
            raise ConfigError(f"reward ensemble '{reduce}' is not one of: {', '.join(REWARD_ENSEMBLES)}")
        if not sources:
            raise ConfigError("a reward ensemble needs at least one source")
        self.sources = list(sources)
        self.metric_names = unique_metric_names(self.sources)
        check_reward_weights(weights, self.metric_names, reduce)
        self.reduce = reduce
        self.std_coef = float(std_coef)
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is None:
            self.name = f"{reduce}({', '.join(s.name for s in self.sources)})"
        else:
            self.name = f"weighted_sum({', '.join(f'{w:g}*{s.name}' for w, s in zip(self.weights, self.sources))})"
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
        if self.weights is not None:
            return (torch.tensor(self.weights, dtype=torch.float32)[:, None] * stacked).sum(0)
        if self.reduce == "mean":
            return stacked.mean(0)
        if self.reduce == "min":
            return stacked.min(0).values
        return stacked.mean(0) - self.std_coef * stacked.std(0, unbiased=False)

    def check_columns(self, available: Sequence[str], where: str = "the dataset") -> None:
        check_reward_columns(self.sources, available, where)


def check_reward_columns(sources: Sequence[Any], available: Sequence[str], where: str = "the dataset") -> None:
    """Every source that reads dataset columns (``check_columns``) finds the ones it requires in
    ``available``; called before training so a misnamed column fails at once."""
    for source in sources:
        check = getattr(source, "check_columns", None)
        if callable(check):
            check(available, where)


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
    weights: Sequence[float] | None = None,
    extra_sources: Sequence[RewardSource] = (),
) -> RewardSource:
    """One source per --reward-model / --reward-fn / --reward-url, then the already built ``extra_sources``
    (the trainers' --reward-judge, built above this layer); one is returned bare (unless weighted), several
    ensembled (in that order: models, functions, URLs, extras); ``weights`` (one per source, in that order)
    make the reward Σ_i w_i r_i.

    ``batch_size`` is the reward models' forward batch size (HTTP sources use their own default chunking).
    """
    if ensemble not in REWARD_ENSEMBLES:
        raise ConfigError(f"reward ensemble '{ensemble}' is not one of: {', '.join(REWARD_ENSEMBLES)}")
    models, fns, urls = list(reward_models or []), list(reward_fns or []), list(reward_urls or [])
    extras = list(extra_sources)
    if not (models or fns or urls or extras):
        raise ConfigError("give a reward source: --reward-model, --reward-fn, --reward-url or --reward-judge")
    check_reward_weights(weights, models + fns + urls + [s.name for s in extras], ensemble)  # before models load
    fn_sources = [load_reward_function(spec) for spec in fns]  # cheap checks before any model loads
    url_sources = [HTTPReward(url) for url in urls]
    sources: list[RewardSource] = [ModelReward(path, policy_tokenizer, device=device, batch_size=batch_size,
                                               trust_remote_code=trust_remote_code) for path in models]
    sources += fn_sources + url_sources + extras
    if len(sources) == 1 and weights is None:
        return sources[0]
    return EnsembleReward(sources, reduce=ensemble, std_coef=std_coef, weights=weights)
