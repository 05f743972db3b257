"""``rlhfkit grade``: multi-turn questions answered by each policy and graded 1-10 by a judge (MT-Bench style).

The questions are the user's own JSONL file (rlhfkit ships only a format example,
``examples/grading_questions.jsonl``): one row per question with ``id``, ``category``, ``turns`` (the user
messages, one or more) and optionally ``reference`` (a reference answer per turn; null for a turn without).

For every policy (one loaded at a time): turn 1 of every question is answered in one batched pass, then each
answer and the next user message are appended to the conversation (in the policy's chat template) and turn
2 is answered, and so on (:class:`rlhfkit.rollout.texts.TextSampler`, one generator seeded with ``--seed``
per policy). Every turn is then graded (:mod:`rlhfkit.judges.grading`): single-answer, or reference-guided
when ``--mode reference`` (every turn must have a reference) or ``--mode auto`` and that turn has one.

Outputs (``--output-dir``): ``grades.jsonl``, one line per policy, question and turn (question, answer,
score, the judge's reply, whether it was reference-guided), appended as grades come in, so a rerun of the
same command skips the questions already graded (a question with a missing turn is answered again from
turn 1, with new samples; an HTTP judge that stays down stops the run with a one-line error, and the rerun
goes on from there); ``grading.json``, per policy: overall mean with a bootstrap interval over questions (each
question's turns averaged first: the question is the resampling unit), the same per turn and per
category, ``n`` (grades counted) and ``parse_failures`` (judge replies without a readable grade: recorded
in grades.jsonl with score null and left out of every mean, never a crash).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.jsonl import json_kind, numbered_rows, read_jsonl, write_jsonl
from ..errors import ConfigError, DataError
from ..judges.base import JudgeReplyError
from ..judges.grading import GradingTemplates, build_grader
from ..judges.spec import JUDGE_SPECS
from ..models.loading import check_model_path
from ..rollout.generate import SamplingConfig
from .cli_options import OneLineParser, options_namespace, policies_of
from .stats import bootstrap_mean_ci

logger = logging.getLogger("rlhfkit")

__all__ = ["GradingQuestion", "QuestionsError", "build_parser", "format_grading_table", "grade_policies",
           "load_questions", "main", "summarize_grades"]

MODES = ("single", "reference", "auto")


class QuestionsError(DataError, ConfigError):
    """A bad question file: names the file, row and field (a DataError, and a ConfigError of the command)."""


@dataclass
class GradingQuestion:
    """One question of the file: its user messages and, per message, a reference answer or None."""

    id: str
    category: str
    turns: list[str]
    reference: list[str | None] | None
    row: int

    def reference_for(self, turn: int, mode: str) -> list[str | None] | None:
        """The references the judge sees when grading ``turn`` (1-based), or None for single-answer grading."""
        if mode == "single" or self.reference is None:
            return None
        if mode == "auto" and not (turn <= len(self.reference) and self.reference[turn - 1]):
            return None
        return self.reference


def load_questions(path: str | Path, mode: str = "auto") -> list[GradingQuestion]:
    """The questions of a JSONL file, checked; a bad row is a one-line error naming file, row and field."""
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"--questions {source}: no such file")
    questions: list[GradingQuestion] = []
    seen: set[str] = set()
    for row_no, row in numbered_rows(path):
        def bad(field: str, message: str, row_no: int = row_no) -> QuestionsError:
            return QuestionsError(message, source=source, row=row_no, field=field)

        qid = str(row.get("id", row_no))
        if qid in seen:
            raise bad("id", f"'{qid}' is used by an earlier row")
        seen.add(qid)
        category = row.get("category", "general")
        if not isinstance(category, str) or not category.strip():
            raise bad("category", f"expected a non-empty string, got {json_kind(category)}")
        if "turns" not in row:
            raise bad("turns", "missing (a list of user messages, one per turn)")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise bad("turns", f"expected a non-empty list of non-empty strings, got {json_kind(turns)}")
        reference = row.get("reference")
        if reference is not None:
            if isinstance(reference, str):
                reference = [reference]
            if not isinstance(reference, list) or not all(r is None or isinstance(r, str) for r in reference):
                raise bad("reference", f"expected a list of strings (one per turn, null for none), got "
                                       f"{json_kind(reference)}")
            if len(reference) > len(turns):
                raise bad("reference", f"{len(reference)} references for {len(turns)} turns")
        if mode == "reference":
            missing = [i + 1 for i in range(len(turns)) if not (reference and i < len(reference) and reference[i])]
            if missing:
                raise bad("reference", f"--mode reference needs a reference for every turn; none for turn "
                                       f"{', '.join(map(str, missing))} (use --mode auto)")
        questions.append(GradingQuestion(qid, category.strip(), [str(t) for t in turns], reference, row_no))
    if not questions:
        raise ConfigError(f"--questions {source}: no questions in the file")
    return questions


def _conversation(question: GradingQuestion, answers: list[str], turn: int) -> list[dict[str, str]]:
    """The chat messages that turn ``turn`` (0-based) of a question is answered after."""
    messages: list[dict[str, str]] = []
    for i in range(turn):
        messages += [{"role": "user", "content": question.turns[i]}, {"role": "assistant", "content": answers[i]}]
    return messages + [{"role": "user", "content": question.turns[turn]}]


def _answer_all(sampler: Any, questions: Sequence[GradingQuestion], seed: int) -> list[list[str]]:
    """Every turn of every question answered, turn by turn, each batch continuing the conversations."""
    generator = torch.Generator().manual_seed(int(seed))
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        rows = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        texts = sampler.sample([_conversation(questions[i], answers[i], turn) for i in rows], 1, generator)
        for i, samples in zip(rows, texts):
            answers[i].append(samples[0])
    return answers


def _grade_one(grader: Any, policy: str, question: GradingQuestion, answers: list[str], turn: int,
               mode: str) -> dict[str, Any]:
    reference = question.reference_for(turn, mode)
    line = {"policy": policy, "id": question.id, "category": question.category, "turn": turn,
            "mode": "single" if reference is None else "reference", "question": question.turns[turn - 1],
            "answer": answers[turn - 1]}
    try:
        score, reply = grader.grade(question.turns, answers, turn, reference)
        return {**line, "score": float(score), "judge_reply": reply, "parse_failure": False}
    except JudgeReplyError as exc:
        logger.warning("policy %s, question %s, turn %d: %s", policy, question.id, turn, exc)
        return {**line, "score": None, "judge_reply": getattr(exc, "reply", "") or str(exc), "parse_failure": True}


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A rerun into a folder must use the same settings (else its old grades would mix with new ones)."""
    path = out / "grading_settings.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise ConfigError(f"{out} holds grades made with other settings ({', '.join(changed)} differ): use "
                              "another --output-dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2), encoding="utf-8")


def grade_policies(policies: dict[str, str], questions: list[GradingQuestion], grader: Any, *, mode: str = "auto",
                   temperature: float = 0.7, max_new_tokens: int = 512, seed: int = 0, batch_size: int = 8,
                   max_prompt_length: int = 2048, workers: int = 1, device: str | None = None,
                   output_dir: str | Path | None = None, settings: dict[str, Any] | None = None) -> list[dict]:
    """Answer and grade every turn of every question with each policy; the grade lines (also in
    ``output_dir/grades.jsonl``, resumed from there)."""
    from ..rollout.texts import TextSampler

    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    out = Path(output_dir) if output_dir is not None else None
    done: dict[tuple[str, str, int], dict] = {}
    if out is not None:
        _check_settings(out, settings or {})
        if (out / "grades.jsonl").is_file():  # keep the questions graded in full; the others start again
            old = {(r["policy"], r["id"], r["turn"]): r for r in read_jsonl(out / "grades.jsonl")}
            full = {(p, q.id) for p in policies for q in questions
                    if all((p, q.id, t) in old for t in range(1, len(q.turns) + 1))}
            done = {k: r for k, r in old.items() if (k[0], k[1]) in full}
            write_jsonl(out / "grades.jsonl", done.values())
    lines: list[dict] = []
    for name, path in policies.items():
        todo = [q for q in questions if (name, q.id, 1) not in done]
        lines += [done[(name, q.id, t)] for q in questions if (name, q.id, 1) in done
                  for t in range(1, len(q.turns) + 1)]
        if not todo:
            logger.info("policy %s: every question already graded in %s", name, out)
            continue
        sampler = TextSampler(path, SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens),
                              max_prompt_length=max_prompt_length, batch_size=batch_size, device=device)
        if max(len(q.turns) for q in todo) > 1 and not getattr(sampler.tokenizer, "chat_template", None):
            raise ConfigError(f"--policy {name}={path}: the tokenizer has no chat template, which multi-turn "
                              "questions need (to append each answer and the next question)")
        limit = getattr(sampler.model.config, "max_position_embeddings", None)
        if limit:  # room for the answer within the model's positions
            sampler.max_prompt_length = max(1, min(sampler.max_prompt_length, limit - max_new_tokens))
        logger.info("policy %s: answering %d questions", name, len(todo))
        answers = _answer_all(sampler, todo, seed)
        del sampler
        gc.collect()
        tasks = [(q, a, t) for q, a in zip(todo, answers) for t in range(1, len(q.turns) + 1)]
        logger.info("policy %s: grading %d answers with %s", name, len(tasks), getattr(grader, "name", "judge"))
        with ThreadPoolExecutor(max(1, int(workers))) as pool:
            for line in pool.map(lambda task, name=name: _grade_one(grader, name, *task, mode), tasks):
                lines.append(line)
                if out is not None:
                    with (out / "grades.jsonl").open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return lines


def _stat(per_question: list[float], n: int, failures: int, n_boot: int, confidence: float,
          seed: int) -> dict[str, Any]:
    if not per_question:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": n, "questions": 0, "parse_failures": failures}
    mean, low, high = bootstrap_mean_ci(np.asarray(per_question), n_boot=n_boot, confidence=confidence, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n, "questions": len(per_question),
            "parse_failures": failures}


def summarize_grades(lines: Sequence[dict], n_boot: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Per policy: overall, per-turn and per-category means with bootstrap intervals over questions."""
    policies: dict[str, Any] = {}
    for name in dict.fromkeys(r["policy"] for r in lines):
        rows = [r for r in lines if r["policy"] == name]

        def group(selected: list[dict]) -> dict[str, Any]:
            by_question: dict[str, list[float]] = {}
            for r in selected:
                if r["score"] is not None:
                    by_question.setdefault(r["id"], []).append(float(r["score"]))
            means = [float(np.mean(v)) for v in by_question.values()]
            return _stat(means, sum(len(v) for v in by_question.values()),
                         sum(bool(r["parse_failure"]) for r in selected), n_boot, confidence, seed)

        turns = sorted({int(r["turn"]) for r in rows})
        categories = sorted({r["category"] for r in rows})
        policies[name] = {
            "overall": group(rows),
            "turns": {str(t): group([r for r in rows if int(r["turn"]) == t]) for t in turns},
            "categories": {c: group([r for r in rows if r["category"] == c]) for c in categories},
            "parse_failures": sum(bool(r["parse_failure"]) for r in rows),
        }
    return {"policies": policies, "confidence": confidence, "n_boot": n_boot}


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.2f} [{stat['ci_low']:.2f}, {stat['ci_high']:.2f}]"


def format_grading_table(report: dict[str, Any]) -> str:
    """One table, policies × categories (then each turn and overall): mean [CI] per cell."""
    raw = report.get("scale") is None
    what = ("score (the judge's raw score, not a 1-10 grade)" if raw
            else f"grade 1-{report['scale']}")
    conf = round(100 * report.get("confidence", 0.95))
    policies = report["policies"]
    categories = sorted({c for p in policies.values() for c in p["categories"]})
    turns = sorted({t for p in policies.values() for t in p["turns"]}, key=int)
    header = ["policy", *categories, *(f"turn {t}" for t in turns), "overall", "failed"]
    body = []
    for name, p in policies.items():
        body.append([name, *(_cell(p["categories"][c]) if c in p["categories"] else "-" for c in categories),
                     *(_cell(p["turns"][t]) if t in p["turns"] else "-" for t in turns), _cell(p["overall"]),
                     str(p["parse_failures"])])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"{what} by judge {report.get('judge', '?')}, mode {report.get('mode', '?')}: mean [{conf}% CI] "
             "over questions", fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*row) for row in body]
    failed = sum(p["parse_failures"] for p in policies.values())
    if failed:
        lines.append(f"{failed} judge repl{'y' if failed == 1 else 'ies'} had no readable grade: left out of the "
                     "means (see grades.jsonl, parse_failure)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="rlhfkit grade", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Answer your multi-turn questions with each policy and grade every answer 1-10 "
                                   "with a judge (single-answer or reference-guided): means with bootstrap "
                                   "intervals per category and turn. Resumable with the same --output-dir.")
    p.add_argument("--policy", action="append", help="NAME=PATH (repeatable; at least one)")
    p.add_argument("--questions", required=True, help="JSONL: id, category, turns (user messages), optional "
                   "reference (one per turn); see examples/grading_questions.jsonl")
    p.add_argument("--judge", required=True, help="openai[:MODEL] (writes 'Rating: [[N]]'), lm:PATH (expected "
                   f"grade from its grade-token probabilities), or a scoring judge, raw scores: {JUDGE_SPECS}")
    p.add_argument("--mode", default="auto", choices=MODES, help="reference: every turn reference-guided; auto: "
                   "the turns that have a reference")
    p.add_argument("--templates", help="folder with your own copies of the grading templates (grade_*.txt)")
    p.add_argument("--temperature", type=float, default=0.7, help="policies' sampling temperature (> 0)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=2048, help="longest conversation in tokens (keeps its "
                   "end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    p.add_argument("--workers", type=int, default=1, help="answers graded concurrently (HTTP judges)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL (default $RLHFKIT_JUDGE_BASE_URL or "
                   "$OPENAI_BASE_URL)")
    p.add_argument("--rate", type=float, default=0.0, help="HTTP judges: at most this many requests/s (0 = off)")
    p.add_argument("--device", default=None, help="policies and local judge (default: cuda when available)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--output-dir", help="write grades.jsonl and grading.json here (and resume from them)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit grade``: answer, grade, write the files, print the table."""
    report = grade_from_options(vars(build_parser().parse_args(list(argv) if argv is not None else None)))
    print(format_grading_table(report))
    return 0


def grade_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The grading report for a mapping of ``rlhfkit grade`` options (underscored names, the flags' defaults
    fill in the rest; ``policy`` a list of NAME=PATH, or ``policies`` a {name: path} mapping), written to
    ``output_dir`` when given: the CLI and the pipeline's grade stage both run this."""
    options = dict(options)
    stage_policies = options.pop("policies", None)
    a = options_namespace(build_parser(), options)
    policies = policies_of(stage_policies, a.policy)
    for name, path in policies.items():
        check_model_path(path, f"--policy {name}")
    questions = load_questions(a.questions, a.mode)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grader = build_grader(a.judge, templates=GradingTemplates.load(a.templates), device=device,
                          base_url=a.base_url, rate=a.rate)
    settings = {"policies": policies, "questions": str(Path(a.questions).resolve()), "judge": a.judge,
                "mode": a.mode, "templates": a.templates, "temperature": a.temperature,
                "max_new_tokens": a.max_new_tokens, "max_prompt_length": a.max_prompt_length, "seed": a.seed}
    lines = grade_policies(policies, questions, grader, mode=a.mode, temperature=a.temperature,
                           max_new_tokens=a.max_new_tokens, seed=a.seed, batch_size=a.batch_size,
                           max_prompt_length=a.max_prompt_length, workers=a.workers, device=device,
                           output_dir=a.output_dir, settings=settings)
    report = {"judge": getattr(grader, "name", a.judge), "scale": getattr(grader, "scale", None), "mode": a.mode,
              "questions": a.questions, **summarize_grades(lines, a.n_boot, a.confidence, a.seed),
              "settings": settings}
    if a.output_dir:
        (Path(a.output_dir) / "grading.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
