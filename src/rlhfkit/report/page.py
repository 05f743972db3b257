"""HTML pieces: number formatting, escaped tables, plot containers and the page shell with inline CSS."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import plotly.io as pio

from .figures import Plot

MAX_CELL_CHARS = 2000  # longer texts (responses, prompts) are cut with a note of how much was left out


class Safe(str):
    """Markup built here (already escaped); every other string put in a table is escaped."""


class Text(str):
    """Free text (a prompt, a response): always shown whole-width with its spaces and line breaks."""


def esc(value: Any) -> str:
    return value if isinstance(value, Safe) else html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A readable number: integers with separators, floats to 4 significant digits, no scientific notation
    between 1e-3 and 1e4; other values as text."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value == 0:
            return "0"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def cut(text: Any, limit: int = MAX_CELL_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text) - limit:,} more characters)"


def cell(value: Any) -> Safe:
    """A table cell: numbers right-aligned and formatted, text escaped (long text kept with its line breaks)."""
    if isinstance(value, Safe):
        return Safe(f"<td>{value}</td>")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Safe(f'<td class="num">{esc(fmt(value))}</td>')
    if isinstance(value, Text) or (isinstance(value, str) and (len(value) > 60 or "\n" in value)):
        return Safe(f'<td class="text">{esc(cut(value))}</td>')
    return Safe(f"<td>{esc(fmt(value))}</td>")


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], css: str = "") -> Safe:
    # long snake_case headers may break after an underscore
    head = "".join(f"<th>{esc(h).replace('_', '_<wbr>')}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    cls = f' class="{css}"' if css else ""
    return Safe(f'<div class="table-wrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                f"</table></div>")


def key_values(data: dict[str, Any]) -> Safe:
    return table(("key", "value"), ((k, v) for k, v in data.items()), css="kv")


class PlotWriter:
    """Turns figures into divs with deterministic ids; plotly.js itself is inlined once in the page head."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, plot: Plot) -> Safe:
        self.count += 1
        div = pio.to_html(plot.figure, full_html=False, include_plotlyjs=False, div_id=f"plot-{self.count}",
                          default_width="100%", default_height=f"{plot.height}px",
                          config={"responsive": True, "displaylogo": False})
        return Safe(f'<div class="plot{" wide" if plot.wide else ""}">{div}</div>')

    def grid(self, plots: Iterable[Plot | None]) -> Safe:
        inner = "".join(self(p) for p in plots if p is not None)
        return Safe(f'<div class="plots">{inner}</div>') if inner else Safe("")


def slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


CSS = """
:root { --fg: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #f5f7fa; --card: #fff; --accent: #4263eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { background: #1f2933; color: #fff; padding: 18px 28px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header .meta { color: #cbd2d9; font-size: 13px; margin-top: 4px; word-break: break-all; }
nav { position: sticky; top: 0; z-index: 10; background: #fff; border-bottom: 1px solid var(--line);
      padding: 8px 28px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { max-width: 1400px; margin: 0 auto; padding: 12px 20px 60px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
          margin: 18px 0; scroll-margin-top: 48px; }
h2 { margin: 0 0 10px; font-size: 19px; }
h3 { margin: 18px 0 8px; font-size: 15px; color: #323f4b; }
p.lead { margin: 4px 0 12px; color: var(--muted); }
.tag { display: inline-block; background: #edf2ff; color: #364fc7; border-radius: 10px; padding: 0 8px;
       font-size: 12px; margin-left: 6px; vertical-align: middle; }
.tag.warn { background: #fff4e6; color: #d9480f; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 520px), 1fr)); gap: 14px; }
.plot { min-width: 0; border: 1px solid var(--line); border-radius: 6px; padding: 4px; background: #fff; }
.plot.wide { grid-column: 1 / -1; }
.table-wrap { overflow-x: auto; margin: 6px 0 12px; }
table { border-collapse: collapse; font-size: 13px; min-width: 40%; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f0f4f8; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; word-break: break-word; max-width: 760px; font-family: ui-monospace,
          SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
tbody tr:hover { background: #f8f9fb; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
details { margin: 8px 0; }
details > summary { cursor: pointer; color: #323f4b; font-weight: 600; }
.prompt { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; margin: 10px 0; }
.prompt pre { white-space: pre-wrap; word-break: break-word; margin: 6px 0; background: #f8f9fb;
              padding: 6px 8px; border-radius: 4px; font-size: 12.5px; }
.notes { border-left: 4px solid #f76707; background: #fff9f2; }
.notes li { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; }
.muted { color: var(--muted); }
.ci { white-space: nowrap; font-variant-numeric: tabular-nums; }
"""


def page(title: str, subtitle: str, nav: list[tuple[str, str]], sections: list[str], plotly_js: str) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n"
        f"<script type=\"text/javascript\">{plotly_js}</script>\n</head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1><div class=\"meta\">{esc(subtitle)}</div></header>\n"
        f"<nav>{links}</nav>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n")
