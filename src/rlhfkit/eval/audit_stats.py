"""Pure statistics of the judge audit (:mod:`rlhfkit.eval.judge_audit`): interval summaries, Cohen's kappa
with a bootstrap interval, and the logistic slope of a preference on a length difference.

Everything is numbers in, JSON-able dicts out; nothing touches a judge. Every interval is over *pairs*: the
bootstrap draws pair indices with replacement (:func:`rlhfkit.eval.stats.bootstrap_indices`, so a given
``(n, n_boot, seed)`` always resamples the same way) and takes the percentile interval.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .stats import bootstrap_indices, bootstrap_mean_ci, percentile_interval

__all__ = ["KAPPA_LABELS", "cohen_kappa", "excludes_zero", "finite_or_none", "gap_ci", "kappa_ci", "logit_slope", "mean_ci",
           "ratio_ci"]

# The judge's verdict on a pair is one of these; the reference label is only ever "a" or "b". A tie never
# agrees with the label, so it lowers kappa (it is not dropped: a judge that ties everything gets kappa 0).
KAPPA_LABELS = ["a", "b", "tie"]
# |linear predictor| above this means fitted probabilities below e^-25 (1e-11): the plain maximum-likelihood
# fit has walked off towards infinity (separation), even when statsmodels converged.
_SEPARATED_ETA = 25.0


def _empty(n: int = 0) -> dict[str, Any]:
    return {"value": None, "ci_low": None, "ci_high": None, "n": n}


def mean_ci(values: Any, n_boot: int, confidence: float, seed: int) -> dict[str, Any]:
    """``{"value", "ci_low", "ci_high", "n"}``: the mean of one number per pair and its bootstrap interval
    (a 2-D ``[pairs, k]`` input is averaged per pair first); all None with no values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape[0] == 0:
        return _empty()
    value, low, high = bootstrap_mean_ci(arr, n_boot, confidence, seed)
    return {"value": value, "ci_low": low, "ci_high": high, "n": int(arr.shape[0])}


def _quantiles(reps: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    reps = reps[np.isfinite(reps)]  # a replicate can be undefined (no decisive asks, one class only)
    if not len(reps):
        return None, None
    return percentile_interval(reps, confidence)


def ratio_ci(numerators: Any, denominators: Any, n_boot: int, confidence: float, seed: int) -> dict[str, Any]:
    """Σ num / Σ den over pairs (a share of events pooled over pairs with different counts), with the
    bootstrap interval of the same ratio on resampled pairs; ``n`` = Σ den."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if not len(num) or den.sum() == 0:
        return _empty(int(den.sum()) if len(den) else 0)
    reps = []
    for idx in bootstrap_indices(len(num), n_boot, seed):
        d = den[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            reps.append(np.where(d > 0, num[idx].sum(axis=1) / np.where(d > 0, d, 1), np.nan))
    low, high = _quantiles(np.concatenate(reps), confidence)
    return {"value": float(num.sum() / den.sum()), "ci_low": low, "ci_high": high, "n": int(den.sum())}


def gap_ci(values: Any, in_first: Any, n_boot: int, confidence: float, seed: int) -> dict[str, Any]:
    """mean(values | first group) − mean(values | second group), with the bootstrap interval over all
    pairs (a replicate missing either group is left out); ``n`` counts both groups."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(in_first, dtype=np.float64)
    if not len(v) or g.sum() == 0 or g.sum() == len(g):
        return _empty(len(v))
    reps = []
    for idx in bootstrap_indices(len(v), n_boot, seed):
        n1, n2 = g[idx].sum(axis=1), (1.0 - g[idx]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            reps.append((v[idx] * g[idx]).sum(axis=1) / n1 - (v[idx] * (1.0 - g[idx])).sum(axis=1) / n2)
    low, high = _quantiles(np.concatenate(reps), confidence)
    value = float(v[g == 1].mean() - v[g == 0].mean())
    return {"value": value, "ci_low": low, "ci_high": high, "n": len(v)}


def cohen_kappa(refs: list[str], preds: list[str]) -> float | None:
    """Cohen's kappa κ = (p_o − p_e) / (1 − p_e) over the categories ``KAPPA_LABELS``: p_o the share of
    agreeing items, p_e = Σ_k p_ref(k) p_pred(k). scikit-learn's when installed (the ``app`` extra), else
    statsmodels'; None when undefined (p_e = 1: both raters used one and the same category)."""
    if not refs:
        return None
    codes = {k: i for i, k in enumerate(KAPPA_LABELS)}
    r = np.array([codes[x] for x in refs])
    p = np.array([codes[x] for x in preds])
    if len(set(r) | set(p)) < 2:
        return None
    try:
        from sklearn.metrics import cohen_kappa_score
    except ImportError:
        from statsmodels.stats.inter_rater import cohens_kappa

        table = np.zeros((3, 3))
        np.add.at(table, (r, p), 1)
        return float(cohens_kappa(table).kappa)
    return float(cohen_kappa_score(refs, preds, labels=KAPPA_LABELS))


def _kappa_rows(r: np.ndarray, p: np.ndarray) -> np.ndarray:
    """κ of each row of integer-coded ratings [B, n] (the formula of :func:`cohen_kappa`), NaN if undefined."""
    po = (r == p).mean(axis=1)
    pe = sum((r == k).mean(axis=1) * (p == k).mean(axis=1) for k in range(len(KAPPA_LABELS)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pe < 1.0, (po - pe) / (1.0 - pe), np.nan)


def kappa_ci(refs: list[str], preds: list[str], n_boot: int, confidence: float, seed: int) -> dict[str, Any]:
    """``{"value", "ci_low", "ci_high", "n"}`` for Cohen's kappa; the interval resamples pairs (replicates
    where κ is undefined are left out of the quantiles)."""
    value = cohen_kappa(refs, preds)
    if value is None:
        return _empty(len(refs))
    codes = {k: i for i, k in enumerate(KAPPA_LABELS)}
    r = np.array([codes[x] for x in refs])
    p = np.array([codes[x] for x in preds])
    reps = np.concatenate([_kappa_rows(r[idx], p[idx]) for idx in bootstrap_indices(len(r), n_boot, seed)])
    low, high = _quantiles(reps, confidence)
    return {"value": value, "ci_low": low, "ci_high": high, "n": len(refs)}


def _penalised_loglik(beta: np.ndarray, y: np.ndarray, design: np.ndarray) -> float:
    """Firth's penalised log-likelihood l(β) + ½·log det I(β), I(β) = Xᵀ W X, W = diag(p(1 − p))."""
    eta = design @ beta
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    prob = 1.0 / (1.0 + np.exp(-eta))
    weight = prob * (1.0 - prob)
    sign, logdet = np.linalg.slogdet(design.T @ (weight[:, None] * design))
    return loglik + 0.5 * logdet if sign > 0 else -math.inf


def _firth(y: np.ndarray, design: np.ndarray) -> np.ndarray:
    """Firth's penalised logistic regression (Jeffreys-prior penalty): finite estimates when the classes
    are separated. Newton steps on the modified score U*(β) = Xᵀ(y − p + h(½ − p)), h the diagonal of the
    hat matrix W^½ X I⁻¹ Xᵀ W^½; steps capped at 2 per coordinate."""
    beta = np.zeros(design.shape[1])
    for _ in range(200):
        prob = 1.0 / (1.0 + np.exp(-design @ beta))
        weight = prob * (1.0 - prob)
        inverse = np.linalg.pinv(design.T @ (weight[:, None] * design))
        hat = weight * np.einsum("ij,jk,ik->i", design, inverse, design)
        step = inverse @ (design.T @ (y - prob + hat * (0.5 - prob)))
        biggest = float(np.abs(step).max())
        beta = beta + (step * (2.0 / biggest) if biggest > 2.0 else step)
        if biggest < 1e-9:
            break
    return beta


def _firth_profile(y: np.ndarray, design: np.ndarray, confidence: float) -> tuple[float, float | None,
                                                                                  float | None, float]:
    """Firth slope with its profile penalised-likelihood interval and likelihood-ratio p-value (as R's
    logistf). Under separation a Wald interval is useless (its standard error grows with the estimate:
    the Hauck-Donner effect); the profile one is not. Returns (slope, low, high, p); a bound is None when
    the profile never falls below the cut within 1e4."""
    from scipy.optimize import brentq, minimize_scalar
    from scipy.stats import chi2

    beta = _firth(y, design)
    top = _penalised_loglik(beta, y, design)

    def drop(slope: float) -> float:  # 2·(max l* − max over the intercept of l* at this slope)
        best = minimize_scalar(lambda b0: -_penalised_loglik(np.array([b0, slope]), y, design),
                               bracket=(beta[0] - 1.0, beta[0] + 1.0))
        return 2.0 * (top + float(best.fun))

    cut = float(chi2.ppf(confidence, 1))
    p_value = float(chi2.sf(max(drop(0.0), 0.0), 1))
    bounds: list[float | None] = []
    for sign in (-1.0, 1.0):
        step, bound = max(abs(beta[1]) * 0.1, 0.1), None
        inner = float(beta[1])
        while step < 1e4:
            outer = float(beta[1]) + sign * step
            if drop(outer) > cut:
                bound = float(brentq(lambda s: drop(s) - cut, min(inner, outer), max(inner, outer), xtol=1e-6))
                break
            inner, step = outer, step * 2.0
        bounds.append(bound)
    return float(beta[1]), bounds[0], bounds[1], p_value


def logit_slope(y: Any, x: Any, confidence: float = 0.95) -> dict[str, Any]:
    """Fit logit P(y = 1) = β0 + β1·x; return the slope β1 with its interval and two-sided p-value (Wald,
    from statsmodels, for a plain fit).

    ``y`` in [0, 1] per pair (1: prefers the response whose length difference is x, 0: the other one,
    ½: a tie, fitted as a fractional outcome, i.e. quasi-likelihood). ``fit`` says how:

    * ``"logit"``: statsmodels ``Logit`` (maximum likelihood);
    * ``"firth"``: the classes are (quasi-)separated (the ML fit did not converge, is not finite or has
      |β·x| > 25): Firth's penalised estimate with its profile-likelihood interval and likelihood-ratio
      p-value (:func:`_firth_profile`), which exist where the ML estimate is infinite (a judge that always
      prefers the longer response separates perfectly: the strongest length bias, not a failed fit);
    * ``"no_spread"``: x or the data are too few / constant: the slope is not identified (all None).
    """
    import statsmodels.api as sm
    from scipy.stats import norm

    yv = np.asarray(y, dtype=np.float64)
    xv = np.asarray(x, dtype=np.float64)
    out: dict[str, Any] = {"slope": None, "ci_low": None, "ci_high": None, "p_value": None, "n": int(len(yv)),
                           "fit": "no_spread"}
    if len(yv) < 3 or np.ptp(xv) == 0.0:
        return out
    design = np.column_stack([np.ones_like(xv), xv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # separation and overflow warnings: detected below from the fit itself
        try:
            res = sm.Logit(yv, design).fit(disp=0, maxiter=100)
            beta, se = np.asarray(res.params, dtype=np.float64), np.asarray(res.bse, dtype=np.float64)
            ok = bool(res.mle_retvals.get("converged", False)) and np.isfinite(beta).all() and np.isfinite(se).all()
            ok = ok and float(np.abs(design @ beta).max()) <= _SEPARATED_ETA
        except Exception:  # singular Hessian, perfect separation error: same remedy
            ok = False
        if not ok:
            slope, low, high, p_value = _firth_profile(yv, design, confidence)
            out.update(fit="firth", slope=slope, ci_low=low, ci_high=high, p_value=p_value)
            return out
        out["fit"] = "logit"
    if not (np.isfinite(beta[1]) and np.isfinite(se[1])):
        out["fit"] = "no_spread"
        return out
    z = float(norm.ppf(0.5 + confidence / 2.0))
    slope, err = float(beta[1]), float(se[1])
    p_value = float(2.0 * norm.sf(abs(slope) / err)) if err > 0 else (0.0 if slope else 1.0)
    out.update(slope=slope, ci_low=slope - z * err, ci_high=slope + z * err, p_value=p_value)
    return out


def excludes_zero(stat: dict[str, Any] | None) -> bool:
    """True when an interval dict's interval lies on one side of 0 (a None bound is infinite: a profile
    interval can be open on one side; no bounds at all is never True)."""
    if not stat or (stat.get("ci_low") is None and stat.get("ci_high") is None):
        return False
    low, high = stat.get("ci_low"), stat.get("ci_high")
    return bool((low is not None and low > 0) or (high is not None and high < 0))


def finite_or_none(value: Any) -> float | None:
    """A float, or None for None / NaN / inf (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
