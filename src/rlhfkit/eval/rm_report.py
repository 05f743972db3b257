"""A reward model's report on a preference file (RewardBench style): accuracy by subset, calibration, length bias.

Every pair (chosen, rejected) of a prompt gets the margin m = r(chosen) − r(rejected) from the reward
model. Its outcome is 1 when m > 0, ½ when m == 0 (a tie counts half-correct) and 0 when m < 0.

* Accuracy: the mean outcome, overall and per value of a subset column (RewardBench's chat, chat-hard,
  safety, reasoning, or any other values), each with n and a percentile bootstrap interval
  (:mod:`rlhfkit.eval.stats`). The unit is the row: a ranked row (prompt/responses) gives every ordered
  pair it implies and its outcome is their mean (as ``rlhfkit eval --pairs``); a pair row is one pair.
  ``overall`` pools the rows of every subset (not RewardBench's weighted section average).
* Calibration of p = σ(m), the Bradley-Terry probability that the chosen response is preferred. On a
  preference file every pair's label is "the labelled chosen is preferred" (y = 1), so the standard
  (top-label) formulation is used: confidence = max(p, 1 − p), correct = [p > 0.5] (½ at p = ½, a tie);
  the reliability curve has equal-width bins of the confidence over [0.5, 1] and
  ECE = Σ_b (n_b / N) |acc_b − conf_b| (Guo et al. 2017, "On Calibration of Modern Neural Networks").
  Brier = (1/N) Σ (p − y)² = (1/N) Σ (1 − p)², which equals the mean (confidence − correct)².
* Length bias: accuracy on the pairs whose chosen response is shorter / longer / as long as the rejected
  one, and the share of unequal-length pairs where the reward model prefers the longer response. Lengths
  are in tokens of the reward model's tokenizer, as scored (the response's turn, EOS included).
  Calibration and length bias resample pairs, not rows (the same thing for pair files).

``rlhfkit eval-rm`` (:func:`main`) prints the table and writes ``rm_report.json`` and ``pairs.jsonl``.
The pure functions (:func:`reliability`, :func:`calibration`, :func:`length_bias`, :func:`accuracy`)
take numbers; :func:`score_preferences` and :func:`rm_report` run the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.run_folder import check_report_outputs
from ..errors import ConfigError
from .cli_options import OneLineParser
from .stats import win_rate

logger = logging.getLogger("rlhfkit")

__all__ = ["accuracy", "build_parser", "calibration", "format_rm_table", "length_bias", "main",
           "pair_outcomes", "reliability", "rm_report", "score_preferences"]

_PAIR_COLUMNS = ("chosen", "rejected")


def pair_outcomes(margins: Any) -> np.ndarray:
    """Outcome of each pair from its margin m = r(chosen) − r(rejected): 1 if m > 0, ½ if m == 0, 0 if m < 0."""
    m = np.asarray(margins, dtype=np.float64)
    return np.where(m > 0, 1.0, np.where(m < 0, 0.0, 0.5))


def accuracy(outcomes: Any, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Accuracy = (1/n) Σ outcome_i with a percentile bootstrap interval (:func:`rlhfkit.eval.stats.win_rate`).

    Returns ``n``, ``accuracy``, ``ci_low``, ``ci_high`` and the counts ``correct`` / ``ties`` / ``wrong``
    (outcomes > ½, = ½, < ½); an empty group has n = 0 and None for the rest.
    """
    y = np.asarray(outcomes, dtype=np.float64)
    if y.size == 0:
        return {"n": 0, "accuracy": None, "ci_low": None, "ci_high": None, "correct": 0, "ties": 0, "wrong": 0}
    wr = win_rate(y, n_boot, confidence, seed)
    return {"n": wr.n, "accuracy": wr.rate, "ci_low": wr.ci_low, "ci_high": wr.ci_high, "correct": wr.wins,
            "ties": wr.ties, "wrong": wr.losses}


def reliability(confidences: Any, correct: Any, bins: int = 10, low: float = 0.5,
                high: float = 1.0) -> dict[str, Any]:
    """Reliability curve and expected calibration error of (confidence, correct) pairs (Guo et al. 2017).

    ``bins`` equal-width bins over [low, high] (a confidence on an inner edge goes to the upper bin, ``high``
    to the last); per bin b: n_b, conf_b = mean confidence, acc_b = mean correctness (``correct`` may be
    fractional, a tie being ½). ECE = Σ_b (n_b / N) |acc_b − conf_b|. Empty bins have None and weigh 0.
    Raises ValueError on an empty input, mismatched lengths or a confidence outside [low, high].
    """
    conf = np.asarray(confidences, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.ndim != 1 or conf.shape != hit.shape or conf.size == 0:
        raise ValueError(f"need matching non-empty 1-D confidences and outcomes, got {conf.shape} and {hit.shape}")
    if int(bins) < 1 or not low < high:
        raise ValueError(f"need bins >= 1 and low < high, got {bins}, [{low}, {high}]")
    if not np.isfinite(conf).all() or (conf < low).any() or (conf > high).any():
        raise ValueError(f"confidences must lie in [{low}, {high}]")
    edges = np.linspace(low, high, int(bins) + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, int(bins) - 1)
    curve, ece = [], 0.0
    for b in range(int(bins)):
        rows = which == b
        n_b = int(rows.sum())
        conf_b = float(conf[rows].mean()) if n_b else None
        acc_b = float(hit[rows].mean()) if n_b else None
        if n_b:
            ece += n_b / conf.size * abs(acc_b - conf_b)  # type: ignore[operator]
        curve.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n_b, "confidence": conf_b,
                      "accuracy": acc_b})
    return {"ece": float(ece), "n": int(conf.size), "bins": curve}


def calibration(margins: Any, bins: int = 10) -> dict[str, Any]:
    """Calibration of p = σ(m) = P(chosen preferred) on pairs whose label is always "chosen is preferred".

    Top-label form: confidence = max(p, 1 − p) ∈ [0.5, 1], correct = 1 if p > ½, ½ if p = ½, 0 otherwise;
    :func:`reliability` over [0.5, 1] with ``bins`` bins gives the curve and
    ECE = Σ_b (n_b / N) |acc_b − conf_b|. Brier = (1/N) Σ (1 − p)² (label y = 1). Also returns
    ``mean_confidence`` and ``accuracy`` (a reward model whose confidence exceeds its accuracy is overconfident).
    """
    m = np.asarray(margins, dtype=np.float64)
    p = 0.5 * (1.0 + np.tanh(0.5 * m))  # σ(m) without overflow for large |m|
    conf = np.maximum(p, 1.0 - p)
    hit = pair_outcomes(m)
    out = reliability(conf, hit, bins, 0.5, 1.0)
    return {"ece": out["ece"], "brier": float(np.mean((1.0 - p) ** 2)), "mean_confidence": float(conf.mean()),
            "accuracy": float(hit.mean()), "n": out["n"], "bins": out["bins"]}


def length_bias(margins: Any, chosen_lengths: Any, rejected_lengths: Any, n_boot: int = 2000,
                confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Accuracy split by the chosen response's length relative to the rejected one, and a longer-preference share.

    ``chosen_shorter`` / ``chosen_longer`` / ``same_length``: :func:`accuracy` of the pairs with
    len(chosen) < / > / = len(rejected). ``prefers_longer``: over the unequal-length pairs, the mean of
    outcome_i when the chosen is longer and 1 − outcome_i when it is shorter (a tie counts ½), i.e. how
    often the reward model scores the longer response higher; 0.5 is no length preference.
    """
    y = pair_outcomes(margins)
    lc = np.asarray(chosen_lengths, dtype=np.float64)
    lr = np.asarray(rejected_lengths, dtype=np.float64)
    if not y.shape == lc.shape == lr.shape:
        raise ValueError(f"{y.size} margins but {lc.size} chosen and {lr.size} rejected lengths")
    shorter, longer = lc < lr, lc > lr
    toward_longer = np.where(longer, y, 1.0 - y)[shorter | longer]
    return {"chosen_shorter": accuracy(y[shorter], n_boot, confidence, seed),
            "chosen_longer": accuracy(y[longer], n_boot, confidence, seed),
            "same_length": accuracy(y[~(shorter | longer)], n_boot, confidence, seed),
            "prefers_longer": accuracy(toward_longer, n_boot, confidence, seed)}


# --------------------------------------------------------------------------------------------- the model


def score_preferences(reward_model: Any, ds: Any, source: str, max_length: int | None = None) -> dict[str, Any]:
    """Score every pair of a preference dataset with a :class:`~rlhfkit.rollout.rewards.ModelReward`.

    Rows are tokenised with the reward model's own tokenizer (``rlhfkit.data.prepare_preferences``; a ranked
    row gives every ordered pair, :func:`~rlhfkit.data.expand_to_pairs`) and scored by their token ids
    (:func:`rlhfkit.eval.runner.reward_model_accuracy` uses it too). Returns numpy arrays, one entry per pair:
    ``chosen``, ``rejected`` (scores), ``row`` (index among the kept rows), ``chosen_tokens``,
    ``rejected_tokens``; and ``num_rows`` (kept), ``skipped`` and ``lines`` (each kept row's line / row
    number in the file, or None when rows were skipped and the mapping is unknown).
    """
    from ..data import LINE_COLUMN, expand_to_pairs, prepare_preferences
    from ..rollout.rewards import ScoringBatch
    from .policy_run import _bind_tokenizer

    limit = int(max_length or reward_model.max_length or 1024)
    groups, report = prepare_preferences(ds, reward_model.tokenizer, max_length=limit, source=source)
    report.log(logger, source)
    prompt_ids, response_ids, owner = [], [], []
    for g, group in enumerate(groups):
        for pair in expand_to_pairs([group]):
            for response in pair["responses"]:
                prompt_ids.append(pair["prompt_ids"])
                response_ids.append(response)
            owner.append(g)
    m = len(owner)
    own = _bind_tokenizer(reward_model, reward_model.tokenizer)  # scores the token ids as they are
    scores = own.score(ScoringBatch([""] * 2 * m, [""] * 2 * m, prompt_ids, response_ids, [True] * 2 * m))
    scores = scores.double().numpy().reshape(m, 2)
    tokens = np.asarray([len(r) for r in response_ids], dtype=np.int64).reshape(m, 2)
    lines = None
    if report.num_skipped == 0:
        lines = list(ds[LINE_COLUMN]) if LINE_COLUMN in ds.column_names else list(range(1, len(ds) + 1))
    return {"chosen": scores[:, 0], "rejected": scores[:, 1], "row": np.asarray(owner, dtype=np.int64),
            "chosen_tokens": tokens[:, 0], "rejected_tokens": tokens[:, 1], "num_rows": len(groups),
            "skipped": report.num_skipped, "lines": lines}


MISSING_SUBSET = "(missing)"


def _check_columns(columns: Sequence[str], source: str, subset_column: str | None) -> str | None:
    """A one-line ConfigError naming the file and the missing field; returns the subset column to use."""
    cols = [c for c in columns if not c.startswith("__")]
    ranked = "prompt" in cols and "responses" in cols
    missing = [c for c in _PAIR_COLUMNS if c not in cols]
    if missing and not ranked:
        raise ConfigError(f"--pairs {source}: no '{missing[0]}' column (found: {', '.join(cols) or 'none'}); "
                          "expected prompt/chosen/rejected, chosen/rejected or prompt/responses (rename with "
                          f"--columns {missing[0]}=OLD)")
    if subset_column is None:
        return "subset" if "subset" in cols else None
    if subset_column not in cols:
        raise ConfigError(f"--pairs {source}: no '{subset_column}' column for --subset-column (found: "
                          f"{', '.join(cols)})")
    return subset_column


def rm_report(reward_model: Any, pairs: str, *, subset_column: str | None = None, bins: int = 10,
              n_boot: int = 2000, confidence: float = 0.95, seed: int = 0, max_length: int | None = None,
              split: str | None = None, columns: str | None = None, config: str | None = None,
              output_dir: str | Path | None = None) -> dict[str, Any]:
    """The report of a reward model (a :class:`~rlhfkit.rollout.rewards.ModelReward`) on the preference file
    ``pairs``: ``subsets`` (per value of the subset column) and ``overall`` (n, accuracy, interval, mean margin), :func:`calibration` and
    :func:`length_bias` (see the module docstring for every definition). ``subset_column`` defaults to
    ``subset`` when the file has it. With ``output_dir``: ``rm_report.json`` (this dict) and ``pairs.jsonl``
    (one line per pair: subset, row, line, scores, margin, p_chosen, outcome, token lengths).
    """
    from ..data import load_rows

    path = Path(str(pairs)).expanduser()
    if path.suffix and not path.exists():  # a file path, not a hub name: say which flag
        raise ConfigError(f"--pairs {pairs}: file not found")
    if output_dir is not None:  # before any scoring: never over the input pairs or another command's files
        check_report_outputs(output_dir, "rm_report.json", ["pairs.jsonl"], [pairs])
    ds = load_rows(str(pairs), split=split, columns=columns, purpose="eval", split_flag="--split", config=config,
                   config_flag="--pairs-config")
    column = _check_columns(ds.column_names, str(pairs), subset_column)
    # a row without a subset value is reported as its own subset, not as the string "None"
    values = [MISSING_SUBSET if v is None else str(v) for v in ds[column]] if column else [""] * len(ds)
    records: list[dict[str, Any]] = []
    skipped = 0
    for name in dict.fromkeys(values):  # one prepare per subset: skipped rows cannot shift a row's subset
        part = ds.select([i for i, v in enumerate(values) if v == name]) if column else ds
        where = f"{pairs} [{column}={name}]" if column else str(pairs)
        s = score_preferences(reward_model, part, where, max_length)
        skipped += s["skipped"]
        for i in range(len(s["row"])):
            g = int(s["row"][i])
            margin = float(s["chosen"][i] - s["rejected"][i])
            records.append({"subset": name if column else None, "row": g, "line": None if s["lines"] is None else s["lines"][g],
                            "chosen_score": float(s["chosen"][i]), "rejected_score": float(s["rejected"][i]),
                            "margin": margin, "p_chosen": 0.5 * (1.0 + math.tanh(0.5 * margin)),
                            "outcome": float(pair_outcomes(margin)), "chosen_tokens": int(s["chosen_tokens"][i]),
                            "rejected_tokens": int(s["rejected_tokens"][i])})
    margins = np.asarray([r["margin"] for r in records])
    def summary(mine: list[dict[str, Any]]) -> dict[str, Any]:
        per_row: dict[tuple[str, int], list[float]] = {}
        for r in mine:  # the unit is the row: a ranked row's pairs share one outcome, their mean
            per_row.setdefault((r["subset"], r["row"]), []).append(r["outcome"])
        acc = accuracy([sum(v) / len(v) for v in per_row.values()], n_boot, confidence, seed)
        return {**acc, "num_pairs": len(mine), "margin_mean": float(np.mean([r["margin"] for r in mine]))}

    subsets = {name: summary([r for r in records if r["subset"] == name])
               for name in dict.fromkeys(r["subset"] for r in records)} if column else {}
    report = {
        "reward_model": getattr(reward_model, "name", str(reward_model)), "pairs": str(pairs),
        "subset_column": column, "num_rows": len(ds), "num_pairs": len(records), "skipped_rows": skipped,
        "n_boot": int(n_boot), "confidence": confidence, "seed": seed, "subsets": subsets,
        "overall": summary(records),
        "calibration": calibration(margins, bins),
        "length_bias": {"unit": "tokens of the reward model's tokenizer",
                        **length_bias(margins, [r["chosen_tokens"] for r in records],
                                      [r["rejected_tokens"] for r in records], n_boot, confidence, seed)},
    }
    if output_dir is not None:
        from ..data.jsonl import write_jsonl

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rm_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_jsonl(out / "pairs.jsonl", records)
        logger.info("wrote %s and %s", out / "rm_report.json", out / "pairs.jsonl")
    return report


# --------------------------------------------------------------------------------------------- CLI


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(stat: Mapping[str, Any]) -> str:
    return f"{_fmt(stat['accuracy'])} [{_fmt(stat['ci_low'])}, {_fmt(stat['ci_high'])}]"


def format_rm_table(report: Mapping[str, Any]) -> str:
    """The report as text: one row per subset (n, accuracy [CI], mean margin), then calibration and length bias."""
    header = ["subset", "n", f"accuracy [{100 * report['confidence']:.0f}% CI]", "mean margin"]
    rows = [*report["subsets"].items(), ("all", report["overall"])]
    lines = [header] + [[name, str(s["n"]), _ci(s), _fmt(s["margin_mean"])] for name, s in rows]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    cal, lb = report["calibration"], report["length_bias"]
    text.append(f"calibration: ECE {_fmt(cal['ece'])} ({len(cal['bins'])} bins of max(p, 1-p) over [0.5, 1], "
                f"p = sigmoid(margin)), Brier {_fmt(cal['brier'])}, mean confidence {_fmt(cal['mean_confidence'])}")
    parts = [f"{label} {_ci(lb[key])} (n={lb[key]['n']})" for key, label in
             (("chosen_shorter", "chosen shorter"), ("chosen_longer", "chosen longer"), ("same_length", "same length"))]
    text.append("length bias: accuracy when " + "; ".join(parts))
    text.append(f"length bias: prefers the longer response {_ci(lb['prefers_longer'])} of "
                f"{lb['prefers_longer']['n']} unequal-length pairs (lengths in {lb['unit']})")
    text.append(f"{report['num_pairs']} pairs from {report['num_rows']} rows of {report['pairs']} "
                f"({report['skipped_rows']} skipped); reward model {report['reward_model']}; ties count half")
    return "\n".join(text)


def build_parser() -> argparse.ArgumentParser:
    """``rlhfkit eval-rm``'s flags."""
    p = OneLineParser(prog="rlhfkit eval-rm", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="A reward model's report on a preference file: accuracy per subset with "
                                   "bootstrap intervals, calibration (ECE, Brier) and length bias.")
    p.add_argument("--reward-model", required=True, help="reward model folder or hub id")
    p.add_argument("--pairs", required=True, help="preference file (.jsonl/.json/.parquet/.csv), dataset "
                   "folder or hub dataset: prompt/chosen/rejected, chosen/rejected or prompt/responses")
    p.add_argument("--subset-column", default=None, help="column whose values split the report "
                   "(None: 'subset' when the file has it)")
    p.add_argument("--split", default=None, help="split of a dataset folder or hub dataset")
    p.add_argument("--pairs-config", default=None, help="configuration (subset) of a hub dataset")
    p.add_argument("--columns", default=None, help="rename columns, NEW=OLD comma-separated (chosen=good)")
    p.add_argument("--bins", type=int, default=10, help="reliability bins over confidence [0.5, 1]")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per reward-model forward")
    p.add_argument("--max-length", type=int, default=None, help="longest pair in tokens (None: the model's)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (None: cuda when available)")
    p.add_argument("--output-dir", help="write rm_report.json and pairs.jsonl here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit eval-rm``: score the pairs, print :func:`format_rm_table`, write the report."""
    report = rm_report_from_options(vars(build_parser().parse_args(list(argv) if argv is not None else None)))
    print(format_rm_table(report))
    return 0


def rm_report_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The report for a mapping of ``rlhfkit eval-rm`` options (underscored names, the flags' defaults fill
    in the rest): the CLI and the pipeline's eval_rm stage both run this."""
    from ..models import load_tokenizer
    from ..models.loading import check_model_path
    from ..rollout.rewards import ModelReward
    from .cli_options import options_namespace
    from .policy_run import _device

    a = options_namespace(build_parser(), options)
    if a.bins < 1 or a.batch_size < 1 or a.n_boot < 1 or not 0 < a.confidence < 1:
        raise ConfigError("--bins, --batch-size and --n-boot must be >= 1 and --confidence in (0, 1)")
    if a.max_length is not None and a.max_length < 1:
        raise ConfigError("--max-length must be >= 1")
    check_model_path(a.reward_model, "--reward-model")
    path = Path(a.pairs).expanduser()
    if path.suffix and not path.exists():  # before the model loads
        raise ConfigError(f"--pairs {a.pairs}: file not found")
    tokenizer = load_tokenizer(a.reward_model)
    rm = ModelReward(a.reward_model, tokenizer, device=_device(a.device), batch_size=a.batch_size,
                     tokenizer=tokenizer)
    report = rm_report(rm, a.pairs, subset_column=a.subset_column, bins=a.bins, n_boot=a.n_boot,
                       confidence=a.confidence, seed=a.seed, max_length=a.max_length, split=a.split,
                       columns=a.columns, config=a.pairs_config, output_dir=a.output_dir)
    return report
