"""Judge prompt templates: user-editable text files with ``### section`` headers.

A template is a system preamble, optional few-shot ``user``/``assistant`` turns, a final ``user`` turn with
placeholders (``{prompt}``, ``{response_a}``, ``{response_b}`` or ``{response}``, ``{principles}``) and, for
local models, a ``verdict`` prefix after which the option tokens are scored. Placeholders are replaced
literally (not with ``str.format``), so other braces in the text are kept. The defaults ship in
``rlhfkit/templates/judge_*.txt``; copy one, edit it and pass ``--template FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["DEFAULT_TEMPLATES", "JudgeTemplate", "load_template", "prompt_text", "response_text"]

DEFAULT_TEMPLATES = {
    "pairwise": "judge_pairwise.txt",
    "pairwise_cot": "judge_pairwise_cot.txt",
    "score": "judge_score.txt",
}
_SECTIONS = ("system", "user", "assistant", "verdict")


def prompt_text(prompt: Any) -> str:
    """A prompt as text for a judge: strings as they are; chat messages as ``Role: content`` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{str(m.get('role', 'user')).capitalize()}: {m.get('content', '')}"
                         if isinstance(m, dict) else str(m) for m in prompt)
    return "" if prompt is None else str(prompt)


def response_text(response: Any) -> str:
    """A response as text: a message list becomes its messages' contents joined."""
    if isinstance(response, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in response)
    return "" if response is None else str(response)


@dataclass
class JudgeTemplate:
    """A parsed template; ``messages(...)`` renders it as chat messages."""

    system: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (role, text), the last one is the question
    verdict: str = "Verdict:"
    source: str = ""

    @classmethod
    def parse(cls, text: str, source: str = "template") -> JudgeTemplate:
        template = cls(source=source)
        current: str | None = None
        lines: list[str] = []
        sections: list[tuple[str, str]] = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith("### "):
                if current is not None:
                    sections.append((current, "\n".join(lines).strip("\n")))
                current = line[4:].strip().lower()
                if current not in _SECTIONS:
                    raise ConfigError(f"{source}: line {number}: unknown section '### {current}' (expected one of "
                                      f"{', '.join(_SECTIONS)})")
                lines = []
            elif current is None:
                if line.strip() and not line.startswith("#"):
                    raise ConfigError(f"{source}: line {number}: text before the first '### section' line")
            else:
                lines.append(line)
        if current is not None:
            sections.append((current, "\n".join(lines).strip("\n")))
        for name, body in sections:
            if name == "system":
                template.system = body
            elif name == "verdict":
                template.verdict = body.strip()
            else:
                template.turns.append((name, body))
        if not template.turns or template.turns[-1][0] != "user":
            raise ConfigError(f"{source}: the last turn must be a '### user' section (the question)")
        return template

    def messages(self, **values: str) -> list[dict[str, str]]:
        """System + few-shot + question as chat messages, placeholders filled in."""

        def fill(text: str) -> str:
            for key, value in values.items():
                text = text.replace("{" + key + "}", value)
            return text

        out = []
        system = fill(self.system).strip()
        if system:
            out.append({"role": "system", "content": system})
        last = len(self.turns) - 1
        for i, (role, text) in enumerate(self.turns):
            # few-shot turns are examples: only the question (and the system text) get the row's values
            out.append({"role": role, "content": fill(text) if i == last else text})
        return out


def load_template(path_or_name: str | Path | None, kind: str = "pairwise") -> JudgeTemplate:
    """A template file, or a shipped default by name (``pairwise``, ``pairwise_cot``, ``score``)."""
    name = str(path_or_name) if path_or_name else kind
    if name in DEFAULT_TEMPLATES:
        file = resources.files("rlhfkit") / "templates" / DEFAULT_TEMPLATES[name]
        return JudgeTemplate.parse(file.read_text(encoding="utf-8"), source=DEFAULT_TEMPLATES[name])
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"judge template '{name}' not found (a file, or one of: {', '.join(DEFAULT_TEMPLATES)})")
    return JudgeTemplate.parse(path.read_text(encoding="utf-8"), source=str(path))
