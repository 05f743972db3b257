"""Safe rendering of user text for the pages: Markdown with raw HTML disabled (``<script>`` stays escaped,
inert text), fenced code in ``<pre><code>``, unsafe link schemes refused by markdown-it's own validator; a
chat transcript (a prompt stored as a JSON list of ``{role, content}`` messages) split into turns."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _md():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False})


def render_markdown(text: str) -> str:
    """Markdown to HTML with raw HTML disabled (escaped) and unsafe link schemes refused."""
    return _md().render(text or "")


def chat_turns(prompt: Any) -> list[dict[str, str]] | None:
    """``[{role, content}, ...]`` when ``prompt`` is a chat transcript (a list, or a string holding a JSON
    list, of objects with string ``role`` and ``content``); otherwise None."""
    value = prompt
    if isinstance(prompt, str):
        if not prompt.lstrip().startswith("["):
            return None
        try:
            value = json.loads(prompt)
        except ValueError:
            return None
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in value):
        return None
    return [{"role": m["role"][:40], "content": m["content"]} for m in value]


def chat_row(row: Any) -> Any:
    """An import row whose ``prompt`` is a list of ``{role, content}`` messages, with that prompt stored as
    its JSON text (what :func:`chat_turns` reads back); any other row unchanged."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), list) and chat_turns(row["prompt"]) is not None:
        return {**row, "prompt": json.dumps(row["prompt"], ensure_ascii=False)}
    return row


def md(text: str):
    """Jinja global: ``text`` as safe Markdown HTML (Markup)."""
    from markupsafe import Markup

    return Markup(render_markdown(text))
