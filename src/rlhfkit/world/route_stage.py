"""The demo world's routed collection, as a pipeline stage: routed_collect (issue 26); and gold_pairs (fresh
on-policy test pairs from an eval stage's samples).

Preference collection the way a team runs it when people are the scarce resource:

1. a policy's samples on the world's training prompts (as the ``collect`` stage draws them), every pair of
   distinct responses of a prompt;
2. an AI judge (option ``judge``, any judge spec: ``model:RM``, ``fn:FILE.py:FN``, ...) labels every pair,
   with its confidence (:mod:`rlhfkit.judges.routing`);
3. the pairs it is unsure of (confidence < ``confidence_threshold`` or the two orders disagree), and a seeded
   ``audit_fraction`` of the others, go to a project of a labelling-app database in the stage's folder,
   in-process through the app's service functions, with ``priority`` = a reward-model ensemble's
   disagreement when ``active`` (``priority_models``); the simulated annotators label them through the same
   service API the web app calls (:func:`rlhfkit.world.human_eval_stage.label_with_panel`);
4. :func:`rlhfkit.label.merge.merge_labels` merges both into labels.jsonl (prompt as chat messages,
   chosen, rejected, source, pair_id: what ``rlhfkit rm`` / ``dpo`` read).

The gold judge only evaluates, never labels: the summary (route_summary.json) gives the judge's accuracy
against gold on its confident share (and, for contrast, on the pairs it routed), the annotators' accuracy
against gold on the pairs they labelled, and the judge's accuracy against the annotators on the audited pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..rollout.texts import sample_responses
from ..stage import StageContext, stage
from .sampling import reply_pools

PROJECT = "routed"


def _gold_accuracy(gold: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How often ``chosen`` beats ``rejected`` under the gold judge, gold ties left out (counted)."""
    hits, ties = [], 0
    for r in rows:
        diff = gold.judge(r["prompt"], r["chosen"]).total - gold.judge(r["prompt"], r["rejected"]).total
        if abs(diff) < 1e-9:
            ties += 1
        else:
            hits.append(diff > 0)
    return {"pairs": len(rows), "compared": len(hits), "gold_ties": ties,
            "accuracy": sum(hits) / len(hits) if hits else None}


def _prompt_texts(path: str) -> list[str]:
    """The user turns of a prompt file's rows (text, or chat messages ending in a user turn), in order."""
    from ..data.jsonl import numbered_rows
    from ..errors import DataError
    from ..eval.attacks import user_text

    texts = []
    for n, row in numbered_rows(path):
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict)
                                            and prompt[-1].get("role") == "user")):
            raise DataError("expected a text prompt or chat messages ending in a user turn", source=path, row=n,
                            field="prompt")
        texts.append(user_text(prompt))
    return texts


def _specs(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [v for v in str(value or "").split(",") if v]


@stage("routed_collect", options=("policy", "world", "judge", "confidence_threshold", "audit_fraction", "annotators",
                                  "overlap", "max_prompts", "num_samples", "temperature", "max_new_tokens", "seed",
                                  "active", "priority_models", "judge_temperature", "prompts", "heldout_samples",
                                  "other_policy", "other_samples", "max_pairs", "explore_samples",
                                  "explore_temperature", "off_prompt_samples", "near_miss_samples",
                                  "active_budget"))
def routed_collect_stage(ctx: StageContext) -> dict[str, Any]:
    """A policy's sample pairs labelled by an AI judge where it is confident, by the simulated annotators in the
    labelling app elsewhere, merged (see the module docstring).

    Options: policy (model folder), world (world stage folder), judge (judge spec), confidence_threshold
    (0.2: confidence |p - 1/2| at or above which, orders agreeing, the judge's label is kept), audit_fraction
    (0.1 of the confident pairs also sent to the annotators), annotators (5), overlap (3 labels per item),
    max_prompts (all), num_samples (4), temperature (1.0), max_new_tokens (48), judge_temperature (1.0:
    scoring judges' p = sigmoid(score difference / it)), active (false) with priority_models (>= 2 reward
    model specs: the app serves first the pairs they disagree on most), seed (the pipeline's), prompts (a
    JSONL of prompt rows to sample on instead of the world's training requests, e.g. a red-team step's
    train_prompts.jsonl; every prompt must be one the world knows), max_pairs (0 = all: label at most this
    many pairs, drawn with the seed from every prompt's pairs of distinct replies; a label budget, the same
    however alike the policy's samples are), active_budget (0: the share of max_pairs spent on the pairs the
    priority_models disagree on most, the rest drawn at random: :func:`rlhfkit.judges.routing.budget_pairs`),
    heldout_samples (0: with k > 0, k samples of the policy per
    held-out prompt make gold_pairs.jsonl, gold-labelled fresh on-policy pairs: the reward model's honest test
    on the distribution it is about to judge). The pairs' replies, as ``collect``'s options draw them
    (:func:`.sampling.reply_pools`): other_policy + other_samples (0; after RL a policy's samples often
    agree, and a pair needs two different replies), explore_samples + explore_temperature (the policy's hotter
    samples), off_prompt_samples (replies borrowed from the nearest other prompt), near_miss_samples (the
    policy's replies with their answer swapped for that prompt's).
    Writes judge_labels.jsonl (+ .judged/.routed/.posted sidecars), labels.db, merged.jsonl, pending.jsonl,
    labels.jsonl and route_summary.json."""
    from ..judges import build_judge
    from ..judges.judge_pairs import label_rows, sidecar_paths
    from ..judges.routing import budget_pairs, ensemble_disagreement, load_scorers, route_judged, route_paths
    from ..label.db import Database
    from ..label.merge import merge_labels, service_poster
    from ..label.service import project_by_name
    from ..label.text import text_problem
    from .data import default_panel, world_of, write_jsonl
    from .human_eval_stage import label_with_panel
    from .judge import GoldJudge

    ctx.require("policy", "world", "judge")
    world = world_of(ctx.option("world"))
    seed = int(ctx.option("seed", ctx.seed))
    # the options and the priority models are checked before any sampling
    budget, active_share = int(ctx.option("max_pairs", 0)), float(ctx.option("active_budget", 0))
    if not 0.0 <= active_share <= 1.0:
        raise ConfigError(f"stage '{ctx.name}': active_budget must be in [0, 1], got {active_share}")
    if active_share and not budget:
        raise ConfigError(f"stage '{ctx.name}': active_budget needs max_pairs (the label budget it shares out)")
    scorers = load_scorers(_specs(ctx.option("priority_models"))) if ctx.option("active") or active_share else None
    prompts = [r.prompt for r in world.split("train")] if not ctx.option("prompts") else \
        _prompt_texts(str(ctx.option("prompts")))
    if ctx.option("max_prompts"):
        prompts = random.Random(seed).sample(prompts, min(len(prompts), int(ctx.option("max_prompts"))))
    pools = reply_pools(ctx, prompts, int(ctx.option("num_samples", 4)), float(ctx.option("temperature", 1.0)),
                        int(ctx.option("max_new_tokens", 48)), seed + 1, other_seed=seed + 7)
    rows, left_out = [], {"prompts_fewer_than_two_distinct": 0, "unstorable_responses": 0, "pairs_over_budget": 0}
    selection: dict[str, Any] = {}
    for prompt, texts in ((r["prompt"], r["responses"]) for r in pools):
        distinct = list(dict.fromkeys(t for t in texts if t.strip()))
        storable = [t for t in distinct if text_problem(t) is None]  # the app refuses e.g. a NUL
        left_out["unstorable_responses"] += len(distinct) - len(storable)
        if len(storable) < 2:
            left_out["prompts_fewer_than_two_distinct"] += 1
            continue
        rows.append({"prompt": prompt, "responses": storable})
    if not rows:
        raise ConfigError(f"stage '{ctx.name}': no prompt got two distinct responses to compare")
    every = [(r["prompt"], a, b) for r in rows for i, a in enumerate(r["responses"]) for b in r["responses"][i + 1:]]
    if budget and len(every) > budget:  # pair rows (response_a / response_b) in their original order
        spread = ensemble_disagreement(scorers, *map(list, zip(*every))) if active_share else [0.0] * len(every)
        keep = budget_pairs(spread, budget, active_share, seed + 3)
        rows = [{"prompt": every[i][0], "response_a": every[i][1], "response_b": every[i][2]} for i in keep]
        left_out["pairs_over_budget"] = len(every) - budget
        if active_share:  # what the active share bought: its pairs' mean disagreement against all candidates'
            top = round(active_share * budget)
            selection = {"active_pairs": top, "disagreement_mean_active": sum(sorted(spread, reverse=True)[:top]) / max(top, 1),
                         "disagreement_mean_candidates": sum(spread) / len(spread)}
    priority = None
    if ctx.option("active"):
        def priority(p: list[Any], a: list[str], b: list[str]) -> list[float]:
            return ensemble_disagreement(scorers, p, a, b)
    judge = build_judge(str(ctx.option("judge")), temperature=float(ctx.option("judge_temperature", 1.0)))
    out = ctx.output_dir
    out.mkdir(parents=True, exist_ok=True)
    labels_file = out / "judge_labels.jsonl"
    paths = route_paths(labels_file)
    db_file = out / "labels.db"
    for stale in (db_file, paths["posted"], paths["routed"]):  # a stage reruns from scratch
        stale.unlink(missing_ok=True)
    judged = label_rows(rows, judge, paths["judged"], source="samples", restart=True, with_confidence=True)
    db = Database(str(db_file))
    try:
        routing = route_judged(paths["judged"], sidecar_paths(paths["judged"])["unlabelled"], labels_file,
                               float(ctx.option("confidence_threshold", 0.2)),
                               service_poster(db, PROJECT, int(ctx.option("overlap", 3))),
                               audit_fraction=float(ctx.option("audit_fraction", 0.1)), seed=seed, priority=priority)
        gold = GoldJudge(world)
        human_labels = 0
        if routing["posted_this_run"]:
            with db.session() as s:
                project_id = project_by_name(s, PROJECT).id
            panel = default_panel(seed, num=int(ctx.option("annotators", 5)))
            human_labels = label_with_panel(db, project_id, panel, gold, seed, likert=False)
        merged = merge_labels(labels_file, paths["routed"], db, PROJECT, out / "merged.jsonl",
                              pending_out=out / "pending.jsonl")
    finally:
        db.dispose()
    held_k = int(ctx.option("heldout_samples", 0))
    if held_k:
        from .data import gold_pairs_from_samples

        held = [r.prompt for r in world.split("eval")]
        texts = sample_responses(str(ctx.option("policy")), held, held_k, float(ctx.option("temperature", 1.0)),
                                 int(ctx.option("max_new_tokens", 48)), seed + 2)
        fresh = gold_pairs_from_samples(world, [{"prompt": p, "responses": t} for p, t in zip(held, texts)])
        write_jsonl(out / "gold_pairs.jsonl", ({**r, "prompt": [{"role": "user", "content": r["prompt"]}]}
                                               for r in fresh))
    rows_out = [json.loads(x) for x in (out / "merged.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    write_jsonl(out / "labels.jsonl", ({"prompt": [{"role": "user", "content": r["prompt"]}],
                                        **{k: r[k] for k in ("chosen", "rejected", "source", "pair_id")}}
                                       for r in rows_out))
    confident = [json.loads(x) for x in labels_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    routed = [json.loads(x) for x in paths["routed"].read_text(encoding="utf-8").splitlines() if x.strip()]
    routed_verdicts = [{"prompt": r["prompt"], **r["judge"]} for r in routed if "chosen" in r["judge"]]
    summary = {"pairs": merged["pairs"], "labelled": merged["rows"], "judge_labels": merged["by_source"]["judge"],
               "human_labels": merged["by_source"]["human"], "human_share": merged["human_share"],
               "judge_share": merged["judge_share"], "pending": merged["pending"], "ties": merged["ties"],
               "annotator_labels": human_labels, "routing": routing, **left_out, **selection,
               "judge_vs_gold_confident": _gold_accuracy(gold, confident),
               "judge_vs_gold_routed": _gold_accuracy(gold, routed_verdicts),
               "humans_vs_gold": _gold_accuracy(gold, [r for r in rows_out if r["source"] == "human"]),
               "judge_vs_humans_audited": merged["judge_vs_human_on_audited"],
               "judge": judge.name, "judge_summary": {k: judged.get(k) for k in ("labelled", "ties", "inconsistent")}}
    (out / "route_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return {k: v for k, v in summary.items() if not isinstance(v, dict)} | {
        "judge_accuracy_confident": summary["judge_vs_gold_confident"]["accuracy"],
        "human_accuracy": summary["humans_vs_gold"]["accuracy"]}


@stage("gold_pairs", options=("world", "samples", "policy"))
def gold_pairs_stage(ctx: StageContext) -> dict[str, Any]:
    """Fresh on-policy test pairs for a reward model: every pair of distinct responses that one policy gave
    to a held-out prompt in an eval stage's samples.jsonl (option ``samples``: the eval folder; ``policy``:
    its name there), labelled by the gold judge (:func:`rlhfkit.world.data.gold_pairs_from_samples`; gold
    ties left out). The reward model is tested on what the policy now writes, with no sampling of its own.
    Writes gold_pairs.jsonl (chat prompts)."""
    from ..data.jsonl import numbered_rows
    from .data import gold_pairs_from_samples, world_of, write_jsonl

    ctx.require("world", "samples", "policy")
    path = Path(str(ctx.option("samples"))) / "samples.jsonl"
    if not path.is_file():
        raise ConfigError(f"stage '{ctx.name}': {path} not found (run the eval stage first)")
    by_prompt: dict[str, list[str]] = {}
    for _, row in numbered_rows(path):
        if row.get("policy") == ctx.option("policy"):
            text = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
            by_prompt.setdefault(text, []).append(row["response"])
    if not by_prompt:
        raise ConfigError(f"stage '{ctx.name}': {path} holds no samples of policy {ctx.option('policy')!r}")
    rows = [{"prompt": p, "responses": list(dict.fromkeys(r))} for p, r in by_prompt.items()]
    pairs = gold_pairs_from_samples(world_of(ctx.option("world")), rows)
    write_jsonl(ctx.output_dir / "gold_pairs.jsonl", ({**r, "prompt": [{"role": "user", "content": r["prompt"]}]}
                                                     for r in pairs))
    return {"pairs": len(pairs), "prompts": len(rows),
            "prompts_with_a_pair": len({r["prompt"] for r in pairs})}
