"""How each policy compares with the baseline: per-prompt outcomes, the report's figures from them, samples.jsonl.

Outcomes come from one of two kinds of judge (:mod:`rlhfkit.judges.spec`):

* a **scoring** judge scores every response; prompt i's outcome is ``stats.pairwise_outcomes`` of the
  policy's and the baseline's scores (all sample pairs, ties 1/2);
* a **pairwise** judge (``lm:``, ``openai:``, ``pairfn:``) compares the policy's sample s of prompt i with the
  baseline's sample s of the same prompt, asked in both orders (``PairwiseJudge.compare``), giving
  P(policy better); prompt i's outcome is the mean P over its samples (:func:`judge_against_baseline`). A
  pair whose reply could not be read (after the judge's own retries) is counted in ``judge_failures`` and
  left out; a prompt without any verdict leaves the win rates (not the other figures).

Either way the win rate, its bootstrap interval over prompts and the length-controlled win rate are
:mod:`rlhfkit.eval.stats` on those outcomes, so one code path gives both. A pairwise judge scores no single
response: ``judge_score`` (and the judge's flags) are None, not made up.

Verifiable tasks (``rlhfkit eval --pass-k 1,4 --verifier SPEC``): a scoring judge (the verifier) scores every
sample besides the judge; :func:`verifiable_metrics` turns a policy's k samples per prompt into pass@k,
maj@k and best@k (:func:`rlhfkit.eval.verifiable.verifiable_report`; correct = score >= the threshold).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .policy_run import _PolicyRun
from .stats import bootstrap_mean_ci, length_controlled_win_rate, mean_or_none, pairwise_outcomes, win_rate
from .verifiable import format_verifiable_table, verifiable_report

logger = logging.getLogger("rlhfkit")

__all__ = ["JudgedPairs", "format_verifiable_tables", "judge_against_baseline", "parse_pass_k",
           "verifiable_metrics"]

REPLY_CHARS = 500  # replies kept in samples.jsonl per order (longer ones are cut)


@dataclasses.dataclass
class JudgedPairs:
    """A pairwise judge's verdicts on one policy against the baseline, prompt-major like :class:`_PolicyRun`."""

    p: np.ndarray  # [n, k] P(policy sample better than the baseline's), NaN where the judge gave no verdict
    verdicts: list[dict[str, Any] | None]  # per response: p, both orders' p and replies, or the error

    @property
    def failures(self) -> int:
        return int(np.isnan(self.p).sum())

    def outcomes(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-prompt mean P over the samples with a verdict, mask of the prompts that have one)."""
        keep = ~np.isnan(self.p).all(axis=1)
        outcomes = np.full(self.p.shape[0], np.nan)
        outcomes[keep] = np.nanmean(self.p[keep], axis=1)
        return outcomes, keep


def judge_against_baseline(judge: Any, rows: list[dict[str, Any]], run: _PolicyRun, base: _PolicyRun,
                           num_samples: int) -> JudgedPairs:
    """Compare every sample of ``run`` with the baseline's sample of the same prompt and index, in both
    orders: n·k ``compare`` calls (2·n·k single-order judgements)."""
    from ..judges.base import JudgeReplyError

    n, k = len(rows), num_samples
    p = np.full((n, k), np.nan)
    verdicts: list[dict[str, Any] | None] = []
    for i, row in enumerate(rows):
        for s in range(k):
            idx = i * k + s
            try:
                v = judge.compare(row["prompt"], run.texts[idx], base.texts[idx])
            except JudgeReplyError as exc:
                verdicts.append({"p": None, "error": str(exc)})
                continue
            p[i, s] = v.p_a
            record = {"p": v.p_a, "p_forward": v.p_forward, "p_backward": v.p_backward}
            if v.rationales:
                record["replies"] = [r if len(r) <= REPLY_CHARS else r[:REPLY_CHARS] + "..." for r in v.rationales]
            verdicts.append(record)
    judged = JudgedPairs(p, verdicts)
    if judged.failures:
        logger.warning("judge '%s': no verdict for %d of %d pairs (left out of the win rate)",
                       getattr(judge, "name", "judge"), judged.failures, n * k)
    return judged


def flag_rates(flags: list[dict[str, bool | None]] | None, k: int, n_boot: int, confidence: float,
               seed: int) -> dict[str, float | None]:
    """``<flag>_rate`` over the responses a flag applies to, with its bootstrap interval over prompts
    (``<flag>_rate_ci_low/high``; a flag applies to all of a prompt's samples or to none)."""
    if not flags:
        return {}
    names = list(dict.fromkeys(name for f in flags for name in f))
    out: dict[str, float | None] = {}
    for name in names:
        values = [f.get(name) for f in flags]
        out[f"{name}_rate"] = mean_or_none(values)
        grid = [values[i:i + k] for i in range(0, len(values), k)]
        applies = np.asarray([[float(v) for v in row] for row in grid if all(v is not None for v in row)])
        low = high = None
        if len(applies):
            _, low, high = bootstrap_mean_ci(applies, n_boot, confidence, seed)
        out[f"{name}_rate_ci_low"], out[f"{name}_rate_ci_high"] = low, high
    return out


def _outcomes(run: _PolicyRun, base: _PolicyRun, judged: JudgedPairs | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt outcomes and the mask of prompts that have one (see the module docstring)."""
    if judged is not None:
        return judged.outcomes()
    if run.scores is None or base.scores is None:  # a pairwise judge's baseline against itself
        return np.full(len(run.char_lengths), 0.5), np.ones(len(run.char_lengths), dtype=bool)
    outcomes = pairwise_outcomes(run.scores, base.scores)
    return outcomes, np.ones(len(outcomes), dtype=bool)


def by_category(run: _PolicyRun, base: _PolicyRun, categories: list[Any],
                judged: JudgedPairs | None = None) -> dict[str, dict[str, Any]]:
    """Per category: prompts, mean judge score (None for a pairwise judge) and win rate."""
    outcomes, keep = _outcomes(run, base, judged)
    cats = np.asarray([str(c) for c in categories])
    by: dict[str, dict[str, Any]] = {}
    for cat in dict.fromkeys(cats.tolist()):
        rows = cats == cat
        judged_rows = rows & keep
        by[cat] = {"n": int(rows.sum()),
                   "judge_score": float(run.scores[rows].mean()) if run.scores is not None else None,
                   "win_rate": float(outcomes[judged_rows].mean()) if judged_rows.any() else None}
    return by


def policy_metrics(run: _PolicyRun, base: _PolicyRun, baseline: str, n_boot: int, confidence: float, seed: int,
                   judged: JudgedPairs | None = None) -> dict[str, Any]:
    """One policy's row of the report (see ``evaluate_policies``); ``judged``: a pairwise judge's verdicts."""
    judge_mean = judge_low = judge_high = None
    if run.scores is not None:
        judge_mean, judge_low, judge_high = bootstrap_mean_ci(run.scores, n_boot, confidence, seed)
    outcomes, keep = _outcomes(run, base, judged)
    out: dict[str, Any] = {"judge_score": judge_mean, "judge_score_ci_low": judge_low,
                           "judge_score_ci_high": judge_high}
    if keep.any():
        wr = win_rate(outcomes[keep], n_boot, confidence, seed)
        lc, lc_low, lc_high = length_controlled_win_rate(outcomes[keep], run.char_lengths[keep],
                                                         base.char_lengths[keep], n_boot, confidence, seed)
        out.update({f"win_rate_vs_{baseline}": wr.rate, "win_rate_ci_low": wr.ci_low, "win_rate_ci_high": wr.ci_high,
                    "lc_win_rate": lc, "lc_win_rate_ci_low": lc_low, "lc_win_rate_ci_high": lc_high,
                    "wins": wr.wins, "ties": wr.ties, "losses": wr.losses})
    else:
        out.update({key: None for key in (f"win_rate_vs_{baseline}", "win_rate_ci_low", "win_rate_ci_high",
                                          "lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high", "wins",
                                          "ties", "losses")})
    out.update({
        "reward_mean": float(run.rewards.mean()) if run.rewards is not None else None,
        "kl": float(run.kl.mean()) if run.kl is not None else None,
        "mean_length": float(run.token_lengths.mean()),
        "mean_length_chars": float(run.char_lengths.mean()),
        "no_eos_rate": float((~run.ended).mean()),
    })
    if judged is not None:
        out.update(judge_pairs=int(judged.p.size), judge_failures=judged.failures)
    out.update(flag_rates(run.flags, run.char_lengths.shape[1], n_boot, confidence, seed))
    if run.turns is not None and run.tool_calls is not None:  # --tools: the episodes' shape and the calls' errors
        stats = run.tool_stats or {}
        out.update(turns_mean=float(run.turns.mean()), tool_calls_mean=float(run.tool_calls.mean()),
                   tool_call_errors=int(stats.get("tools/errors", 0)), tool_seconds=float(stats.get("tools/seconds", 0)))
    return out


def parse_pass_k(value: Any, num_samples: int, verifier: Any) -> list[int] | None:
    """``--pass-k 1,4`` as sorted distinct ks (None when not given); a one-line ConfigError when a k is not a
    whole number >= 1, exceeds ``--num-samples`` (the estimators need n >= k samples per prompt) or no
    ``--verifier`` says which samples are correct."""
    if value is None or value == "" or value == []:
        if verifier:
            raise ConfigError("--verifier needs --pass-k (e.g. --pass-k 1,4): which k to report")
        return None
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    try:
        ks = sorted({int(str(k).strip()) for k in items if str(k).strip()})
    except ValueError:
        raise ConfigError(f"--pass-k {value!r}: expected whole numbers, comma-separated (1,4)") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--pass-k {value!r}: every k must be >= 1")
    if ks[-1] > num_samples:
        raise ConfigError(f"--pass-k {ks[-1]} needs --num-samples >= {ks[-1]} (got {num_samples}): pass@k is "
                          "estimated from n >= k samples per prompt")
    if not verifier:
        raise ConfigError("--pass-k needs --verifier SPEC (a scoring judge, e.g. fn:check.py:correct or gold:WORLD)")
    return ks


def verifiable_metrics(run: _PolicyRun, ks: list[int], threshold: float, n_boot: int, confidence: float,
                       seed: int) -> dict[str, Any]:
    """pass@k, maj@k (votes over the normalised texts) and best@k of one policy from its verifier scores,
    over its k samples per prompt: :func:`verifiable_report` without the per-prompt rows (samples.jsonl has
    every sample's score and ``correct`` flag)."""
    assert run.verified is not None
    n, k = run.verified.shape
    report = verifiable_report([i for i in range(n) for _ in range(k)], run.texts, run.verified.ravel().tolist(),
                               ks, threshold=threshold, n_boot=n_boot, confidence=confidence, seed=seed)
    report.pop("per_prompt")
    return report


def format_verifiable_tables(report: dict[str, Any]) -> str:
    """One pass@k / maj@k / best@k table per policy (eval.json's ``verifiable``), or "" without one."""
    blocks = [f"{name}: verifier {report.get('verifier')}\n{format_verifiable_table(v)}"
              for name, v in (report.get("verifiable") or {}).items()]
    return "\n\n".join(blocks)


def json_safe(value: Any) -> Any:
    """Non-finite floats as None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_outputs(out: Path, report: dict[str, Any], rows: list[dict[str, Any]], runs: dict[str, _PolicyRun],
                  names: list[str], k: int, judged: dict[str, JudgedPairs] | None = None) -> None:
    """``eval.json`` (the report) and ``samples.jsonl`` (one row per response; a pairwise judge's verdict on
    each non-baseline sample under ``verdict``, its ``score`` None)."""
    from ..data import LINE_COLUMN

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(json_safe(report), indent=2, default=str) + "\n", encoding="utf-8")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as fh:
        for name in names:
            run = runs[name]
            verdicts = judged[name].verdicts if judged and name in judged else None
            for p, row in enumerate(rows):
                for s in range(k):
                    i = p * k + s
                    sample = {"prompt": row["prompt"], "prompt_row": row[LINE_COLUMN]}
                    if "category" in row:
                        sample["category"] = row["category"]
                    sample.update({"policy": name, "sample": s, "response": run.texts[i],
                                   "score": float(run.scores[p, s]) if run.scores is not None else None,
                                   "length": int(run.token_lengths[p, s]), "ended": bool(run.ended[p, s])})
                    if verdicts is not None:
                        sample["verdict"] = verdicts[i]
                    if run.verified is not None:
                        score = float(run.verified[p, s])
                        sample.update(verified=score, correct=score >= float(report.get("pass_threshold", 0.5)))
                    if run.rewards is not None:
                        sample["reward"] = float(run.rewards[p, s])
                    if run.kl is not None:
                        sample["kl"] = float(run.kl[p, s])
                    if run.turns is not None and run.tool_calls is not None:
                        sample.update(turns=int(run.turns[p, s]), tool_calls=int(run.tool_calls[p, s]))
                    if run.flags is not None:
                        sample["flags"] = run.flags[i]
                    fh.write(json.dumps(json_safe(sample), default=str) + "\n")
    logger.info("wrote %s and %s", out / "eval.json", out / "samples.jsonl")
