"""Figures of tool episodes (RL with ``--tools``): turns and tool calls per episode, and the tool calls' errors by
kind, over training steps. A run whose metrics.jsonl has none of these keys gets none of these figures.

The keys are those :class:`rlhfkit.trainers.rl.tool_rollouts.ToolRollouts` logs per step: ``turns_mean`` and
``tool_calls_mean`` (per episode), ``tools/calls``, ``tools/errors`` and ``tools/errors/<kind>`` (counts over
the step's episodes). ``tools/seconds`` is left to the "other metrics" grid.
"""

from __future__ import annotations

from plotly.subplots import make_subplots

from .figures import COLORS, Plot, _figure, _line, _style
from .runs import Run

PER_EPISODE = (("turns_mean", "turns"), ("tool_calls_mean", "tool calls"))
CALLS, ERRORS, ERROR_PREFIX = "tools/calls", "tools/errors", "tools/errors/"
ERROR_KINDS = ("malformed", "exception", "timeout", "truncated")  # rlhfkit.rollout.tools's kinds, in its order
CALLS_COLOR = "#868e96"


def _with_eval(run: Run, name: str) -> list[str]:
    """The training key and its evaluation key (``eval_`` prefix), those the run logged."""
    return [k for k in (name, f"eval_{name}") if k in run.series]


def episode_turns(run: Run) -> tuple[Plot | None, set[str]]:
    """Turns and tool calls per episode over steps (evaluation series dashed), and the keys it shows."""
    fig, used = _figure(), set()
    for index, (name, label) in enumerate(PER_EPISODE):
        for key in _with_eval(run, name):
            used.add(key)
            trace = _line(run.series[key], key, COLORS[index], dashed=key.startswith("eval_"))
            trace.name = f"{label} ({key})"
            fig.add_trace(trace)
    if not fig.data:
        return None, used
    _style(fig, "Turns and tool calls per episode", "step", "per episode", unified=True)
    fig.update_yaxes(rangemode="tozero")
    return Plot(fig), used


def error_kinds(run: Run) -> list[str]:
    """The run's ``tools/errors/<kind>`` keys: the known kinds in their order, then any others."""
    logged = [k.removeprefix(ERROR_PREFIX) for k in run.series if k.startswith(ERROR_PREFIX)]
    return [k for k in ERROR_KINDS if k in logged] + sorted(k for k in logged if k not in ERROR_KINDS)


def tool_errors(run: Run) -> tuple[Plot | None, set[str]]:
    """Tool-call errors per step, one line per kind (the total ``tools/errors`` only when no kind is logged),
    with the step's tool calls in grey on a right-hand axis for scale; and the keys it shows."""
    kinds = error_kinds(run)
    keys = [f"{ERROR_PREFIX}{k}" for k in kinds] or ([ERRORS] if ERRORS in run.series else [])
    if not keys and CALLS not in run.series:
        return None, set()
    fig = make_subplots(specs=[[{"secondary_y": True}]], figure=_figure())
    for index, key in enumerate(keys):
        trace = _line(run.series[key], key.removeprefix(ERROR_PREFIX) if kinds else "errors (all kinds)",
                      COLORS[(index + 2) % len(COLORS)], dashed=False)
        trace.meta = key  # the metric's key, for whoever reads the figure back
        fig.add_trace(trace, secondary_y=False)
    if CALLS in run.series:
        calls = _line(run.series[CALLS], "tool calls (right axis)", CALLS_COLOR, dashed=False)
        calls.line.dash, calls.meta = "dot", CALLS
        fig.add_trace(calls, secondary_y=True)
    _style(fig, "Tool-call errors by kind", "step", unified=True)
    fig.update_yaxes(title_text="errors per step", rangemode="nonnegative", secondary_y=False)
    fig.update_yaxes(title_text="calls per step", rangemode="nonnegative", showgrid=False, secondary_y=True)
    used = {k for k in run.series if k == ERRORS or k.startswith(ERROR_PREFIX)} | ({CALLS} & set(run.series))
    return Plot(fig), used


def episode_panels(run: Run) -> list[tuple[Plot, set[str]]]:
    """The tool-episode figures the run's log allows, each with the metric keys it shows (for
    :func:`rlhfkit.report.figures.run_panels`, which leaves those out of its "other metrics" grid)."""
    panels = []
    for build in (episode_turns, tool_errors):
        plot, used = build(run)
        if plot is not None:
            panels.append((plot, used))
    return panels
