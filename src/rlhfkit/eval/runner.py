"""Evaluate policies against a baseline: judge win rates with intervals, length control, KL, reward, RM accuracy.

For every policy (one at a time, so only one policy is in memory; :mod:`rlhfkit.eval.policy_run`):
  1. tokenise the prompts with the policy's own tokenizer (``rlhfkit.data.prepare_prompts``, as the RL
     trainers do: chat-message prompts are rendered with the chat template, strings are used as they are);
  2. sample ``num_samples`` responses per prompt (``HFGenerationBackend``, a ``torch.Generator`` seeded
     with ``seed`` for every policy, so two copies of one model sample identical responses);
  3. score them with the judge (a scoring judge: any reward source) and, when given, a reward model;
     collect the judge's optional per-response flags (``describe``);
  4. with a reference model, estimate KL(π || π_ref) per response (see :func:`reference_logprob_sums`).
Then every policy is compared with the baseline prompt by prompt (:mod:`rlhfkit.eval.compare`): from the
scoring judge's scores, or, with a pairwise judge (``lm:``, ``openai:``, ``pairfn:``), from its verdicts on
each policy sample against the baseline's sample of the same prompt and index, asked in both orders.

Judge flags. A judge may have ``describe(prompts, responses) -> list[dict[str, bool | None]]``, one dict
per response (None = not applicable); ``<flag>_rate`` is the mean over the responses where the flag is not
None. For a ``fn:file.py:function`` judge, ``describe`` is the function's own ``describe`` attribute or
else a top-level function named ``describe`` in the same file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.run_folder import check_report_outputs
from ..errors import ConfigError
from ..judges.base import PairwiseJudge
from ..judges.spec import (
    JUDGE_KINDS,
    add_judge_flags,
    build_judge,
    is_pairwise_spec,
    judge_from_flags,
    load_judge,
    pairwise_hint,
)
from ..models.loading import check_model_path
from ..rollout.generate import SamplingConfig
from ..rollout.rewards import ModelReward, RewardSource, check_reward_columns
from ..rollout.tool_prompts import ToolSettings, start_tool_worker
from .cli_options import OneLineParser, policies_of
from .compare import (
    JudgedPairs,
    by_category,
    format_verifiable_tables,
    judge_against_baseline,
    parse_pass_k,
    policy_metrics,
    verifiable_metrics,
    write_outputs,
)
from .policy_run import (
    _clean_rows,
    _device,
    _PolicyRun,
    _run_policy,
    reference_logprob_sums,
)
from .stats import pairwise_outcomes, win_rate

__all__ = ["evaluate_policies", "format_table", "main", "reference_logprob_sums", "reward_model_accuracy"]


# --------------------------------------------------------------------------------------------- RM accuracy


def reward_model_accuracy(reward_model: ModelReward, pairs: str | Any | Sequence[Mapping[str, Any]],
                          n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                          max_length: int | None = None) -> dict[str, Any]:
    """Share of preference pairs where r(chosen) > r(rejected) (ties count ½), with a bootstrap interval.

    ``pairs`` is a preference file / dataset name, a ``datasets.Dataset`` or a list of rows (prompt/chosen/rejected, chosen/rejected
    or ranked prompt/responses), tokenised with the reward model's own tokenizer
    (``rlhfkit.data.prepare_preferences``; a ranked row gives every ordered pair). A row's outcome is the
    mean over its pairs; the bootstrap resamples rows.
    """
    import datasets

    from ..data import dataset_source, load_rows
    from .rm_report import score_preferences

    if isinstance(pairs, str):
        source, ds = pairs, load_rows(pairs)
    elif isinstance(pairs, datasets.Dataset):
        source, ds = dataset_source(pairs, "pairs"), pairs
    else:
        source, ds = "pairs", datasets.Dataset.from_list([dict(r) for r in pairs])
    scored = score_preferences(reward_model, ds, source, max_length)
    pair_outcomes = pairwise_outcomes(scored["chosen"], scored["rejected"])
    owners, num_rows = scored["row"], scored["num_rows"]
    per_row = np.asarray([pair_outcomes[owners == g].mean() for g in range(num_rows)])
    acc = win_rate(per_row, n_boot, confidence, seed)
    return {"reward_model": reward_model.name, "pairs": source, "num_rows": num_rows, "num_pairs": len(owners),
            "skipped_rows": scored["skipped"], "accuracy": acc.rate, "ci_low": acc.ci_low,
            "ci_high": acc.ci_high, "margin_mean": float((scored["chosen"] - scored["rejected"]).mean())}


# --------------------------------------------------------------------------------------------- driver


def evaluate_policies(
    policies: Mapping[str, str],
    baseline: str,
    prompts: Sequence[Mapping[str, Any]],
    judge: RewardSource | PairwiseJudge | str,
    reference: str | None = None,
    reward_model: str | None = None,
    num_samples: int = 1,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 8,
    *,
    pairs: str | Sequence[Mapping[str, Any]] | None = None,
    output_dir: str | Path | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
    max_prompt_length: int = 256,
    device: torch.device | str | None = None,
    prompts_source: str = "prompts",
    prompt_format: str = "auto",
    decode: Mapping[str, bool] | None = None,
    tools: ToolSettings | None = None,
    verifier: RewardSource | str | None = None,
    pass_k: Sequence[int] | None = None,
    pass_threshold: float = 0.5,
) -> dict[str, Any]:
    """Sample from every policy, judge, compare with ``baseline``; returns (and writes) the eval report.

    ``policies`` maps names to model paths (or hub ids); ``judge`` is a reward source, a
    :class:`PairwiseJudge` or a spec (either kind, :mod:`rlhfkit.judges.spec`). A pairwise judge compares each
    sample with the baseline's sample of the same prompt and index in both orders: the outcome of a prompt is
    the mean P(policy better); ``judge_score`` and flags are None (nothing scores one response) and each
    policy gets ``judge_pairs`` / ``judge_failures`` (pairs without a readable verdict, left out). Per policy the report has: ``judge_score`` (+ CI), ``win_rate_vs_<baseline>``
    with ``win_rate_ci_low/high`` and wins/ties/losses (per-prompt outcomes from all sample pairs, see
    ``stats.pairwise_outcomes``; the baseline gets 0.5), ``lc_win_rate`` (+ CI; Δ length in characters,
    which does not depend on the tokenizer), ``reward_mean`` (reward model), ``kl``, ``mean_length``
    (tokens, EOS included), ``mean_length_chars``, ``no_eos_rate`` and ``<flag>_rate``: numbers only
    (None where not measured). All intervals are percentile bootstraps over prompts with ``seed``.
    Top-level keys besides: ``paths`` (name -> model), ``by_category`` (policy -> category -> n, judge
    score, win rate; when rows have a ``category``) and ``rm`` (with ``pairs``).

    KL. For each response y ~ π(·|x): Σ_t log π(y_t) − log π_ref(y_t) (the k1 estimate; its mean over
    responses is unbiased for KL(π || π_ref) and single values may be negative). log π comes from the
    sampler (no second policy forward); log π_ref from one reference forward per batch. Both use the
    sampling temperature, so at temperature 1 this is the KL between the policies themselves and at
    T ≠ 1 between their tempered distributions; with top-k / top-p the samples come from the truncated
    distribution while the log-probs do not, which biases the estimate (use temperature 1, no top-k/p,
    for a KL you report). The reference must share the policies' tokenizer.

    With ``output_dir``: ``eval.json`` (this dict) and ``samples.jsonl`` (one row per response).
    ``decode``: the decoding backend's switches (``fast_decode``, ``compile_decode``; as the RL trainers').

    ``tools``: the policies may call tools mid-response (multi-turn episodes, as in RL with ``--tools``):
    prompts are rendered with the tools offered, samples show every turn, the judge sees the whole
    episode, the KL counts the policy's own tokens only, and each policy gets ``turns_mean``,
    ``tool_calls_mean``, ``tool_call_errors`` and ``tool_seconds``.

    ``verifier`` + ``pass_k``: a scoring judge (or spec) scores every sample too; per policy ``verifiable``
    holds pass@k, maj@k and best@k for each k (correct = score >= ``pass_threshold``;
    :func:`rlhfkit.eval.compare.verifiable_metrics`), and samples.jsonl each sample's ``verified`` score and
    ``correct`` flag. Needs ``num_samples`` >= max(pass_k).
    """
    from ..models import load_causal_lm, load_tokenizer

    policies = {str(k): str(v) for k, v in policies.items()}
    if not policies:
        raise ConfigError("give at least one policy (--policy NAME=PATH)")
    if baseline not in policies:
        raise ConfigError(f"--baseline '{baseline}' is not one of the policies: {', '.join(policies)}")
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("--num-samples and --batch-size must be >= 1")
    if int(n_boot) < 1 or not 0 < confidence < 1:
        raise ConfigError("--n-boot must be >= 1 and --confidence in (0, 1)")
    if max_prompt_length < 1:
        raise ConfigError("--max-prompt-length must be >= 1")
    sampling = sampling or SamplingConfig(temperature=1.0)
    sampling.check()
    ks = parse_pass_k(list(pass_k) if pass_k else None, num_samples, verifier)
    if pairs is not None and not reward_model:
        raise ConfigError("--pairs needs --reward-model (the model whose accuracy is measured)")
    rows = _clean_rows(prompts, prompts_source)
    if tools is not None:  # a bad --tools fails now; the tools' worker forks before any model is loaded
        start_tool_worker(tools.spec)
    if output_dir is not None:  # before any sampling: never over the prompts file or another command's files
        check_report_outputs(output_dir, "eval.json", ["samples.jsonl"],
                             [p for p in (prompts, prompts_source) if isinstance(p, str)])
    if isinstance(pairs, str):  # a missing file should fail now, not after all the sampling
        from ..data import load_rows

        pairs = load_rows(pairs)
    device = _device(device)
    base_tokenizer = load_tokenizer(policies[baseline])
    judge_name = judge if isinstance(judge, str) else getattr(judge, "name", type(judge).__name__)
    if isinstance(judge, str):
        judge = build_judge(judge, device=str(device)) if is_pairwise_spec(judge) else \
            load_judge(judge, base_tokenizer, device)
    pairwise = isinstance(judge, PairwiseJudge)
    columns = list(dict.fromkeys(k for row in rows for k in row if not k.startswith("__")))
    if isinstance(verifier, str):
        verifier = load_judge(verifier, base_tokenizer, device)
    # an fn: judge's (and verifier's) columns, before sampling
    try:
        check_reward_columns([j for j in (None if pairwise else judge, verifier) if j is not None], columns,
                             f"--prompts {prompts_source}")
    except ConfigError as exc:
        hint = pairwise_hint(judge_name, getattr(judge, "fn", None))
        if not hint:
            raise
        raise ConfigError(f"{exc}{hint}") from None
    rm = ModelReward(reward_model, base_tokenizer, device=device, batch_size=batch_size) if reward_model else None
    ref_model = None
    if reference:
        ref_model = load_causal_lm(reference).to(device)
        ref_model.eval().requires_grad_(False)

    order = [baseline] + [name for name in policies if name != baseline]  # the baseline first: others need it
    runs: dict[str, _PolicyRun] = {}
    for name in order:
        runs[name] = _run_policy(name, policies[name], rows, None if pairwise else judge, rm, ref_model,
                                 reference, num_samples,
                                 sampling, seed, batch_size, max_prompt_length, device, prompts_source,
                                 prompt_format=prompt_format, decode=decode, tools=tools, verifier=verifier)
    judged: dict[str, JudgedPairs] = {}
    if pairwise:  # the baseline is the other side of every pair: its outcomes are 1/2 by definition
        judged = {name: judge_against_baseline(judge, rows, runs[name], runs[baseline], num_samples)
                  for name in policies if name != baseline}
    categories = [r.get("category") for r in rows] if any("category" in r for r in rows) else None
    report: dict[str, Any] = {
        "judge": judge_name, "judge_type": "pairwise" if pairwise else "scoring", "baseline": baseline, "num_prompts": len(rows), "num_samples": num_samples,
        "sampling": dataclasses.asdict(sampling), "seed": seed, "n_boot": int(n_boot), "confidence": confidence,
        "reference": reference, "reward_model": reward_model, "paths": dict(policies),
        "policies": {name: policy_metrics(runs[name], runs[baseline], baseline, n_boot, confidence, seed,
                                          judged.get(name)) for name in policies},
    }
    if categories is not None:
        report["by_category"] = {name: by_category(runs[name], runs[baseline], categories, judged.get(name))
                                 for name in policies}
    if ks:
        report.update(verifier=getattr(verifier, "name", str(verifier)), pass_threshold=float(pass_threshold),
                      verifiable={name: verifiable_metrics(runs[name], ks, float(pass_threshold), n_boot, confidence,
                                                           seed) for name in policies})
    if pairs is not None and rm is not None:
        report["rm"] = reward_model_accuracy(rm, pairs, n_boot, confidence, seed)
    if output_dir is not None:
        write_outputs(Path(output_dir), report, rows, runs, list(policies), num_samples, judged)
    return report


# --------------------------------------------------------------------------------------------- CLI


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a plain-text table: one row per policy."""
    baseline = report["baseline"]
    policies = report["policies"]
    rate_names = list(dict.fromkeys(key for m in policies.values() for key in m if key.endswith("_rate")
                                    and key not in ("lc_win_rate", "no_eos_rate")))
    header = ["policy", "judge", f"win vs {baseline} [CI]", "LC win [CI]", "reward", "KL", "length",
              "no EOS"] + rate_names
    lines = [header]
    for name, m in policies.items():
        lines.append([
            name, _fmt(m["judge_score"]),
            f"{_fmt(m[f'win_rate_vs_{baseline}'])} [{_fmt(m['win_rate_ci_low'])}, {_fmt(m['win_rate_ci_high'])}]",
            f"{_fmt(m['lc_win_rate'])} [{_fmt(m['lc_win_rate_ci_low'])}, {_fmt(m['lc_win_rate_ci_high'])}]",
            _fmt(m["reward_mean"]), _fmt(m["kl"]), _fmt(m["mean_length"], 1), _fmt(m["no_eos_rate"]),
        ] + [_fmt(m.get(r)) for r in rate_names])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    footer = (f"{report['num_prompts']} prompts x {report['num_samples']} samples; judge {report['judge']}; "
              f"{100 * report['confidence']:.0f}% bootstrap intervals over prompts")
    if report.get("judge_type") == "pairwise":
        pairs = sum(m.get("judge_pairs") or 0 for m in policies.values())
        failed = sum(m.get("judge_failures") or 0 for m in policies.values())
        footer += (f"\njudge column empty: a pairwise judge scores no single response; it compared each sample with "
                   f"the baseline's (same prompt and sample, both orders): {pairs - failed} of {pairs} verdicts read")
    if "rm" in report:
        rm = report["rm"]
        footer += (f"\nRM accuracy {_fmt(rm['accuracy'])} [{_fmt(rm['ci_low'])}, {_fmt(rm['ci_high'])}] on "
                   f"{rm['num_pairs']} pairs ({rm['reward_model']})")
    verifiable = format_verifiable_tables(dict(report))
    return "\n".join(text) + "\n" + footer + (f"\n\npass@k by the verifier\n{verifiable}" if verifiable else "")


def build_parser() -> argparse.ArgumentParser:
    """``rlhfkit eval``'s flags; the pipeline's eval stage takes the same options, with the same defaults."""
    p = OneLineParser(
        prog="rlhfkit eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Sample from policies and compare them with a baseline under a judge: win rate and "
                    "length-controlled win rate with bootstrap intervals, reward, KL to a reference, length.")
    p.add_argument("--policy", action="append", required=True,
                   help="NAME=PATH (repeatable, or a comma-separated list); a bare PATH is named after its folder")
    p.add_argument("--baseline", help="name of the policy the others are compared with (None: the first policy)")
    p.add_argument("--prompts", required=True, help="prompt file (.jsonl/.json/.parquet/.csv) or dataset; "
                   "a 'category' column gives per-category results")
    p.add_argument("--judge", required=True, help=f"judge spec: {JUDGE_KINDS}")
    p.add_argument("--reference", help="reference model for the KL (same tokenizer as the policies)")
    p.add_argument("--reward-model", help="reward model: mean reward per policy (and accuracy with --pairs)")
    p.add_argument("--pairs", help="preference file for the reward model's accuracy (needs --reward-model)")
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt and policy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-prompt-length", type=int, default=256, help="longest prompt in tokens (keeps its end)")
    p.add_argument("--split", default=None, help="split of a dataset folder or hub dataset, by its own name "
                   "(None: the only split, else the only test/validation/eval one)")
    p.add_argument("--prompts-config", default=None, help="configuration (subset) of a hub dataset or data "
                   "folder that has several, e.g. main for openai/gsm8k")
    p.add_argument("--columns", default=None, help="rename prompt-set columns, NEW=OLD comma-separated "
                   "(prompt=question)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "raw"],
                   help="string prompts: chat = one user turn in the policy's chat template; raw = text; "
                   "auto = chat when the tokenizer has its own chat template")
    p.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="decode Llama/Mistral/Qwen2 policies with rlhfkit's lean step (same tokens and log-probs)")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=False,
                   help="CPU: run that decode step ahead-of-time compiled (needs a C++ compiler; built once, cached; "
                   "off by default here, unlike the trainers: a one-off evaluation rarely repays the build)")
    p.add_argument("--tools", default=None, help="tools the policies may call mid-response, 'file.py:fn1,fn2' "
                   "(typed, documented functions): multi-turn episodes, as rlhfkit's RL trainers run them")
    p.add_argument("--max-turns", type=int, default=3, help="--tools: most tool calls per response")
    p.add_argument("--tool-timeout", type=float, default=10.0, help="--tools: seconds a call may run")
    p.add_argument("--tool-max-chars", type=int, default=2000, help="--tools: longest tool answer in characters")
    p.add_argument("--pass-k", default=None, help="verifiable tasks: pass@k, maj@k and best@k for these k "
                   "(comma list, e.g. 1,4; each <= --num-samples), with --verifier")
    p.add_argument("--verifier", default=None, help="scoring judge spec deciding correctness (fn:FILE.py:FN "
                   "returning 1/0 or a score, gold:WORLD, ...)")
    p.add_argument("--pass-threshold", type=float, default=0.5, help="a sample is correct when verifier score >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--output-dir", help="write eval.json and samples.jsonl here")
    add_judge_flags(p, "judge-")  # lm: / openai: judges' template, endpoint, retries (as rlhfkit judge's)
    return p


def option_defaults() -> dict[str, Any]:
    """Every ``rlhfkit eval`` option's default, by its name with underscores."""
    return {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}


def evaluate_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The report for a mapping of ``rlhfkit eval`` options (underscored names; the flags' defaults fill in
    the rest; ``policies`` may be a {name: path} mapping instead of ``policy``): the CLI and the pipeline's
    eval stage both run this."""
    from ..data import PROMPT_FORMATS, detect_format, load_rows

    o = argparse.Namespace(**{"policies": None, **option_defaults(), **options})

    policies = policies_of(o.policies, o.policy)
    for name in ("prompts", "judge"):
        if not o.__dict__.get(name):
            raise ConfigError(f"--{name} is required")
    baseline = o.baseline or next(iter(policies))
    if baseline not in policies:
        raise ConfigError(f"--baseline '{baseline}' is not one of the policies: {', '.join(policies)}")
    if o.max_prompts is not None and o.max_prompts < 1:
        raise ConfigError("--max-prompts must be >= 1")
    for flag, path in (("--reference", o.reference), ("--reward-model", o.reward_model),
                       *(("--policy", p) for p in policies.values())):
        if path:
            check_model_path(str(path), flag)  # not a hub error, and before any sampling
    sampling = SamplingConfig(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                              max_new_tokens=o.max_new_tokens)
    sampling.check()
    ds = load_rows(o.prompts, split=o.split, columns=o.columns, purpose="eval", split_flag="--split",
                   config=o.prompts_config, config_flag="--prompts-config")
    detect_format(ds.column_names, allowed=PROMPT_FORMATS, source=o.prompts)
    if o.max_prompts is not None:
        ds = ds.select(range(min(o.max_prompts, len(ds))))
    judge = judge_from_flags(o.judge, vars(o), "judge-", device=str(_device(None))) \
        if is_pairwise_spec(o.judge) else o.judge
    report = evaluate_policies(policies, baseline, ds.to_list(), judge, reference=o.reference,
                               reward_model=o.reward_model, num_samples=o.num_samples, sampling=sampling,
                               seed=o.seed, batch_size=o.batch_size, pairs=o.pairs, output_dir=o.output_dir,
                               n_boot=o.n_boot, confidence=o.confidence, max_prompt_length=o.max_prompt_length,
                               prompts_source=o.prompts, prompt_format=o.prompt_format,
                               decode={"fast_decode": o.fast_decode, "compile_decode": o.compile_decode},
                               tools=ToolSettings(str(o.tools), int(o.max_turns), float(o.tool_timeout),
                                                  int(o.tool_max_chars)) if o.tools else None,
                               verifier=o.verifier, pass_k=parse_pass_k(o.pass_k, o.num_samples, o.verifier),
                               pass_threshold=o.pass_threshold)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit eval``: parse flags, run :func:`evaluate_from_options`, print the table."""
    a = build_parser().parse_args(list(argv) if argv is not None else None)
    print(format_table(evaluate_from_options(vars(a))))
    return 0
