"""``rlhfkit label <command>``: init, add-labeller, user, import, generate, settings, serve, agreement, export,
merge, human-eval, migrate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, DataError

logger = logging.getLogger("rlhfkit")

USAGE = """usage: rlhfkit label <command> --db DB [options]

commands:
  init           create / migrate the database and an admin; prints the admin's token (once)
  add-labeller   create a labeller (or --admin) and print their token (once)
  user           user add NAME [--role labeller|reviewer|admin]: create a user, print their token (once);
                 user rotate NAME: new token (printed once; the old one and NAME's sessions stop at once);
                 user disable NAME / user enable NAME: refuse / allow NAME's tokens and sessions
  import         add items from a JSONL file (prompt, responses [2..16], optional gold = index of the best)
  generate       sample candidate responses from a policy checkpoint and add them as items
  settings       show a project's settings, or change them: --min-critique-chars, --fast-seconds, --hold-minutes
                 (import and generate take them too)
  serve          run the web app (FastAPI + uvicorn)
  agreement      print agreement statistics (Krippendorff, Cohen, Fleiss, % agreement) as JSON
  export         write preference pairs (for rlhfkit rm / dpo), SFT rows from rewrites, or raw labels
  merge          the judge's confident pairs and the app's human labels of the routed ones, one row per pair
                 with its source (rlhfkit judge --route-threshold; see rlhfkit.label.merge)
  human-eval     per-policy win rate vs a baseline, Likert mean, success rate (bootstrap CIs over items) and
                 agreement, from items whose import rows name each response's policy ('policies': [...]);
                 --ai-eval DIR sets an 'rlhfkit eval' run beside it, with Cohen's kappa; writes human_eval.json
  migrate        bring the database schema up to date (serve and every command also do this)

--db takes a SQLite file path (created when missing) or a SQLAlchemy URL (postgresql+psycopg://...)."""


def _project_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None,
                   help="comma-separated task types: pairwise, ranking, binary, likert, critique (new project: "
                        "pairwise)")
    p.add_argument("--overlap", type=int, default=None, help="labellers per item, R (new project: 3)")
    p.add_argument("--guidelines", default=None, help="Markdown file of labelling guidelines")
    _setting_opts(p)


def _setting(text: str) -> float | None:
    """A setting's value on the command line: a number, or 'default' (None: back to the default)."""
    if text == "default":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'default', got {text!r}") from None


def _setting_opts(p: argparse.ArgumentParser) -> None:
    """The per-project settings (:mod:`.rules`); one left out stays as it is (a new project: the default)."""
    p.add_argument("--min-critique-chars", type=int, default=argparse.SUPPRESS,
                   help="shortest critique accepted (characters, whitespace at the ends not counted; default 1)")
    p.add_argument("--fast-seconds", type=_setting, default=argparse.SUPPRESS,
                   help="the review page calls a label made faster than this 'very fast' (seconds; 'default': 2)")
    p.add_argument("--hold-minutes", type=_setting, default=argparse.SUPPRESS,
                   help="an item assigned but not labelled for this long goes to the next labeller ('default': "
                        "serve's --hold-minutes)")


def _settings(a) -> dict:
    """The settings given on the command line, checked before anything is stored."""
    from .rules import CHECKS, checked

    return checked({name: getattr(a, name) for name in CHECKS if hasattr(a, name)})


def _project_args(a) -> dict:
    from .text import check_text

    guidelines = None
    if a.guidelines:
        if not Path(a.guidelines).exists():
            raise ConfigError(f"{a.guidelines}: guidelines file not found")
        try:
            guidelines = Path(a.guidelines).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 ({exc.reason})", source=a.guidelines) from None
        check_text(guidelines, "guidelines", source=a.guidelines)
    tasks = a.tasks.split(",") if a.tasks else None
    return {"tasks": tasks, "overlap": a.overlap, "guidelines": guidelines}


def _read_prompts(path: str) -> list[str]:
    from .service import jsonl_lines
    from .text import check_text

    prompts = []
    for n, line in jsonl_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", source=path, row=n) from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError("expected a non-empty string", source=path, row=n, field="prompt")
        prompts.append(check_text(prompt, "prompt", source=path, row=n))
    if not prompts:
        raise DataError("no prompts", source=path)
    return prompts


def generate_items(model: str, prompts: list[str], num_samples: int, temperature: float, max_new_tokens: int,
                   seed: int) -> tuple[list[dict], dict[str, int]]:
    """Candidates from a policy (rlhfkit's own HF generation); duplicates and empty responses dropped and
    counted, prompts left with fewer than two distinct responses skipped and counted."""
    from ..rollout.texts import sample_responses

    samples = sample_responses(model, prompts, num_samples, temperature, max_new_tokens, seed)
    items, counts = [], {"dropped_empty_or_duplicate": 0, "skipped_prompts": 0}
    for prompt, responses in zip(prompts, samples):
        distinct = list(dict.fromkeys(r for r in responses if r.strip()))
        counts["dropped_empty_or_duplicate"] += len(responses) - len(distinct)
        if len(distinct) < 2:
            counts["skipped_prompts"] += 1
            continue
        items.append({"prompt": prompt, "responses": distinct, "gold": None,
                      "meta": {"source": "generate", "model": str(model)}})
    return items, counts


def export_path(out: str, project: str, kind: str) -> Path:
    """``--out`` as a file path: an existing folder, or a path ending in a separator, gets a default name."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        return path / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', project).strip('.') or 'project'}_{kind}.jsonl"
    return path


def write_rows(path: Path, rows: list[dict]) -> int:
    """:func:`write_jsonl`, with a one-line error instead of a traceback and no ``.tmp`` left behind."""
    from ..data.jsonl import write_jsonl

    tmp = path.with_name(path.name + ".tmp")
    try:
        return write_jsonl(path, rows)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the export ({exc.strerror or exc})") from None
    finally:
        if tmp.is_file():
            tmp.unlink()


def main(argv: Sequence[str]) -> int:
    from .service import LabelError

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "human-eval":  # its own flags and checks (a missing --db file is an error, not created)
        from .human_eval import main as human_eval_main

        return human_eval_main(rest)
    p = argparse.ArgumentParser(prog=f"rlhfkit label {command}",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--db", default="labels.db", help="SQLite file or SQLAlchemy URL")
    if command == "init":
        p.add_argument("--admin", default="admin", help="name of the admin to create")
    elif command == "add-labeller":
        p.add_argument("name")
        p.add_argument("--admin", action="store_true", help="create an admin instead")
    elif command == "user":
        p.add_argument("action", choices=["add", "rotate", "disable", "enable"])
        p.add_argument("name")
        p.add_argument("--role", choices=["labeller", "reviewer", "admin"], default="labeller",
                       help="user add: the new user's role (reviewers see every project's review pages)")
    elif command == "import":
        p.add_argument("file", help="JSONL: prompt, responses (2..16 strings), optional gold (index of the best)")
        p.add_argument("--project", required=True)
        _project_opts(p)
    elif command == "generate":
        p.add_argument("--project", required=True)
        p.add_argument("--model", required=True, help="policy checkpoint (folder or hub id)")
        p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' string per row")
        p.add_argument("--num-samples", type=int, default=4)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--max-new-tokens", type=int, default=48)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None, help="also write the items as JSONL here")
        _project_opts(p)
    elif command == "settings":
        p.add_argument("--project", required=True)
        _setting_opts(p)
    elif command == "serve":
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--max-body", type=int, default=256 * 1024, help="request body limit in bytes")
        p.add_argument("--max-import", type=int, default=20 * 1024 * 1024, help="import request limit in bytes")
        p.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (behind HTTPS)")
        p.add_argument("--session-hours", type=float, default=12.0,
                       help="browser session lifetime after login (log out ends it at once)")
        p.add_argument("--hold-minutes", type=float, default=30.0,
                       help="an item assigned but not labelled for this long goes to the next labeller (projects "
                            "without their own setting: see 'settings')")
        p.add_argument("--log-level", default="warning")
        p.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                       help="SQLite: NORMAL survives a server crash / kill; FULL also power loss (slower)")
    elif command == "agreement":
        p.add_argument("--project", required=True)
        p.add_argument("--min-agreement", type=float, default=0.5)
        p.add_argument("--min-gold-accuracy", type=float, default=0.6)
    elif command == "export":
        p.add_argument("--project", required=True)
        p.add_argument("--out", required=True,
                       help="JSONL file to write (atomically); an existing folder (or a path ending in '/') gets "
                            "PROJECT_KIND.jsonl inside it")
        p.add_argument("--kind", choices=["pairs", "sft", "kto", "labels"], default="pairs",
                       help="pairs (rm, dpo), sft (rewrites), kto (binary accept/reject: prompt/completion/label) "
                       "or labels (raw)")
        p.add_argument("--aggregate", choices=["majority", "soft"], default="majority")
        p.add_argument("--ties", choices=["drop", "keep"], default="drop")
        p.add_argument("--tasks", default="pairwise,ranking",
                       help="label types that give preference votes: pairwise, ranking, likert, binary")
        p.add_argument("--exclude-gold", action="store_true", help="leave gold items out of the pairs / KTO rows")
    elif command == "merge":
        p.add_argument("--project", required=True, help="the app project the routed pairs were posted to")
        p.add_argument("--judge-labels", required=True, help="rlhfkit judge's --out (the confident pairs)")
        p.add_argument("--routed", required=True, help="OUT.routed.jsonl (the pairs sent to the app)")
        p.add_argument("--out", required=True, help="merged JSONL (summary beside it: .summary.json)")
        p.add_argument("--aggregate", choices=["majority", "soft"], default="majority")
        p.add_argument("--pending-out", default=None, help="also list the pairs still waiting for a label (or tied)")
    elif command == "migrate":
        pass
    else:
        print(f"rlhfkit label: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    a = p.parse_args(rest)
    try:
        return _run(command, a)
    except LabelError as exc:
        raise ConfigError(exc.detail) from None


def _run(command: str, a) -> int:
    from . import service
    from .db import Database
    from .projects import set_settings

    db = Database(a.db, synchronous=getattr(a, "synchronous", "NORMAL"))
    if command == "migrate":
        from .db import schema_version

        print(f"schema version {schema_version(db.engine)}")
    elif command in ("init", "add-labeller"):
        role = "admin" if command == "init" or a.admin else "labeller"
        name = a.admin if command == "init" else a.name
        user, token = service.create_user(db, name, role)
        print(f"{role} '{user.name}' created; token (shown once, stored hashed):\n{token}")
    elif command == "user":
        from . import accounts

        if a.action == "add":
            user, token = service.create_user(db, a.name, a.role)
            print(f"{a.role} '{user.name}' created; token (shown once, stored hashed):\n{token}")
        elif a.action == "rotate":
            user, token = accounts.rotate_token(db, name=a.name)
            print(f"new token for '{user.name}' (shown once; the old token and their sessions no longer work):"
                  f"\n{token}")
        else:
            user = accounts.set_active(db, a.action == "enable", name=a.name)
            print(f"user '{user.name}' {a.action}d" + ("" if user.active else
                                                      " (their tokens and sessions are refused from now on)"))
    elif command == "import":
        settings = _settings(a)
        items = service.read_items(a.file)
        project, added, skipped = service.import_items(db, a.project, items, **_project_args(a))
        set_settings(db, project.id, settings)
        print(f"project '{project.name}' (id {project.id}): {added} items added, {skipped} duplicates skipped "
              f"({sum(it['gold'] is not None for it in items)} gold rows in the file)")
    elif command == "generate":
        settings = _settings(a)
        prompts = _read_prompts(a.prompts)
        items, counts = generate_items(a.model, prompts, a.num_samples, a.temperature, a.max_new_tokens, a.seed)
        if not items:
            raise DataError("no prompt got two distinct non-empty responses", source=a.prompts)
        if a.out:
            from ..data.jsonl import write_jsonl

            write_jsonl(a.out, ({"prompt": it["prompt"], "responses": it["responses"]} for it in items))
        project, added, skipped = service.import_items(db, a.project, items, **_project_args(a))
        set_settings(db, project.id, settings)
        print(f"project '{project.name}' (id {project.id}): {added} items added, {skipped} duplicates skipped "
              f"from {len(prompts)} prompts; "
              f"{counts['dropped_empty_or_duplicate']} empty/duplicate responses dropped, "
              f"{counts['skipped_prompts']} prompts skipped (<2 distinct responses)")
    elif command == "settings":
        settings = _settings(a)
        with db.session() as s:
            project = service.project_by_name(s, a.project)
        values = set_settings(db, project.id, settings)
        print(json.dumps({"project": project.name, **values}))  # hold_minutes null: serve's --hold-minutes
    elif command == "serve":
        import uvicorn

        from .rules import MAX_HOLD_MINUTES
        from .web import create_app

        if a.session_hours <= 0:
            raise ConfigError(f"--session-hours must be positive, got {a.session_hours}")
        if not 0 < a.hold_minutes <= MAX_HOLD_MINUTES:
            raise ConfigError(f"--hold-minutes must be above 0 and at most {MAX_HOLD_MINUTES:g}, got {a.hold_minutes}")
        app = create_app(db, max_body=a.max_body, max_import=a.max_import, secure_cookies=a.secure_cookies,
                         session_hours=a.session_hours, hold_minutes=a.hold_minutes)
        print(f"rlhfkit label: serving {a.db} on http://{a.host}:{a.port}", flush=True)
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    elif command == "agreement":
        from .agreement import project_agreement
        from .export import stored_labels

        with db.session() as s:
            project = service.project_by_name(s, a.project)
        result = project_agreement(stored_labels(db, project.id), a.min_agreement, a.min_gold_accuracy)
        result["labellers"] = {str(k): v for k, v in result["labellers"].items()}
        print(json.dumps(result, indent=2, default=str))
    elif command == "export":
        from . import export

        with db.session() as s:
            project = service.project_by_name(s, a.project)
        if a.kind == "pairs":
            rows = export.preference_rows(db, project.id, a.aggregate, a.ties, a.tasks.split(","),
                                          include_gold=not a.exclude_gold)
        elif a.kind == "sft":
            rows = export.sft_rows(db, project.id)
        elif a.kind == "kto":
            rows = export.kto_rows(db, project.id, include_gold=not a.exclude_gold)
        else:
            rows = export.stored_labels(db, project.id)
        out = export_path(a.out, project.name, a.kind)
        n = write_rows(out, export.check_rows(rows, str(out)))
        print(f"{n} {a.kind} rows written to {out}")
    elif command == "merge":
        from .merge import merge_labels

        summary = merge_labels(a.judge_labels, a.routed, db, a.project, a.out, a.aggregate, a.pending_out)
        print(json.dumps(summary, indent=2))
    return 0
