"""Metrics for verifiable tasks (maths, code) from k of n samples per prompt: pass@k, maj@k, best@k.

Every metric here is an *unbiased estimator from n ≥ k observed samples* of what k fresh samples would
score, i.e. the average over all k-subsets of the n samples (Chen et al. 2021, "Evaluating Large Language
Models Trained on Code", §2.1): sampling exactly k responses and scoring them once has a much larger
variance for the same compute.

* pass@k: P(at least one of k samples is correct).
* best@k: E[max reward of k samples] (best-of-k with an oracle reward; a reward model's best-of-n
  selection is a different metric).
* maj@k: E[correctness of the plurality answer of k samples] (self-consistency, Wang et al. 2022,
  "Self-Consistency Improves Chain of Thought Reasoning in Language Models"), ties broken uniformly.

:func:`verifiable_report` computes them per prompt and averages over prompts with a percentile bootstrap
interval over prompts (:func:`rlhfkit.eval.stats.bootstrap_mean_ci`). Pure numpy; nothing touches a model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from .stats import bootstrap_mean_ci

__all__ = [
    "MAJ_EXACT_CAP",
    "MAJ_MC_DRAWS",
    "best_at_k",
    "default_answer_fn",
    "format_verifiable_table",
    "maj_at_k",
    "pass_at_k",
    "verifiable_report",
]

# maj@k is exact while the number of ways k samples can split over the distinct answers is at most this
# (each way is one multivariate-hypergeometric term); beyond it a seeded Monte Carlo estimate is used.
MAJ_EXACT_CAP = 20_000
# Random k-subsets drawn by the Monte Carlo estimate of maj@k (standard error <= 0.5 / sqrt(draws) = 0.0035).
MAJ_MC_DRAWS = 20_000


def _check_nk(n: int, k: int) -> None:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if int(k) > int(n):
        raise ValueError(f"k = {k} is more than the n = {n} samples observed; pass@k needs n >= k")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):

        pass@k = 1 − C(n − c, k) / C(n, k)

    i.e. one minus the chance that a k-subset drawn without replacement holds no correct sample. The
    naive closed form overflows floats (C(200, 100) ~ 9e58) and loses precision::

        1.0 - math.comb(n - c, k) / math.comb(n, k)

    so it is computed as Chen et al.'s numerically stable product:

        pass@k = 1 − Π_{i = n−c+1}^{n} (1 − k / i)      (= 1 when n − c < k).

    Raises ValueError when k > n, k < 1 or c is not in [0, n].
    """
    n, c, k = int(n), int(c), int(k)
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c = {c} correct samples is outside [0, n = {n}]")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def best_at_k(rewards: Sequence[float], k: int) -> float:
    """Unbiased E[max reward of k samples] drawn without replacement from the n observed ones.

    With the rewards sorted ascending r_(1) ≤ ... ≤ r_(n), r_(i) is the maximum of exactly C(i−1, k−1)
    of the C(n, k) k-subsets (those holding it and k−1 of the i−1 smaller ones), so

        best@k = Σ_{i=k}^{n} r_(i) · C(i − 1, k − 1) / C(n, k)

    (the order-statistics form of the average over all k-subsets; ties among rewards do not matter since
    equal values are interchangeable). best@1 is the mean and best@n the maximum. The weights are exact
    integer ratios (Python ints) turned into floats once.
    """
    r = np.sort(np.asarray(rewards, dtype=np.float64))
    n, k = len(r), int(k)
    _check_nk(n, k)
    if not np.isfinite(r).all():
        raise ValueError("rewards must be finite numbers")
    total = math.comb(n, k)
    weights = np.array([math.comb(i - 1, k - 1) / total for i in range(1, n + 1)], dtype=np.float64)
    return float(weights @ r)


def default_answer_fn(text: Any) -> str:
    """The answer of a sample for maj@k by default: its text, whitespace-collapsed, stripped and lowercased.

    Tasks with a final answer inside a longer text (``#### 42``, ``\\boxed{42}``) pass their own
    ``answer_fn`` (e.g. the verifier's extractor), so that two derivations of one answer vote together.
    """
    return " ".join(str(text).split()).lower()


def _answer_correctness(answers: list[Hashable], correct: Any) -> dict[Hashable, float]:
    if isinstance(correct, str) or not isinstance(correct, Sequence | np.ndarray):
        reference = correct
        return {a: float(a == reference) for a in dict.fromkeys(answers)}
    flags = [float(f) for f in correct]
    if len(flags) != len(answers):
        raise ValueError(f"{len(flags)} correctness flags for {len(answers)} answers")
    sums: dict[Hashable, list[float]] = {}
    for a, f in zip(answers, flags):
        sums.setdefault(a, []).append(f)
    return {a: sum(v) / len(v) for a, v in sums.items()}  # a consistent verifier gives 0 or 1


def _votes(counts: np.ndarray, worth: np.ndarray) -> np.ndarray:
    """Expected correctness of the plurality answer of each row of answer counts [rows, answers]: the
    answers tied for the most votes share the win equally (a tie broken uniformly at random)."""
    top = counts == counts.max(axis=1, keepdims=True)
    return (top * worth).sum(axis=1) / top.sum(axis=1)


def _compositions(counts: list[int], k: int, cap: int) -> int:
    """How many vectors x with 0 ≤ x_a ≤ counts[a] and Σ x_a = k (the exact sum's number of terms), or
    cap + 1 when there are more (only "over the cap" matters, and the numbers stay small)."""
    ways = [1] + [0] * k
    for c in counts:
        ways = [min(sum(ways[t - x] for x in range(min(c, t) + 1)), cap + 1) for t in range(k + 1)]
    return ways[k]


def _count_vectors(counts: list[int], k: int) -> list[tuple[int, ...]]:
    """Every x with 0 ≤ x_a ≤ counts[a] and Σ x_a = k (depth-first, pruning prefixes that cannot reach k)."""
    room = list(itertools.accumulate(reversed(counts)))[::-1] + [0]  # room[j] = Σ_{a ≥ j} counts[a]
    out: list[tuple[int, ...]] = []
    stack: list[tuple[tuple[int, ...], int]] = [((), k)]
    while stack:
        prefix, left = stack.pop()
        j = len(prefix)
        if j == len(counts):
            out.append(prefix)
            continue
        for x in range(max(0, left - room[j + 1]), min(counts[j], left) + 1):
            stack.append((prefix + (x,), left - x))
    return out


def maj_at_k(answers: Sequence[Any], correct_answer_or_flags: Any, k: int, *,
             answer_fn: Callable[[Any], Hashable] | None = None, seed: int = 0,
             exact_cap: int = MAJ_EXACT_CAP, draws: int = MAJ_MC_DRAWS) -> float:
    """maj@k: the expected correctness of the plurality (majority-vote) answer of a random k-subset.

    ``answers`` are the n samples' texts (or answers), mapped through ``answer_fn`` (default
    :func:`default_answer_fn`); ``correct_answer_or_flags`` is the reference answer (mapped the same way;
    an answer is correct when it equals it) or one correctness flag per sample (an answer's correctness is
    then the mean flag of the samples giving it: 0 or 1 for a consistent verifier). With A the distinct
    answers, n_a their counts and w_a their correctness, over the k-subsets S drawn uniformly without
    replacement (Wang et al. 2022, self-consistency; the k-subset average as in Chen et al. 2021):

        maj@k = E_S [ Σ_{a ∈ top(S)} w_a / |top(S)| ],   top(S) = the answers most frequent in S,

    a tie for the plurality broken uniformly at random. Exact by the multivariate hypergeometric law,
    Σ_x Π_a C(n_a, x_a) / C(n, k) · vote(x) over count vectors x with Σ x_a = k, when there are at most
    ``exact_cap`` such vectors; else a Monte Carlo mean over ``draws`` k-subsets from
    ``numpy.random.default_rng(seed)`` (standard error ≤ 0.5/√draws). maj@1 = the mean correctness.
    """
    fn = answer_fn or default_answer_fn
    keys = [fn(a) for a in answers]
    n, k = len(keys), int(k)
    _check_nk(n, k)
    target = correct_answer_or_flags
    if isinstance(target, str) or not isinstance(target, Sequence | np.ndarray):
        target = fn(target)
    worth_of = _answer_correctness(keys, target)
    distinct = list(dict.fromkeys(keys))
    counts = [keys.count(a) for a in distinct]
    worth = np.asarray([worth_of[a] for a in distinct], dtype=np.float64)
    if k == 1 or max(counts) == 1:  # every k-subset's vote is a k-way tie (or one sample): the mean
        return float(np.dot(counts, worth) / n)
    if _compositions(counts, k, int(exact_cap)) <= exact_cap:
        x = np.asarray(_count_vectors(counts, k), dtype=np.int64)
        ways = np.asarray([math.prod(math.comb(c, xa) for c, xa in zip(counts, row)) for row in x.tolist()],
                          dtype=np.float64)  # multivariate hypergeometric weights; Σ ways = C(n, k)
        return float(ways @ _votes(x, worth) / ways.sum())
    rng = np.random.default_rng(seed)
    codes = np.asarray([distinct.index(a) for a in keys])
    m = len(distinct)
    total = 0.0
    chunk = max(1, (1 << 22) // n)  # bounds memory: chunk x n random keys at a time
    for start in range(0, int(draws), chunk):
        rows = min(chunk, int(draws) - start)
        # the k smallest of n iid uniforms per row: a uniformly random k-subset without replacement
        picked = codes[np.argpartition(rng.random((rows, n)), k - 1, axis=1)[:, :k]]
        flat = (np.arange(rows)[:, None] * m + picked).ravel()
        total += float(_votes(np.bincount(flat, minlength=rows * m).reshape(rows, m), worth).sum())
    return total / int(draws)


def _is_correct(reward: Any, threshold: float) -> bool:
    if isinstance(reward, bool | np.bool_):
        return bool(reward)
    return float(reward) >= threshold


def verifiable_report(prompt_ids: Sequence[Hashable], samples: Sequence[str], rewards: Sequence[float | bool],
                      ks: Sequence[int], answers: Sequence[Any] | None = None, threshold: float = 0.5, *,
                      answer_fn: Callable[[Any], Hashable] | None = None, n_boot: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """pass@k, maj@k and best@k per prompt and overall, as a JSON-able dict.

    Inputs are flat lists with one entry per sample: ``prompt_ids[i]`` groups sample ``samples[i]`` with
    its prompt's others (prompts keep the order they first appear in), ``rewards[i]`` is its verifier
    reward; a sample is correct when the reward is True or ≥ ``threshold``. maj@k votes over
    ``answers[i]`` when given, else over ``answer_fn(samples[i])`` (default :func:`default_answer_fn`),
    with the samples' correctness flags deciding whether the winning answer is right. best@k takes the
    rewards as numbers (True = 1). Per prompt with n samples, c correct (see each function's formula):
    ``pass@k`` (Chen et al. 2021), ``best@k``, ``maj@k``; a prompt with n < k has None for that k.

    ``overall[metric]`` = the mean over the prompts with n ≥ k, with a percentile bootstrap interval over
    those prompts (``ci_low``, ``ci_high``; :func:`rlhfkit.eval.stats.bootstrap_mean_ci`) and ``n`` =
    their number; an empty group has None everywhere.
    """
    m = len(prompt_ids)
    if not len(samples) == len(rewards) == m or (answers is not None and len(answers) != m):
        raise ValueError(f"{m} prompt ids, {len(samples)} samples, {len(rewards)} rewards"
                         + ("" if answers is None else f", {len(answers)} answers") + ": expected one each")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    fn = answer_fn or default_answer_fn
    keys = list(answers) if answers is not None else [fn(s) for s in samples]
    groups: dict[Hashable, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(i)
    per_prompt: list[dict[str, Any]] = []
    for pid, rows in groups.items():
        flags = [_is_correct(rewards[i], threshold) for i in rows]
        values = [float(rewards[i]) for i in rows]
        votes = [keys[i] for i in rows]
        n, c = len(rows), sum(flags)
        entry: dict[str, Any] = {"prompt_id": pid, "n": n, "correct": c}
        for k in ks:
            ok = k <= n
            entry[f"pass@{k}"] = pass_at_k(n, c, k) if ok else None
            entry[f"maj@{k}"] = maj_at_k(votes, flags, k, answer_fn=lambda a: a, seed=seed) if ok else None
            entry[f"best@{k}"] = best_at_k(values, k) if ok else None
        per_prompt.append(entry)
    overall: dict[str, dict[str, Any]] = {}
    for k in ks:
        for metric in ("pass", "maj", "best"):
            name = f"{metric}@{k}"
            vals = [p[name] for p in per_prompt if p[name] is not None]
            if vals:
                mean, low, high = bootstrap_mean_ci(vals, n_boot, confidence, seed)
                overall[name] = {"mean": mean, "ci_low": low, "ci_high": high, "n": len(vals)}
            else:
                overall[name] = {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    return {"ks": ks, "threshold": threshold, "num_prompts": len(groups), "num_samples": m,
            "n_boot": int(n_boot), "confidence": confidence, "seed": seed, "overall": overall,
            "per_prompt": per_prompt}


def _cell(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.3f} [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"


def format_verifiable_table(report: Mapping[str, Any]) -> str:
    """The overall numbers of :func:`verifiable_report` as a plain-text table: one row per k."""
    overall = report["overall"]
    header = ["k", "pass@k [CI]", "maj@k [CI]", "best@k [CI]", "prompts"]
    lines = [header] + [[str(k), _cell(overall[f"pass@{k}"]), _cell(overall[f"maj@{k}"]),
                         _cell(overall[f"best@{k}"]), str(overall[f"pass@{k}"]["n"])] for k in report["ks"]]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    footer = (f"{report['num_prompts']} prompts, {report['num_samples']} samples; correct = reward >= "
              f"{report['threshold']}; {100 * report['confidence']:.0f}% bootstrap intervals over prompts")
    return "\n".join(text) + "\n" + footer
