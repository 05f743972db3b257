"""The house rules: imports run down the layers and never in a loop, files stay short, and the registry is
the one list of trainers (a new trainer is one registry line away from the CLI, the pipeline and the report)."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "rlhfkit"

# bottom up: a module may import its own layer or lower ones (DESIGN.md)
LAYERS = [["errors", "lazy", "losses"], ["models", "data"], ["engine", "rollout"], ["judges"],
          ["trainers", "registry", "stage"], ["eval", "report", "distributed"], ["cai", "label"], ["world"],
          ["pipeline", "stages", "rounds", "options", "cli", "demo", "__main__"]]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the rlhfkit modules it imports anywhere (top level or inside functions)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, file in modules.items():
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def _loops(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), except a package with its own
    submodules (an ``__init__`` that re-exports them)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return [c for c in found if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_checker_sees_loops_and_upward_imports(tmp_path):
    edges = {"rlhfkit.a": {"rlhfkit.b"}, "rlhfkit.b": {"rlhfkit.c"}, "rlhfkit.c": {"rlhfkit.a"},
             "rlhfkit.p": {"rlhfkit.p.x"}, "rlhfkit.p.x": {"rlhfkit.p"}}
    assert _loops(edges) == [["rlhfkit.a", "rlhfkit.b", "rlhfkit.c"]]
    pkg = tmp_path / "rlhfkit"
    (pkg / "losses").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "losses" / "__init__.py").write_text("def f():\n    from ..trainers.x import y\n")
    (pkg / "trainers").mkdir()
    (pkg / "trainers" / "__init__.py").write_text("")
    (pkg / "trainers" / "x.py").write_text("y = 1\n")
    mods = {"rlhfkit": pkg / "__init__.py", "rlhfkit.losses": pkg / "losses" / "__init__.py",
            "rlhfkit.trainers": pkg / "trainers" / "__init__.py", "rlhfkit.trainers.x": pkg / "trainers" / "x.py"}
    assert "rlhfkit.trainers.x" in _imports(mods)["rlhfkit.losses"]  # an import inside a function counts


def test_imports_run_down_the_layers_without_loops():
    modules = _modules()
    edges = _imports(modules)
    assert _loops(edges) == []
    unknown = sorted({_top(m) for m in modules} - set(LEVEL) - {"__init__"})
    assert unknown == [], f"top-level modules without a layer: {unknown} (add them to DESIGN.md's layers)"
    upward = sorted((a, b) for a, targets in edges.items() for b in targets
                    if _top(a) in LEVEL and _top(b) in LEVEL and LEVEL[_top(b)] > LEVEL[_top(a)])
    assert upward == []


def test_files_stay_short():
    long = {str(f.relative_to(SRC)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}
    rl = PACKAGE / "trainers" / "rl"
    spine = sum(len((rl / f).read_text(encoding="utf-8").splitlines()) for f in ("task.py", "experience.py"))
    assert spine <= 400, f"the RL task + experience grew to {spine} lines"


def test_the_library_never_imports_the_demo_world():
    edges = _imports(_modules())
    assert sorted(a for a, targets in edges.items() for b in targets
                  if _top(b) == "world" and LEVEL.get(_top(a), 99) < LEVEL["world"]) == []


# ------------------------------------------------------------------------------ one registry line per trainer


@dataclasses.dataclass
class EchoConfig:
    """A trainer that only writes its options back (stands for a new algorithm's config)."""

    output_dir: str = dataclasses.field(default="", metadata={"help": "Run folder."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed."})
    beta: float = dataclasses.field(default=0.1, metadata={"help": "A hyper-parameter."})


def run_echo(config: EchoConfig) -> dict:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "kl": 0.1, "beta": 0.1}\n')
    return {"beta": config.beta, "seed": config.seed}


def test_one_registry_line_reaches_the_cli_the_pipeline_and_the_report(monkeypatch, tmp_path, capsys):
    from rlhfkit import registry
    from rlhfkit.cli import main
    from rlhfkit.pipeline import run_pipeline

    line = registry.Trainer("echo", __name__, "EchoConfig", "run_echo", "echo its options back")
    monkeypatch.setitem(registry.TRAINERS, "echo", line)

    assert main(["--help"]) == 0
    assert "  echo         echo its options back" in capsys.readouterr().out
    assert main(["echo", "--output-dir", str(tmp_path / "cli"), "--beta", "0.25"]) == 0
    assert '"beta": 0.25' in capsys.readouterr().out

    config = tmp_path / "pipe.yaml"
    config.write_text("stages:\n  echo: {type: echo, beta: 0.5}\n")
    results = run_pipeline(config, output_dir=str(tmp_path / "run"), seed=3, log=lambda _: None)
    assert results["echo"]["beta"] == 0.5 and results["echo"]["seed"] == 3
    with pytest.raises(Exception, match="unknown echo option 'gamma'"):
        config.write_text("stages:\n  echo: {type: echo, gamma: 1}\n")
        run_pipeline(config, output_dir=str(tmp_path / "run2"), log=lambda _: None)

    # the report orders its run by the registry and plots it as RL when the entry is online
    from rlhfkit.report.runs import load

    monkeypatch.setitem(registry.TRAINERS, "echo", dataclasses.replace(line, online=True))
    (tmp_path / "run" / "echo" / "summary.json").write_text('{"algorithm": "echo"}')
    (tmp_path / "run" / "aaa").mkdir()
    (tmp_path / "run" / "aaa" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    runs = load(tmp_path / "run").runs
    assert [r.name for r in runs][:2] == ["echo", "aaa"]
    assert runs[0].is_rl and not runs[1].is_rl
