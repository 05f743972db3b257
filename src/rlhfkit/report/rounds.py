"""The report's section for a ``rounds`` stage (iterated RLHF, :mod:`rlhfkit.rounds`): its rounds.json as a
table (a row per round, a column per figure) and one line plot per figure over the rounds."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from .figures import COLORS, TEMPLATE, Plot
from .page import PlotWriter, esc, table
from .runs import is_number


def _figure(label: str, rounds: list[Any], values: list[Any], color: str) -> Plot | None:
    """One figure over the rounds (rounds without a number are left out, so a gap shows as one)."""
    points = [(r, v) for r, v in zip(rounds, values) if is_number(v)]
    if not points:
        return None
    fig = go.Figure(layout={"template": TEMPLATE})
    fig.add_trace(go.Scatter(x=[r for r, _ in points], y=[v for _, v in points], mode="lines+markers", name=label,
                             line={"color": color, "width": 2}, marker={"size": 7}, hovertemplate="%{y:.4g}"))
    fig.update_layout(title={"text": f"{label} by round", "x": 0.01, "xanchor": "left", "font": {"size": 15}},
                      margin={"l": 56, "r": 16, "t": 44, "b": 40}, autosize=True, showlegend=False,
                      font={"family": "system-ui, sans-serif", "size": 12})
    fig.update_xaxes(title_text="round", dtick=1)
    fig.update_yaxes(title_text=label)
    return Plot(fig, 300)


def rounds_section(name: str, data: dict[str, Any], plot: PlotWriter, anchor: str) -> str:
    """``rounds.json`` of the stage folder ``name``: what each round started from, its figures, their plots."""
    rows = [r for r in data.get("table") or [] if isinstance(r, dict)]
    labels = [str(k) for k in data.get("figures") or {}]
    per_round = {r.get("round"): r for r in data.get("per_round") or [] if isinstance(r, dict)}
    done, total = len(rows), data.get("rounds")
    lead = (f"{done} of {esc(total)} round(s) done; each round starts from the policy the round before it "
            f"trained (step <code>{esc(data.get('next_policy'))}</code>). Figures: "
            + (", ".join(f"{esc(k)} = <code>{esc(v)}</code>" for k, v in (data.get("figures") or {}).items())
               or "none") + ".")
    body = table(("round", *labels, "labels so far", "policy"),
                 ((r.get("round"), *(r.get(label) for label in labels),
                   per_round.get(r.get("round"), {}).get("labels_so_far"),
                   per_round.get(r.get("round"), {}).get("policy")) for r in rows))
    rounds = [r.get("round") for r in rows]
    plots = plot.grid(_figure(label, rounds, [r.get(label) for r in rows], COLORS[i % len(COLORS)])
                      for i, label in enumerate(labels))
    return (f'<section id="{anchor}"><h2>Rounds: {esc(name)}</h2><p class="lead">{lead}</p>{body}{plots}'
            "</section>")
