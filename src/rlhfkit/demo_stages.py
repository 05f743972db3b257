"""Pipeline stage types beyond the trainers: world, tiny_model, collect, eval, report.

Each is registered with :func:`rlhfkit.pipeline.stage` and takes the options documented on it.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .pipeline import StageContext, stage

logger = logging.getLogger("rlhfkit")


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _world_of(path: str | Path):
    from .world import World

    file = Path(path)
    file = file / "world.json" if file.is_dir() else file
    if not file.exists():
        raise ConfigError(f"{file}: no world.json (run a 'world' stage first)")
    return World.load(file)


@stage("world")
def world_stage(ctx: StageContext) -> dict[str, Any]:
    """The demo world and its datasets.

    Options: num_countries (12), eval_fraction (0.25), sft_demonstrations (400), closing_rate (0.5: share of
    demonstrations with a polite closing), rl_prompts (2000 training prompts for RL, drawn with the category
    mix), pretrain_copies (2). Writes world.json, pretrain.jsonl (text), sft.jsonl (chat), prompts_train.jsonl
    and prompts_eval.jsonl (chat prompts with a category column).
    """
    from .world import build_world
    from .world.data import chat_text, pretraining_corpus, prompt_rows, sft_demonstrations, write_jsonl

    out = ctx.output_dir
    world = build_world(ctx.seed, num_countries=int(ctx.option("num_countries", 12)),
                        eval_fraction=float(ctx.option("eval_fraction", 0.25)))
    world.save(out / "world.json")
    corpus = pretraining_corpus(world, ctx.seed, copies=int(ctx.option("pretrain_copies", 2)))
    write_jsonl(out / "pretrain.jsonl", ({"text": doc} for doc in corpus))
    demos = sft_demonstrations(world, int(ctx.option("sft_demonstrations", 400)), ctx.seed,
                               closing_rate=float(ctx.option("closing_rate", 0.5)))
    write_jsonl(out / "sft.jsonl", ({"prompt": _messages(d["prompt"]),
                                     "completion": [{"role": "assistant", "content": d["completion"]}]}
                                    for d in demos))
    # the tokenizer learns from everything the models will read
    (out / "tokenizer_corpus.txt").write_text(
        "\n".join(corpus + [chat_text(d["prompt"], d["completion"]) for d in demos]), encoding="utf-8")
    train = prompt_rows(world, "train", int(ctx.option("rl_prompts", 2000)), ctx.seed)
    write_jsonl(out / "prompts_train.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in train))
    held_out = prompt_rows(world, "eval")
    write_jsonl(out / "prompts_eval.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in held_out))
    counts: dict[str, int] = {}
    for r in world.requests:
        counts[f"{r.split}_{r.category}"] = counts.get(f"{r.split}_{r.category}", 0) + 1
    return {"requests": len(world.requests), "pretrain_documents": len(corpus), "sft_demonstrations": len(demos),
            "held_out_prompts": len(held_out), **counts}


@stage("tiny_model")
def tiny_model_stage(ctx: StageContext) -> dict[str, Any]:
    """A random-init Llama with a BPE tokenizer trained on ``corpus`` (a text file, one document per line).

    Options: corpus, vocab (1024), layers (2), hidden (128), heads (4), max_positions (256).
    """
    from .models.tiny import build_tiny_model

    ctx.require("corpus")
    corpus_file = Path(ctx.option("corpus"))
    if not corpus_file.exists():
        raise ConfigError(f"stage '{ctx.name}': corpus {corpus_file} not found")
    lines = corpus_file.read_text(encoding="utf-8").split("\n")
    build_tiny_model(ctx.output_dir, layers=int(ctx.option("layers", 2)), hidden=int(ctx.option("hidden", 128)),
                     heads=int(ctx.option("heads", 4)), vocab=int(ctx.option("vocab", 1024)),
                     max_positions=int(ctx.option("max_positions", 256)), seed=ctx.seed, corpus=lines)
    import transformers

    config = transformers.AutoConfig.from_pretrained(ctx.output_dir)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": config.vocab_size}


def sample_responses(model_path: str, prompts: list[str], num_samples: int, temperature: float,
                     max_new_tokens: int, seed: int, batch_size: int = 32) -> list[list[str]]:
    """``num_samples`` decoded responses per (user-turn) prompt from a causal LM, seeded."""
    import datasets
    import torch

    from .data import prepare_prompts
    from .models import load_causal_lm, load_tokenizer
    from .rollout.generate import HFGenerationBackend, SamplingConfig

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path).eval().requires_grad_(False)
    ds = datasets.Dataset.from_list([{"prompt": _messages(p)} for p in prompts])
    records, _ = prepare_prompts(ds, tokenizer, max_prompt_length=256, source=model_path)
    backend = HFGenerationBackend(tokenizer)
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    out: list[list[str]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        rollout = backend.generate(model, [r["prompt_ids"] for r in chunk], num_samples, sampling, generator)
        texts = [t.strip() for t in backend.decode(rollout)]
        out += [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(chunk))]
    return out


def _samples_of_all(ctx: StageContext, prompts: list[str], k: int, temperature: float, max_new: int,
                    seed: int) -> list[dict[str, Any]]:
    """Rows {prompt, responses, sources}: ``k`` samples of the policy, plus the other policy's if set."""
    samples = sample_responses(ctx.option("policy"), prompts, k, temperature, max_new, seed)
    rows = [{"prompt": p, "responses": s, "sources": ["policy"] * len(s)} for p, s in zip(prompts, samples)]
    other, other_k = ctx.option("other_policy"), int(ctx.option("other_samples", 0))
    if other and other_k:
        extra = sample_responses(other, prompts, other_k, temperature, max_new, seed + 7)
        for row, more in zip(rows, extra):
            row["responses"] = row["responses"] + more
            row["sources"] = row["sources"] + ["other"] * len(more)
    return rows


@stage("collect")
def collect_stage(ctx: StageContext) -> dict[str, Any]:
    """Preference collection in the demo world: a policy's samples labelled by simulated annotators.

    Options: policy (model folder), world (world stage folder), num_samples (4 per prompt), rounds (1: passes
    over the training prompts), temperature (1.0), max_new_tokens (48), annotators (5), biased (none |
    flattery | length: a panel that shares that taste), max_prompts (all), heldout_samples (4: samples per
    held-out prompt for the gold-labelled test pairs; 0 = none), other_policy + other_samples (responses
    from a second model put beside the policy's in each comparison, as InstructGPT's labellers compared
    outputs of several models: it shows the annotators, and so the reward model, more kinds of mistakes).
    Writes ranked.jsonl (prompt + responses best first, for rlhfkit rm / dpo), ranked_policy.jsonl (only the
    policy's responses, in the same order: on-policy data for DPO), pairs.jsonl (best vs worst),
    gold_pairs.jsonl (held-out prompts, labelled by the gold judge: the RM's honest test) and labels.json.
    """
    from .world.data import default_panel, gold_pairs_from_samples, label_samples, write_jsonl

    ctx.require("policy", "world")
    world = _world_of(ctx.option("world"))
    seed = ctx.seed
    k = int(ctx.option("num_samples", 4))
    temperature = float(ctx.option("temperature", 1.0))
    max_new = int(ctx.option("max_new_tokens", 48))
    prompts = [r.prompt for r in world.split("train")] * int(ctx.option("rounds", 1))
    if ctx.option("max_prompts"):
        prompts = random.Random(seed).sample(prompts, min(len(prompts), int(ctx.option("max_prompts"))))
    samples = _samples_of_all(ctx, prompts, k, temperature, max_new, seed + 1)
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
        held_samples = _samples_of_all(ctx, held, held_k, temperature, max_new, seed + 2)
        gold = gold_pairs_from_samples(world, held_samples)
        write_jsonl(out / "gold_pairs.jsonl", ({**r, "prompt": _messages(r["prompt"])} for r in gold))
        report["gold_pairs"] = len(gold)
    (out / "labels.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    agreement = report.get("agreement", {})
    return {"prompts_labelled": report["prompts_labelled"], "pairs": report["pairs_in_rankings"],
            "gold_pairs": report.get("gold_pairs", 0),
            "krippendorff_alpha": agreement.get("krippendorff_alpha"),
            "percent_agreement": agreement.get("percent_agreement")}


@stage("eval")
def eval_stage(ctx: StageContext) -> dict[str, Any]:
    """``rlhfkit eval`` as a stage. Options: policies ({name: path}), baseline, prompts, judge, reference,
    reward_model, pairs, num_samples (4), temperature (1.0), max_new_tokens (48), batch_size (32),
    n_boot (1000 bootstrap rounds for the confidence intervals)."""
    from .eval.runner import evaluate_policies
    from .rollout.generate import SamplingConfig

    ctx.require("policies", "baseline", "prompts", "judge")
    from .data import load_rows

    prompts = list(load_rows(str(ctx.option("prompts"))))
    report = evaluate_policies(
        {k: str(v) for k, v in dict(ctx.option("policies")).items()}, str(ctx.option("baseline")), prompts,
        str(ctx.option("judge")), reference=ctx.option("reference"), reward_model=ctx.option("reward_model"),
        num_samples=int(ctx.option("num_samples", 4)),
        sampling=SamplingConfig(temperature=float(ctx.option("temperature", 1.0)),
                                max_new_tokens=int(ctx.option("max_new_tokens", 48))),
        seed=ctx.seed + 100, batch_size=int(ctx.option("batch_size", 32)), pairs=ctx.option("pairs"),
        output_dir=ctx.output_dir, prompts_source=str(ctx.option("prompts")),
        n_boot=int(ctx.option("n_boot", 1000)))
    from .eval.runner import format_table

    print(format_table(report))
    return {"policies": report.get("policies", {}), "rm": report.get("rm", {})}


@stage("report")
def report_stage(ctx: StageContext) -> dict[str, Any]:
    """The HTML report of the run folder (or of ``run_dir``): report.html at the run's root."""
    from .report import build_report

    run_dir = Path(ctx.option("run_dir", ctx.run_dir))
    path = build_report(run_dir, output=ctx.option("output"))
    return {"report": str(path)}


SUMMARY_POLICY_KEYS = ("judge_score", "win_rate_vs_sft", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate",
                       "harmful_refusal_rate", "benign_over_refusal_rate", "hallucination_rate", "kl_to_sft",
                       "reward_mean", "mean_length")


@stage("summary")
def summary_stage(ctx: StageContext) -> dict[str, Any]:
    """The run's machine-readable summary.json (stable keys) from an eval folder and the stages' summaries.

    Per policy: the evaluation's numbers (``kl`` is renamed ``kl_to_<baseline>``, ``judge_score`` is the
    absolute gold score); ``rm.gold_accuracy`` (the reward model on gold-labelled held-out pairs);
    ``annotators`` (their agreement); ``stage_seconds`` and ``wall_seconds`` (their sum).
    """
    ctx.require("eval")
    eval_file = Path(ctx.option("eval")) / "eval.json"
    if not eval_file.exists():
        raise ConfigError(f"stage '{ctx.name}': {eval_file} not found (run the eval stage first)")
    report = json.loads(eval_file.read_text(encoding="utf-8"))
    baseline = report.get("baseline", "sft")
    summary: dict[str, Any] = {"seed": ctx.seed, "judge": report.get("judge"), "baseline": baseline,
                               "num_prompts": report.get("num_prompts"), "num_samples": report.get("num_samples")}
    for name, metrics in report.get("policies", {}).items():
        row = dict(metrics)
        if "kl" in row:
            row[f"kl_to_{baseline}"] = row.pop("kl")
        summary[name] = row
    rm = dict(report.get("rm") or {})
    if "accuracy" in rm:  # the eval's pairs are gold-labelled held-out pairs in the demo
        rm["gold_accuracy"] = rm["accuracy"]
    summary["rm"] = rm
    for result in ctx.results.values():
        if isinstance(result, dict) and "krippendorff_alpha" in result:
            summary["annotators"] = {k: result.get(k) for k in ("krippendorff_alpha", "percent_agreement",
                                                                 "prompts_labelled", "pairs", "gold_pairs")}
    stage_seconds = {n: r.get("wall_seconds") for n, r in ctx.results.items() if isinstance(r, dict)}
    summary["stage_seconds"] = stage_seconds
    # the stages' own wall times: the same whether the run went in one go or resumed over several
    summary["wall_seconds"] = sum(float(v) for v in stage_seconds.values() if isinstance(v, int | float))
    (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return {"summary": str(ctx.run_dir / "summary.json")}


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing table: one row per policy, the reward model and the wall time."""
    cols = (("gold", "judge_score"), ("win vs sft", "win_rate_vs_sft"), ("CI low", "win_rate_ci_low"),
            ("LC win", "lc_win_rate"), ("harm. refusal", "harmful_refusal_rate"),
            ("over-refusal", "benign_over_refusal_rate"), ("halluc.", "hallucination_rate"),
            ("KL to sft", "kl_to_sft"), ("length", "mean_length"))
    lines = [f"{'policy':<8}" + "".join(f"{c:>14}" for c, _ in cols)]
    for name in ("base", "sft", "ppo", "dpo"):
        row = summary.get(name)
        if not isinstance(row, dict):
            continue
        cells = []
        for _, key in cols:
            v = row.get(key)
            cells.append(f"{v:>14.3f}" if isinstance(v, int | float) else f"{'-':>14}")
        lines.append(f"{name:<8}" + "".join(cells))
    rm = summary.get("rm", {})
    if "gold_accuracy" in rm:
        lines.append(f"reward model accuracy on gold-labelled held-out pairs: {rm['gold_accuracy']:.3f}")
    if summary.get("annotators"):
        a = summary["annotators"]
        lines.append(f"annotators: Krippendorff's alpha {a.get('krippendorff_alpha', float('nan')):.2f}, "
                     f"percent agreement {a.get('percent_agreement', float('nan')):.2f}")
    if summary.get("wall_seconds") is not None:
        lines.append(f"wall time: {summary['wall_seconds']:.0f}s")
    return "\n".join(lines)
