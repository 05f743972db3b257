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
cai, revision_preference, eval_rm, audit_judge, grade), rounds (:mod:`rlhfkit.rounds`: N rounds of a chain of
steps, each from the last round's policy) and those other packages register (:mod:`rlhfkit.stage`; the demo
world's world, collect, cai_world, summary and human_labels). The whole file (types, options, references) is
checked before the first stage runs.
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
from collections.abc import Callable, Collection
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


@dataclasses.dataclass(frozen=True)
class Nested:
    """A stage type that runs stages of its own (:mod:`rlhfkit.rounds`). Its option ``option`` holds them
    (name -> options, as a pipeline's ``stages``): the pipeline resolves the outer ``${refs}`` there but leaves
    the names ``local_refs(options)`` gives (its own steps shadow the pipeline's stages of the same name) to
    the stage, which resolves them itself. ``check(where, options, refs, types)`` checks its options (and,
    through :func:`check_stages`, its steps) before the pipeline's first stage runs; ``refs``: the names
    defined before it."""

    option: str
    local_refs: Callable[[dict[str, Any]], set[str]]
    check: Callable[[str, dict[str, Any], set[str], dict[str, StageFn]], None]


NESTED: dict[str, Nested] = {}


def nested_stage(type_name: str, option: str, local_refs: Callable[[dict[str, Any]], set[str]],
                 check: Callable[[str, dict[str, Any], set[str], dict[str, StageFn]], None]) -> None:
    """Declare ``type_name`` (registered with :func:`rlhfkit.stage.stage`) as a stage that runs stages."""
    NESTED[type_name] = Nested(option, local_refs, check)


def all_stage_types() -> dict[str, StageFn]:
    """The library's stage types (rlhfkit.stages, rlhfkit.rounds) and those other packages register (entry
    points)."""
    return stage_types("rlhfkit.stages", "rlhfkit.rounds")


def resolve(value: Any, refs: dict[str, str], where: str, keep: Collection[str] = ()) -> Any:
    """``value`` with every ``${name}`` in its strings replaced by ``refs[name]``; names in ``keep`` are left
    as they are (for a nested stage to resolve), any other unknown name is an error."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key in keep:
                return m.group(0)
            if key not in refs:
                raise ConfigError(f"{where}: unknown reference ${{{key}}} (stages defined before this one: "
                                  f"{', '.join(k for k in refs if k not in ('output_dir', 'seed')) or 'none'})")
            return refs[key]
        return _REF.sub(sub, value)
    if isinstance(value, list):
        return [resolve(v, refs, where, keep) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, refs, where, keep) for k, v in value.items()}
    return value


def references(value: Any) -> set[str]:
    """The ``${names}`` used anywhere in an option value (strings, lists and mappings)."""
    if isinstance(value, str):
        return set(_REF.findall(value))
    items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
    return set().union(*map(references, items))


def resolve_stage(kind: str, options: dict[str, Any], refs: dict[str, str], where: str) -> dict[str, Any]:
    """A stage's options with the references resolved (a nested stage's steps keep its own names)."""
    nested = NESTED.get(kind)
    if nested is None:
        return resolve(options, refs, where)
    keep = nested.local_refs(options)
    return {k: resolve(v, refs, where, keep if k == nested.option else ()) for k, v in options.items()}


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


def _check_stage_options(where: str, name: str, kind: str, options: dict[str, Any],
                         types: dict[str, StageFn]) -> None:
    """A stage's type and option names (and, for a trainer, the option values' types) are known."""
    if kind not in types and kind not in TRAINERS:
        hint = closest(kind, [*TRAINERS, *types], quote="'")
        raise ConfigError(f"{where}: unknown type '{kind}'{hint} (types: "
                          f"{', '.join(sorted([*TRAINERS, *types]))})")
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
            raise ConfigError(f"{where}: output_dir is the pipeline's to set (a stage writes to "
                              f"OUTPUT_DIR/{name}); set output_dir at the top of the file")
        if str(key).replace("-", "_") not in known:
            hint = closest(str(key).replace("-", "_"), sorted(known), quote="'")
            raise ConfigError(f"{where}: unknown {kind} option '{key}'{hint}{help_hint}")
    if kind in TRAINERS:  # values that do not wait for a ${stage} reference can be checked now
        plain = {str(k).replace("-", "_"): v for k, v in options.items()
                 if not (isinstance(v, str) and "${" in v)}
        offset = plain.pop("seed_offset", None)
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or "seed" in plain):
            raise ConfigError(f"{where}: seed_offset takes a whole number added to the pipeline's "
                              f"seed (got {offset!r}), and replaces seed: give one of them")
        coerce_options(config_cls, plain, where)


def check_stages(where: str, stages: dict[str, Any], types: dict[str, StageFn], refs: Collection[str],
                 label: str = "stage") -> None:
    """Stages in order (a pipeline's, or a nested stage's steps): each one's type, option names (a trainer's
    values' types too) and ``${references}`` (to ``refs`` or a stage before it), so that a mistake anywhere
    stops the run before its first stage. Messages start with ``where`` and name the ``label`` ('stage')."""
    known = dict.fromkeys(refs)
    for name, opts in stages.items():
        here = f"{where}{label} '{name}'"
        if not isinstance(opts, dict) or "type" not in opts:
            raise ConfigError(f"{here} needs a mapping with a 'type'")
        kind = str(opts["type"])
        options = {k: v for k, v in opts.items() if k != "type"}
        _check_stage_options(here, name, kind, options, types)
        if kind in NESTED:
            NESTED[kind].check(here, options, set(known), types)
        resolve_stage(kind, options, {k: k for k in known}, here)
        known[name] = None


def check_pipeline(path: str | Path, defaults: dict[str, Any], stages: dict[str, dict[str, Any]],
                   types: dict[str, StageFn]) -> None:
    """The whole file, before its first stage runs: every stage's type, options and references, and
    ``defaults:`` (each key must be an option of some trainer, since defaults go to the trainer stages). One
    line per mistake."""
    trainer_options = {f.name for t in TRAINERS.values() for f in dataclasses.fields(trainer_config_class(t))}
    for key in defaults:
        if str(key).replace("-", "_") not in trainer_options:
            hint = closest(str(key).replace("-", "_"), sorted(trainer_options), quote="'")
            raise ConfigError(f"{path}: defaults: unknown option '{key}'{hint} (defaults go to the trainer "
                              "stages: any option of rlhfkit sft, rm, dpo, ppo, grpo or rloo)")
    check_stages(f"{path}: ", stages, types, ("output_dir", "seed"))


def run_stages(stages: dict[str, dict[str, Any]], folder: Path, refs: dict[str, str], seed: int,
               defaults: dict[str, Any], types: dict[str, StageFn], *, forced: Collection[str] = (),
               selected: Collection[str] | None = None, log: Callable[[str], None] = print,
               before: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``stages`` (name -> options with a ``type``) in order, each into ``folder/<name>`` with ``seed``:
    the one loop of a pipeline and of a nested stage's rounds. ``refs`` (name -> text) resolve ``${name}``,
    and every stage adds its folder. A stage whose folder holds stage_done.json is skipped (its summary
    loaded) unless ``forced``; stages not ``selected`` (default: all) are only loaded. ``before(name)`` is
    called before a stage runs. Returns ({name: summary}, {name: seconds} of the stages run)."""
    refs = dict(refs)
    names = list(stages)
    selected = set(names) if selected is None else set(selected)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for i, name in enumerate(names, 1):
        opts = dict(stages[name])
        kind = str(opts.pop("type"))
        out = folder / name
        options = resolve_stage(kind, opts, refs, f"stage '{name}'")
        refs[name] = str(out)
        done = out / DONE_FILE
        if name not in selected or (done.exists() and name not in forced):
            if done.exists():
                record = json.loads(done.read_text(encoding="utf-8"))
                results[name] = record.get("summary", {})
                log(f"[{i}/{len(names)}] {name} ({kind}): done before, skipped (--force {name} reruns it)")
                changed = changed_options(record, kind, options, folder)
                if changed:
                    log(f"    warning: {name} was done with other options ({changed}); its results are "
                        f"used as they are (--force {name} reruns it with this config's)")
            continue
        if before is not None:
            before(name)
        log(f"[{i}/{len(names)}] {name} ({kind}) -> {out}")
        if done.exists():
            done.unlink()
        ctx = StageContext(name=name, output_dir=out, options=options, run_dir=folder, seed=seed,
                           defaults=defaults, results=results)
        t = time.perf_counter()
        summary = _run_trainer(TRAINERS[kind], ctx, name in forced) if kind in TRAINERS else types[kind](ctx)
        timings[name] = time.perf_counter() - t
        summary = dict(summary or {})
        summary.setdefault("wall_seconds", timings[name])
        results[name] = summary
        out.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"type": kind, "options": options, "summary": summary, "folder": str(folder)},
                                   indent=2, default=str), encoding="utf-8")
        log(f"    {name}: {timings[name]:.1f}s")
    return results, timings


def _rebased(value: Any, old: re.Pattern, new: str) -> Any:
    """``value`` (JSON-like) with every path that starts with the ``old`` folder moved to ``new``."""
    if isinstance(value, str):
        return old.sub(lambda _: new, value)
    if isinstance(value, list):
        return [_rebased(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _rebased(v, old, new) for k, v in value.items()}
    return value


def changed_options(record: dict[str, Any], kind: str, options: dict[str, Any], folder: Path) -> str:
    """How a finished stage's record (stage_done.json) differs from the stage as configured now: ``''`` when
    not at all, else e.g. ``"type rm -> dpo; red_team_mutations: None -> 7"`` (a key one side lacks shows as
    None). Values are compared as the record stores them (JSON, paths as text), except that paths into the
    folder the record was made in are read as paths into ``folder``: a run folder moved or copied whole is
    the same run."""
    now = json.loads(json.dumps(options, default=str))
    before = record.get("options", {})
    made_in = record.get("folder")
    if made_in and made_in != str(folder):
        inside = re.compile(re.escape(made_in) + r"(?=[/\\]|$)")
        before = _rebased(before, inside, str(folder))
    diffs = [f"type {record.get('type')} -> {kind}"] if record.get("type", kind) != kind else []
    diffs += [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
              if before.get(key) != now.get(key)]
    return "; ".join(diffs)


def run_pipeline(config_path: str | Path, output_dir: str | None = None, seed: int | None = None,
                 force: str | bool = False, only: str | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stages of ``config_path`` in order; returns {stage name: summary} plus ``wall_seconds``.

    ``overrides`` ({stage: {option: value}}) change options without editing the file (the CLI's --set).
    """
    types = all_stage_types()
    data = load_pipeline(config_path)
    run_dir = Path(output_dir or data.get("output_dir") or "runs/pipeline")
    seed = int(seed if seed is not None else data.get("seed", 0))
    defaults = dict(data.get("defaults") or {})
    stages: dict[str, dict[str, Any]] = {k: dict(v) for k, v in data["stages"].items()}
    for name, opts in (overrides or {}).items():
        if name not in stages:
            raise ConfigError(f"--set: no stage named '{name}' in {config_path}")
        stages[name].update(opts)
    check_pipeline(config_path, defaults, stages, types)
    names = list(stages)
    forced = set(names) if force is True else {s for s in str(force or "").split(",") if s}
    selected = {s for s in (only or "").split(",") if s} or set(names)
    for s in (forced | selected) - set(names):
        raise ConfigError(f"no stage named '{s}' in {config_path} (stages: {', '.join(names)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, timings = run_stages(stages, run_dir, {"output_dir": str(run_dir), "seed": str(seed)}, seed, defaults,
                                  types, forced=forced, selected=selected, log=log)
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
