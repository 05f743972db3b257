"""The demo world's human evaluation, as a pipeline stage: human_labels.

People label in the labelling app (:mod:`rlhfkit.label`); in the demo world they are the simulated annotators
(:mod:`rlhfkit.world.annotators`). The stage puts both together the way a team would run a human eval:

1. responses of several policies on the world's held-out prompts: the samples.jsonl of an earlier eval stage
   (``eval``), so that people and the AI judges label the very same texts (what makes Cohen's κ between
   them mean something), or, without one, fresh samples of ``policies`` ({name: model folder});
2. one item per (prompt, sample index, policy): the policy's sample beside the baseline's sample of the same
   prompt and index (the pairs a pairwise ``rlhfkit eval`` judges), with ``policies`` in the item's meta,
   imported into a project of a SQLite database in the stage's folder through the app's service functions
   (:func:`rlhfkit.label.service.import_items`); identical texts are not asked (counted);
3. every annotator takes assignments and submits verdicts through the same service API that the web app
   calls (``next_assignment`` -> ``assignment_view`` -> ``submit``): it sees the responses in the app's
   display order, so the app's order randomisation and the annotators' first-slot bias play as they would;
   ``overlap`` labellers per item; optional Likert ratings of both responses;
4. :func:`rlhfkit.label.human_eval.human_eval_report` on the database, and
   :func:`rlhfkit.label.human_vs_ai.compare_with_ai` against every folder of ``ai_evals`` (default: ``eval``).

Writes labels.db, items.jsonl (what was imported), human_eval.json (the report, with ``ai``: {folder name:
comparison}) and human_eval.txt (the tables).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..stage import StageContext, stage

PROJECT = "human_eval"


def _eval_samples(folder: Path, name: str) -> tuple[list[dict[str, Any]], str]:
    """(samples.jsonl's rows, the eval's baseline) of an eval stage folder."""
    from ..label.human_vs_ai import read_ai_eval

    report, samples, _ = read_ai_eval(folder)
    if samples is None:
        raise ConfigError(f"stage '{name}': {folder} has no samples.jsonl (run its eval stage with an output folder)")
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows, str(report["baseline"])


def _fresh_samples(ctx: StageContext, policies: Mapping[str, str]) -> list[dict[str, Any]]:
    """``num_samples`` samples of every policy on the world's held-out prompts, in samples.jsonl's layout."""
    from ..rollout.texts import sample_responses
    from .data import world_of

    world = world_of(ctx.option("world"))
    prompts = [r.prompt for r in world.split("eval")]
    k = int(ctx.option("num_samples", 2))
    rows = []
    for name, path in policies.items():  # one seed for all: two copies of a model write the same texts
        texts = sample_responses(str(path), prompts, k, float(ctx.option("temperature", 1.0)),
                                 int(ctx.option("max_new_tokens", 48)), ctx.seed + 100)
        rows += [{"prompt": p, "policy": name, "sample": s, "response": t}
                 for p, ts in zip(prompts, texts) for s, t in enumerate(ts)]
    return rows


def pair_items(samples: list[dict[str, Any]], baseline: str, policies: list[str], max_items: int,
               seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Items {prompt, responses: [policy's, baseline's], policies, sample} from samples.jsonl rows, pairing
    sample s of a prompt with the baseline's sample s; (items, counts of the pairs left out: ``same_text``,
    both texts alike or one empty; ``unstorable``, a text the app refuses, e.g. a NUL an untrained model
    wrote, :func:`rlhfkit.label.text.text_problem`). ``max_items`` > 0 keeps a seeded random subset of that
    many per policy."""
    from ..label.human_vs_ai import prompt_key
    from ..label.text import text_problem

    base = {(prompt_key(r["prompt"]), r["sample"]): r["response"] for r in samples if r["policy"] == baseline}
    items, left_out = [], {"same_text": 0, "unstorable": 0}
    for name in policies:
        mine = []
        for r in samples:
            key = prompt_key(r["prompt"])
            other = base.get((key, r["sample"]))
            if r["policy"] != name or key is None or other is None:
                continue
            if r["response"].strip() == other.strip() or not r["response"].strip() or not other.strip():
                left_out["same_text"] += 1
                continue
            if any(text_problem(t) for t in (key, r["response"], other)):
                left_out["unstorable"] += 1
                continue
            mine.append({"prompt": key, "responses": [r["response"], other], "policies": [name, baseline],
                         "sample": r["sample"]})
        if max_items and len(mine) > max_items:
            mine = random.Random(seed).sample(mine, max_items)
        items += mine
    return items, left_out


def label_with_panel(db: Any, project_id: int, panel: list[Any], judge: Any, seed: int, likert: bool) -> int:
    """Every annotator labels until the app has nothing left for anyone: assignments from the app, answers
    in display positions (as the web form sends them), submitted through the service. Returns the labels."""
    from ..label import service
    from ..label.db import Assignment

    # seeded draws for the labels and for the app's display orders (the annotators' position bias makes the
    # order count): one seed, one set of labels
    rng, shown = random.Random(seed), random.Random(seed + 1)
    users = [service.create_user(db, a.name)[0] for a in panel]
    active, labels = list(range(len(panel))), 0
    while active:
        for i in list(active):  # round robin, so every item's slots go to different annotators
            assignment = service.next_assignment(db, users[i], project_id, shown)
            if assignment is None:
                active.remove(i)
                continue
            with db.session() as s:
                view = service.assignment_view(s, s.get(Assignment, assignment.id))
            prompt, (first, second) = view["prompt"], view["responses"][:2]
            answers: dict[str, Any] = {"pairwise": {
                "choice": "A" if panel[i].prefers_first(judge, prompt, first, second, rng) else "B"}}
            if likert:
                answers["likert"] = {"ratings": [panel[i].rate(judge, prompt, r, rng) for r in view["responses"]]}
            service.submit(db, users[i], assignment.id, f"{panel[i].name}-{assignment.id:08d}", answers)
            labels += 1
    return labels


@stage("human_labels", options=("world", "eval", "policies", "baseline", "ai_evals", "annotators", "overlap",
                               "max_items", "likert", "num_samples", "temperature", "max_new_tokens", "n_boot",
                               "seed"))
def human_labels_stage(ctx: StageContext) -> dict[str, Any]:
    """Simulated annotators label policy-vs-baseline pairs in the labelling app; the human-eval report beside
    AI judges' evals, with Cohen's κ (see the module docstring).

    Options: world (required: the gold judge behind the annotators), eval (an eval stage folder whose samples
    are labelled) or policies ({name: model folder} sampled afresh: num_samples (2), temperature (1.0),
    max_new_tokens (48)); policies with eval: a list of the eval's policies to compare (default: all but the
    baseline); baseline (default: the eval's, else the first policy); ai_evals (eval folders to compare
    with; default [eval]); annotators (5), overlap (3 labellers per item), max_items (0 = every pair, else
    at most this many per policy, a seeded subset), likert (false: also rate both responses 1..5),
    n_boot (2000), seed (the pipeline's)."""
    from ..label import service
    from ..label.db import Database
    from ..label.human_eval import format_human_eval_table, human_eval_report
    from ..label.human_vs_ai import compare_with_ai
    from .data import default_panel, world_of, write_jsonl
    from .judge import GoldJudge

    ctx.require("world")
    seed = int(ctx.option("seed", ctx.seed))
    policies = ctx.option("policies")
    if ctx.option("eval"):
        samples, baseline = _eval_samples(Path(ctx.option("eval")), ctx.name)
        baseline = str(ctx.option("baseline", baseline))
        names = list(dict.fromkeys(r["policy"] for r in samples))
        chosen = [str(p) for p in policies] if isinstance(policies, list) else [n for n in names if n != baseline]
    elif isinstance(policies, Mapping) and policies:
        samples = _fresh_samples(ctx, {str(k): str(v) for k, v in policies.items()})
        names = [str(k) for k in policies]
        baseline = str(ctx.option("baseline", names[0]))
        chosen = [n for n in names if n != baseline]
    else:
        raise ConfigError(f"stage '{ctx.name}': give eval (an eval stage folder) or policies ({{name: model folder}})")
    for name in [baseline, *chosen]:
        if name not in names:
            raise ConfigError(f"stage '{ctx.name}': policy '{name}' has no samples (policies: {', '.join(names)})")
    items, left_out = pair_items(samples, baseline, chosen, int(ctx.option("max_items", 0)), seed)
    if not items:
        raise ConfigError(f"stage '{ctx.name}': no pair to label ({left_out['same_text']} pairs had the same text "
                          f"on both sides, {left_out['unstorable']} a text the app cannot store)")
    out = ctx.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "items.jsonl", items)
    db_file = out / "labels.db"
    if db_file.exists():  # a stage reruns from scratch (a done stage is skipped)
        db_file.unlink()
    db = Database(str(db_file))
    try:
        tasks = ["pairwise", "likert"] if ctx.option("likert") else ["pairwise"]
        project, added, duplicates = service.import_items(
            db, PROJECT, [service.check_item(it, "items.jsonl", i + 1) for i, it in enumerate(items)], tasks,
            overlap=int(ctx.option("overlap", 3)))
        panel = default_panel(seed, num=int(ctx.option("annotators", 5)))
        labels = label_with_panel(db, project.id, panel, GoldJudge(world_of(ctx.option("world"))), seed,
                                  bool(ctx.option("likert")))
        report = human_eval_report(db, PROJECT, baseline, int(ctx.option("n_boot", 2000)), seed=seed)
    finally:
        db.dispose()
    ai_evals = ctx.option("ai_evals") or ([ctx.option("eval")] if ctx.option("eval") else [])
    ai = {Path(str(f)).name: compare_with_ai(report, str(f)) for f in ai_evals}
    (out / "human_eval.json").write_text(json.dumps({**report, "ai": ai}, indent=2, default=str) + "\n",
                                         encoding="utf-8")
    tables = [format_human_eval_table(report, comparison) for comparison in ai.values()] or \
        [format_human_eval_table(report)]
    text = "\n\n".join(tables)
    (out / "human_eval.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    return {"items": added, "duplicates": duplicates, **{f"{k}_pairs": v for k, v in left_out.items()}, "labels": labels,
            "baseline": baseline, "policies": {n: report["policies"][n].get(f"win_rate_vs_{baseline}")
                                               for n in report["policies"]},
            "kappa": {name: {"cohen_kappa": c["cohen_kappa"], "matched_items": c["matched_items"],
                             "ai_judge": c["ai_judge"]} for name, c in ai.items()}}
