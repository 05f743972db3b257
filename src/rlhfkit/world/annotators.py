"""Simulated annotators: noisy, biased people labelling pairs and rankings from the gold judge.

Annotator ``i`` sees utility ``u_i(y) = gold(y) + flattery_bias_i·[flattery] + length_bias_i·words(y)``
and labels by Bradley–Terry with temperature ``noise_i`` and a bonus for the first slot:

    P(A ≻ B) = σ((u_i(A) − u_i(B) + position_bias_i) / noise_i)

Rankings are Plackett–Luce draws from the same utilities (Gumbel-perturbed utilities sorted). So two
annotators disagree like people do: by noise (more on close pairs) and by taste (one likes flattery, one
likes long answers).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .judge import GoldJudge


@dataclass
class Annotator:
    name: str
    noise: float = 0.3            # Bradley–Terry temperature (higher = noisier)
    flattery_bias: float = 0.0    # utility added for flattery
    length_bias: float = 0.0      # utility added per word
    position_bias: float = 0.0    # utility added to whichever response is shown first

    def utility(self, judge: GoldJudge, prompt: str, response: str) -> float:
        verdict = judge.judge(prompt, response)
        words = len(response.split())
        return verdict.total + self.flattery_bias * verdict.flags["flattery"] + self.length_bias * words

    def prefers_first(self, judge: GoldJudge, prompt: str, first: str, second: str, rng: random.Random) -> bool:
        """One pairwise label: True when ``first`` is chosen."""
        margin = self.utility(judge, prompt, first) - self.utility(judge, prompt, second) + self.position_bias
        z = margin / self.noise
        p = 1.0 / (1.0 + math.exp(-z)) if z > -40 else 0.0
        return rng.random() < p

    def rate(self, judge: GoldJudge, prompt: str, response: str, rng: random.Random) -> int:
        """One Likert rating 1..5: the utility mapped linearly (-1 -> 1, 0 -> 3, +1 -> 5; the gold total
        lies in about [-1.5, 1]) plus Gaussian noise of sd ``noise / 2``, rounded and clipped."""
        x = (self.utility(judge, prompt, response) + 1.0) / 2.0 + rng.gauss(0.0, self.noise / 2.0)
        return min(5, max(1, 1 + round(4 * x)))

    def rank(self, judge: GoldJudge, prompt: str, responses: Sequence[str], rng: random.Random) -> list[int]:
        """Indices of ``responses``, best first (a Plackett–Luce draw)."""
        keyed = []
        for i, r in enumerate(responses):
            gumbel = -math.log(-math.log(max(rng.random(), 1e-12)))
            keyed.append((self.utility(judge, prompt, r) / self.noise + gumbel, i))
        return [i for _, i in sorted(keyed, reverse=True)]


def annotator_panel(num: int = 5, seed: int = 0, biased: str | None = None) -> list[Annotator]:
    """A panel of ``num`` annotators with individual noise and biases, drawn from ``seed``.

    ``biased`` = ``"flattery"`` or ``"length"`` gives a panel that all share that taste strongly (the reward
    hacking experiment's biased labellers).
    """
    rng = random.Random(seed)
    panel = []
    for i in range(num):
        a = Annotator(name=f"annotator_{i}", noise=rng.uniform(0.1, 0.3),
                      flattery_bias=rng.uniform(-0.1, 0.25), length_bias=rng.uniform(-0.005, 0.01),
                      position_bias=rng.uniform(-0.1, 0.1))
        if biased == "flattery":
            a.flattery_bias = rng.uniform(0.9, 1.3)
        elif biased == "length":
            a.length_bias = rng.uniform(0.05, 0.08)
        elif biased is not None:
            raise ValueError(f"unknown annotator bias {biased!r} (flattery or length)")
        panel.append(a)
    return panel


def describe_panel(panel: Sequence[Annotator]) -> list[dict]:
    return [asdict(a) for a in panel]


def pairwise_agreement(judge: GoldJudge, panel: Sequence[Annotator], items: Sequence[tuple[str, str, str]],
                       seed: int = 0) -> dict[str, float]:
    """Every annotator labels every (prompt, A, B) item: Krippendorff's alpha (nominal), mean pairwise
    percent agreement, and each annotator's agreement with the gold judge (gold ties left out)."""
    import krippendorff
    import numpy as np

    rng = random.Random(seed)
    labels = np.array([[float(a.prefers_first(judge, p, x, y, rng)) for p, x, y in items] for a in panel])
    alpha = float(krippendorff.alpha(reliability_data=labels, level_of_measurement="nominal")) \
        if len(items) and labels.std() > 0 else float("nan")
    pairs = [(i, j) for i in range(len(panel)) for j in range(i + 1, len(panel))]
    percent = float(np.mean([np.mean(labels[i] == labels[j]) for i, j in pairs])) if pairs else float("nan")
    gold = np.array([judge.judge(p, x).total - judge.judge(p, y).total for p, x, y in items])
    decided = gold != 0
    vs_gold = {a.name: float(np.mean(labels[k][decided] == (gold[decided] > 0))) if decided.any() else float("nan")
               for k, a in enumerate(panel)}
    return {"krippendorff_alpha": alpha, "percent_agreement": percent, "num_items": len(items),
            "agreement_with_gold": vs_gold}
