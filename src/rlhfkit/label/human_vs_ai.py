"""Human evaluation beside an AI judge's: win rates per policy side by side, and Cohen's κ on shared items.

The AI side is the output folder of ``rlhfkit eval`` (``eval.json`` + ``samples.jsonl``); the human side is
:func:`rlhfkit.label.human_eval.human_eval_report`, whose ``pairwise_items`` hold each pairwise-labelled
item's prompt, the two compared responses' texts and the labellers' mean outcome of the first. An item is
matched to the AI's judgement of the same two texts under the same prompt:

* a scoring judge (samples with a ``score``): the texts' scores are compared (a text sampled more than once:
  its mean score; closer than 1e-6 is a tie, as :func:`rlhfkit.eval.stats.pairwise_outcomes`);
* a pairwise judge (samples with ``verdict.p`` = P(policy's sample better than the baseline's sample of the
  same index)): the pair it judged, read in either order.

A chat-message prompt in samples.jsonl is matched by :func:`prompt_key`: a single user turn by its text (what
a labeller is shown), others as ``Role: content`` lines (``rlhfkit.judges.templates.prompt_text``).

Both sides' verdicts are coded as :mod:`.agreement` codes pairwise labels (0 first better, 1 even, 2 second
better) and compared with scikit-learn's ``cohen_kappa_score``. Only this module reads eval folders.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["compare_with_ai", "prompt_key", "read_ai_eval"]

TIE_TOL = 1e-6  # scores (or P - 1/2) closer than this are a tie


def read_ai_eval(path: str | Path) -> tuple[dict[str, Any], Path | None, Path]:
    """(eval.json's dict, its samples.jsonl or None, the eval.json path) from the folder or the file."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path}: no eval.json in this folder" if path.is_dir() else f"{path}: not found"
        raise ConfigError(f"{where} (give the output folder of 'rlhfkit eval' or its eval.json)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not a JSON eval report ({exc})", source=str(file)) from None
    if not isinstance(report, dict) or not isinstance(report.get("policies"), dict) or "baseline" not in report:
        raise DataError("expected the report of 'rlhfkit eval' (keys 'baseline' and 'policies')", source=str(file))
    samples = file.with_name("samples.jsonl")
    return report, samples if samples.is_file() else None, file


def prompt_key(prompt: Any) -> str | None:
    """The text a labelling item shows for an eval prompt: a string as it is, one user turn's content, or
    other chat messages as ``Role: content`` lines; None for anything else. Items made from an eval's samples
    use it too (rlhfkit.world's human_labels stage), so both sides name a prompt alike."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        if len(prompt) == 1 and prompt[0].get("role", "user") == "user" and isinstance(prompt[0].get("content"), str):
            return prompt[0]["content"]
        from ..judges.templates import prompt_text

        return prompt_text(prompt)
    return None


def _code(first_minus_second: float) -> int:
    """A signed preference for the first response as a verdict: 0 first better, 1 even, 2 second better."""
    return 0 if first_minus_second > TIE_TOL else 2 if first_minus_second < -TIE_TOL else 1


def ai_verdicts(samples: Path, baseline: str) -> tuple[dict[tuple[str, str], list[float]], dict[tuple, float]]:
    """From samples.jsonl: (prompt, text) -> a scoring judge's scores, and (prompt, policy text, baseline text)
    -> a pairwise judge's P(policy text better). Rows that are not JSON objects with a string prompt and
    response are a one-line DataError naming the row."""
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    judged, by_index = [], {}
    for n, line in enumerate(samples.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, response = prompt_key(row["prompt"]), row["response"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"expected a sample with prompt and response ({exc.__class__.__name__}: {exc})",
                            source=str(samples), row=n) from None
        if not isinstance(prompt, str) or not isinstance(response, str):
            continue
        if isinstance(row.get("score"), int | float) and math.isfinite(row["score"]):
            scores[(prompt, response)].append(float(row["score"]))
        p = (row.get("verdict") or {}).get("p") if isinstance(row.get("verdict"), dict) else None
        if isinstance(p, int | float) and math.isfinite(p):
            judged.append((prompt, row.get("sample"), response, float(p)))
        if row.get("policy") == baseline:
            by_index[(prompt, row.get("sample"))] = response
    pairs = {(prompt, text, by_index[(prompt, s)]): p for prompt, s, text, p in judged if (prompt, s) in by_index}
    return scores, pairs


def _match(item: dict[str, Any], scores: dict, pairs: dict) -> int | None:
    """The AI's verdict on a human item's two texts, or None when it judged no such pair."""
    (first, second), prompt = item["responses"], item["prompt"]
    a, b = scores.get((prompt, first)), scores.get((prompt, second))
    if a and b:
        return _code(float(np.mean(a)) - float(np.mean(b)))
    if (prompt, first, second) in pairs:
        return _code(pairs[(prompt, first, second)] - 0.5)
    if (prompt, second, first) in pairs:
        return _code(0.5 - pairs[(prompt, second, first)])
    return None


def compare_with_ai(human: dict[str, Any], ai_eval: str | Path) -> dict[str, Any]:
    """Human and AI win rates per policy side by side, and Cohen's κ between their verdicts on the human
    pairwise items the AI judged too (see the module docstring). The human verdict is the side of ½ of the
    item's mean outcome. With no matched item (or one verdict only), κ is None and ``note`` says why."""
    report, samples, file = read_ai_eval(ai_eval)
    ai_base = str(report["baseline"])
    key, hkey = f"win_rate_vs_{ai_base}", f"win_rate_vs_{human['baseline']}"
    rows = {}
    for name in dict.fromkeys([*human["policies"], *report["policies"]]):
        h, a = human["policies"].get(name) or {}, report["policies"].get(name) or {}
        rows[name] = {"human": h.get(hkey), "human_ci_low": h.get("win_rate_ci_low"),
                      "human_ci_high": h.get("win_rate_ci_high"), "human_n": h.get("n_items"),
                      "ai": a.get(key, a.get("win_rate")), "ai_ci_low": a.get("win_rate_ci_low", a.get("ci_low")),
                      "ai_ci_high": a.get("win_rate_ci_high", a.get("ci_high"))}
    items = human.get("pairwise_items") or []
    out = {"ai_eval": str(file), "ai_judge": report.get("judge"), "ai_baseline": ai_base,
           "ai_num_prompts": report.get("num_prompts"), "policies": rows, "human_items": len(items),
           "matched_items": 0, "cohen_kappa": None, "percent_agreement": None,
           "note": f"the AI baseline '{ai_base}' is not the human one" if ai_base != human["baseline"] else None}
    if samples is None:
        out["note"] = f"no samples.jsonl next to {file}: no per-item verdicts to compare (kappa not computed)"
        return out
    scores, judged = ai_verdicts(samples, ai_base)
    verdicts = [(_code(it["outcome"] - 0.5), ai) for it in items if (ai := _match(it, scores, judged)) is not None]
    out["matched_items"] = len(verdicts)
    if not verdicts:
        out["note"] = (f"no human item matched an AI judgement (prompt and both responses' texts) in {samples}: "
                       "kappa not computed")
        return out
    from sklearn.metrics import cohen_kappa_score

    out["percent_agreement"] = sum(h == a for h, a in verdicts) / len(verdicts)
    if len({v for pair in verdicts for v in pair}) < 2:
        out["note"] = f"kappa is undefined: all {len(verdicts)} matched verdicts fall in one category"
    else:
        out["cohen_kappa"] = float(cohen_kappa_score(*zip(*verdicts), labels=[0, 1, 2]))
    return out
