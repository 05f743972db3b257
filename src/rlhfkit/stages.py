"""The library's pipeline stage types (the trainers are stage types too, from :mod:`rlhfkit.registry`):
tiny_model, eval, report, judge (an AI judge's agreement with known labels), cai (critique -> revision),
revision_preference (does a judge prefer the revisions?), and the evaluation commands beside eval: eval_rm
(``rlhfkit eval-rm``), audit_judge (``rlhfkit audit-judge``), grade (``rlhfkit grade``) and red_team
(``rlhfkit red-team``). Each takes the
options documented on it; a command's stage takes the command's options by their names with underscores and
the same defaults (its parser is the one list of both, :mod:`rlhfkit.eval.cli_options`), writes the
command's files to the stage's folder and prints its table, with the pipeline's seed unless it sets ``seed``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .stage import StageContext, stage


@stage("tiny_model", options=("corpus", "vocab", "layers", "hidden", "heads", "max_positions", "chat_template",
                             "spaces_apart"))
def tiny_model_stage(ctx: StageContext) -> dict[str, Any]:
    """A random-init Llama with a BPE tokenizer trained on ``corpus`` (a text file, one document per line).

    Options: corpus, vocab (1024), layers (2), hidden (128), heads (4), max_positions (256), chat_template
    (default | tools: a template that also renders ``tools=``, rlhfkit.models.tiny.TOOLS_CHAT_TEMPLATE),
    spaces_apart (false: a space is its own token, rlhfkit.models.tiny.train_tokenizer).
    """
    from .models.tiny import CHAT_TEMPLATES, build_tiny_model

    ctx.require("corpus")
    corpus_file = Path(ctx.option("corpus"))
    if not corpus_file.exists():
        raise ConfigError(f"stage '{ctx.name}': corpus {corpus_file} not found")
    template = str(ctx.option("chat_template", "default"))
    if template not in CHAT_TEMPLATES:
        raise ConfigError(f"stage '{ctx.name}': chat_template must be one of {', '.join(CHAT_TEMPLATES)} "
                          f"(got {template!r})")
    lines = corpus_file.read_text(encoding="utf-8").split("\n")
    build_tiny_model(ctx.output_dir, layers=int(ctx.option("layers", 2)), hidden=int(ctx.option("hidden", 128)),
                     heads=int(ctx.option("heads", 4)), vocab=int(ctx.option("vocab", 1024)),
                     max_positions=int(ctx.option("max_positions", 256)), seed=ctx.seed, corpus=lines,
                     chat_template=template, spaces_apart=bool(ctx.option("spaces_apart", False)))
    import transformers

    config = transformers.AutoConfig.from_pretrained(ctx.output_dir)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": config.vocab_size}


def _eval_options() -> set[str]:
    from .eval.runner import option_defaults

    return {*option_defaults(), "policies"} - {"output_dir"}


@stage("eval", options=_eval_options)
def eval_stage(ctx: StageContext) -> dict[str, Any]:
    """``rlhfkit eval`` as a stage: the same options, with the same defaults, by their names with
    underscores (num_samples, temperature, max_new_tokens, batch_size, n_boot, ...); ``policies`` is a
    {name: path} mapping (or ``policy``: NAME=PATH as on the command line). The seed is the pipeline's + 100
    unless given; eval.json and samples.jsonl go to the stage's folder."""
    from .eval.runner import evaluate_from_options, format_table

    ctx.require("prompts", "judge")
    report = evaluate_from_options({**ctx.options, "seed": int(ctx.option("seed", ctx.seed + 100)),
                                    "output_dir": str(ctx.output_dir)})
    print(format_table(report))
    return {"policies": report.get("policies", {}), "rm": report.get("rm", {})}


@stage("report", options=("run_dir", "output", "summary"))
def report_stage(ctx: StageContext) -> dict[str, Any]:
    """The HTML report of the run folder (or of ``run_dir``): report.html at the run's root (or ``output``);
    ``summary``: the pipeline summary file it shows (summary.json)."""
    from .report import build_report

    run_dir = Path(ctx.option("run_dir", ctx.run_dir))
    path = build_report(run_dir, output=ctx.option("output"), summary_file=str(ctx.option("summary", "summary.json")))
    return {"report": str(path)}


@stage("judge", options=("judge", "pairs", "max_pairs", "template", "principles"))
def judge_stage(ctx: StageContext) -> dict[str, Any]:
    """An AI judge labels preference pairs whose preference is known (``rlhfkit judge`` as a stage): how
    often it agrees with the reference. Options: judge (a spec: model:PATH, lm:PATH, openai:..., see
    rlhfkit judge --help), pairs (prompt/chosen/rejected rows; each is shown in alternating order and its
    chosen side is the reference), max_pairs (only the first N rows; 0 = all), template, principles (a
    constitution or text file). Writes pairs.jsonl (the judge's labels) and its sidecars. Summary: accuracy
    and Cohen's kappa against the reference, with the judge's ties, inconsistent verdicts (the two
    presentation orders disagree) and position bias."""
    from .judges import build_judge, label_file

    ctx.require("judge", "pairs")
    pairs = str(ctx.option("pairs"))
    if not Path(pairs).exists():
        raise ConfigError(f"stage '{ctx.name}': pairs file {pairs} not found")
    principles = ""
    if ctx.option("principles"):
        from .judges.constitution import principles_text

        principles = principles_text(str(ctx.option("principles")))
    judge = build_judge(str(ctx.option("judge")), template=ctx.option("template"), principles=principles)
    # a stage reruns from scratch (a done stage is skipped), so a changed input never meets old progress
    result = label_file(pairs, judge, ctx.output_dir / "pairs.jsonl", restart=True,
                        limit=int(ctx.option("max_pairs", 0)))
    agreement = result.get("agreement") or {}
    return {"judge": str(ctx.option("judge")), "pairs": result["pairs"], "compared": agreement.get("compared"),
            "accuracy": agreement.get("accuracy"), "cohen_kappa": agreement.get("cohen_kappa"),
            **{k: result.get(k) for k in ("ties", "unlabelled", "inconsistent", "inconsistent_rate",
                                          "first_slot_win_rate", "position_biased")}}


@stage("cai", options=("policy", "prompts", "constitution", "category", "samples_per_prompt", "rounds", "temperature",
                     "top_p", "max_new_tokens", "max_prompt_length", "batch_size", "judge"))
def cai_stage(ctx: StageContext) -> dict[str, Any]:
    """``rlhfkit cai`` as a stage: critique -> revision against a constitution by one policy.

    Options: policy, prompts (a file with a prompt column), constitution (default: rlhfkit's), category
    (only rows of it), samples_per_prompt (1: each prompt is revised this many times, with its own sampled
    principle and responses), rounds (1), temperature (0.7), top_p (1.0), max_new_tokens (48),
    max_prompt_length (200), batch_size (32), judge (RL-CAI: a judge spec labelling initial vs final into
    pairs_ai.jsonl). Writes sft.jsonl, pairs.jsonl (final revision > initial), trace.jsonl, summary.json."""
    from .cai import HFChatPolicy, load_constitution, load_prompts, run_cai

    ctx.require("policy", "prompts")
    constitution = load_constitution(ctx.option("constitution"))
    prompts = load_prompts(str(ctx.option("prompts")), ctx.option("category"))
    repeats = int(ctx.option("samples_per_prompt", 1))
    if repeats < 1:
        raise ConfigError(f"stage '{ctx.name}': samples_per_prompt must be >= 1, not {repeats}")
    judge = None
    if ctx.option("judge"):
        from .judges import build_judge

        judge = build_judge(str(ctx.option("judge")), principles=constitution.as_text())
    policy = HFChatPolicy(str(ctx.option("policy")), temperature=float(ctx.option("temperature", 0.7)),
                          top_p=float(ctx.option("top_p", 1.0)),
                          max_new_tokens=int(ctx.option("max_new_tokens", 48)),
                          max_prompt_length=int(ctx.option("max_prompt_length", 200)),
                          batch_size=int(ctx.option("batch_size", 32)), seed=ctx.seed)
    summary = run_cai([p for p in prompts for _ in range(repeats)], policy, constitution, ctx.output_dir,
                      rounds=int(ctx.option("rounds", 1)), seed=ctx.seed, judge=judge, restart=True)
    return {k: v for k, v in summary.items() if not k.endswith("_file")}


@stage("revision_preference", options=("cai", "judge", "n_boot"))
def revision_preference_stage(ctx: StageContext) -> dict[str, Any]:
    """How often a judge prefers a CAI run's final revision to the initial response (ties count ½).

    Options: cai (the cai stage folder), judge (a spec; gold:WORLD in the demo, so it measures, never
    trains), n_boot (2000). The rate is the mean over prompts of each prompt's mean outcome (a prompt revised
    several times counts once), with a percentile bootstrap interval over prompts (rlhfkit.eval.stats)."""
    import numpy as np

    from .data.jsonl import read_jsonl, write_jsonl
    from .eval.stats import win_rate
    from .judges import build_judge

    ctx.require("cai", "judge")
    trace_file = Path(ctx.option("cai")) / "trace.jsonl"
    if not trace_file.exists():
        raise ConfigError(f"stage '{ctx.name}': {trace_file} not found (run the cai stage first)")
    judge = build_judge(str(ctx.option("judge")))
    by_prompt: dict[str, list[float]] = {}
    rows = []
    for row in read_jsonl(trace_file):
        winner = judge.compare(row["prompt"], row["final"], row["initial"]).winner
        outcome = {"a": 1.0, None: 0.5, "b": 0.0}[winner]
        by_prompt.setdefault(json.dumps(row["prompt"]), []).append(outcome)
        rows.append({"prompt": row["prompt"], "initial": row["initial"], "final": row["final"],
                     "outcome": outcome})
    if not rows:
        raise ConfigError(f"stage '{ctx.name}': {trace_file} is empty")
    write_jsonl(ctx.output_dir / "outcomes.jsonl", rows)
    per_prompt = np.asarray([np.mean(v) for v in by_prompt.values()])
    rate = win_rate(per_prompt, int(ctx.option("n_boot", 2000)), seed=ctx.seed)
    outcomes = [r["outcome"] for r in rows]
    return {"judge": str(ctx.option("judge")), "revision_preferred": rate.rate, "ci_low": rate.ci_low,
            "ci_high": rate.ci_high, "n_prompts": rate.n, "n_revisions": len(rows),
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}


# ------------------------------------------------------------------ the evaluation commands as stages
def _options_of(module: str, extra: tuple[str, ...] = ()) -> Callable[[], set[str]]:
    """The option names of a command's parser (output_dir is the pipeline's), imported when a config is
    checked, not when the stage types are listed."""

    def names() -> set[str]:
        import importlib

        from .eval.cli_options import option_names

        return (option_names(importlib.import_module(module).build_parser()) | set(extra)) - {"output_dir"}

    return names


def _with_run(ctx: StageContext) -> dict[str, Any]:
    """The stage's options for its command: written to the stage's folder, with the pipeline's seed."""
    return {"seed": ctx.seed, **ctx.options, "output_dir": str(ctx.output_dir)}


@stage("eval_rm", options=_options_of("rlhfkit.eval.rm_report"))
def eval_rm_stage(ctx: StageContext) -> dict[str, Any]:
    """A reward model's RewardBench-style report (``rlhfkit eval-rm`` as a stage): accuracy per subset and
    overall with intervals, calibration (ECE, Brier) and length bias on a labelled preference file.

    Options: reward_model, pairs (required), subset_column, bins, batch_size, max_length, n_boot, ... (see
    rlhfkit eval-rm --help). Writes rm_report.json and pairs.jsonl. Summary: accuracy [CI], ECE, Brier and
    the share of unequal-length pairs where the longer response scores higher."""
    from .eval.rm_report import format_rm_table, rm_report_from_options

    ctx.require("reward_model", "pairs")
    report = rm_report_from_options(_with_run(ctx))
    print(format_rm_table(report))
    overall, cal = report["overall"], report["calibration"]
    return {"accuracy": overall.get("accuracy"), "ci_low": overall.get("ci_low"), "ci_high": overall.get("ci_high"),
            "num_pairs": report["num_pairs"], "ece": cal["ece"], "brier": cal["brier"],
            "prefers_longer": report["length_bias"]["prefers_longer"].get("accuracy"),
            "subsets": {name: s.get("accuracy") for name, s in report["subsets"].items()}}


@stage("audit_judge", options=_options_of("rlhfkit.eval.judge_audit"))
def audit_judge_stage(ctx: StageContext) -> dict[str, Any]:
    """How far to trust a pairwise judge (``rlhfkit audit-judge`` as a stage), on pairs whose better side is
    known: accuracy and Cohen's kappa with intervals, position bias (each pair asked in both orders), length
    bias against the labels' own, self-preference (with self_model), consistency (repeats >= 2).

    Options: judge, pairs (required), max_pairs, repeats, self_model, template, n_boot, ... (see rlhfkit
    audit-judge --help). Writes judge_audit.json, which the HTML report shows. Summary: accuracy, kappa,
    first-slot share, flip share, length slopes (judge and labels) and the flags raised."""
    from .eval.judge_audit import audit_from_options, format_audit_table

    ctx.require("judge", "pairs")
    report = audit_from_options(_with_run(ctx))
    print(format_audit_table(report))
    position, length = report["position"], report["length"]
    return {"judge": report["judge"], "pairs": report["pairs"], "skipped": report["skipped"],
            "accuracy": report["accuracy"]["value"], "kappa": report["kappa"].get("value"),
            "first_slot_share": position["first_slot_share"].get("value"),
            "flip_share": position["flip_share"].get("value"),
            "length_slope": (length.get("judge_slope") or {}).get("slope"),
            "label_length_slope": (length.get("label_slope") or {}).get("slope"), "flagged": report["flagged"]}


@stage("grade", options=_options_of("rlhfkit.eval.grading_run", ("policies",)))
def grade_stage(ctx: StageContext) -> dict[str, Any]:
    """MT-Bench-style grading (``rlhfkit grade`` as a stage): every policy answers the questions (multi-turn)
    and a judge grades each answer 1-10, single or reference-guided.

    Options: policies ({name: path}, or policy: [NAME=PATH, ...] as on the command line), questions, judge
    (required), mode, templates, temperature, max_new_tokens, ... (see rlhfkit grade --help). Writes
    grades.jsonl and grading.json. Summary: each policy's mean grade [CI] and parse failures."""
    from .eval.grading_run import format_grading_table, grade_from_options

    ctx.require("questions", "judge")
    options = _with_run(ctx)
    report = grade_from_options(options)
    print(format_grading_table(report))
    return {"judge": report["judge"], "policies": {
        name: {"mean": p["overall"].get("mean"), "ci_low": p["overall"].get("ci_low"),
               "ci_high": p["overall"].get("ci_high"), "parse_failures": p["parse_failures"]}
        for name, p in report["policies"].items()}}


@stage("red_team", options=_options_of("rlhfkit.eval.red_team"))
def red_team_stage(ctx: StageContext) -> dict[str, Any]:
    """A red-team round (``rlhfkit red-team`` as a stage): mutated attacks on a target, ASR by category and
    mutation with Wilson intervals, over-refusal on benign look-alikes, and the next round's pairs.

    Options: target, seeds, harm_judge (required), benign, mutations, mutations_per_seed, attacker,
    refusal_judge, num_samples, temperature, ... (see rlhfkit red-team --help). Writes red_team.json,
    attacks.jsonl, refusal_pairs.jsonl and helpful_pairs.jsonl (a rerun of the stage replaces them).
    Summary: ASR and over-refusal [CI] with counts, the plain seeds' rates, and the pairs written."""
    from .eval.red_team import format_red_team_table, red_team_from_options

    ctx.require("target", "seeds", "harm_judge")
    report = red_team_from_options({**_with_run(ctx), "overwrite": True})
    print(format_red_team_table(report))
    counts = report["counts"]
    return {"asr": report["asr"]["overall"], "seed_asr": report["seed_asr"]["overall"]["rate"],
            "over_refusal": report["over_refusal"]["overall"],
            "seed_over_refusal": report["seed_over_refusal"]["overall"]["rate"],
            "refusal_pairs": counts["refusal_pairs"], "helpful_pairs": counts["helpful_pairs"],
            "refusal_pairs_without_chosen": counts["refusal_pairs_without_chosen"]}
