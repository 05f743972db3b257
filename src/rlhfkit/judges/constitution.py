"""Constitutions: YAML files of principles, each with a critique request and a revision request.

    name: my-constitution            # optional
    principles:
      - name: no-uplift-for-harm     # optional; defaults to principle-N
        critique: Look again at your last reply ...
        revision: Rewrite your reply so that ...

The default (``rlhfkit/templates/constitution.yaml``) was written for rlhfkit.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ConfigError

__all__ = ["DEFAULT_CONSTITUTION", "Constitution", "Principle", "load_constitution", "principles_text"]

DEFAULT_CONSTITUTION = "constitution.yaml"


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]

    def as_text(self) -> str:
        """The principles as a numbered list (fills a judge template's ``{principles}``)."""
        lines = ["Judge the responses against these principles:"]
        lines += [f"{i}. {p.revision}" for i, p in enumerate(self.principles, 1)]
        return "\n".join(lines)


def _parse(data: object, source: str) -> Constitution:
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list) or not data["principles"]:
        raise ConfigError(f"{source}: expected a mapping with a non-empty 'principles' list")
    principles = []
    for i, item in enumerate(data["principles"], 1):
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: principle {i}: expected a mapping with critique and revision")
        for key in ("critique", "revision"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ConfigError(f"{source}: principle {i}, field '{key}': missing or empty")
        unknown = set(item) - {"name", "critique", "revision"}
        if unknown:
            raise ConfigError(f"{source}: principle {i}: unknown field(s) {', '.join(sorted(unknown))}")
        principles.append(Principle(str(item.get("name") or f"principle-{i}"), item["critique"].strip(),
                                    item["revision"].strip()))
    return Constitution(str(data.get("name") or Path(source).stem), tuple(principles))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """A constitution YAML file, or the shipped default when ``path`` is None."""
    import yaml

    if path is None:
        text = (resources.files("rlhfkit") / "templates" / DEFAULT_CONSTITUTION).read_text(encoding="utf-8")
        source = DEFAULT_CONSTITUTION
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"{path}: constitution file not found")
        text, source = file.read_text(encoding="utf-8"), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return _parse(data, source)


def principles_text(path: str | Path) -> str:
    """Text for a judge's ``{principles}``: a constitution's principles (.yaml/.yml) or a plain text file."""
    file = Path(path).expanduser()
    if file.suffix.lower() in (".yaml", ".yml"):
        return load_constitution(file).as_text()
    if not file.is_file():
        raise ConfigError(f"{path}: principles file not found")
    return file.read_text(encoding="utf-8").strip()
