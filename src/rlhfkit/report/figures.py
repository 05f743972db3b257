"""Plotly figures of runs and evaluations. Each builder returns figures only for the data that exists."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .runs import Evaluation, Run, Series, is_number, sqrt_kl

COLORS = ("#4263eb", "#e8590c", "#2b8a3e", "#ae3ec9", "#f08c00", "#0c8599", "#c2255c", "#5c940d", "#495057",
          "#1971c2")
HACK_COLOR = "#e03131"
BEST_COLOR = "#f59f00"

# (panel title, y-axis title, metric names without the eval_ prefix): a panel shows the training and the
# evaluation series of each name that exists. Names no panel claims go to one "other metrics" grid.
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Reward", "reward", ("reward_mean", "score_mean", "reward_penalized", "heldout_reward", "reward")),
    ("KL to reference", "KL (nats)", ("kl",)),
    ("β (KL coefficient)", "β", ("beta",)),
    ("Entropy", "nats / token", ("entropy",)),
    ("Loss", "loss", ("loss", "policy_loss", "value_loss")),
    ("Response length", "tokens", ("response_length",)),
    ("Policy update", "", ("approx_kl", "clip_frac", "value_clip_frac")),
    ("Accuracy", "accuracy", ("accuracy", "reward_accuracy", "token_accuracy")),
    ("Implicit rewards and margin", "reward", ("reward_margin", "chosen_reward", "rejected_reward")),
    ("Log-probabilities", "log p", ("chosen_logp", "rejected_logp")),
    ("Perplexity", "perplexity", ("perplexity",)),
    ("Learning rate", "learning rate", ("learning_rate",)),
    ("Gradient norm", "‖g‖", ("grad_norm",)),
    ("Throughput", "tokens / s", ("tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s")),
)
BANDS = {"reward_mean": "reward_std"}  # mean -> std drawn as a ±1 std band around it
NOT_PLOTTED = {"step", "epoch"}
MAX_OTHER = 24  # panels in the "other metrics" grid
MAX_POINTS = 4000  # points per line; longer series are thinned to every k-th step

# the 2-D part of plotly's "plotly_white": the full template styles every trace type and is deep-copied into
# each figure, which made building a report several times slower (and every plot's JSON larger)
_AXIS = {"gridcolor": "#EBF0F8", "linecolor": "#EBF0F8", "zerolinecolor": "#EBF0F8", "zerolinewidth": 2,
         "ticks": "", "automargin": True, "title": {"standoff": 12}}
TEMPLATE = {"layout": {"paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"color": "#2a3f5f"},
                       "hoverlabel": {"align": "left"}, "xaxis": _AXIS, "yaxis": _AXIS}}


class Plot(NamedTuple):
    """A figure with the height its container gets (the width follows the page); wide plots span the grid."""

    figure: go.Figure
    height: int = 340
    wide: bool = False


def _figure() -> go.Figure:
    """An empty figure on the small template (setting it later would first load plotly's big default)."""
    return go.Figure(layout={"template": TEMPLATE})


def _style(fig: go.Figure, title: str, x_title: str = "", y_title: str = "", *, unified: bool = False) -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        margin={"l": 56, "r": 16, "t": 44, "b": 40}, autosize=True, colorway=list(COLORS),
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0, "font": {"size": 11}},
        hovermode="x unified" if unified else "closest", font={"family": "system-ui, sans-serif", "size": 12})
    if x_title:
        fig.update_xaxes(title_text=x_title)
    if y_title:
        fig.update_yaxes(title_text=y_title)


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _line(series: Series, name: str, color: str, *, dashed: bool) -> go.Scatter:
    """Training series solid, evaluation series dashed with markers; short series keep their markers."""
    series = series.thinned(MAX_POINTS)
    markers = dashed or len(series.values) < 20
    return go.Scatter(x=series.steps, y=series.values, name=name, mode="lines+markers" if markers else "lines",
                      line={"color": color, "width": 2, "dash": "dash" if dashed else "solid"},
                      marker={"size": 6}, hovertemplate="%{y:.4g}")


def _band(mean: Series, std: Series, color: str, name: str) -> go.Scatter | None:
    sd = dict(zip(std.steps, std.values))
    points = [(s, m, sd[s]) for s, m in zip(mean.steps, mean.values) if s in sd]
    if not points:
        return None
    xs = [p[0] for p in points]
    upper = [p[1] + p[2] for p in points]
    lower = [p[1] - p[2] for p in points]
    return go.Scatter(x=xs + xs[::-1], y=upper + lower[::-1], mode="lines", fill="toself",
                      fillcolor=_rgba(color, 0.15),
                      line={"width": 0}, hoverinfo="skip", name=name)


def _fix_flat_axis(fig: go.Figure) -> None:
    """Plotly centres a constant series in [v-1, v+1], which shows a learning rate of 1e-5 as 0: give such a
    panel a range around its value instead."""
    values = [v for trace in fig.data for v in (trace.y or ()) if is_number(v) and math.isfinite(v)]
    if values and max(values) == min(values):
        v = values[0]
        pad = abs(v) * 0.5 or 1.0
        fig.update_yaxes(range=[v - pad, v + pad])


def _mark_hacking(fig: go.Figure, run: Run) -> None:
    fired = run.hacking().get("fired_step")
    if is_number(fired):
        fig.add_vline(x=fired, line={"color": HACK_COLOR, "dash": "dot", "width": 1.5},
                      annotation_text="hacking detected", annotation_font_color=HACK_COLOR,
                      annotation_position="top left")


def run_panels(run: Run, more: Sequence[tuple[Plot, Collection[str]]] = ()) -> list[Plot]:
    """Line plots over steps of every numeric metric of a run: known groups first, then ``more`` (figures
    built elsewhere, each with the metric keys it shows), then the rest."""
    figures = []
    used: set[str] = set(NOT_PLOTTED)
    for title, y_title, names in PANELS:
        fig = _figure()
        color_index = 0
        for name in names:
            keys = [k for k in (name, f"eval_{name}") if k in run.series]
            if not keys:
                continue
            color = COLORS[color_index % len(COLORS)]
            color_index += 1
            for key in keys:
                used.add(key)
                std_key = BANDS.get(name)
                if std_key:
                    std_key = f"eval_{std_key}" if key.startswith("eval_") else std_key
                    if std_key in run.series:
                        used.add(std_key)
                        band = _band(run.series[key], run.series[std_key], color, f"{key} ± std")
                        if band is not None:
                            fig.add_trace(band)
                fig.add_trace(_line(run.series[key], key, color, dashed=key.startswith("eval_")))
        if fig.data:
            _style(fig, title, "step", y_title, unified=True)
            _fix_flat_axis(fig)
            if title in ("Reward", "KL to reference"):
                _mark_hacking(fig, run)
            figures.append(Plot(fig))
    for plot, keys in more:
        figures.append(plot)
        used.update(keys)
    other = _other_metrics(run, used)
    if other is not None:
        figures.append(other)
    return figures


def _other_metrics(run: Run, used: set[str]) -> Plot | None:
    names: list[str] = []
    for key in run.series:
        if key in used:
            continue
        name = key.removeprefix("eval_")
        if name not in names:
            names.append(name)
    names = names[:MAX_OTHER]
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, vertical_spacing=min(0.12, 0.5 / rows),
                        horizontal_spacing=0.08, figure=_figure())
    for index, name in enumerate(names):
        for key in (name, f"eval_{name}"):
            if key in run.series and key not in used:
                trace = _line(run.series[key], key, COLORS[0 if key == name else 1], dashed=key != name)
                trace.showlegend = False
                fig.add_trace(trace, row=index // cols + 1, col=index % cols + 1)
    _style(fig, "Other metrics (dashed: evaluation)")
    fig.update_annotations(font_size=12)
    fig.update_layout(margin={"t": 70})
    return Plot(fig, 60 + 230 * rows, wide=True)


def _pairs(x: Series, y: Series) -> list[tuple[float, float, float]]:
    """(step, x, y) at the steps both series share."""
    xs = dict(zip(x.steps, x.values))
    return [(s, xs[s], v) for s, v in zip(y.steps, y.values) if s in xs]


def reward_vs_kl(run: Run) -> Plot | None:
    """Reward against KL, one point per step (colour and hover give the step)."""
    fig = _figure()
    for prefix, symbol in (("", "circle"), ("eval_", "diamond")):
        reward, kl = run.series.get(f"{prefix}reward_mean"), run.series.get(f"{prefix}kl")
        if reward is None or kl is None:
            continue
        points = _pairs(kl, reward)
        if not points:
            continue
        steps = [p[0] for p in points]
        fig.add_trace(go.Scatter(
            x=[p[1] for p in points], y=[p[2] for p in points], customdata=steps,
            name="evaluation" if prefix else "training", mode="lines+markers",
            line={"color": "rgba(120,120,120,0.35)", "width": 1},
            marker={"size": 9 if prefix else 7, "symbol": symbol, "color": steps, "colorscale": "Viridis",
                    "showscale": not prefix and True, "colorbar": {"title": {"text": "step"}, "thickness": 12}},
            hovertemplate="step %{customdata}<br>KL %{x:.4g}<br>reward %{y:.4g}<extra>%{fullData.name}</extra>"))
    if not fig.data:
        return None
    _style(fig, "Reward against KL", "KL to reference (nats)", "reward")
    return Plot(fig)


def hacking_figure(title: str, runs: list[Run]) -> Plot | None:
    """Proxy (training reward model) and held-out (independent judge) reward of the evaluation rows against
    √KL, one colour per run; marks where the hacking detector fired and the best step."""
    fig = _figure()
    for index, run in enumerate(runs):
        color = COLORS[index % len(COLORS)]
        rows = [r for r in run.rows if is_number(r.get("eval_heldout_reward"))]
        points = []
        for row in rows:
            kl = row.get("eval_kl", row.get("kl"))
            if is_number(kl):
                points.append((row.get("step"), float(kl), row.get("eval_reward_mean"), row["eval_heldout_reward"]))
        if not points:
            continue
        xs = [sqrt_kl(p[1]) for p in points]
        custom = [[p[0], p[1]] for p in points]
        hover = "step %{customdata[0]}<br>KL %{customdata[1]:.4g}<br>reward %{y:.4g}<extra>%{fullData.name}</extra>"
        proxy = [(x, p[2], c) for x, p, c in zip(xs, points, custom) if is_number(p[2])]
        if proxy:
            fig.add_trace(go.Scatter(x=[p[0] for p in proxy], y=[p[1] for p in proxy],
                                     customdata=[p[2] for p in proxy], name=f"{run.name}: proxy reward",
                                     legendgroup=run.name, mode="lines+markers", line={"color": color, "width": 2},
                                     hovertemplate=hover))
        fig.add_trace(go.Scatter(x=xs, y=[p[3] for p in points], customdata=custom, legendgroup=run.name,
                                 name=f"{run.name}: held-out reward", mode="lines+markers",
                                 line={"color": color, "width": 2, "dash": "dash"},
                                 marker={"symbol": "circle-open", "size": 8}, hovertemplate=hover))
        verdict = run.hacking()
        for key, label, symbol, marker_color in (("fired_step", "hacking detected", "x", HACK_COLOR),
                                                 ("best_step", "best step", "star", BEST_COLOR)):
            step = verdict.get(key)
            if not is_number(step):
                continue
            nearest = min(range(len(points)), key=lambda i: abs((points[i][0] or 0) - step))
            fig.add_trace(go.Scatter(
                x=[xs[nearest]], y=[points[nearest][3]], mode="markers", legendgroup=run.name,
                name=f"{run.name}: {label} (step {step:g})", customdata=[custom[nearest]], hovertemplate=hover,
                marker={"symbol": symbol, "size": 16, "color": marker_color, "line": {"width": 1, "color": "#222"}}))
    if not fig.data:
        return None
    _style(fig, title, "√KL to reference", "reward")
    return Plot(fig, 440, wide=True)


def compare_runs(runs: list[Run], name: str, title: str, y_title: str) -> Plot | None:
    """One metric (its evaluation series when there is one) of several runs over steps."""
    fig = _figure()
    for index, run in enumerate(runs):
        series = run.series.get(f"eval_{name}") or run.series.get(name)
        if series is not None:
            series = series.thinned(MAX_POINTS)
            fig.add_trace(go.Scatter(x=series.steps, y=series.values, name=run.name, mode="lines+markers",
                                     line={"color": COLORS[index % len(COLORS)], "width": 2},
                                     hovertemplate="%{y:.4g}"))
    if len(fig.data) < 2:
        return None
    _style(fig, title, "step", y_title, unified=True)
    return Plot(fig)


# evaluation metrics: (subplot title, predicate on the key); keys no group claims get a subplot each
def _is_win(key: str) -> bool:
    return "win_rate" in key


def _is_ci(key: str) -> bool:
    return key.endswith(("_ci_low", "_ci_high"))


EVAL_GROUPS: tuple[tuple[str, Any], ...] = (
    ("Win rate vs baseline", _is_win),
    ("Judge score", lambda k: k.startswith("judge_score")),
    ("Reward", lambda k: k.startswith("reward")),
    ("KL to reference", lambda k: k.startswith("kl")),
    ("Mean length", lambda k: "length" in k),
    ("Rates", lambda k: k.endswith("_rate") and not _is_win(k)),
)
MAX_EVAL_SUBPLOTS = 12


def confidence_intervals(metrics: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """metric key -> (low, high) from ``P_ci_low``/``P_ci_high`` keys; P names the metric exactly or by prefix
    (``win_rate_ci_low`` belongs to ``win_rate_vs_sft``)."""
    out = {}
    for key, low in metrics.items():
        if not key.endswith("_ci_low"):
            continue
        prefix = key.removesuffix("_ci_low")
        high = metrics.get(f"{prefix}_ci_high")
        if not (is_number(low) and is_number(high)):
            continue
        candidates = [k for k in metrics if not _is_ci(k) and (k == prefix or k.startswith(f"{prefix}_"))]
        if candidates:
            out[candidates[0]] = (float(low), float(high))
    return out


def eval_bars(evaluation: Evaluation) -> Plot | None:
    """Grouped bars, one colour per policy, one subplot per metric group; win rates with CI error bars."""
    policies = evaluation.policies
    keys: list[str] = []
    for metrics in policies.values():
        keys += [k for k, v in metrics.items() if is_number(v) and not _is_ci(k) and k not in keys]
    groups: list[tuple[str, list[str]]] = []
    claimed: set[str] = set()
    for title, predicate in EVAL_GROUPS:
        members = [k for k in keys if k not in claimed and predicate(k)]
        if members:
            groups.append((title, members))
            claimed.update(members)
    groups += [(k, [k]) for k in keys if k not in claimed]
    groups = groups[:MAX_EVAL_SUBPLOTS]
    if not groups:
        return None
    baseline = evaluation.data.get("baseline")
    titles = [f"Win rate vs {baseline}" if t == "Win rate vs baseline" and baseline else t for t, _ in groups]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, vertical_spacing=min(0.2, 0.6 / rows),
                        horizontal_spacing=0.07, figure=_figure())
    for p_index, (policy, metrics) in enumerate(policies.items()):
        color = COLORS[p_index % len(COLORS)]
        cis = confidence_intervals(metrics)
        for g_index, (_, members) in enumerate(groups):
            present = [k for k in members if is_number(metrics.get(k))]
            if not present:
                continue
            values = [float(metrics[k]) for k in present]
            error = None
            if any(k in cis for k in present):
                # bars without an interval get no whisker (NaN), not a zero-length one
                error = {"type": "data", "symmetric": False, "color": "#333", "thickness": 1.5, "width": 0,
                         "array": [cis[k][1] - v if k in cis else math.nan for k, v in zip(present, values)],
                         "arrayminus": [v - cis[k][0] if k in cis else math.nan for k, v in zip(present, values)]}
            fig.add_trace(go.Bar(x=present, y=values, name=policy, legendgroup=policy, showlegend=g_index == 0,
                                 marker_color=color, error_y=error, hovertemplate="%{x}: %{y:.4g}"),
                          row=g_index // cols + 1, col=g_index % cols + 1)
    for g_index, (title, _) in enumerate(groups):
        if title == "Win rate vs baseline":
            fig.add_hline(y=0.5, line={"dash": "dot", "color": "#868e96", "width": 1},
                          row=g_index // cols + 1, col=g_index % cols + 1)
    _style(fig, "")  # the page gives the title; the legend takes the title's place, clear of the toolbar
    fig.update_layout(barmode="group", bargap=0.25, margin={"t": 70, "b": 50},
                      legend={"orientation": "h", "yref": "container", "y": 0.99, "yanchor": "top", "x": 0,
                              "xanchor": "left", "font": {"size": 12}})
    fig.update_annotations(font_size=12)
    fig.update_xaxes(tickfont={"size": 10})
    return Plot(fig, 90 + 260 * rows, wide=True)

