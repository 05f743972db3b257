"""The demo world's pipeline stage types: world (the world and its datasets), collect (preferences from
simulated annotators), cai_world (Constitutional AI data) and summary (the run's summary.json), plus the
demo's closing table; human_labels (a human eval in the labelling app) lives in world/human_eval_stage.py
and is registered by importing it here. Registered through the ``rlhfkit.stages`` entry point (pyproject.toml)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..stage import StageContext, stage
from . import human_eval_stage as _human_eval_stage  # noqa: F401  (registers human_labels: one entry point)
from . import loop_summary as _loop_summary  # noqa: F401  (registers loop_summary)
from . import route_stage as _route_stage  # noqa: F401  (registers routed_collect)
from .data import world_of as _world_of
from .sampling import reply_pools

logger = logging.getLogger("rlhfkit")


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]




@stage("world", options=("num_countries", "eval_fraction", "pretrain_copies", "sft_demonstrations", "closing_rate",
                        "rl_prompts", "tool_demonstrations", "tool_call_share", "tool_countries", "tool_sums",
                        "copy_documents", "red_team_mutations", "roleplay_demonstrations"))
def world_stage(ctx: StageContext) -> dict[str, Any]:
    """The demo world and its datasets.

    Options: num_countries (12), eval_fraction (0.25), sft_demonstrations (400), closing_rate (0.5: share of
    demonstrations with a polite closing), rl_prompts (2000 training prompts for RL, drawn with the category
    mix), pretrain_copies (2). Writes world.json, pretrain.jsonl (text), sft.jsonl (chat), prompts_train.jsonl
    and prompts_eval.jsonl (chat prompts with a category column).

    Tools (issue 24): tool_demonstrations (0 = none) adds the atlas and calculator of
    :mod:`rlhfkit.world.tool_world`: tools.py, tool_prompts_train.jsonl / tool_prompts_eval.jsonl (questions
    only a tool answers, with an ``answer`` column) and that many demonstrations with the tools offered, of
    which a share tool_call_share (0.3) call a tool; sft.jsonl then holds every demonstration as ``messages``.
    tool_countries ("80,24,12") and tool_sums ("300,200,60"): new countries and two-digit sums for the
    demonstrations, RL training and held-out evaluation. copy_documents (0): that many pretraining
    documents in which made-up names and two-digit numbers recur (:func:`rlhfkit.world.tool_world.copy_documents`),
    the text that teaches a language model to copy what it just read, as a call's arguments need.

    Red teaming (issue 26): red_team_mutations (0 = none) frames the harmful requests, and as many benign
    look-alikes, in that many of rlhfkit's mutations (:mod:`rlhfkit.world.red_team_world`): red_team_train.jsonl
    / red_team_eval.jsonl (seeds), benign_lookalikes_train.jsonl / _eval.jsonl and red_team_mutations.yaml,
    for ``rlhfkit red-team``; the framed prompts reach the tokenizer corpus and the gold judge, no other file.
    roleplay_demonstrations (0): that many demonstrations (in sft.jsonl) that play along with a frame on a
    benign training request ("Sure! ..."), the helpful habit that framed attacks exploit in a real model.
    """
    from . import build_world
    from .data import chat_text, pretraining_corpus, prompt_rows, sft_demonstrations, write_jsonl

    out = ctx.output_dir
    world = build_world(ctx.seed, num_countries=int(ctx.option("num_countries", 12)),
                        eval_fraction=float(ctx.option("eval_fraction", 0.25)))
    tools = bool(int(ctx.option("tool_demonstrations", 0)))
    if tools:
        _add_tool_questions(ctx, world)
    corpus = pretraining_corpus(world, ctx.seed, copies=int(ctx.option("pretrain_copies", 2)))
    if int(ctx.option("copy_documents", 0)):
        from .tool_world import copy_documents

        corpus += copy_documents(world, int(ctx.option("copy_documents")), ctx.seed)
        random.Random(ctx.seed).shuffle(corpus)
    write_jsonl(out / "pretrain.jsonl", ({"text": doc} for doc in corpus))
    demos = sft_demonstrations(world, int(ctx.option("sft_demonstrations", 400)), ctx.seed,
                               closing_rate=float(ctx.option("closing_rate", 0.5)))
    tool_texts: list[str] = []
    tool_counts: dict[str, int] = {}
    if int(ctx.option("red_team_mutations", 0)):
        from .red_team_world import add_red_team, roleplay_demonstrations

        tool_texts, tool_counts = add_red_team(world, out, int(ctx.option("red_team_mutations")))
        demos += roleplay_demonstrations(world, int(ctx.option("roleplay_demonstrations", 0)), ctx.seed)
    if tools:
        from .tool_world import write_tool_datasets

        tool_texts, tool_counts = write_tool_datasets(world, out, ctx.seed, int(ctx.option("tool_demonstrations")),
                                                      float(ctx.option("tool_call_share", 0.3)), demos)
    else:
        write_jsonl(out / "sft.jsonl", ({"prompt": _messages(d["prompt"]),
                                         "completion": [{"role": "assistant", "content": d["completion"]}]}
                                        for d in demos))
    world.save(out / "world.json")
    # the tokenizer learns from everything the models will read
    (out / "tokenizer_corpus.txt").write_text(
        "\n".join(corpus + [chat_text(d["prompt"], d["completion"]) for d in demos] + tool_texts), encoding="utf-8")
    train = prompt_rows(world, "train", int(ctx.option("rl_prompts", 2000)), ctx.seed)
    write_jsonl(out / "prompts_train.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in train))
    held_out = prompt_rows(world, "eval")
    write_jsonl(out / "prompts_eval.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in held_out))
    counts: dict[str, int] = {}
    for r in world.requests:
        counts[f"{r.split}_{r.category}"] = counts.get(f"{r.split}_{r.category}", 0) + 1
    return {"requests": len(world.requests), "pretrain_documents": len(corpus), "sft_demonstrations": len(demos),
            "held_out_prompts": len(held_out), **counts, **tool_counts}


def _add_tool_questions(ctx: StageContext, world: Any) -> None:
    """The world stage's tool options checked, and the atlas and sums added to ``world``."""
    from .tool_world import add_tool_requests

    def counts(name: str, default: str) -> tuple[int, ...]:
        value = ctx.option(name, default)
        try:
            parts = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or min(parts) < 1:
            raise ConfigError(f"stage '{ctx.name}': {name} must be three positive counts 'DEMO,TRAIN,EVAL' "
                              f"(got {value!r})")
        return parts

    share = float(ctx.option("tool_call_share", 0.3))
    if not 0 < share <= 1:
        raise ConfigError(f"stage '{ctx.name}': tool_call_share must be in (0, 1] (got {share})")
    add_tool_requests(world, ctx.seed, counts("tool_countries", "80,24,12"), counts("tool_sums", "300,200,60"))


@stage("collect", options=("policy", "world", "num_samples", "temperature", "max_new_tokens", "rounds", "max_prompts",
                          "other_policy", "other_samples", "explore_samples", "explore_temperature", "biased",
                          "annotators", "heldout_samples", "off_prompt_samples", "near_miss_samples"))
def collect_stage(ctx: StageContext) -> dict[str, Any]:
    """Preference collection in the demo world: a policy's samples labelled by simulated annotators.

    Options: policy (model folder), world (world stage folder), num_samples (4 per prompt), rounds (1: passes
    over the training prompts), temperature (1.0), max_new_tokens (48), annotators (5), biased (none |
    flattery | length: a panel that shares that taste), max_prompts (all), heldout_samples (4: samples per
    held-out prompt for the gold-labelled test pairs; 0 = none), other_policy + other_samples (responses
    from a second model put beside the policy's in each comparison, as InstructGPT's labellers compared
    outputs of several models: it shows the annotators, and so the reward model, more kinds of mistakes),
    explore_samples (0) + explore_temperature (1.5): the policy's own samples at a higher temperature, whose
    near misses (a wrong sum, a wrong capital) are the mistakes RL's exploration finds first; labelled
    before RL, they teach the reward model what the policy is about to try. off_prompt_samples (0): the
    policy's replies to the most similar other prompt (source "off_prompt", see sampling.off_prompt_responses): a
    right answer to another question, which the reward model must learn to mark down. near_miss_samples (0):
    the policy's replies with their answer swapped for the nearest other prompt's (source "near_miss", see
    sampling.near_miss_responses): "One plus six is three.", a wrong answer to this very question.
    Writes ranked.jsonl (prompt + responses best first, for rlhfkit rm / dpo), ranked_policy.jsonl (only the
    policy's responses, in the same order: on-policy data for DPO), pairs.jsonl (best vs worst),
    gold_pairs.jsonl (held-out prompts, labelled by the gold judge: the RM's honest test) and labels.json.
    """
    from .data import default_panel, gold_pairs_from_samples, label_samples, write_jsonl

    ctx.require("policy", "world")
    world = _world_of(ctx.option("world"))
    seed = ctx.seed
    k = int(ctx.option("num_samples", 4))
    temperature = float(ctx.option("temperature", 1.0))
    max_new = int(ctx.option("max_new_tokens", 48))
    prompts = [r.prompt for r in world.split("train")] * int(ctx.option("rounds", 1))
    if ctx.option("max_prompts"):
        prompts = random.Random(seed).sample(prompts, min(len(prompts), int(ctx.option("max_prompts"))))
    samples = reply_pools(ctx, prompts, k, temperature, max_new, seed + 1)
    panel = default_panel(seed, biased=ctx.option("biased"), num=int(ctx.option("annotators", 5)))
    ranked, pairs, report = label_samples(world, samples, panel, seed)
    out = ctx.output_dir
    write_jsonl(out / "ranked.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in ranked))
    # the policy's own responses in the annotators' order: on-policy preferences (what DPO learns best from)
    on_policy = [{"prompt": _messages(r["prompt"]),
                  "responses": [x for x, src in zip(r["responses"], r["sources"]) if src == "policy"],
                  "annotator": r["annotator"]} for r in ranked]
    write_jsonl(out / "ranked_policy.jsonl", (r for r in on_policy if len(r["responses"]) >= 2))
    write_jsonl(out / "pairs.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in pairs))
    held_k = int(ctx.option("heldout_samples", 4))
    if held_k:
        held = [r.prompt for r in world.split("eval")]
        # the held-out test keeps the sources of the demo's first build (no hot samples): its figures compare
        held_samples = reply_pools(ctx, held, held_k, temperature, max_new, seed + 2, explore=False)
        gold = gold_pairs_from_samples(world, held_samples)
        write_jsonl(out / "gold_pairs.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in gold))
        report["gold_pairs"] = len(gold)
    (out / "labels.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    agreement = report.get("agreement", {})
    return {"prompts_labelled": report["prompts_labelled"], "pairs": report["pairs_in_rankings"],
            "gold_pairs": report.get("gold_pairs", 0),
            "krippendorff_alpha": agreement.get("krippendorff_alpha"),
            "percent_agreement": agreement.get("percent_agreement")}


@stage("cai_world", options=("world", "constitution", "red_team_fraction", "demonstrations", "closing_rate", "teaching",
                            "already_safe_rate"))
def cai_world_stage(ctx: StageContext) -> dict[str, Any]:
    """The demo world's Constitutional AI data. Options: world (world stage folder), constitution (default:
    rlhfkit/templates/constitution_world.yaml), demonstrations (400), teaching (400 critique -> revision
    conversations), red_team_fraction (0.5 of each harm kind's training prompts kept for the CAI run),
    already_safe_rate (0.1), closing_rate (0.0).

    Writes constitution.yaml (the constitution used here; give it to the cai stage), sft_helpful.jsonl
    (``messages`` rows: a helpful-only assistant's demonstrations (harmful requests get compliance) and the
    teaching conversations, on the other harmful training prompts), red_team.jsonl (prompt + category)."""
    from importlib import resources

    from ..judges.constitution import load_constitution
    from .data import cai_prompt_split, cai_teaching, sft_demonstrations, write_jsonl

    ctx.require("world")
    world = _world_of(ctx.option("world"))
    source = ctx.option("constitution") or str(resources.files("rlhfkit") / "templates" / "constitution_world.yaml")
    constitution = load_constitution(source)  # fails here, with its file name, when bad
    out = ctx.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "constitution.yaml").write_text(Path(source).read_text(encoding="utf-8"), encoding="utf-8")
    try:
        teach, red_team = cai_prompt_split(world, float(ctx.option("red_team_fraction", 0.5)))
    except ValueError as exc:
        raise ConfigError(f"stage '{ctx.name}': {exc}") from None
    demos = sft_demonstrations(world, int(ctx.option("demonstrations", 400)), ctx.seed,
                               closing_rate=float(ctx.option("closing_rate", 0.0)), harmful_style="comply")
    rows = [{"messages": [*_messages(d["prompt"]), {"role": "assistant", "content": d["completion"]}]}
            for d in demos]
    teaching = cai_teaching(world, constitution, teach, int(ctx.option("teaching", 400)), ctx.seed + 1,
                            already_safe_rate=float(ctx.option("already_safe_rate", 0.1)))
    rows += teaching
    random.Random(ctx.seed).shuffle(rows)
    write_jsonl(out / "sft_helpful.jsonl", rows)
    write_jsonl(out / "red_team.jsonl", ({"prompt": _messages(r.prompt), "category": r.category}
                                         for r in red_team))
    return {"constitution": constitution.name, "principles": len(constitution.principles),
            "demonstrations": len(demos), "teaching": len(teaching), "teach_prompts": len(teach),
            "red_team_prompts": len(red_team)}


WITHOUT_TOOLS_KEYS = ("correct_rate", "correct_rate_ci_low", "correct_rate_ci_high", "hallucination_rate",
                      "judge_score")
SUMMARY_POLICY_KEYS = ("judge_score", "win_rate_vs_sft", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate",
                       "harmful_refusal_rate", "benign_over_refusal_rate", "hallucination_rate", "kl_to_sft",
                       "reward_mean", "mean_length")


@stage("summary", options=("eval", "file", "without_tools"))
def summary_stage(ctx: StageContext) -> dict[str, Any]:
    """The run's machine-readable summary.json (stable keys) from an eval folder and the stages' summaries.

    Per policy: the evaluation's numbers (``kl`` is renamed ``kl_to_<baseline>``, ``judge_score`` is the
    absolute gold score); ``rm.gold_accuracy`` (the reward model on gold-labelled held-out pairs);
    ``annotators`` (their agreement); ``ai_judges`` (per judge stage: agreement with the reference labels);
    ``cai`` (per revision_preference stage: how often the judge prefers the revisions); per policy
    ``train_seconds`` (the wall time of the stage whose folder the policy is, when it is one); ``stage_seconds``
    and ``wall_seconds`` (their sum). Option ``file``: the file name in the run folder (summary.json).
    Option ``without_tools``: a second eval folder, of the same prompts without the tools (tool demo): per
    policy ``without_tools`` holds its accuracy (``correct_rate`` and interval), hallucination and score.
    """
    ctx.require("eval")
    report = _eval_report(ctx, Path(ctx.option("eval")))
    baseline = report.get("baseline", "sft")
    summary: dict[str, Any] = {"seed": ctx.seed, "judge": report.get("judge"), "baseline": baseline,
                               "num_prompts": report.get("num_prompts"), "num_samples": report.get("num_samples")}
    made_by = _stages_of_policies(Path(ctx.option("eval")), ctx.run_dir)
    for name, metrics in report.get("policies", {}).items():
        row = dict(metrics)
        if "kl" in row:
            row[f"kl_to_{baseline}"] = row.pop("kl")
        # the wall time of the stage that trained the policy (a method's cost, beside its figures)
        seconds = (ctx.results.get(made_by.get(name, "")) or {}).get("wall_seconds")
        if isinstance(seconds, int | float):
            row["train_seconds"] = float(seconds)
        summary[name] = row
    if ctx.option("without_tools"):
        plain = _eval_report(ctx, Path(ctx.option("without_tools")))
        for name, metrics in plain.get("policies", {}).items():
            if name in summary:
                summary[name]["without_tools"] = {k: metrics.get(k) for k in WITHOUT_TOOLS_KEYS}
    rm = dict(report.get("rm") or {})
    if "accuracy" in rm:  # the eval's pairs are gold-labelled held-out pairs in the demo
        rm["gold_accuracy"] = rm["accuracy"]
    summary["rm"] = rm
    for result in ctx.results.values():
        if isinstance(result, dict) and "krippendorff_alpha" in result:
            summary["annotators"] = {k: result.get(k) for k in ("krippendorff_alpha", "percent_agreement",
                                                                 "prompts_labelled", "pairs", "gold_pairs")}
    # the other stages' headline numbers, recognised by their summaries' keys
    judges = {n: r for n, r in ctx.results.items() if isinstance(r, dict) and "cohen_kappa" in r}
    if judges:
        summary["ai_judges"] = judges
    revisions = {n: r for n, r in ctx.results.items() if isinstance(r, dict) and "revision_preferred" in r}
    if revisions:
        summary["cai"] = revisions
    stage_seconds = {n: r.get("wall_seconds") for n, r in ctx.results.items() if isinstance(r, dict)}
    summary["stage_seconds"] = stage_seconds
    # the stages' own wall times: the same whether the run went in one go or resumed over several
    summary["wall_seconds"] = sum(float(v) for v in stage_seconds.values() if isinstance(v, int | float))
    out = ctx.run_dir / str(ctx.option("file", "summary.json"))
    out.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return {"summary": str(out)}


def _eval_report(ctx: StageContext, folder: Path) -> dict[str, Any]:
    eval_file = folder / "eval.json"
    if not eval_file.exists():
        raise ConfigError(f"stage '{ctx.name}': {eval_file} not found (run the eval stage first)")
    return json.loads(eval_file.read_text(encoding="utf-8"))


def _stages_of_policies(eval_dir: Path, run_dir: Path) -> dict[str, str]:
    """{policy: name of the stage whose folder it is} from the eval stage's stage_done.json (its resolved
    options); policies from elsewhere, or an eval folder made outside a pipeline, map to nothing."""
    done = eval_dir / "stage_done.json"
    if not done.exists():
        return {}
    policies = (json.loads(done.read_text(encoding="utf-8")).get("options") or {}).get("policies") or {}
    out = {}
    for name, path in policies.items() if isinstance(policies, dict) else ():
        folder = Path(str(path))
        if folder.parent.resolve() == Path(run_dir).resolve():
            out[str(name)] = folder.name
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing table: one row per policy, then the reward model, AI judges, CAI and wall time."""
    baseline = str(summary.get("baseline") or "sft")
    cols = (("gold", "judge_score"), (f"win vs {baseline}", f"win_rate_vs_{baseline}"),
            ("CI low", "win_rate_ci_low"), ("LC win", "lc_win_rate"), ("harm. refusal", "harmful_refusal_rate"),
            ("over-refusal", "benign_over_refusal_rate"), ("halluc.", "hallucination_rate"),
            (f"KL to {baseline}", f"kl_to_{baseline}"), ("length", "mean_length"))
    width = max(14, *(len(c) + 1 for c, _ in cols))
    # the policies are the rows with a score, whatever their names and number (compare.yaml has eight)
    policies = {name: row for name, row in summary.items() if isinstance(row, dict) and "judge_score" in row}
    first = max(8, *(len(str(name)) + 1 for name in policies)) if policies else 8
    lines = [f"{'policy':<{first}}" + "".join(f"{c:>{width}}" for c, _ in cols)]
    for name, row in policies.items():
        cells = []
        for _, key in cols:
            v = row.get(key)
            cells.append(f"{v:>{width}.3f}" if isinstance(v, int | float) else f"{'-':>{width}}")
        lines.append(f"{name:<{first}}" + "".join(cells))
    if any(isinstance(row, dict) and "lc_win_rate" in row for row in summary.values()):
        lines.append("LC win: the win rate at equal length. This world's gold judge rewards concision (-0.05 a "
                     "word past the ideal reply), so shorter replies are partly real gains: LC win < 0.5 says the "
                     "wins come through length, not that they are fake.")
    lines += _tool_lines(policies)
    rm = summary.get("rm", {})
    if "gold_accuracy" in rm:
        lines.append(f"reward model accuracy on gold-labelled held-out pairs: {rm['gold_accuracy']:.3f}")
    for j in (summary.get("ai_judges") or {}).values():
        lines.append(f"AI judge {j.get('judge')} vs gold on {j.get('compared')} held-out pairs: accuracy "
                     f"{_num(j.get('accuracy'))}, Cohen's kappa {_num(j.get('cohen_kappa'))}, ties "
                     f"{j.get('ties')}, inconsistent {j.get('inconsistent')}, first-slot wins "
                     f"{_num(j.get('first_slot_win_rate'))}{' (position-biased)' if j.get('position_biased') else ''}")
    for c in (summary.get("cai") or {}).values():
        lines.append(f"CAI revisions preferred by {c.get('judge')}: {_num(c.get('revision_preferred'))} "
                     f"(95% CI {_num(c.get('ci_low'))}-{_num(c.get('ci_high'))}; {c.get('n_prompts')} prompts, "
                     f"{c.get('n_revisions')} revisions: {c.get('wins')} won, {c.get('ties')} tied, "
                     f"{c.get('losses')} lost)")
    if summary.get("annotators"):
        a = summary["annotators"]
        lines.append(f"annotators: Krippendorff's alpha {a.get('krippendorff_alpha', float('nan')):.2f}, "
                     f"percent agreement {a.get('percent_agreement', float('nan')):.2f}")
    if summary.get("wall_seconds") is not None:
        lines.append(f"wall time: {summary['wall_seconds']:.0f}s")
    return "\n".join(lines)


def _tool_lines(policies: dict[str, dict[str, Any]]) -> list[str]:
    """The tool demo's table: accuracy with the tools (95% CI) and without, call rate, turns, call errors."""
    rows = {n: r for n, r in policies.items() if "tool_calls_mean" in r}
    if not rows:
        return []
    first = max(8, *(len(n) + 1 for n in rows))
    head = ("accuracy (tools)", "95% CI", "no tools", "call rate", "calls/ep.", "turns/ep.", "call errors",
            "halluc.")
    lines = ["", f"{'policy':<{first}}" + "".join(f"{h:>18}" for h in head)]
    for name, r in rows.items():
        plain = r.get("without_tools") or {}
        ci = f"{_num(r.get('correct_rate_ci_low'))}-{_num(r.get('correct_rate_ci_high'))}"
        cells = (_num(r.get("correct_rate")), ci, _num(plain.get("correct_rate")), _num(r.get("tool_call_rate")),
                 _num(r.get("tool_calls_mean")), _num(r.get("turns_mean")), str(r.get("tool_call_errors", "-")),
                 _num(r.get("hallucination_rate")))
        lines.append(f"{name:<{first}}" + "".join(f"{c:>18}" for c in cells))
    lines.append("accuracy: held-out questions only a tool answers (new countries, two-digit sums), judged on "
                 "the final answer; 'no tools': the same questions without the tools offered.")
    return lines


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"
