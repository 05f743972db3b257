"""``rlhfkit pipeline CONFIG.yaml``: run a chain of stages from one file.

A config names an output folder, options shared by every training stage, and the stages in order::

    output_dir: runs/demo
    seed: 0
    defaults: {num_threads: 0}          # merged into every trainer stage (where the trainer has the option)
    stages:
      sft: {type: sft, model: "${pretrain}", dataset: "${world}/sft.jsonl", max_steps: 200}
      rm:  {type: rm, model: "${sft}", dataset: "${preferences}/ranked.jsonl"}

Each stage writes to ``OUTPUT_DIR/<stage name>``; ``${name}`` in any string option is that stage's folder,
``${output_dir}`` the run folder, ``${seed}`` the seed. A trainer stage runs with the pipeline's seed unless
it sets ``seed:`` (fixed) or ``seed_offset: N`` (the pipeline's seed + N: a second reward model of an ensemble
stays a different model on every seed). Stage types: the trainers of :mod:`rlhfkit.registry`
(options as on their command line), the library's steps (:mod:`rlhfkit.stages`: tiny_model, eval, report, judge,
cai, revision_preference, eval_rm, audit_judge, grade) and those other packages
register (:mod:`rlhfkit.stage`; the demo world's world, collect, cai_world, summary and human_labels).
A stage whose folder holds ``stage_done.json`` is skipped; ``--force`` reruns everything, ``--force a,b`` the
named stages. ``--only a,b`` runs a subset.
A trainer stage that was interrupted continues from its checkpoints (as with --resume); a forced one replaces
its earlier run (as with --overwrite).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .options import (
    OneLineParser,
    closest,
    coerce_options,
    config_from_options,
    read_yaml,
    run_trainer,
    trainer_config_class,
)
from .registry import TRAINERS, Trainer
from .stage import StageContext, StageFn, stage_options, stage_types

DONE_FILE = "stage_done.json"
_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


def all_stage_types() -> dict[str, StageFn]:
    """The library's stage types (rlhfkit.stages) and those other packages register (entry points)."""
    return stage_types("rlhfkit.stages")


def _resolve(value: Any, refs: dict[str, str], where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key not in refs:
                raise ConfigError(f"{where}: unknown reference ${{{key}}} (stages defined before this one: "
                                  f"{', '.join(k for k in refs if k not in ('output_dir', 'seed')) or 'none'})")
            return refs[key]
        return _REF.sub(sub, value)
    if isinstance(value, list):
        return [_resolve(v, refs, where) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, refs, where) for k, v in value.items()}
    return value


def _run_trainer(trainer: Trainer, ctx: StageContext, forced: bool = False) -> dict[str, Any]:
    from .engine.run_folder import holds_run

    config_cls = trainer_config_class(trainer)
    known = {f.name for f in dataclasses.fields(config_cls)}
    options: dict[str, Any] = {"seed": ctx.seed}
    options.update({k: v for k, v in ctx.defaults.items() if k in known})
    options.update(ctx.options)
    offset = options.pop("seed_offset", None)
    if offset is not None:  # a second model of the same kind (an ensemble member) on every pipeline seed
        options["seed"] = ctx.seed + int(offset)
    options["output_dir"] = str(ctx.output_dir)
    # The stage's folder is the pipeline's: --force reruns it from scratch; otherwise what an earlier attempt
    # left is continued (checkpoints) or reused (a run that finished before its stage was marked done).
    if forced:
        options.update(overwrite=True, resume=False)
    elif not options.get("overwrite") and holds_run(ctx.output_dir):
        options["resume"] = True
    return run_trainer(trainer, config_from_options(trainer, options, f"stage '{ctx.name}'"))


def load_pipeline(path: str | Path) -> dict[str, Any]:
    data = read_yaml(path, "pipeline config")
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or not data["stages"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'stages' mapping (name: options)")
    for key in data:
        if key not in ("output_dir", "seed", "defaults", "stages", "description"):
            raise ConfigError(f"{path}: unknown top-level key '{key}' (output_dir, seed, defaults, stages)")
    for name, options in data["stages"].items():
        if not isinstance(options, dict) or "type" not in options:
            raise ConfigError(f"{path}: stage '{name}' needs a mapping with a 'type'")
    return data


def _check_stage_options(path: str | Path, name: str, kind: str, options: dict[str, Any],
                         steps: dict[str, StageFn]) -> None:
    """A stage's type and option names (and, for a trainer, the option values' types) are known."""
    if kind not in steps and kind not in TRAINERS:
        hint = closest(kind, [*TRAINERS, *steps], quote="'")
        raise ConfigError(f"{path}: stage '{name}': unknown type '{kind}'{hint} (types: "
                          f"{', '.join(sorted([*TRAINERS, *steps]))})")
    if kind in TRAINERS:
        config_cls = trainer_config_class(TRAINERS[kind])
        known = {f.name for f in dataclasses.fields(config_cls)} - {"output_dir"} | {"seed_offset"}
        help_hint = f" (see rlhfkit {kind} --help)"
    else:
        declared = stage_options(kind)
        if declared is None:  # a stage type that did not declare its options is not checked
            return
        known, help_hint = declared, ""
    for key in options:
        if kind in TRAINERS and str(key).replace("-", "_") == "output_dir":
            raise ConfigError(f"{path}: stage '{name}': output_dir is the pipeline's to set (a stage writes to "
                              f"OUTPUT_DIR/{name}); set output_dir at the top of the file")
        if str(key).replace("-", "_") not in known:
            hint = closest(str(key).replace("-", "_"), sorted(known), quote="'")
            raise ConfigError(f"{path}: stage '{name}': unknown {kind} option '{key}'{hint}{help_hint}")
    if kind in TRAINERS:  # values that do not wait for a ${stage} reference can be checked now
        plain = {str(k).replace("-", "_"): v for k, v in options.items()
                 if not (isinstance(v, str) and "${" in v)}
        offset = plain.pop("seed_offset", None)
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or "seed" in plain):
            raise ConfigError(f"{path}: stage '{name}': seed_offset takes a whole number added to the pipeline's "
                              f"seed (got {offset!r}), and replaces seed: give one of them")
        coerce_options(config_cls, plain, f"{path}: stage '{name}'")


def check_pipeline(path: str | Path, defaults: dict[str, Any], stages: dict[str, dict[str, Any]],
                   steps: dict[str, StageFn]) -> None:
    """The whole file, before its first stage runs: every stage's type and options, and ``defaults:`` (each
    key must be an option of some trainer, since defaults go to the trainer stages). One line per mistake."""
    trainer_options = {f.name for t in TRAINERS.values() for f in dataclasses.fields(trainer_config_class(t))}
    for key in defaults:
        if str(key).replace("-", "_") not in trainer_options:
            hint = closest(str(key).replace("-", "_"), sorted(trainer_options), quote="'")
            raise ConfigError(f"{path}: defaults: unknown option '{key}'{hint} (defaults go to the trainer "
                              "stages: any option of rlhfkit sft, rm, dpo, ppo, grpo or rloo)")
    for name, opts in stages.items():
        _check_stage_options(path, name, str(opts.get("type")), {k: v for k, v in opts.items() if k != "type"},
                             steps)


def run_pipeline(config_path: str | Path, output_dir: str | None = None, seed: int | None = None,
                 force: str | bool = False, only: str | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stages of ``config_path`` in order; returns {stage name: summary} plus ``wall_seconds``.

    ``overrides`` ({stage: {option: value}}) change options without editing the file (the CLI's --set).
    """
    steps = all_stage_types()
    data = load_pipeline(config_path)
    run_dir = Path(output_dir or data.get("output_dir") or "runs/pipeline")
    seed = int(seed if seed is not None else data.get("seed", 0))
    defaults = dict(data.get("defaults") or {})
    stages: dict[str, dict[str, Any]] = {k: dict(v) for k, v in data["stages"].items()}
    for name, opts in (overrides or {}).items():
        if name not in stages:
            raise ConfigError(f"--set: no stage named '{name}' in {config_path}")
        stages[name].update(opts)
    check_pipeline(config_path, defaults, stages, steps)
    names = list(stages)
    forced = set(names) if force is True else {s for s in str(force or "").split(",") if s}
    selected = {s for s in (only or "").split(",") if s} or set(names)
    for s in (forced | selected) - set(names):
        raise ConfigError(f"no stage named '{s}' in {config_path} (stages: {', '.join(names)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    refs: dict[str, str] = {"output_dir": str(run_dir), "seed": str(seed)}
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        opts = stages[name]
        kind = str(opts.pop("type"))
        out = run_dir / name
        refs_here = dict(refs)
        options = _resolve(opts, refs_here, f"stage '{name}'")
        refs[name] = str(out)
        done = out / DONE_FILE
        if name not in selected or (done.exists() and name not in forced):
            if done.exists():
                results[name] = json.loads(done.read_text(encoding="utf-8")).get("summary", {})
                log(f"[{i}/{len(names)}] {name} ({kind}): done before, skipped (--force {name} reruns it)")
            continue
        log(f"[{i}/{len(names)}] {name} ({kind}) -> {out}")
        if done.exists():
            done.unlink()
        ctx = StageContext(name=name, output_dir=out, options=options, run_dir=run_dir, seed=seed,
                           defaults=defaults, results=results)
        t = time.perf_counter()
        summary = _run_trainer(TRAINERS[kind], ctx, name in forced) if kind in TRAINERS else steps[kind](ctx)
        timings[name] = time.perf_counter() - t
        summary = dict(summary or {})
        summary.setdefault("wall_seconds", timings[name])
        results[name] = summary
        out.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"type": kind, "options": options, "summary": summary}, indent=2,
                                   default=str), encoding="utf-8")
        log(f"    {name}: {timings[name]:.1f}s")
    results["wall_seconds"] = {"total": time.perf_counter() - start, **timings}
    return results


def parse_sets(values: list[str]) -> dict[str, dict[str, Any]]:
    """``--set stage.option=value`` (value parsed as YAML: numbers, booleans, lists)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        stage_name, dot, option = key.partition(".")
        if not sep or not dot or not stage_name or not option:
            raise ConfigError(f"--set {item!r}: expected STAGE.OPTION=VALUE")
        out.setdefault(stage_name, {})[option] = yaml.safe_load(raw)
    return out


def pipeline_main(argv: list[str]) -> int:
    p = OneLineParser(prog="rlhfkit pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="pipeline YAML file")
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--force", nargs="?", const=True, default=False,
                   help="rerun stages that are done: all, or a comma list of names")
    p.add_argument("--only", help="run only these stages (comma list); the others are loaded if done")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.OPTION=VALUE",
                   help="override one stage option (repeatable)")
    a = p.parse_args(argv)
    results = run_pipeline(a.config, output_dir=a.output_dir, seed=a.seed, force=a.force, only=a.only,
                           overrides=parse_sets(a.set))
    print(f"done in {results['wall_seconds']['total']:.0f}s")
    return 0
