"""Does a demo reward model know its sums? Scores "X plus Y is S." for every sum of the demo world.

For each pair X, Y in 1..MAX_ADDEND the reward model scores the world's answer sentence with every S from zero
to the largest sum, and the script prints two figures: for how many of the pairs the right sum scores highest,
and how often the right sum beats a near miss (|S - (X + Y)| <= 3), averaged over the pairs. A reward model that knows style but not sums
scores "Four plus one is six" like "Four plus one is five", and PPO, sampling its own answers, finds that.

    python bench/rm_sum_probe.py runs/demo/rm [runs/seeds/seed-5/rm ...]
    python bench/rm_sum_probe.py runs/demo/rm,runs/demo/rm2     # what the demo's PPO is paid: the pair's
                                                                # mean minus their spread (the lower score)
"""

from __future__ import annotations

import argparse

import torch

from rlhfkit.judges.spec import build_judge
from rlhfkit.world.generator import _NUMBER_WORDS, MAX_ADDEND


def probe(rm: str) -> tuple[int, int, float]:
    """(pairs whose right sum scores highest, pairs, mean over pairs of the share of near misses it beats).
    ``rm``: a reward model folder, or several joined by commas, scored as PPO's ``reward_ensemble:
    mean_minus_std`` combines them (mean minus the population std over the models: with two, the lower)."""
    largest = 2 * MAX_ADDEND
    cases = [(x, y, s) for x in range(1, MAX_ADDEND + 1) for y in range(1, MAX_ADDEND + 1) for s in range(largest + 1)]
    prompts = [[{"role": "user", "content": f"What is {_NUMBER_WORDS[x]} plus {_NUMBER_WORDS[y]}?"}]
               for x, y, _ in cases]
    replies = [f"{_NUMBER_WORDS[x].capitalize()} plus {_NUMBER_WORDS[y]} is {_NUMBER_WORDS[s]}." for x, y, s in cases]
    per_model = torch.tensor([build_judge(f"model:{m}").score_many(prompts, replies) for m in rm.split(",")],
                             dtype=torch.float64)
    combined = per_model.mean(0) - per_model.std(0, unbiased=False)
    scores: dict[tuple[int, int], dict[int, float]] = {}
    for (x, y, s), score in zip(cases, combined.tolist()):
        scores.setdefault((x, y), {})[s] = score
    first, shares = 0, []
    for (x, y), by_sum in scores.items():
        right = by_sum[x + y]
        first += right == max(by_sum.values())
        near = [v for s, v in by_sum.items() if s != x + y and abs(s - (x + y)) <= 3]
        shares.append(sum(right > v for v in near) / len(near))
    return first, len(scores), sum(shares) / len(shares)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reward_models", nargs="+", help="reward model folders (a demo's rm stage), or several joined by commas")
    for rm in p.parse_args().reward_models:
        first, pairs, near = probe(rm)
        print(f"{rm}: right sum scores highest for {first}/{pairs} pairs; beats a near miss {near:.3f} of the time")


if __name__ == "__main__":
    main()
