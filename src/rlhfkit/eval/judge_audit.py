"""``rlhfkit audit-judge``: how far to trust a pairwise judge, measured on pairs that people labelled.

Input: a judge spec (any that :func:`rlhfkit.judges.spec.build_judge` takes) and a labelled pairs file with
``prompt``, ``chosen``, ``rejected`` (the label: chosen is better), optionally ``chosen_model`` /
``rejected_model`` naming the policy that wrote each response (needed by ``--self-model``). Every pair is
judged with :meth:`PairwiseJudge.compare`, which asks in both orders (chosen first, then rejected first);
``--repeats R`` calls it R times. A pair whose judge reply cannot be read is skipped and counted.

Definitions (every interval is a percentile bootstrap over pairs, :mod:`rlhfkit.eval.audit_stats`):

* **verdict** of a pair: P(chosen better) averaged over both orders and the repeats; > ½ picks chosen,
  < ½ rejected, = ½ is a tie. **accuracy** = mean over pairs of 1 (picks chosen), ½ (tie), 0.
* **kappa**: the label always says "chosen", so Cohen's κ against it is degenerate. Each pair is therefore
  given slots A/B by a seeded balanced coin (a random permutation puts chosen in A for ⌈n/2⌉ pairs): the
  label is "a" or "b", the judge's verdict "a", "b" or "tie" (a tie never agrees). The judge still sees
  both orders; the slots only relabel its verdict.
* **position**: of the 2·n·R single-order asks that pick a side, the share won by the first slot (½ = no
  bias; binomial p-value from :class:`PositionStats`; single-order ties are left out and counted), and the
  **flip share**: share of verdicts whose two orders pick different winners (``Verdict.consistent``).
* **length**: X = the response in slot A, Y the other, Δ = (len X − len Y) / 100 in *characters*
  (``len`` of the text; chat messages: their contents joined). logit P(judge prefers X) = β0 + β1·Δ is fitted
  on the judge's verdicts (a tie is a fractional ½) with statsmodels Logit (Firth's penalised fit when the
  verdicts are separated by length, see :func:`logit_slope`); the same fit on the labels (X is chosen) gives
  the people's own slope. Also: how often the judge (and the label) prefers the longer response, and the
  accuracy on pairs whose labelled winner is the longer / the shorter one.
* **self-preference** (``--self-model NAME``): among pairs where exactly one response comes from NAME, the
  judge's rate of preferring it minus the labels' rate for the same pairs (per-pair differences). A weak
  judge regresses towards ½ and so shows a difference whenever the labels favour one side; the **error
  asymmetry** separates that from bias: P(judge prefers NAME's | label rejected it) − P(judge prefers the
  other | label chose NAME's), 0 for a judge whose mistakes are symmetric.
* **consistency** (R ≥ 2): share of (pair, order) asks whose single-order pick is the same on all R
  repeats; a deterministic judge (greedy LM, scoring judges, plain functions) gives 1.0 by construction.

Flags (``flagged``): ``position`` when p < 0.01 and the flip share > 0.2 (a significant first/second-slot
preference that also changes verdicts); ``length`` when the judge's slope interval excludes 0 and
|judge slope| > |label slope| (more length-driven than the people, either direction; ``direction`` says
which); ``self_preference`` when the intervals of both the difference and the error asymmetry lie above 0
(one-sided: preferring *other* models' responses is not self-preference).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..judges.base import JudgeReplyError, PairwiseJudge, PositionStats, Verdict
from .audit_stats import excludes_zero, gap_ci, kappa_ci, logit_slope, mean_ci, ratio_ci
from .cli_options import OneLineParser
from .stats import win_rate

logger = logging.getLogger("rlhfkit")

__all__ = ["LENGTH_UNIT", "MODEL_FIELDS", "PAIR_FIELDS", "THRESHOLDS", "audit_html", "audit_judge",
           "format_audit_table", "main"]

PAIR_FIELDS = ("prompt", "chosen", "rejected")
MODEL_FIELDS = ("chosen_model", "rejected_model")
LENGTH_UNIT = "characters/100"
THRESHOLDS = {"position_p_value": 0.01, "position_flip_share": 0.2}
REPORT_FILE = "judge_audit.json"


@dataclass
class _Pair:
    row: int
    prompt: Any
    chosen: Any
    rejected: Any
    chosen_model: str | None = None
    rejected_model: str | None = None


def _text(response: Any) -> str:
    """The text whose length is measured: a string, or a chat message list's contents joined."""
    if isinstance(response, str):
        return response
    if isinstance(response, Sequence) and all(isinstance(m, Mapping) for m in response):
        return "".join(str(m.get("content", "")) for m in response)
    return str(response)


def _check_rows(rows: Sequence[Mapping[str, Any]], source: str, self_model: str | None,
                row_numbers: Sequence[int] | None) -> list[_Pair]:
    """Rows -> pairs; a missing or empty field is a one-line ConfigError naming the file, row and field."""
    needed = PAIR_FIELDS + (MODEL_FIELDS if self_model else ())
    pairs = []
    for i, row in enumerate(rows):
        number = row_numbers[i] if row_numbers else i + 1
        for name in needed:
            if name not in row:
                why = " (--self-model needs chosen_model and rejected_model)" if name in MODEL_FIELDS else ""
                raise ConfigError(f"{source}, row {number}, field '{name}': missing{why}; a judge audit reads "
                                  "prompt, chosen, rejected")
            value = row[name]
            # an empty prompt is allowed (some sets keep the whole conversation in chosen / rejected)
            if name in PAIR_FIELDS and (value is None or (name != "prompt" and value in ("", []))):
                raise ConfigError(f"{source}, row {number}, field '{name}': empty")
        models = [row.get(k) for k in MODEL_FIELDS]
        pairs.append(_Pair(number, row["prompt"], row["chosen"], row["rejected"],
                           *(None if m is None else str(m) for m in models)))
    if not pairs:
        raise ConfigError(f"{source}: no pairs to audit")
    return pairs


def _pick(p: float) -> int:
    return (p > 0.5) - (p < 0.5)


def _ask(judge: PairwiseJudge, pairs: list[_Pair], repeats: int) -> tuple[list[list[Verdict] | None], list]:
    """R verdicts (both orders each) per pair; None and a skip record where the judge gave no verdict."""
    verdicts: list[list[Verdict] | None] = []
    skipped = []
    for pair in pairs:
        try:
            verdicts.append([judge.compare(pair.prompt, pair.chosen, pair.rejected) for _ in range(repeats)])
        except JudgeReplyError as exc:  # an unreadable reply loses the pair, not the audit
            verdicts.append(None)
            skipped.append({"row": pair.row, "reason": str(exc)})
            logger.warning("row %d: skipped: %s", pair.row, exc)
    return verdicts, skipped


def _length_section(outcome: np.ndarray, a_is_chosen: np.ndarray, len_c: np.ndarray, len_r: np.ndarray,
                    boot: tuple[int, float, int]) -> dict[str, Any]:
    delta_x = np.where(a_is_chosen, len_c - len_r, len_r - len_c) / 100.0  # X = slot A
    judge_x = np.where(a_is_chosen, outcome, 1.0 - outcome)
    judge_fit = logit_slope(judge_x, delta_x, boot[1])
    label_fit = logit_slope(a_is_chosen.astype(float), delta_x, boot[1])
    unequal = len_c != len_r
    chosen_longer = len_c > len_r
    judge_longer = np.where(chosen_longer, outcome, 1.0 - outcome)[unequal]
    section = {
        "unit": LENGTH_UNIT, "judge_slope": judge_fit, "label_slope": label_fit,
        "judge_prefers_longer": mean_ci(judge_longer, *boot),
        "labels_prefer_longer": mean_ci(chosen_longer[unequal].astype(float), *boot),
        "accuracy_winner_longer": mean_ci(outcome[chosen_longer], *boot),
        "accuracy_winner_shorter": mean_ci(outcome[len_c < len_r], *boot),
    }
    label_slope = label_fit["slope"] or 0.0
    section["biased"] = bool(excludes_zero(judge_fit) and abs(judge_fit["slope"]) > abs(label_slope))
    section["direction"] = ("longer" if judge_fit["slope"] > 0 else "shorter") if section["biased"] else None
    return section


def _self_section(pairs: list[_Pair], outcome: np.ndarray, name: str, boot: tuple[int, float, int]) -> dict:
    keep = [i for i, p in enumerate(pairs) if (p.chosen_model == name) != (p.rejected_model == name)]
    mine_chosen = np.array([pairs[i].chosen_model == name for i in keep], dtype=bool)
    judge = np.where(mine_chosen, outcome[keep], 1.0 - outcome[keep]) if keep else np.zeros(0)
    label = mine_chosen.astype(float)
    diff = mean_ci(judge - label, *boot)
    # a judge's mistakes toward NAME (it prefers NAME's rejected response) minus those against it (it prefers
    # the other where NAME's was chosen): 0 for symmetric noise, however weak the judge
    mistakes = np.where(mine_chosen, 1.0 - judge, judge)
    asymmetry = gap_ci(mistakes, ~mine_chosen, *boot)
    if not keep:
        logger.warning("--self-model %s: no pair has exactly one response from it", name)
    return {"model": name, "pairs": len(keep), "judge_rate": mean_ci(judge, *boot),
            "label_rate": mean_ci(label, *boot), "difference": diff, "error_asymmetry": asymmetry,
            "biased": bool(diff["ci_low"] is not None and diff["ci_low"] > 0
                           and asymmetry["ci_low"] is not None and asymmetry["ci_low"] > 0)}


def audit_judge(judge: PairwiseJudge, rows: Sequence[Mapping[str, Any]], *, self_model: str | None = None,
                repeats: int = 1, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                source: str = "pairs", row_numbers: Sequence[int] | None = None) -> dict[str, Any]:
    """Audit ``judge`` on labelled ``rows`` (prompt/chosen/rejected[/chosen_model/rejected_model]); returns
    the JSON-able report (definitions and flags in the module docstring)."""
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, not {repeats}")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ConfigError("--n-boot must be >= 1 and --confidence in (0, 1)")
    pairs = _check_rows(rows, source, self_model, row_numbers)
    # the slot coin is drawn over all rows before any is skipped, so a skip never reshuffles the others
    coins = np.random.default_rng(seed).permutation(len(pairs)) < (len(pairs) + 1) // 2
    verdicts, skipped = _ask(judge, pairs, repeats)
    kept = [i for i, v in enumerate(verdicts) if v is not None]
    if not kept:
        raise ConfigError(f"{source}: the judge gave no verdict on any of the {len(pairs)} pairs "
                          f"(first reason: {skipped[0]['reason']})")
    pairs = [pairs[i] for i in kept]
    per_pair = [verdicts[i] for i in kept]
    a_is_chosen = coins[kept]
    boot = (n_boot, confidence, seed)

    p_chosen = np.array([np.mean([v.p_a for v in vs]) for vs in per_pair])
    outcome = np.where(p_chosen > 0.5, 1.0, np.where(p_chosen < 0.5, 0.0, 0.5))
    accuracy = win_rate(outcome, n_boot, confidence, seed).as_dict()
    accuracy["value"] = accuracy.pop("rate")
    refs = ["a" if a else "b" for a in a_is_chosen]
    preds = ["tie" if o == 0.5 else ("a" if (o == 1.0) == a else "b") for o, a in zip(outcome, a_is_chosen)]

    stats = PositionStats()
    first, decisive, flips = [], [], []
    for vs in per_pair:
        # single-order picks of the first slot: forward (chosen first) and backward (rejected first)
        picks = [s for v in vs for s in (_pick(v.p_forward), _pick(1.0 - v.p_backward))]
        first.append(sum(s == 1 for s in picks))
        decisive.append(sum(s != 0 for s in picks))
        flips.append(np.mean([not v.consistent for v in vs]))
        for v in vs:
            stats.add(v)
    position = {"first_slot_share": ratio_ci(first, decisive, *boot), "p_value": stats.p_value,
                "single_order_ties": 2 * len(pairs) * repeats - int(sum(decisive)),
                "flip_share": mean_ci(flips, *boot)}
    position["biased"] = bool(position["p_value"] is not None
                              and position["p_value"] < THRESHOLDS["position_p_value"]
                              and position["flip_share"]["value"] > THRESHOLDS["position_flip_share"])
    position["towards"] = ("first" if position["first_slot_share"]["value"] > 0.5 else "second") \
        if position["biased"] else None

    len_c = np.array([len(_text(p.chosen)) for p in pairs], dtype=np.float64)
    len_r = np.array([len(_text(p.rejected)) for p in pairs], dtype=np.float64)
    report: dict[str, Any] = {
        "judge": getattr(judge, "name", type(judge).__name__), "pairs_file": source, "pairs": len(pairs),
        "skipped": len(skipped), "skipped_rows": skipped[:20], "repeats": repeats, "n_boot": n_boot,
        "confidence": confidence, "seed": seed, "thresholds": dict(THRESHOLDS), "accuracy": accuracy,
        "kappa": {**kappa_ci(refs, preds, *boot), "label_in_a": int(a_is_chosen.sum())},
        "position": position, "length": _length_section(outcome, a_is_chosen, len_c, len_r, boot),
        "self_preference": _self_section(pairs, outcome, self_model, boot) if self_model else None,
        "consistency": None,
    }
    if repeats >= 2:
        same = [np.mean([len({_pick(v.p_forward) for v in vs}) == 1, len({_pick(v.p_backward) for v in vs}) == 1])
                for vs in per_pair]
        report["consistency"] = mean_ci(same, *boot)
    report["flagged"] = [name for name, section in (("position", position), ("length", report["length"]),
                                                    ("self_preference", report["self_preference"]))
                         if section and section["biased"]]
    return report


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ci(stat: Mapping[str, Any]) -> str:
    low, high = stat.get("ci_low"), stat.get("ci_high")
    if low is None and high is None:
        return "-"
    return f"[{'-inf' if low is None else f'{low:.3f}'}, {'inf' if high is None else f'{high:.3f}'}]"


def _rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, value, interval, n, note) lines shared by the text table and the HTML fragment."""
    def line(metric: str, stat: Mapping[str, Any], note: str = "", key: str = "value"):
        return metric, _num(stat.get(key)), _ci(stat), str(stat.get("n", "")), note

    pos, length = report["position"], report["length"]
    js, ls = length["judge_slope"], length["label_slope"]
    out = [
        line("accuracy vs labels", report["accuracy"], f"ties {report['accuracy']['ties']}"),
        line("Cohen's kappa (slots A/B)", report["kappa"], f"label in A for {report['kappa']['label_in_a']}"),
        line("first-slot win share", pos["first_slot_share"],
             f"p = {pos['p_value']:.2g}; single-order ties {pos['single_order_ties']}"
             if pos["p_value"] is not None else "no decisive asks"),
        line("verdict flips on swap", pos["flip_share"]),
        line(f"length slope, judge (per {LENGTH_UNIT})", js,
             f"{js['fit']}" + (f", p = {js['p_value']:.2g}" if js["p_value"] is not None else ""), key="slope"),
        line("length slope, labels", ls,
             f"{ls['fit']}" + (f", p = {ls['p_value']:.2g}" if ls["p_value"] is not None else ""), key="slope"),
        line("judge prefers longer", length["judge_prefers_longer"]),
        line("labels prefer longer", length["labels_prefer_longer"]),
        line("accuracy, labelled winner longer", length["accuracy_winner_longer"]),
        line("accuracy, labelled winner shorter", length["accuracy_winner_shorter"]),
    ]
    sp = report.get("self_preference")
    if sp:
        out += [line(f"judge prefers {sp['model']}", sp["judge_rate"]),
                line(f"labels prefer {sp['model']}", sp["label_rate"]),
                line("self-preference (judge - labels)", sp["difference"]),
                line(f"mistakes toward - against {sp['model']}", sp["error_asymmetry"])]
    if report.get("consistency"):
        out.append(line(f"same pick on all {report['repeats']} repeats", report["consistency"]))
    return out


def format_audit_table(report: Mapping[str, Any]) -> str:
    """The audit as one plain-text table, with the flags underneath."""
    head = ("metric", "value", f"{report['confidence']:.0%} CI", "n", "note")
    rows = [head, *_rows(report)]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = [f"judge audit: {report['judge']} on {report['pairs']} pairs of {report['pairs_file']}"
             + (f" ({report['skipped']} skipped)" if report["skipped"] else "")]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        if k == 0:
            lines.append("-" * (sum(widths) + 8 + len("note")))
    lines.append("flagged: " + (", ".join(report["flagged"]) or "none"))
    return "\n".join(lines)


def audit_html(report: Mapping[str, Any]) -> str:
    """The audit as a self-contained HTML fragment (a caption and one table; text escaped)."""
    esc = html.escape
    head = ("metric", "value", f"{report['confidence']:.0%} CI", "n", "note")
    flagged = ", ".join(report["flagged"]) or "none"
    cells = ["<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    cells += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in _rows(report)]
    caption = (f"Judge audit: {esc(str(report['judge']))} on {report['pairs']} pairs of "
               f"{esc(str(report['pairs_file']))}; flagged: {esc(flagged)}")
    return (f'<table class="judge-audit"><caption>{caption}</caption>\n' + "\n".join(cells) + "\n</table>")


def build_parser() -> argparse.ArgumentParser:
    """``rlhfkit audit-judge``'s flags; the judge flags are ``rlhfkit judge``'s."""
    from ..judges.spec import JUDGE_KINDS

    p = OneLineParser(prog="rlhfkit audit-judge", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Audit a pairwise judge on human-labelled pairs: accuracy and kappa, position, "
                                   "length and self-preference bias, consistency, with bootstrap intervals.")
    p.add_argument("--judge", required=True, help=JUDGE_KINDS)
    p.add_argument("--pairs", required=True, help="labelled pairs (JSONL/JSON/parquet/CSV): prompt, chosen, "
                                                  "rejected; optional chosen_model, rejected_model")
    p.add_argument("--self-model", help="the policy the judge shares a checkpoint with (a chosen_model / "
                                        "rejected_model value): measure self-preference")
    p.add_argument("--repeats", type=int, default=1, help="times each pair is judged (>= 2: consistency)")
    p.add_argument("--max-pairs", type=int, help="audit only the first N pairs")
    p.add_argument("--output-dir", help=f"folder for {REPORT_FILE}")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="bootstrap and A/B slot seed")
    p.add_argument("--template", help="judge template file, or a shipped one: pairwise, pairwise_cot, score")
    p.add_argument("--cot", action="store_true", help="shorthand for --template pairwise_cot")
    p.add_argument("--principles", help="text file (or constitution YAML) whose principles fill {principles}")
    p.add_argument("--rate", type=float, default=0.0, help="HTTP judges: at most this many requests/s (0 = off)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL (default $RLHFKIT_JUDGE_BASE_URL or "
                                      "$OPENAI_BASE_URL)")
    p.add_argument("--api-key-env", help="name of the variable holding the API key (default "
                                         "$RLHFKIT_JUDGE_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout per request (s)")
    p.add_argument("--max-retries", type=int, default=3, help="HTTP retries (timeouts, 429, 5xx)")
    p.add_argument("--reply-retries", type=int, default=2, help="times to ask again after an unreadable reply")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="scoring judges: P(a better) = sigmoid((score_a - score_b) / temperature)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit audit-judge``: build the judge as ``rlhfkit judge`` does, audit, print the table, write
    ``judge_audit.json`` into ``--output-dir``."""
    a = build_parser().parse_args(list(argv) if argv is not None else None)
    report = audit_from_options(vars(a))
    print(format_audit_table(report))
    if a.output_dir:
        print(f"wrote {Path(a.output_dir) / REPORT_FILE}")
    return 0


def audit_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The audit for a mapping of ``rlhfkit audit-judge`` options (underscored names, the flags' defaults
    fill in the rest), written to ``output_dir``/judge_audit.json when given: the CLI and the pipeline's
    audit_judge stage both run this."""
    import os

    from ..data import load_rows, row_number
    from ..judges.spec import build_judge
    from .cli_options import options_namespace

    a = options_namespace(build_parser(), options)
    if a.max_pairs is not None and a.max_pairs < 1:
        raise ConfigError("--max-pairs must be >= 1")
    api_key = None
    if a.api_key_env:
        api_key = os.environ.get(a.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env: ${a.api_key_env} is not set")
    principles = ""
    if a.principles:
        from ..judges.constitution import principles_text

        principles = principles_text(a.principles)
    ds = load_rows(a.pairs, purpose="eval")  # a missing file fails before a model judge is loaded
    missing = [f for f in PAIR_FIELDS if f not in ds.column_names]
    if missing:
        raise ConfigError(f"{a.pairs}: field '{missing[0]}' is missing (columns: {', '.join(ds.column_names)}); "
                          "a judge audit reads prompt, chosen, rejected")
    rows = [dict(r) for r in ds][: a.max_pairs or None]
    judge = build_judge(a.judge, template="pairwise_cot" if a.cot and not a.template else a.template,
                        principles=principles, base_url=a.base_url, api_key=api_key, timeout=a.timeout,
                        max_retries=a.max_retries, reply_retries=a.reply_retries, rate=a.rate,
                        temperature=a.temperature, device=a.device)
    report = audit_judge(judge, rows, self_model=a.self_model, repeats=a.repeats, n_boot=a.n_boot,
                         confidence=a.confidence, seed=a.seed, source=str(a.pairs),
                         row_numbers=[row_number(r, i) for i, r in enumerate(rows)])
    if a.output_dir:
        out = Path(a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
