"""The report's tool-episode figures (issue 24): a run whose metrics.jsonl has the tool metrics RL with --tools
logs gets turns and tool calls per episode, and tool-call errors by kind, over steps, with exactly the logged
numbers; a run without them gets nothing new."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhfkit.report import build_report

STEPS = [1, 2, 3, 4, 5]
TURNS = [1.0, 1.25, 1.5, 2.0, 1.75]
CALLS_PER_EPISODE = [0.0, 0.25, 0.5, 1.0, 0.75]
CALLS = [0, 2, 4, 8, 6]
ERRORS = {"malformed": [0, 1, 1, 0, 0], "exception": [0, 0, 1, 0, 0], "timeout": [0, 0, 0, 1, 0],
          "truncated": [0, 0, 0, 0, 2]}
TURNS_TITLE, ERRORS_TITLE = "Turns and tool calls per episode", "Tool-call errors by kind"


def _write_run(path: Path, tools: bool) -> None:
    """metrics.jsonl as the RL trainer writes it (with --tools: the tool metrics per step), an evaluation row
    without them, and summary.json."""
    rows = []
    for i, step in enumerate(STEPS):
        row = {"step": step, "reward_mean": 0.1 * step, "reward_std": 0.2, "kl": 0.01 * step, "beta": 0.05,
               "loss": 1.0 / step, "response_length": 40.0 + step}
        if tools:
            row.update({"turns_mean": TURNS[i], "tool_calls_mean": CALLS_PER_EPISODE[i], "tools/calls": CALLS[i],
                        "tools/errors": sum(e[i] for e in ERRORS.values()),
                        **{f"tools/errors/{kind}": e[i] for kind, e in ERRORS.items()}, "tools/seconds": 0.1 * i})
        rows.append(row)
    rows.append({"step": 5, "eval_reward_mean": 0.4, "eval_kl": 0.05})
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"algorithm": "grpo", "steps": 5}))


def _plots(html: str) -> dict[str, list[tuple[str, list[dict], dict]]]:
    """Each run section's plots (section id -> [(title, traces, layout)]) as the page hands them to
    Plotly.newPlot."""
    decoder = json.JSONDecoder()
    sections: dict[str, list[tuple[str, list[dict], dict]]] = {}
    for section in re.finditer(r'<section id="(run-[^"]+)">(.*?)</section>', html, flags=re.S):
        body, plots = section.group(2), []
        for call in re.finditer(r'Plotly\.newPlot\(\s*"plot-\d+",\s*', body):
            traces, end = decoder.raw_decode(body, call.end())
            layout, _ = decoder.raw_decode(body, re.compile(r"\s*,\s*").match(body, end).end())
            plots.append((layout.get("title", {}).get("text", ""), traces, layout))
        sections[section.group(1)] = plots
    return sections


@pytest.fixture
def report(tmp_path):
    _write_run(tmp_path / "with_tools", tools=True)
    _write_run(tmp_path / "plain", tools=False)
    return build_report(tmp_path)


def test_tool_runs_plot_turns_calls_and_errors_by_kind_over_steps(report):
    plots = _plots(report.read_text(encoding="utf-8"))
    assert set(plots) == {"run-with-tools", "run-plain"}
    titles = [title for title, _, _ in plots["run-with-tools"]]
    assert titles.count(TURNS_TITLE) == 1 and titles.count(ERRORS_TITLE) == 1
    by_title = {title: (traces, layout) for title, traces, layout in plots["run-with-tools"]}

    traces, layout = by_title[TURNS_TITLE]
    assert [t["name"] for t in traces] == ["turns (turns_mean)", "tool calls (tool_calls_mean)"]
    assert [t["x"] for t in traces] == [STEPS, STEPS]
    assert [t["y"] for t in traces] == [TURNS, CALLS_PER_EPISODE]
    assert layout["yaxis"]["title"]["text"] == "per episode" and layout["xaxis"]["title"]["text"] == "step"

    traces, layout = by_title[ERRORS_TITLE]
    errors = {t["meta"]: t for t in traces if t["meta"].startswith("tools/errors/")}
    assert list(errors) == [f"tools/errors/{kind}" for kind in ERRORS]  # one line per kind, in rlhfkit's order
    for kind, values in ERRORS.items():
        trace = errors[f"tools/errors/{kind}"]
        assert (trace["name"], trace["x"], trace["y"], trace["yaxis"]) == (kind, STEPS, values, "y")
    (calls,) = [t for t in traces if t["meta"] == "tools/calls"]
    assert calls["x"] == STEPS and calls["y"] == CALLS and calls["yaxis"] == "y2"  # for scale, on the right
    assert layout["yaxis2"]["overlaying"] == "y" and layout["yaxis2"]["side"] == "right"
    assert layout["yaxis"]["title"]["text"] == "errors per step"

    # the figures' keys leave the "other metrics" grid; tools/seconds stays there
    (other,) = [layout for title, _, layout in plots["run-with-tools"] if title.startswith("Other metrics")]
    grid = [a["text"] for a in other["annotations"]]
    assert "tools/seconds" in grid
    assert not [k for k in grid if k in ("turns_mean", "tool_calls_mean") or k.startswith("tools/") and
                k != "tools/seconds"], grid


def test_a_run_without_tool_metrics_gets_no_tool_figures(report):
    plots = _plots(report.read_text(encoding="utf-8"))
    plain = [title for title, _, _ in plots["run-plain"]]
    assert plain and TURNS_TITLE not in plain and ERRORS_TITLE not in plain
    # the same panels as the tool run, less the two tool figures and its other-metrics grid (tools/seconds)
    with_tools = [title for title, _, _ in plots["run-with-tools"]]
    assert plain == [t for t in with_tools if t not in (TURNS_TITLE, ERRORS_TITLE) and not t.startswith("Other")]


def test_errors_total_only_and_calls_only_logs_still_plot(tmp_path):
    """A log with the errors' total but no kinds plots the total; one with calls only plots the calls."""
    from rlhfkit.report.episode_figures import episode_panels
    from rlhfkit.report.runs import Run

    total = Run("r", tmp_path, [{"step": s, "tools/calls": c, "tools/errors": c // 2} for s, c in zip(STEPS, CALLS)],
                {}, [])
    ((plot, keys),) = episode_panels(total)
    assert keys == {"tools/calls", "tools/errors"}
    assert [(t.name, list(t.y)) for t in plot.figure.data] == [("errors (all kinds)", [0, 1, 2, 4, 3]),
                                                                ("tool calls (right axis)", CALLS)]
    turns_only = Run("r", tmp_path, [{"step": s, "turns_mean": t} for s, t in zip(STEPS, TURNS)], {}, [])
    ((plot, keys),) = episode_panels(turns_only)
    assert keys == {"turns_mean"} and plot.figure.layout.title.text == TURNS_TITLE
    assert episode_panels(Run("r", tmp_path, [{"step": 1, "loss": 1.0}], {}, [])) == []


def test_tool_figures_render_in_chromium(report, tmp_path):
    """Both figures draw their lines in a headless browser (the right-hand calls axis included)."""
    from test_report import CHROMIUM, CHROMIUM_FLAGS, _strip_scripts

    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's chromium")
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=5000", "--window-size=1280,2400", "--dump-dom", report.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = _strip_scripts(proc.stdout)
    assert {TURNS_TITLE, ERRORS_TITLE} <= set(re.findall(r'class="gtitle"[^>]*>([^<]+)<', body))
    legend = set(re.findall(r'class="legendtext"[^>]*>([^<]+)<', body))
    assert {"turns (turns_mean)", "tool calls (tool_calls_mean)", *ERRORS, "tool calls (right axis)"} <= legend
    assert "calls per step" in body and "errors per step" in body
