"""Statistics for evaluation: win rates with bootstrap confidence intervals and length-controlled win rates.

Everything here is a pure function of numbers (numpy arrays in, floats out); nothing touches a model.

Resampling unit. The unit of every bootstrap here is the *prompt*: a replicate draws ``n`` prompt indices
with replacement and recomputes the statistic on those prompts (all samples of a prompt travel
together). The index matrix depends only on ``(n, n_boot, seed)``, so statistics computed with the same
seed on the same prompts (the raw and the length-controlled win rate, say) are resampled identically,
i.e. paired. The interval is the percentile interval: the ``(1 - confidence) / 2`` and
``(1 + confidence) / 2`` quantiles of the replicate statistics (numpy's default linear interpolation).

Why not ``scipy.stats.bootstrap``: it refuses one observation, its seeding keyword changed between
releases (``random_state`` -> ``rng``), and it cannot share one index matrix between statistics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "LC_RIDGE_ALPHA",
    "WinRate",
    "bootstrap_indices",
    "bootstrap_mean_ci",
    "length_controlled_win_rate",
    "lc_glm_fit",
    "pairwise_outcomes",
    "percentile_interval",
    "win_rate",
]

# Ridge penalty (per observation, on the length coefficient only) of the fallback fit used when the
# plain GLM hits (quasi-)perfect separation; see `lc_glm_fit`.
LC_RIDGE_ALPHA = 1e-3
# A coefficient this large (the feature is bounded by 1) means fitted probabilities of e^-15 (3e-7): the
# unpenalised fit has walked off to infinity (separation) even when statsmodels did not flag it.
_SEPARATION_COEF = 15.0
# Bootstrap replicates are processed in chunks of at most this many indices (bounds memory for big n).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class WinRate:
    """A win rate with its bootstrap interval.

    ``wins`` / ``ties`` / ``losses`` count prompts whose outcome is > 0.5, == 0.5 and < 0.5 (with one
    sample per prompt: won, tied, lost; with several: better, even, worse on average).
    """

    rate: float
    ci_low: float
    ci_high: float
    n: int
    wins: int
    ties: int
    losses: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_boot(n_boot: int, confidence: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _vector(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per prompt), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}[{bad}] is {arr[bad]}; expected finite numbers")
    return arr


def _outcome_vector(outcomes: Any) -> np.ndarray:
    arr = _vector(outcomes, "outcomes")
    if (arr < 0).any() or (arr > 1).any():
        bad = int(np.flatnonzero((arr < 0) | (arr > 1))[0])
        raise ValueError(f"outcomes[{bad}] = {arr[bad]} is outside [0, 1] (1 win, 0.5 tie, 0 loss)")
    return arr


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield the bootstrap index matrix in row chunks: together ``n_boot`` rows of ``n`` indices in [0, n).

    Drawn with ``numpy.random.default_rng(seed).integers`` row chunk by row chunk; the chunking depends
    only on ``n``, so the same ``(n, n_boot, seed)`` always gives the same replicates.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def percentile_interval(replicates: Any, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates: their (1 - confidence) / 2 and (1 + confidence) / 2
    quantiles (numpy's linear interpolation)."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _per_prompt_means(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2:
        if arr.shape[1] == 0:
            raise ValueError(f"{name} has no samples per prompt (shape {arr.shape})")
        arr = arr.mean(axis=1)
    return _vector(arr, name)


def bootstrap_mean_ci(values: Any, n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval: ``(mean, ci_low, ci_high)``.

    ``values`` is [n_prompts] or [n_prompts, n_samples]; a 2-D input is first averaged per prompt, so the
    resampling unit is the prompt (samples of one prompt are not independent evidence). The mean is
    then the mean of the per-prompt means (= the plain mean when every prompt has the same number of
    samples).
    """
    _check_boot(n_boot, confidence)
    per_prompt = _per_prompt_means(values, "values")
    reps = np.concatenate([per_prompt[idx].mean(axis=1) for idx in bootstrap_indices(len(per_prompt), n_boot,
                                                                                       seed)])
    low, high = percentile_interval(reps, confidence)
    return float(per_prompt.mean()), low, high


def win_rate(outcomes: Any, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate = mean per-prompt outcome, with a percentile paired bootstrap interval over prompts.

    ``outcomes[i]`` in [0, 1] is prompt i's result against the baseline: 1 win, 0.5 tie, 0 loss, or the
    mean over several sample pairs (see :func:`pairwise_outcomes`). rate = (1/n) Σ_i outcomes[i].
    """
    _check_boot(n_boot, confidence)
    y = _outcome_vector(outcomes)
    reps = np.concatenate([y[idx].mean(axis=1) for idx in bootstrap_indices(len(y), n_boot, seed)])
    low, high = percentile_interval(reps, confidence)
    return WinRate(rate=float(y.mean()), ci_low=low, ci_high=high, n=len(y), wins=int((y > 0.5).sum()),
                   ties=int((y == 0.5).sum()), losses=int((y < 0.5).sum()))


def _scores_2d(scores: Any, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be [n_prompts] or [n_prompts, n_samples] and non-empty, got shape "
                         f"{np.asarray(scores).shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite scores")
    return arr


def pairwise_outcomes(policy_scores: Any, baseline_scores: Any, tie_tol: float = 1e-6) -> np.ndarray:
    """Per-prompt outcome of the policy against the baseline from judge scores: float64 [n_prompts].

    Scores are [n_prompts] (one sample each) or [n_prompts, n_samples] (the two sides may have different
    sample counts). With a = policy, b = baseline, k and m samples of prompt i:
        outcome[i] = (1 / (k m)) Σ_s Σ_t  w(a[i, s] − b[i, t]),
        w(d) = 1 if d > tie_tol,  0 if d < −tie_tol,  1/2 otherwise (a tie counts half).
    """
    a = _scores_2d(policy_scores, "policy_scores")
    b = _scores_2d(baseline_scores, "baseline_scores")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"policy has {a.shape[0]} prompts but baseline has {b.shape[0]}")
    diff = a[:, :, None] - b[:, None, :]  # [n, k, m]
    w = np.where(diff > tie_tol, 1.0, np.where(diff < -tie_tol, 0.0, 0.5))
    return w.mean(axis=(1, 2))


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow for large |x|


def lc_glm_fit(outcomes: Any, length_feature: Any) -> tuple[np.ndarray, str]:
    """Fit logit P(policy wins) = θ0 + θ1·x by a binomial GLM (statsmodels, logit link); returns (θ, how).

    ``outcomes`` are fractional targets in [0, 1] (ties are 0.5: the quasi-likelihood of a fractional
    logit model), ``length_feature`` is x (the caller passes tanh(Δlen / std(Δlen))). ``how`` says
    which fit produced θ:

    * ``"glm"``: the plain maximum-likelihood fit (IRLS).
    * ``"constant"``: all outcomes equal c (all wins, all losses, all ties): the MLE does not exist for
      c in {0, 1}; θ = (logit c, 0) with logit 0 = −inf and logit 1 = +inf.
    * ``"intercept"``: x has no spread: θ1 is not identified; θ = (logit mean(y), 0).
    * ``"ridge"``: (quasi-)perfect separation (statsmodels warns, the fit fails or does not converge,
      or |θ| > 15): refit maximising (1/n)·loglik − (α/2)·θ1² with α = LC_RIDGE_ALPHA, the intercept
      unpenalised (statsmodels ``fit_regularized(L1_wt=0)``). Because θ0 is free, Σ (y − p) = 0 still
      holds; the bounded θ1 keeps θ0 finite.
    * ``"mean"``: even the ridge fit failed: θ = (logit mean(y), 0).
    """
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    y = _outcome_vector(outcomes)
    x = _vector(length_feature, "length_feature")
    if len(x) != len(y):
        raise ValueError(f"{len(y)} outcomes but {len(x)} length values")

    def logit(p: float) -> float:
        if p <= 0.0:
            return -math.inf
        if p >= 1.0:
            return math.inf
        return math.log(p / (1.0 - p))

    if np.all(y == y[0]):
        return np.array([logit(float(y[0])), 0.0]), "constant"
    if np.ptp(x) == 0.0:
        return np.array([logit(float(y.mean())), 0.0]), "intercept"
    design = np.column_stack([np.ones_like(x), x])
    model = sm.GLM(y, design, family=sm.families.Binomial())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = model.fit()
            params = np.asarray(result.params, dtype=np.float64)
            ok = bool(result.converged) and np.isfinite(params).all() and np.abs(params).max() <= _SEPARATION_COEF
        except Exception:  # singular weights, overflow: treat like separation
            params, ok = np.full(2, np.nan), False
    ok = ok and not any(issubclass(w.category, PerfectSeparationWarning) for w in caught)
    if ok:
        return params, "glm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ridge = model.fit_regularized(alpha=np.array([0.0, LC_RIDGE_ALPHA]), L1_wt=0.0,
                                           opt_method="newton-cg")
            params = np.asarray(ridge.params, dtype=np.float64)
        except Exception:
            params = np.full(2, np.nan)
    if np.isfinite(params).all():
        return params, "ridge"
    return np.array([logit(float(y.mean())), 0.0]), "mean"


def _length_feature(delta: np.ndarray) -> np.ndarray:
    """tanh(Δ / std(Δ)) (population std); all zeros when Δ has no spread."""
    std = float(delta.std())
    if std == 0.0 or not math.isfinite(std):
        return np.zeros_like(delta)
    return np.tanh(delta / std)


def _lc_rate(y: np.ndarray, delta: np.ndarray) -> tuple[float, str]:
    theta, how = lc_glm_fit(y, _length_feature(delta))
    return _sigmoid(float(theta[0])) if math.isfinite(theta[0]) else float(theta[0] > 0), how


def length_controlled_win_rate(
    outcomes: Any,
    policy_lengths: Any,
    baseline_lengths: Any,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Length-controlled win rate (AlpacaEval 2 style) with a paired bootstrap interval over prompts.

    With Δ_i = len(policy_i) − len(baseline_i) (per-prompt mean lengths when there are several samples),
    fit the binomial GLM (logit link, fractional targets; see :func:`lc_glm_fit`)
        logit P(win_i) = θ0 + θ1 · tanh(Δ_i / std(Δ))
    and report the win rate with the length term set to zero (equal lengths):
        LC = sigmoid(θ0).
    std is the population std of Δ over the (resampled) prompts. Degenerate inputs never raise: all
    outcomes equal -> that value; Δ without spread -> the plain win rate; separation -> a ridge fit on θ1
    (all documented in :func:`lc_glm_fit`). Each bootstrap replicate refits the GLM on the resampled
    prompts, with the same index matrix as :func:`win_rate` for the same seed (about 2-4 ms per replicate
    on a CPU, ~10 ms when it needs the ridge fit).

    LC is a prediction at Δ = 0: when nearly every Δ has the same sign it extrapolates beyond the data
    (as AlpacaEval's does), and its interval widens accordingly.

    Returns ``(lc_rate, ci_low, ci_high)``.
    """
    _check_boot(n_boot, confidence)
    y = _outcome_vector(outcomes)
    p_len = _per_prompt_means(policy_lengths, "policy_lengths")
    b_len = _per_prompt_means(baseline_lengths, "baseline_lengths")
    if not len(y) == len(p_len) == len(b_len):
        raise ValueError(f"{len(y)} outcomes but {len(p_len)} policy and {len(b_len)} baseline lengths")
    delta = p_len - b_len
    rate, _ = _lc_rate(y, delta)
    reps = [_lc_rate(y[row], delta[row])[0] for idx in bootstrap_indices(len(y), n_boot, seed) for row in idx]
    low, high = percentile_interval(np.asarray(reps), confidence)
    return rate, low, high


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the non-None values; None when there are none (a flag that never applied)."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None

