"""An active label budget (issue 26): part of a round's budget goes to the pairs a reward-model committee
disagrees on most, the rest is drawn at random, exactly as the plain budget draws it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.judges.routing import budget_pairs, route_paths


def test_budget_pairs_takes_the_most_disputed_share_then_draws_the_rest():
    rng = np.random.default_rng(0)
    spread = list(rng.random(50))
    # no active share: the plain seeded draw, index for index
    assert budget_pairs(spread, 12, 0.0, seed=7) == sorted(random.Random(7).sample(range(50), 12))
    # all of it active: the twelve largest disagreements
    assert budget_pairs(spread, 12, 1.0) == sorted(np.argsort(spread)[::-1][:12].tolist())
    # half: the six largest, and six others drawn at random, no index twice
    half = budget_pairs(spread, 12, 0.5, seed=3)
    top = set(np.argsort(spread)[::-1][:6].tolist())
    assert len(half) == len(set(half)) == 12 and top <= set(half)
    others = [i for i in range(50) if i not in top]
    assert sorted(set(half) - top) == sorted(random.Random(3).sample(others, 6))
    # ties go to the earlier pair; a budget at or over the candidates keeps them all
    assert budget_pairs([1.0, 2.0, 2.0, 2.0], 2, 1.0) == [1, 2]
    assert budget_pairs([0.3, 0.1], 5, 0.5) == [0, 1]
    with pytest.raises(ConfigError, match=r"active_budget must be in \[0, 1\], got 1.5"):
        budget_pairs(spread, 3, 1.5)


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_routed_collect_spends_the_active_share_on_the_committees_disputes(tmp_path, monkeypatch):
    from rlhfkit.stage import StageContext
    from rlhfkit.world import build_world, route_stage, sampling

    world = build_world(0, num_countries=4)
    world.save(tmp_path / "world.json")

    def policy(model, prompts, k, temperature, max_new, seed):  # a scripted policy: the world's own styles
        rng = random.Random(seed)
        return [[world.respond(world.request(p), rng.choice(world.styles_for(world.request(p).category)), rng)
                 for _ in range(k)] for p in prompts]

    monkeypatch.setattr(sampling, "sample_responses", policy)
    fns = tmp_path / "rms.py"
    fns.write_text("def short(prompts, responses):\n    return [-0.2 * len(r.split()) for r in responses]\n\n"
                   "def vowels(prompts, responses):\n"
                   "    return [0.1 * sum(c in 'aeiou' for c in r) for r in responses]\n")
    options = {"policy": "scripted", "world": str(tmp_path), "judge": f"fn:{fns}:short", "annotators": 2,
               "overlap": 1, "max_prompts": 8, "num_samples": 4, "max_pairs": 10, "active_budget": 0.4,
               "priority_models": f"fn:{fns}:short,fn:{fns}:vowels"}
    ctx = StageContext(name="routed", output_dir=tmp_path / "routed", run_dir=tmp_path, seed=0, defaults={},
                       results={}, options=dict(options))
    result = route_stage.routed_collect_stage(ctx)
    assert result["pairs"] == 10 and result["pairs_over_budget"] > 0
    # every candidate pair, as the stage draws them, and the committee's disagreement on it, computed here
    prompts = random.Random(0).sample([r.prompt for r in world.split("train")], 8)
    candidates = {}
    for p, texts in zip(prompts, policy("scripted", prompts, 4, 1.0, 48, 1)):
        distinct = list(dict.fromkeys(texts))
        for i, a in enumerate(distinct):
            for b in distinct[i + 1:]:
                d_short = -0.2 * (len(a.split()) - len(b.split()))
                d_vowels = 0.1 * (sum(c in "aeiou" for c in a) - sum(c in "aeiou" for c in b))
                candidates[(p, frozenset((a, b)))] = float(np.std([d_short, d_vowels]))
    assert len(candidates) == result["pairs"] + result["pairs_over_budget"]
    judged = route_paths(tmp_path / "routed" / "judge_labels.jsonl")["judged"]
    rows = _lines(judged) + _lines(judged.with_name(judged.name + ".unlabelled.jsonl"))
    bought = {(r["prompt"], frozenset((r.get("chosen", r.get("response_a")), r.get("rejected", r.get("response_b")))))
              for r in rows}
    assert len(bought) == 10 and bought <= set(candidates)
    top4 = sorted(candidates, key=candidates.get, reverse=True)[:4]
    assert set(top4) <= bought  # round(0.4 * 10) pairs by disagreement
    summary = json.loads((tmp_path / "routed" / "route_summary.json").read_text())
    assert summary["active_pairs"] == 4
    assert summary["disagreement_mean_active"] == pytest.approx(np.mean([candidates[k] for k in top4]))
    assert summary["disagreement_mean_active"] > summary["disagreement_mean_candidates"]
    for bad, message in (({"max_pairs": 0}, "active_budget needs max_pairs"),
                         ({"active_budget": -0.1}, r"active_budget must be in \[0, 1\]"),
                         ({"priority_models": f"fn:{fns}:short"}, "at least 2 reward models")):
        ctx.options.update({**options, **bad})
        with pytest.raises(ConfigError, match=message):
            route_stage.routed_collect_stage(ctx)
