"""Assemble the report: overview, evaluation, iterated rounds, reward hacking, run comparison, one section per
run, notes."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import RlhfkitError
from ..eval.judge_audit import audit_html
from . import episode_figures, figures
from .page import PlotWriter, Safe, Text, duration, esc, fmt, key_values, page, slug, table
from .rounds import rounds_section
from .runs import WALL_KEYS, Evaluation, ReportData, Run, flatten, is_number, load

logger = logging.getLogger("rlhfkit")

HEADLINE_KEYS = ("eval_reward_mean", "eval_heldout_reward", "eval_kl", "eval_loss", "eval_accuracy",
                 "eval_reward_accuracy", "eval_token_accuracy")
MAX_EVAL_PROMPTS = 30  # prompts shown in the sample generations of an evaluation
MAX_RUN_SAMPLES = 16  # rows of a run's samples.jsonl shown (its first and last logged steps)
POLICY_SAMPLE_KEYS = ("prompt", "category", "policy", "sample", "response", "score", "length")


def _headline(run: Run) -> str:
    """The final value of the run's main evaluation metrics (summary.json first, else the last row)."""
    parts = []
    for key in HEADLINE_KEYS:
        value = run.summary.get(key)
        if not is_number(value) and key in run.series:
            value = run.series[key].values[-1]
        if is_number(value):
            parts.append(f"{key.removeprefix('eval_')} {fmt(value)}")
    return ", ".join(parts[:3]) or "—"


def _overview(data: ReportData, anchors: dict[str, str]) -> str:
    rows = []
    for run in data.runs:
        link = Safe(f'<a href="#{anchors[run.name]}">{esc(run.name)}</a>')
        rows.append((link, run.task or "—", run.last_step, run.train_rows, run.eval_rows,
                     duration(run.wall_seconds), _headline(run)))
    parts = [f"<h2>Overview</h2><p class=\"lead\">{len(data.runs)} run(s), {len(data.evaluations)} "
             f"evaluation(s) found in <code>{esc(data.root)}</code>.</p>"]
    if rows:
        parts.append(table(("run", "task", "optimizer steps", "logged training steps", "evaluations",
                            "wall time", "final held-out metrics"), rows))
    if data.pipeline_summary:
        parts.append(_pipeline_summary(data.pipeline_summary))
    return f'<section id="overview">{"".join(parts)}</section>'


def _pipeline_summary(summary: dict[str, Any]) -> str:
    """Scalars as key/value; nested dicts as one table with a row per stage and a column per inner key."""
    scalars = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    nested = {k: flatten(v) for k, v in summary.items() if isinstance(v, dict)}
    # folded: its tables are long, and the plots of the sections below are what a reader comes for
    parts = [f"<details><summary>Pipeline summary ({len(nested)} stage(s), {len(scalars)} run-level "
             f"value(s))</summary>"]
    if scalars:
        shown = {k: (duration(v) + f" ({fmt(v)} s)" if k in WALL_KEYS and is_number(v) else v)
                 for k, v in scalars.items()}
        parts.append(key_values(shown))
    if nested:
        columns: list[str] = []
        for values in nested.values():
            columns += [k for k in values if k not in columns]
        if len(columns) <= 16:
            parts.append(table(("stage", *columns), ((stage, *(v.get(c) for c in columns))
                                                     for stage, v in nested.items())))
        else:  # too wide for one table: one small table per stage
            for stage, values in nested.items():
                parts.append(f"<h3>{esc(stage)}</h3>" + key_values(values))
    return "".join(parts) + "</details>"


def _policy_table(evaluation: Evaluation) -> str:
    policies = evaluation.policies
    if not policies:
        return ""
    columns: list[str] = []
    for metrics in policies.values():
        columns += [k for k in metrics if k not in columns]
    cis = {p: figures.confidence_intervals(m) for p, m in policies.items()}
    ci_columns = {k for c in cis.values() for k in c}
    ci_keys = {k for k in columns if k.endswith(("_ci_low", "_ci_high"))}
    columns = [c for c in columns if c not in ci_keys or not ci_columns]
    headers = [f"{c} [95% CI]" if c in ci_columns else c for c in columns]
    rows = []
    for policy, metrics in policies.items():
        row: list[Any] = [policy]
        for column in columns:
            value = metrics.get(column)
            if column in cis[policy] and is_number(value):
                low, high = cis[policy][column]
                row.append(Safe(f'<span class="ci"><span class="num">{esc(fmt(value))}</span> '
                                f'<span class="muted">[{esc(fmt(low))}, {esc(fmt(high))}]</span></span>'))
            else:
                row.append(value)
        rows.append(row)
    return "<h3>Policies</h3>" + table(("policy", *headers), rows)


def _eval_samples(evaluation: Evaluation) -> str:
    samples = [s for s in evaluation.samples if "response" in s]
    if not samples:
        return ""
    order = list(evaluation.policies)
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_prompt.setdefault(_prompt_text(sample.get("prompt", "")), []).append(sample)
    shown = list(by_prompt.items())[:MAX_EVAL_PROMPTS]
    extra: list[str] = []
    for sample in samples:
        extra += [k for k in sample if k not in POLICY_SAMPLE_KEYS and k not in extra]
    parts = [f"<h3>Sample generations</h3><p class=\"lead\">{len(shown)} of {len(by_prompt)} prompts, "
             f"{len(samples)} responses in <code>{esc(evaluation.path / 'samples.jsonl')}</code>.</p>"]
    for index, (prompt, rows) in enumerate(shown):
        rows = sorted(rows, key=lambda s: (order.index(s["policy"]) if s.get("policy") in order else len(order),
                                           str(s.get("policy")), s.get("sample") or 0))
        category = rows[0].get("category")
        tag = f'<span class="tag">{esc(category)}</span>' if category is not None else ""
        body = table(("policy", "sample", "response", "score", "length", *extra),
                     ((s.get("policy"), s.get("sample"), _text(s.get("response")), s.get("score"),
                       s.get("length"), *(s.get(k) for k in extra)) for s in rows))
        opened = " open" if index < 3 else ""
        parts.append(f'<details class="prompt"{opened}><summary>Prompt {index + 1}{tag}</summary>'
                     f"<pre>{esc(prompt)}</pre>{body}</details>")
    return "".join(parts)


def _prompt_text(prompt: Any) -> str:
    """A chat prompt (list of messages) as "role: content" lines; any other prompt as its text."""
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in prompt)
    return str(prompt)


def _text(value: Any) -> Any:
    """Responses are shown as text even when short (keeps spaces and line breaks)."""
    return Text(value) if isinstance(value, str) else value


def _evaluation(evaluation: Evaluation, plot: PlotWriter, anchor: str) -> str:
    meta = {k: v for k, v in evaluation.data.items() if not isinstance(v, dict | list)}
    parts = [f"<h2>Evaluation: {esc(evaluation.name)}</h2>",
             f"<p class=\"lead\"><code>{esc(evaluation.path / 'eval.json')}</code></p>"]
    if meta:
        parts.append(key_values(meta))
    bars = figures.eval_bars(evaluation)
    if bars is not None:
        baseline = evaluation.data.get("baseline")
        vs = f" (win rates against {esc(baseline)}, whiskers: 95% CI)" if baseline else ""
        parts.append(f"<h3>Policies side by side{vs}</h3>" + plot.grid([bars]))
    parts.append(_policy_table(evaluation))
    for key, value in evaluation.data.items():
        if key != "policies" and isinstance(value, dict):
            parts.append(f"<h3>{esc(key)}</h3>" + key_values(flatten(value)))
    parts.append(_eval_samples(evaluation))
    return f'<section id="{anchor}">{"".join(parts)}</section>'


def _hacking(data: ReportData, plot: PlotWriter) -> str:
    """Proxy and held-out reward against √KL, runs sharing a parent folder overlaid in one plot."""
    groups: dict[str, list[Run]] = {}
    for run in data.runs:
        if "eval_heldout_reward" in run.series:
            parent = run.name.rsplit("/", 1)[0] if "/" in run.name else ""
            groups.setdefault(parent, []).append(run)
    if not groups:
        return ""
    parts = ["<h2>Reward hacking: proxy and held-out reward against √KL</h2>",
             "<p class=\"lead\">Solid: the reward the policy was trained on (proxy); dashed: an independent "
             "judge's score of the same evaluation responses (held-out). A gap that opens as KL grows is reward "
             "hacking. ✕ marks where the detector fired, ★ the best step.</p>"]
    plots, verdicts = [], []
    for parent, runs in groups.items():
        title = f"Proxy and held-out reward against √KL: {parent or data.root.resolve().name}"
        plots.append(figures.hacking_figure(title, runs))
        for run in runs:
            verdict = run.hacking()
            if verdict:
                verdicts.append((run.name, *(verdict.get(k) for k in ("fired_step", "best_step")),
                                 fmt({k: v for k, v in verdict.items() if k not in ("fired_step", "best_step")})
                                 or "—"))
    parts.append(plot.grid(plots))
    if verdicts:
        parts.append(table(("run", "detector fired at step", "best step", "details"), verdicts))
    return f'<section id="hacking">{"".join(parts)}</section>'


def _comparison(data: ReportData, plot: PlotWriter) -> str:
    rl = [r for r in data.runs if r.is_rl]
    if len(rl) < 2:
        return ""
    plots = [figures.compare_runs(rl, "reward_mean", "Reward", "reward"),
             figures.compare_runs(rl, "kl", "KL to reference", "KL (nats)"),
             figures.compare_runs(rl, "heldout_reward", "Held-out reward", "reward"),
             figures.compare_runs(rl, "response_length", "Response length", "tokens")]
    grid = plot.grid(plots)
    if not grid:
        return ""
    return (f'<section id="compare"><h2>RL runs compared</h2><p class="lead">Evaluation series where a run logged '
            f"them, training series otherwise.</p>{grid}</section>")


def _run_samples(run: Run) -> str:
    samples = [s for s in run.samples if "response" in s]
    if not samples:
        return ""
    steps = [s.get("step") for s in samples if is_number(s.get("step"))]
    if steps:
        first, last = min(steps), max(steps)
        half = MAX_RUN_SAMPLES // 2
        chosen = [s for s in samples if s.get("step") == first][:half]
        if last != first:
            chosen += [s for s in samples if s.get("step") == last][:half]
    else:
        chosen = samples[:MAX_RUN_SAMPLES]
    columns = ["step", "prompt", "response", "reward"]
    for sample in chosen:
        columns += [k for k in sample if k not in columns]
    rows = [[_text(s.get(c)) if c == "response" else s.get(c) for c in columns] for s in chosen]
    return (f"<h3>Samples</h3><p class=\"lead\">{len(chosen)} of {len(samples)} logged generations (first and "
            f"last logged step) from <code>{esc(run.path / 'samples.jsonl')}</code>.</p>" + table(columns, rows))


def _run(run: Run, plot: PlotWriter, anchor: str) -> str:
    facts = [f"<code>{esc(run.path)}</code>"]
    if run.last_step is not None:
        facts.append(f"{fmt(run.last_step)} optimizer steps")
    facts.append(f"{run.train_rows} logged training steps, {run.eval_rows} evaluations")
    wall = run.wall_seconds
    if wall is not None:
        facts.append(f"wall time {duration(wall)}")
    task = f'<span class="tag">{esc(run.task)}</span>' if run.task else ""
    parts = [f"<h2>Run: {esc(run.name)}{task}</h2><p class=\"lead\">{' · '.join(facts)}</p>"]
    if not run.series:
        parts.append("<p class=\"muted\">metrics.jsonl holds no numeric metrics.</p>")
    plots = figures.run_panels(run, episode_figures.episode_panels(run))
    if run.is_rl:
        plots.insert(min(len(plots), 2), figures.reward_vs_kl(run))
    parts.append(plot.grid(plots))
    scalars = {k: v for k, v in flatten(run.summary).items() if not isinstance(v, list)}
    if scalars:
        parts.append(f"<details><summary>summary.json ({len(scalars)} values)</summary>"
                     f"{key_values(scalars)}</details>")
    parts.append(_run_samples(run))
    return f'<section id="{anchor}">{"".join(parts)}</section>'


def build_report(run_dir: str | Path, output: str | Path | None = None, summary_file: str = "summary.json") -> Path:
    """Write one self-contained HTML report (plotly.js inlined, works offline) of a training run, a pipeline
    folder or an evaluation folder; returns its path (default ``RUN_DIR/report.html``). ``summary_file``:
    the pipeline summary shown in the overview."""
    from plotly.offline import get_plotlyjs

    out = Path(output) if output is not None else Path(run_dir) / "report.html"
    _check_replaceable(out)
    data = load(run_dir, summary_file)
    taken: set[str] = {"overview", "hacking", "compare", "notes"}
    anchors = {run.name: slug(f"run-{run.name}", taken) for run in data.runs}
    eval_anchors = [slug(f"eval-{e.name}", taken) for e in data.evaluations]
    plot = PlotWriter()
    sections = [_overview(data, anchors)]
    nav = [("overview", "Overview")]
    for evaluation, anchor in zip(data.evaluations, eval_anchors):
        sections.append(_evaluation(evaluation, plot, anchor))
        nav.append((anchor, "Evaluation" if len(data.evaluations) == 1 else f"Evaluation {evaluation.name}"))
    for name, record in data.rounds:
        anchor = slug(f"rounds-{name}", taken)
        sections.append(rounds_section(name, record, plot, anchor))
        nav.append((anchor, "Rounds" if len(data.rounds) == 1 else f"Rounds {name}"))
    for name, audit in data.audits:
        anchor = slug(f"audit-{name}", taken)
        sections.append(f'<section id="{anchor}"><h2>Judge audit: {esc(name)}</h2>{audit_html(audit)}</section>')
        nav.append((anchor, "Judge audit" if len(data.audits) == 1 else f"Judge audit {name}"))
    hacking = _hacking(data, plot)
    if hacking:
        sections.append(hacking)
        nav.append(("hacking", "Reward hacking"))
    comparison = _comparison(data, plot)
    if comparison:
        sections.append(comparison)
        nav.append(("compare", "RL runs compared"))
    for run in data.runs:
        sections.append(_run(run, plot, anchors[run.name]))
        nav.append((anchors[run.name], run.name))
    if data.notes.messages:
        items = "".join(f"<li>{esc(m)}</li>" for m in data.notes.messages)
        sections.insert(1, f'<section id="notes" class="notes"><h2>Notes</h2><p class="lead">Problems met while '
                           f"reading; the report shows everything else.</p><ul>{items}</ul></section>")
        nav.insert(1, ("notes", f"Notes ({len(data.notes.messages)})"))
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    html = page(f"rlhfkit report: {data.root.resolve().name}", f"{data.root.resolve()} · generated {stamp} · "
                f"{plot.count} plots", nav, sections, get_plotlyjs())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise RlhfkitError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    return out


def _check_replaceable(out: Path) -> None:
    """Only an earlier report is written over: ``--output RUN/summary.json`` (a slip) must not replace the run's
    summary, nor any other file, with a page of HTML."""
    if out.is_dir():
        raise RlhfkitError(f"{out} is a folder; --output takes the HTML file to write (e.g. {out / 'report.html'})")
    if out.is_file():
        with open(out, "rb") as fh:
            if b"<title>rlhfkit report" not in fh.read(4096):
                raise RlhfkitError(f"{out} exists and is not an rlhfkit report; it is left as it is: choose "
                                   "another --output")


def main(argv: Sequence[str]) -> int:
    """``rlhfkit report RUN_DIR [--output FILE]``."""
    parser = argparse.ArgumentParser(
        prog="rlhfkit report",
        description="Write a self-contained HTML report (interactive plots, tables, samples; works offline) of a "
                    "training run folder, a pipeline folder or an evaluation folder.")
    parser.add_argument("run_dir", help="an --output-dir of sft/rm/dpo/ppo/grpo/rloo, or a pipeline folder")
    parser.add_argument("--output", "-o", help="where to write the HTML (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    out = build_report(args.run_dir, args.output)
    logger.info("report written to %s", out)
    print(out)
    return 0
