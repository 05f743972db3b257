"""The ``rounds`` stage type: iterated RLHF as one pipeline stage. N rounds of a chain of steps, each round
starting from the policy the round before it trained: sample -> label -> retrain the reward model on every
label so far -> RL or DPO from the current policy -> evaluate. ::

    loop:
      type: rounds
      rounds: 3
      policy: ${sft}                      # round 1's policy
      next_policy: ppo                    # the step whose folder is the next round's policy
      accumulate: [label/ranked.jsonl]    # rounds 1..r of these files, concatenated: round r's ${labels_so_far}
      figures: {rm_accuracy: eval.rm.accuracy, gold: eval.policies.policy.judge_score,
                kl: eval.policies.policy.kl}          # label: STEP.path.in.its.summary
      steps:                              # one round, written as a pipeline's stages
        label: {type: collect, policy: "${policy}", world: "${world}"}
        rm:    {type: rm, model: "${sft}", dataset: "${labels_so_far}"}
        ppo:   {type: ppo, model: "${policy}", reward_model: "${rm}", dataset: "${world}/prompts_train.jsonl"}
        eval:  {type: eval, policies: {policy: "${ppo}"}, reference: "${policy}", reward_model: "${rm}",
                pairs: "${label}/gold_pairs.jsonl", prompts: "${world}/prompts_eval.jsonl", judge: "gold:${world}"}

Any stage type can be a step. Round K runs in OUT/round-K through the pipeline's own loop
(:func:`rlhfkit.pipeline.run_stages`), so a rerun skips a round's finished steps and an interrupted trainer
step continues from its checkpoints; ``--force NAME`` runs the stage again over its rounds, keeping their
finished steps (so a larger ``rounds`` adds rounds; delete OUT/round-K to redo one).

References in steps: a step before it (this round's folder), ``${policy}`` (round 1: ``policy``; then the
last round's ``next_policy`` folder), ``${round}`` (1..N), ``${labels_so_far}`` (OUT/round-K/labels_so_far.jsonl:
the ``accumulate`` files of rounds 1..K, each row with a ``round`` column added where it has none; rebuilt
before each step that reads it), ``${seed}`` (the round's), ``${previous.STEP}`` (the last round's STEP
folder; round 1 takes it from ``first: {STEP: PATH}``), and the pipeline's stages before this one and
``${output_dir}`` (a step's name shadows a stage's). All of it is checked before the pipeline's first stage.

Seeds: round K's steps run with the pipeline's seed + 1000*K: every round draws new samples and new
initialisations (one seed for all would repeat the same prompts and the same noise; round 1 is not the
pipeline's own seed either, which a collect stage before the loop used), and a rerun repeats them, since
they depend on the pipeline's seed alone. 1000 apart, so a step's own offsets (eval's +100, collect's +7..13,
``seed_offset: 1``) never reach the next round's.

Writes OUT/rounds.json (per round: the figures and every step's summary; rewritten after each round) and
prints the figures as one table, round by round; the HTML report shows both (:mod:`rlhfkit.report.rounds`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .data.jsonl import read_jsonl, write_jsonl
from .errors import ConfigError
from .pipeline import all_stage_types, check_stages, nested_stage, references, run_stages
from .stage import StageContext, StageFn, stage

__all__ = ["ROUNDS_FILE", "SEED_STRIDE", "format_rounds_table", "rounds_stage"]

ROUNDS_FILE = "rounds.json"
SO_FAR_FILE = "labels_so_far.jsonl"
SEED_STRIDE = 1000  # round K's seed: the pipeline's + SEED_STRIDE * K
LOCAL = ("policy", "round", "labels_so_far", "seed")
OPTIONS = ("rounds", "policy", "next_policy", "steps", "accumulate", "figures", "first")


def _steps(options: dict[str, Any]) -> dict[str, Any]:
    steps = options.get("steps")
    return steps if isinstance(steps, dict) else {}


def _local_refs(options: dict[str, Any]) -> set[str]:
    """The names a round resolves itself (the pipeline leaves them in ``steps``)."""
    steps = _steps(options)
    return {*LOCAL, *steps, *(f"previous.{name}" for name in steps)}


def _accumulated(options: dict[str, Any]) -> list[str]:
    files = options.get("accumulate") or []
    return [files] if isinstance(files, str) else list(files)


def _consumers(steps: dict[str, Any]) -> list[str]:
    """The steps that read ``${labels_so_far}``, in order."""
    return [name for name, opts in steps.items() if "labels_so_far" in references(opts)]


def _check(where: str, options: dict[str, Any], refs: set[str], types: dict[str, StageFn]) -> None:
    """Every option of a rounds stage, and its steps as a pipeline's stages, before anything runs."""
    n = options.get("rounds")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{where}: rounds must be a whole number >= 1 (got {n!r})")
    if not isinstance(options.get("policy"), str):
        raise ConfigError(f"{where}: option 'policy' (round 1's policy folder) is required")
    steps = options.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise ConfigError(f"{where}: 'steps' must be a non-empty mapping of step name -> options (as 'stages')")
    names = list(steps)
    nxt = options.get("next_policy")
    if nxt not in steps:
        raise ConfigError(f"{where}: next_policy must name the step whose folder is the next round's policy "
                          f"(got {nxt!r}; steps: {', '.join(names)})")
    first = options.get("first") or {}
    if not isinstance(first, dict) or not set(first) <= set(steps):
        raise ConfigError(f"{where}: 'first' must map step names to round 1's folders for ${{previous.STEP}} "
                          f"(got {first!r}; steps: {', '.join(names)})")
    for name in sorted(r.removeprefix("previous.") for r in references(steps) if r.startswith("previous.")):
        if name not in first:
            raise ConfigError(f"{where}: round 1 has no previous round for ${{previous.{name}}}: give "
                              f"first: {{{name}: PATH}}")
    files = _accumulated(options)
    consumers = _consumers(steps)
    if consumers and not files:
        raise ConfigError(f"{where}: step '{consumers[0]}' reads ${{labels_so_far}}, but 'accumulate' names no "
                          "files (e.g. accumulate: [label/ranked.jsonl])")
    before = names.index(consumers[0]) if consumers else len(names)
    for file in files:
        head = str(file).replace("\\", "/").split("/")[0]
        if not isinstance(file, str) or head not in names[:before]:
            raise ConfigError(f"{where}: accumulate: {file!r} must be a file in the folder of a step that runs "
                              f"before ${{labels_so_far}} is read (steps: {', '.join(names[:before]) or 'none'})")
    figures = options.get("figures") or {}
    if not isinstance(figures, dict):
        raise ConfigError(f"{where}: 'figures' must map a label to STEP.path.in.its.summary")
    for label, path in figures.items():
        parts = str(path).split(".")
        if len(parts) < 2 or parts[0] not in steps:
            raise ConfigError(f"{where}: figure '{label}': {path!r} must be STEP.key[.key...] with STEP one of "
                              f"{', '.join(names)}")
    outer = [r for r in refs if r not in steps]  # a step's name shadows the pipeline's stage of that name
    check_stages(f"{where}: ", steps, types, [*outer, *LOCAL, *(f"previous.{s}" for s in steps)], label="step")


nested_stage("rounds", "steps", _local_refs, _check)


def _write_so_far(out: Path, k: int, files: list[str], where: str) -> int:
    """Round ``k``'s labels_so_far.jsonl: the ``files`` of rounds 1..k in order (rows keep their content; a
    ``round`` column is added where a row has none: the loaders ignore columns they do not read)."""
    rows: list[dict[str, Any]] = []
    for r in range(1, k + 1):
        for file in files:
            path = out / f"round-{r}" / file
            if not path.is_file():
                raise ConfigError(f"{where}: accumulate: {path} not found (written by no step of round {r})")
            rows += [{**row, "round": row.get("round", r)} for row in read_jsonl(path)]
    target = out / f"round-{k}" / SO_FAR_FILE
    partial = target.with_name(target.name + ".partial")
    write_jsonl(partial, rows)
    os.replace(partial, target)  # a step never reads a half-written file, even after a kill
    return len(rows)


def _figure(results: dict[str, Any], label: str, path: str, where: str, k: int) -> Any:
    """The value at ``path`` (STEP.key...) in round ``k``'s step summaries: a number or null, never guessed."""
    value: Any = results
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(value, dict) or part not in value:
            held = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise ConfigError(f"{where}: figure '{label}': {path} not found after round {k} "
                              f"({'.'.join(parts[:i]) or 'the steps'} holds: {held or 'nothing'})")
        value = value[part]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{where}: figure '{label}': {path} is a {type(value).__name__}, not a number")
    return value


def format_rounds_table(labels: list[str], table: list[dict[str, Any]]) -> str:
    """The figures as text: a row per round, a column per figure."""
    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(label), *(len(cell(row.get(label))) for row in table)) for label in labels]
    lines = ["round  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, widths))]
    lines += [f"{row['round']:>5}  " + "  ".join(f"{cell(row.get(label)):>{w}}" for label, w in zip(labels, widths))
              for row in table]
    return "\n".join(lines)


@stage("rounds", options=OPTIONS)
def rounds_stage(ctx: StageContext) -> dict[str, Any]:
    """N rounds of ``steps``, each from the last round's ``next_policy`` (see the module's docstring).
    Summary: the figures, a list over rounds for each label, and the final policy's folder."""
    where = f"stage '{ctx.name}'"
    options = ctx.options
    n, steps, nxt = int(options["rounds"]), dict(options["steps"]), str(options["next_policy"])
    files, first = _accumulated(options), dict(options.get("first") or {})
    figures = {str(k): str(v) for k, v in (options.get("figures") or {}).items()}
    consumers = set(_consumers(steps))
    types = all_stage_types()
    out = ctx.output_dir
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"rounds": n, "policy": str(options["policy"]), "next_policy": nxt,
                              "figures": figures, "table": [], "per_round": []}
    policy, previous = str(options["policy"]), None
    for k in range(1, n + 1):
        folder, seed = out / f"round-{k}", ctx.seed + SEED_STRIDE * k
        refs = {"policy": policy, "round": str(k), "labels_so_far": str(folder / SO_FAR_FILE), "seed": str(seed)}
        refs.update({f"previous.{s}": str(previous / s) for s in steps} if previous else
                    {f"previous.{s}": str(path) for s, path in first.items()})
        counted: list[int] = []

        def before(name: str, k: int = k, counted: list[int] = counted) -> None:
            if name in consumers:
                counted.append(_write_so_far(out, k, files, where))

        print(f"{ctx.name}: round {k}/{n} (seed {seed}) from {policy}")
        results, _ = run_stages(steps, folder, refs, seed, ctx.defaults, types, before=before,
                                log=lambda line, k=k: print(f"  round {k}/{n} {line}"))
        if files and not counted:  # every reader was done before: the file is rewritten for the record
            counted.append(_write_so_far(out, k, files, where))
        values = {label: _figure(results, label, path, where, k) for label, path in figures.items()}
        record["table"].append({"round": k, **values})
        record["per_round"].append({"round": k, "seed": seed, "policy": policy, "folder": str(folder),
                                    "labels_so_far": counted[-1] if counted else None, "figures": values,
                                    "steps": results})
        record["done"] = k
        (out / ROUNDS_FILE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        policy, previous = str(folder / nxt), folder
    if figures:
        print(format_rounds_table(list(figures), record["table"]))
    return {"rounds": n, "final_policy": policy,
            "figures": {label: [row[label] for row in record["table"]] for label in figures}}
