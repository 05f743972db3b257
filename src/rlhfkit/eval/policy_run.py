"""One policy's part of an evaluation: tokenise the prompts, sample, judge, score, and measure the KL.

:func:`_run_policy` loads one policy (so only one is in memory at a time), tokenises the prompts with its
own tokenizer (``rlhfkit.data.prepare_prompts``), samples ``num_samples`` responses per prompt with a
``torch.Generator`` seeded alike for every policy, scores them with the judge and, when given, a reward
model (both re-bound to the policy's tokenizer), collects the judge's optional flags (``describe``) and,
with a reference model, Σ_t log π − log π_ref per response (:func:`reference_logprob_sums`). The result,
a :class:`_PolicyRun`, is what :mod:`rlhfkit.eval.runner` compares with the baseline.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DataError, RlhfkitError
from ..rollout.generate import SamplingConfig
from ..rollout.rewards import EnsembleReward, ModelReward
from ..rollout.tool_prompts import ToolPrompts, ToolSettings

logger = logging.getLogger("rlhfkit")

__all__ = ["reference_logprob_sums"]


def _bind_tokenizer(source: Any, tokenizer: Any) -> Any:
    """The same source for responses tokenised by ``tokenizer``: reward models are re-wrapped (no reload)
    so that they score token ids when the tokenizers match and re-tokenise text otherwise."""
    if isinstance(source, ModelReward):
        bound = ModelReward(source.model, tokenizer, device=source.device, batch_size=source.batch_size,
                            tokenizer=source.tokenizer)
        bound.name, bound.metric_name = source.name, source.metric_name
        return bound
    if isinstance(source, EnsembleReward):
        bound = EnsembleReward([_bind_tokenizer(s, tokenizer) for s in source.sources], source.reduce,
                               source.std_coef, getattr(source, "weights", None))
        bound.name = source.name
        return bound
    return source


def _flags(judge: Any, prompts: list[str], responses: list[str]) -> list[dict[str, bool | None]] | None:
    describe = getattr(judge, "describe", None)
    if not callable(describe):
        return None
    who = f"judge '{getattr(judge, 'name', 'judge')}' describe()"
    result = describe(list(prompts), list(responses))
    if not isinstance(result, Sequence) or len(result) != len(responses):
        size = len(result) if isinstance(result, Sequence) else type(result).__name__
        raise RlhfkitError(f"{who} returned {size} for {len(responses)} responses; expected one dict each")
    out = []
    for i, flags in enumerate(result):
        if not isinstance(flags, Mapping):
            raise RlhfkitError(f"{who} returned a {type(flags).__name__} at index {i}; expected a dict")
        clean: dict[str, bool | None] = {}
        for name, value in flags.items():
            if value is not None and not (isinstance(value, (bool, np.bool_)) or (isinstance(value, int)
                                                                                and value in (0, 1))):
                raise RlhfkitError(f"{who}: flag '{name}' of response {i} is {value!r}; expected true, false "
                                   "or null")
            clean[str(name)] = None if value is None else bool(value)
        out.append(clean)
    return out


def reference_logprob_sums(ref_model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
                           response_ids: Sequence[Sequence[int]], pad_token_id: int | None,
                           temperature: float = 1.0, batch_size: int = 8,
                           response_masks: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Σ_t log π_ref(y_t | x, y_<t) over each response's tokens, at ``temperature``: float32 [N] on CPU.

    One forward pass per batch of ``batch_size`` right-padded prompt+response sequences; token log-probs
    are ``log_softmax(logits / temperature)`` at the response positions only
    (``rlhfkit.trainers.common.sequence_logps``), summed per sequence. The sampler's log-probs use the same temperature.
    ``response_masks`` (1/0 per response token) sums over the marked tokens only: a tool episode's own
    tokens, not the tool turns forced into it.
    """
    from ..data import pad_batch
    from ..models.forward import sequence_logps, to_device

    device = next(ref_model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(response_ids), batch_size):
            prompts = prompt_ids[start:start + batch_size]
            responses = response_ids[start:start + batch_size]
            sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
            marks = response_masks[start:start + batch_size] if response_masks is not None else \
                [[1] * len(r) for r in responses]
            masks = [[0] * len(p) + [int(x) for x in m][:len(r)] for p, r, m in zip(prompts, responses, marks)]
            batch = to_device(pad_batch(sequences, masks, pad_token_id), device)
            out.append(sequence_logps(ref_model, batch, temperature).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _clean_rows(prompts: Sequence[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    """Rows with a non-empty prompt (empty ones are counted and logged); a missing prompt is a DataError."""
    from ..data import LINE_COLUMN

    rows, empty, first = [], 0, None
    for index, row in enumerate(prompts):
        if not isinstance(row, Mapping):
            raise DataError(f"expected a mapping with a 'prompt', got {type(row).__name__}", source=source,
                            row=index + 1)
        line = int(row.get(LINE_COLUMN) or index + 1)
        if "prompt" not in row or row["prompt"] is None:
            raise DataError("missing prompt", source=source, row=line, field="prompt")
        prompt = row["prompt"]
        if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            empty += 1
            first = first or line
            continue
        rows.append({**row, LINE_COLUMN: line})
    if empty:
        logger.warning("%s: skipped %d empty prompt(s) (first: row %d)", source, empty, first)
    if not rows:
        raise DataError("no usable prompts", source=source)
    return rows


def _prompt_records(rows: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int,
                    source: str, prompt_format: str = "auto", model: str = "") -> list[dict[str, Any]]:
    import datasets

    from ..data import LINE_COLUMN, prepare_prompts, resolve_prompt_format

    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], LINE_COLUMN: r[LINE_COLUMN]} for r in rows])
    fmt = resolve_prompt_format(tokenizer, prompt_format, model, log=True)  # policies may differ: one line each
    records, report = prepare_prompts(ds, tokenizer, max_prompt_length, source=source, prompt_format=fmt)
    if report.truncated:
        report.log(logger, source)
    if len(records) != len(rows):  # empty prompts were removed before; nothing else is skipped
        raise DataError(f"{len(rows) - len(records)} prompts could not be used ({report.summary('')})",
                        source=source)
    for record, row in zip(records, rows):  # the row's other columns, for fn: judges (taken from the row as
        # it is: a Dataset built from every column could fail on mixed types that a reward function copes with)
        record["columns"] = {k: v for k, v in row.items() if k != "prompt" and not k.startswith("__")}
    return records


@dataclasses.dataclass
class _PolicyRun:
    """Per-response results of one policy, prompt-major: index = prompt * num_samples + sample."""

    texts: list[str]
    scores: np.ndarray | None  # [n, k] judge scores (None with a pairwise judge: rlhfkit.eval.compare)
    token_lengths: np.ndarray  # [n, k] response tokens (EOS included)
    char_lengths: np.ndarray  # [n, k] response characters
    ended: np.ndarray  # [n, k] bool
    kl: np.ndarray | None  # [n, k] Σ_t log π − log π_ref
    rewards: np.ndarray | None  # [n, k]
    flags: list[dict[str, bool | None]] | None
    turns: np.ndarray | None = None  # [n, k] assistant turns of a tool episode (with --tools)
    tool_calls: np.ndarray | None = None  # [n, k] tool calls (with --tools)
    tool_stats: dict[str, float] | None = None  # calls, errors by kind, seconds (rlhfkit.rollout.tools.ToolStats)
    verified: np.ndarray | None = None  # [n, k] a verifier's score per response (pass@k, rlhfkit.eval.verifiable)


def _run_policy(name: str, path: str, rows: list[dict[str, Any]], judge: Any | None, reward: ModelReward | None,
                reference: torch.nn.Module | None, reference_path: str | None, num_samples: int,
                sampling: SamplingConfig, seed: int, batch_size: int, max_prompt_length: int,
                device: torch.device, source: str, prompt_format: str = "auto",
                decode: Mapping[str, bool] | None = None, tools: ToolSettings | None = None,
                verifier: Any | None = None) -> _PolicyRun:
    from ..models import check_same_tokenizer, load_causal_lm, load_tokenizer
    from ..rollout.generate import HFGenerationBackend
    from ..rollout.rewards import ScoringBatch, checked_scores, row_fields

    tokenizer = load_tokenizer(path)
    if reference is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(reference_path), path, reference_path)
    records = _prompt_records(rows, tokenizer, max_prompt_length, source, prompt_format, path)
    judge = _bind_tokenizer(judge, tokenizer) if judge is not None else None  # None: sample, score no judge
    reward = _bind_tokenizer(reward, tokenizer) if reward is not None else None
    verifier = _bind_tokenizer(verifier, tokenizer) if verifier is not None else None
    model = load_causal_lm(path).to(device)
    model.eval().requires_grad_(False)
    backend = HFGenerationBackend(tokenizer, **dict(decode or {}))  # fast_decode / compile_decode
    tool_prompts = ToolPrompts(tools, tokenizer) if tools is not None else None
    turns: list[int] = []
    calls: list[int] = []
    tool_stats: dict[str, float] = {}
    generator = torch.Generator().manual_seed(int(seed))
    stops = tuple(s for s in sampling.stop_strings if s)
    texts: list[str] = []
    scores, rewards, kl, token_lengths, ended, verified = [], [], [], [], [], []
    flags: list[dict[str, bool | None]] | None = []
    n, k = len(records), num_samples
    logger.info("policy '%s': sampling %d x %d responses from %s", name, n, k, path)
    try:
        for start in range(0, n, batch_size):
            chunk = records[start:start + batch_size]
            if tool_prompts is None:
                rollout = backend.generate(model, [r["prompt_ids"] for r in chunk], k, sampling, generator)
            else:  # the prompts as written, rendered with the tools offered; episodes call them
                prompt_ids, episodes = tool_prompts.episodes([row["prompt"] for row in rows[start:start + batch_size]])
                rollout = backend.generate(model, prompt_ids, k, sampling, generator, episodes=episodes)
                turns += rollout.turns
                calls += rollout.tool_calls
                for key, value in episodes.stats.as_dict().items():
                    tool_stats[key] = tool_stats.get(key, 0.0) + float(value)
            batch_texts = backend.decode(rollout, stops)
            fields = row_fields(chunk, k)  # rendered prompts, prompts as written and columns, for fn: judges
            prompt_texts = fields["prompts"]
            scoring = ScoringBatch(responses=batch_texts, prompt_ids=rollout.prompt_ids,
                                   response_ids=backend.scored_ids(rollout), ended=rollout.ended, **fields)
            if judge is not None:
                judged = checked_scores(judge, scoring, RlhfkitError, f" of policy '{name}'", role="judge")
                scores.append(judged.numpy().astype(np.float64))
            if verifier is not None:  # the same checks as the judge's: a NaN is an error, not a miss
                verified.append(checked_scores(verifier, scoring, RlhfkitError, f" of policy '{name}'",
                                               role="verifier").numpy().astype(np.float64))
            if reward is not None:
                rewards.append(reward.score(scoring).float().numpy().astype(np.float64))
            if flags is not None and judge is not None:
                batch_flags = _flags(judge, prompt_texts, batch_texts)
                flags = None if batch_flags is None else flags + batch_flags
            if reference is not None:
                own = rollout.logprobs.sum(-1).double()
                own_tokens = rollout.policy_mask.int().tolist() if rollout.policy_mask is not None else None
                ref = reference_logprob_sums(reference, rollout.prompt_ids, rollout.response_ids,
                                             tokenizer.pad_token_id, sampling.temperature, batch_size * k,
                                             response_masks=own_tokens)
                kl.append((own - ref.double()).numpy())
            texts += batch_texts
            token_lengths += rollout.lengths
            ended += rollout.ended
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def grid(parts: list) -> np.ndarray:
        return np.concatenate(parts).reshape(n, k)

    return _PolicyRun(
        texts=texts,
        scores=grid(scores) if scores else None,
        token_lengths=np.asarray(token_lengths, dtype=np.float64).reshape(n, k),
        char_lengths=np.asarray([len(t) for t in texts], dtype=np.float64).reshape(n, k),
        ended=np.asarray(ended, dtype=bool).reshape(n, k),
        kl=grid(kl) if kl else None,
        rewards=grid(rewards) if rewards else None,
        flags=flags or None,
        turns=np.asarray(turns, dtype=np.float64).reshape(n, k) if tool_prompts is not None else None,
        tool_calls=np.asarray(calls, dtype=np.float64).reshape(n, k) if tool_prompts is not None else None,
        tool_stats=tool_stats if tool_prompts is not None else None,
        verified=grid(verified) if verified else None,
    )
