"""``rlhfkit judge``: label candidate responses with an AI judge into the preference format of the trainers.

Input rows (JSONL, JSON, parquet, CSV or a dataset folder), one of:

* ``prompt`` + ``responses`` (a list): every pair i < j is judged;
* ``prompt`` + ``response_a`` + ``response_b``;
* ``prompt`` + ``chosen`` + ``rejected``: re-judged; shown as a/b in an order that alternates by row, and the
  input's own preference is the reference label.

Reference labels, when present, give agreement (accuracy and Cohen's kappa, scikit-learn): a ``label`` or
``gold`` column, ``"a"``/``"b"`` (or 0/1, the index of the better response) for pair rows; for ``responses``
rows a list of scores (higher is better) or the index of the best response.

Output (``--out``): one ``{"prompt", "chosen", "rejected", "source_row"}`` line per labelled pair (plus
``margin`` = ``margin_scale * |logit p|`` and ``label`` = P(chosen better) with ``soft=True``), which
``rlhfkit rm`` / ``rlhfkit dpo`` read unchanged. Pairs the judge could not label (no verdict after the retries,
or a tie) go to ``OUT.unlabelled.jsonl`` with the reason, and are counted and logged. Never dropped silently.

Resuming: rows are written in input order; after each row the output sizes and the row's verdicts are
appended to ``OUT.progress.jsonl``. A rerun of the same command truncates the outputs to the last journalled
sizes and continues with the next row, so an interrupted run (Ctrl-C, a crash, a dead server) finishes with
exactly the files of an uninterrupted one: no row labelled twice, none lost. ``restart=True`` starts over.

Routing (``--route-threshold``): confident pairs to ``--out``, the others to the labelling app
(:mod:`.routing`); the journal keeps every verdict's ``confidence`` and ``orders_agree`` either way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .base import JudgeReplyError, PairwiseJudge, PositionStats, ScoringJudge, Verdict
from .routing import add_route_flags, route_paths, router_from_flags, verdict_confidence

logger = logging.getLogger("rlhfkit")

__all__ = ["label_file", "label_rows", "main", "pairs_of_row", "sidecar_paths"]

JOURNAL_VERSION = 1
_P_CLIP = 1e-6


def sidecar_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {"unlabelled": out.with_name(out.name + ".unlabelled.jsonl"),
            "progress": out.with_name(out.name + ".progress.jsonl"),
            "summary": out.with_name(out.name + ".summary.json")}


def _ref_pair(value: Any, source: str, rownum: int, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("a", "response_a", "0"):
            return "a"
        if v in ("b", "response_b", "1"):
            return "b"
        if v in ("tie", "", "none"):
            return None
    elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return "ab"[value]
    raise DataError(f"expected 'a' or 'b' (or 0/1, the index of the better response), got {value!r}",
                    source=source, row=rownum, field=field)


def pairs_of_row(row: Mapping[str, Any], index: int, source: str, rownum: int) -> list[dict[str, Any]]:
    """The pairs to judge in one input row: ``[{"a", "b", "ref"}]`` (ref: 'a', 'b' or None)."""
    if row.get("prompt") is None:
        raise DataError("missing prompt", source=source, row=rownum, field="prompt")
    ref_field = next((f for f in ("label", "gold") if row.get(f) is not None), None)
    ref_value = row.get(ref_field) if ref_field else None
    if row.get("response_a") is not None or row.get("response_b") is not None:
        for f in ("response_a", "response_b"):
            if row.get(f) is None:
                raise DataError("missing response", source=source, row=rownum, field=f)
        return [{"a": row["response_a"], "b": row["response_b"], "ref": _ref_pair(ref_value, source, rownum,
                                                                                  ref_field or "label")}]
    if row.get("chosen") is not None or row.get("rejected") is not None:
        for f in ("chosen", "rejected"):
            if row.get(f) is None:
                raise DataError("missing response", source=source, row=rownum, field=f)
        if index % 2 == 0:
            return [{"a": row["chosen"], "b": row["rejected"], "ref": "a"}]
        return [{"a": row["rejected"], "b": row["chosen"], "ref": "b"}]
    responses = row.get("responses")
    if responses is None:
        raise DataError("expected responses (a list), response_a/response_b or chosen/rejected", source=source,
                        row=rownum, field="responses")
    if not isinstance(responses, list):
        raise DataError(f"expected a list of responses, got {type(responses).__name__}", source=source, row=rownum,
                        field="responses")
    if len(responses) < 2:  # nothing to compare: counted and left out (label_rows), as training data does
        return []
    scores: list[float] | None = None
    best: int | None = None
    if isinstance(ref_value, list):
        if len(ref_value) != len(responses) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                       for s in ref_value):
            raise DataError(f"expected {len(responses)} numbers (one score per response)", source=source,
                            row=rownum, field=ref_field)
        scores = [float(s) for s in ref_value]
    elif ref_value is not None:
        if isinstance(ref_value, bool) or not isinstance(ref_value, int) or not 0 <= ref_value < len(responses):
            raise DataError(f"expected the index of the best response (0..{len(responses) - 1}) or a list of "
                            f"scores, got {ref_value!r}", source=source, row=rownum, field=ref_field)
        best = ref_value
    pairs = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            ref = None
            if scores is not None and scores[i] != scores[j]:
                ref = "a" if scores[i] > scores[j] else "b"
            elif best is not None and best in (i, j):
                ref = "a" if best == i else "b"
            pairs.append({"a": responses[i], "b": responses[j], "ref": ref})
    return pairs


def _result(verdict: Verdict) -> dict[str, Any]:
    """A verdict as the journal keeps it, with its confidence (:func:`.routing.verdict_confidence`)."""
    return {"status": "tie" if verdict.winner is None else "labelled", **verdict.as_dict(),
            **verdict_confidence(verdict.p_a, verdict.consistent), "winner": verdict.winner}


def _judge_row(judge: PairwiseJudge, prompt: Any, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for pair in pairs:
        try:
            verdict = judge.compare(prompt, pair["a"], pair["b"])
        except JudgeReplyError as exc:
            results.append({"status": "unlabelled", "reason": str(exc)})
            continue
        results.append(_result(verdict))
    return results


# Rows a scoring judge labels per batched call (a reward model scores them in one forward, not one per pair).
SCORE_BATCH_ROWS = 64


def _scores_in_batches(judge: PairwiseJudge) -> bool:
    """True for judges whose verdicts come from scores alone (reward models, gold, functions), which can be
    scored many rows at a time; not for judges that override compare (an HTTP judge asked pairwise)."""
    return isinstance(judge, ScoringJudge) and type(judge).compare is ScoringJudge.compare


def _judge_rows(judge: PairwiseJudge, prompts: list[Any], tasks: list[list[dict[str, Any]]]) -> list[list[dict]]:
    """``_judge_row`` for several rows: one score_many call for a batchable scoring judge, else row by row."""
    if not _scores_in_batches(judge) or len(prompts) == 1:
        return [_judge_row(judge, p, t) for p, t in zip(prompts, tasks)]
    assert isinstance(judge, ScoringJudge)
    flat = [(p, pair) for p, pairs in zip(prompts, tasks) for pair in pairs]
    if not flat:  # rows with fewer than two responses only
        return [[] for _ in tasks]
    try:
        scores = judge.score_many([p for p, _ in flat for _ in (0, 1)],
                                  [x for _, pair in flat for x in (pair["a"], pair["b"])])
    except JudgeReplyError:  # find the rows at fault one by one
        return [_judge_row(judge, p, t) for p, t in zip(prompts, tasks)]
    out: list[list[dict]] = []
    k = 0
    for pairs in tasks:
        results = []
        for _ in pairs:
            try:
                results.append(_result(judge.verdict(scores[2 * k], scores[2 * k + 1])))
            except JudgeReplyError as exc:
                results.append({"status": "unlabelled", "reason": str(exc)})
            k += 1
        out.append(results)
    return out


def _fingerprint(input_path: str, judge_name: str, soft: bool, margin_scale: float, limit: int = 0) -> str:
    digest = hashlib.sha256()
    path = Path(input_path)
    if path.is_file():
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(str(input_path).encode())
    digest.update(json.dumps([judge_name, soft, margin_scale] + ([limit] if limit else [])).encode())
    return digest.hexdigest()


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """(header, row entries, byte length of the valid part); a torn last line is ignored."""
    if not path.exists():
        return None, [], 0
    header, entries, valid = None, [], 0
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                item = json.loads(line)
            except ValueError:
                break
            if header is None:
                header = item
            else:
                entries.append(item)
            valid += len(line)
    return header, entries, valid


def _truncate(path: Path, size: int) -> None:
    if not path.exists():
        if size:
            raise ConfigError(f"{path}: missing, but the progress file says it holds {size} bytes; rerun with "
                              "--restart")
        path.touch()
        return
    if path.stat().st_size < size:
        raise ConfigError(f"{path}: shorter than the progress file says ({path.stat().st_size} < {size} bytes); "
                          "rerun with --restart")
    with path.open("r+b") as fh:
        fh.truncate(size)


def _output_lines(prompt: Any, pairs: list[dict[str, Any]], results: list[dict[str, Any]], rownum: int,
                  soft: bool, margin_scale: float, with_confidence: bool = False) -> tuple[list[str], list[str]]:
    out, skipped = [], []
    for k, (pair, result) in enumerate(zip(pairs, results)):
        sure = {f: result[f] for f in ("confidence", "orders_agree") if with_confidence and f in result}
        if result["status"] != "labelled":
            reason = result.get("reason") or "tie: the judge preferred neither response over both orders"
            skipped.append(json.dumps({"source_row": rownum, "pair": k, "prompt": prompt, "response_a": pair["a"],
                                       "response_b": pair["b"], "reason": reason, **sure}, ensure_ascii=False))
            continue
        a_wins = result["winner"] == "a"
        record = {"prompt": prompt, "chosen": pair["a"] if a_wins else pair["b"],
                  "rejected": pair["b"] if a_wins else pair["a"]}
        if soft:
            p = min(max(result["p_a"] if a_wins else 1.0 - result["p_a"], 0.5), 1.0 - _P_CLIP)
            record["margin"] = margin_scale * math.log(p / (1.0 - p))
            record["label"] = p
        record["source_row"] = rownum
        record.update(sure)
        out.append(json.dumps(record, ensure_ascii=False))
    return out, skipped


def _cohen_kappa(refs: list[str], preds: list[str]) -> float:
    """Cohen's kappa: scikit-learn's (the ``app`` extra), else statsmodels' (a core dependency)."""
    try:
        from sklearn.metrics import cohen_kappa_score
    except ImportError:
        import numpy as np
        from statsmodels.stats.inter_rater import cohens_kappa

        table = np.array([[sum(r == x and p == y for r, p in zip(refs, preds)) for y in "ab"] for x in "ab"])
        return float(cohens_kappa(table).kappa)
    return float(cohen_kappa_score(refs, preds, labels=["a", "b"]))


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, position-bias statistics and agreement with reference labels over journal entries."""
    stats = PositionStats()
    reasons: collections.Counter[str] = collections.Counter()
    refs, preds = [], []
    ref_unlabelled = 0
    labelled = 0
    for entry in entries:
        for result, ref in zip(entry["results"], entry["refs"]):
            if result["status"] == "unlabelled":
                reasons[result["reason"].split(":")[0] if result["reason"] else "unlabelled"] += 1
                ref_unlabelled += ref is not None
                continue
            stats.add(Verdict(result["p_a"], result["p_forward"], result["p_backward"]))
            if result["status"] == "tie":
                ref_unlabelled += ref is not None
                continue
            labelled += 1
            if ref is not None:
                refs.append(ref)
                preds.append(result["winner"])
    no_verdict = sum(reasons.values())
    summary: dict[str, Any] = {
        "rows": len(entries),
        "pairs": sum(len(e["results"]) for e in entries),
        "labelled": labelled,
        "ties": stats.ties,
        "unlabelled": no_verdict,
        **{k: v for k, v in stats.summary().items() if k not in ("pairs", "ties")},
    }
    if refs or ref_unlabelled:
        agree = sum(r == p for r, p in zip(refs, preds))
        kappa = _cohen_kappa(refs, preds) if refs and len(set(refs) | set(preds)) > 1 else None
        summary["agreement"] = {"pairs_with_reference": len(refs) + ref_unlabelled, "compared": len(refs),
                                "not_labelled_by_judge": ref_unlabelled,
                                "accuracy": agree / len(refs) if refs else None, "cohen_kappa": kappa}
    return summary


def label_rows(rows: list[Mapping[str, Any]], judge: PairwiseJudge, out: str | Path, *, source: str = "rows",
               fingerprint: str | None = None, soft: bool = False, margin_scale: float = 1.0, workers: int = 1,
               restart: bool = False, row_numbers: list[int] | None = None,
               on_row: Callable[[int], None] | None = None, restart_if_changed: bool = False,
               with_confidence: bool = False) -> dict[str, Any]:
    """Label ``rows`` into ``out`` (resumable, see the module docstring); returns the summary. With
    ``with_confidence`` every output line also carries ``confidence`` and ``orders_agree`` (routing reads them).

    Progress written for different rows / judge / options is an error, or with ``restart_if_changed`` a
    reason to start over (for callers that regenerate their rows, like ``rlhfkit cai``)."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, not {workers}")
    out = Path(out)
    paths = sidecar_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    numbers = row_numbers or list(range(1, len(rows) + 1))
    tasks = [pairs_of_row(row, i, source, numbers[i]) for i, row in enumerate(rows)]  # bad input fails first
    lone = [numbers[i] for i, pairs in enumerate(tasks) if not pairs]
    if len(lone) == len(rows):
        raise DataError(f"no row has two responses to compare ({len(rows)} rows)", source=source)
    if lone:
        logger.warning("%s: %d row(s) with fewer than 2 responses left out (first: row %d)", source, len(lone),
                       lone[0])
    fingerprint = fingerprint or hashlib.sha256(json.dumps([list(map(dict, rows)), judge.name, soft, margin_scale],
                                                           default=str).encode()).hexdigest()
    header = {"version": JOURNAL_VERSION, "fingerprint": fingerprint, "judge": judge.name, "soft": soft,
              "rows": len(rows)}
    if restart_if_changed and not restart:
        old, _, _ = _read_journal(paths["progress"])
        restart = old is not None and old.get("fingerprint") != fingerprint
    if restart:
        for path in (out, paths["unlabelled"], paths["progress"], paths["summary"]):
            path.unlink(missing_ok=True)
    old, entries, valid = _read_journal(paths["progress"])
    if old is None:
        if out.exists() and out.stat().st_size:
            raise ConfigError(f"{out}: exists without a progress file {paths['progress'].name}; rerun with "
                              "--restart to overwrite it")
        paths["progress"].write_text(json.dumps(header) + "\n", encoding="utf-8")
        out.write_bytes(b"")
        paths["unlabelled"].write_bytes(b"")
        entries = []
    else:
        if old.get("fingerprint") != fingerprint:
            raise ConfigError(f"{paths['progress']}: written by a different run (input, judge or label options "
                              "changed); rerun with --restart to start over")
        with paths["progress"].open("r+b") as fh:
            fh.truncate(valid)
        last = entries[-1] if entries else {"out_bytes": 0, "skip_bytes": 0}
        _truncate(out, last["out_bytes"])
        _truncate(paths["unlabelled"], last["skip_bytes"])
        if entries:
            logger.info("resuming %s: %d of %d rows already labelled", out, len(entries), len(rows))
    start = len(entries)
    todo = list(range(start, len(rows)))
    bad = [0]

    def consume(index: int, results: list[dict[str, Any]], fh_out, fh_skip, fh_journal) -> None:
        row = rows[index]
        lines, skipped = _output_lines(row["prompt"], tasks[index], results, numbers[index], soft, margin_scale,
                                       with_confidence)
        for r in results:
            if r["status"] == "unlabelled":
                bad[0] += 1
                logger.warning("%s row %d: left unlabelled: %s", source, numbers[index], r["reason"])
        for line in lines:
            fh_out.write(line + "\n")
        for line in skipped:
            fh_skip.write(line + "\n")
        fh_out.flush()
        fh_skip.flush()
        entry = {"row": index, "out_bytes": fh_out.tell(), "skip_bytes": fh_skip.tell(), "results": results,
                 "refs": [p["ref"] for p in tasks[index]]}
        fh_journal.write(json.dumps(entry) + "\n")
        fh_journal.flush()
        entries.append(entry)
        if on_row is not None:
            on_row(index)

    with out.open("ab") as raw_out, paths["unlabelled"].open("ab") as raw_skip, \
            paths["progress"].open("a", encoding="utf-8") as fh_journal:
        import io

        fh_out = io.TextIOWrapper(raw_out, encoding="utf-8", newline="\n")
        fh_skip = io.TextIOWrapper(raw_skip, encoding="utf-8", newline="\n")
        try:
            if workers == 1:
                step = SCORE_BATCH_ROWS if _scores_in_batches(judge) else 1
                for start_at in range(0, len(todo), step):
                    chunk = todo[start_at:start_at + step]
                    results = _judge_rows(judge, [rows[i]["prompt"] for i in chunk], [tasks[i] for i in chunk])
                    for index, row_results in zip(chunk, results):
                        consume(index, row_results, fh_out, fh_skip, fh_journal)
            else:
                pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rlhfkit-judge")
                window: collections.deque = collections.deque()
                pending = iter(todo)
                try:
                    for index in pending:
                        window.append((index, pool.submit(_judge_row, judge, rows[index]["prompt"], tasks[index])))
                        if len(window) >= 4 * workers:
                            break
                    while window:
                        index, future = window.popleft()
                        consume(index, future.result(), fh_out, fh_skip, fh_journal)  # in input order
                        nxt = next(pending, None)
                        if nxt is not None:
                            window.append((nxt, pool.submit(_judge_row, judge, rows[nxt]["prompt"], tasks[nxt])))
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            fh_out.flush()
            fh_skip.flush()
            fh_out.detach()
            fh_skip.detach()
    summary = summarize(entries)
    summary["judge"] = judge.name
    summary["resumed_from_row"] = start
    summary["out"] = str(out)
    summary["unlabelled_file"] = str(paths["unlabelled"])
    summary["rows_with_fewer_than_two_responses"] = len(lone)
    malformed = getattr(judge, "malformed_replies", None)
    if malformed is not None:
        summary["malformed_replies_this_run"] = malformed
    if summary["unlabelled"]:
        logger.warning("%d pair(s) left unlabelled (listed with reasons in %s)", summary["unlabelled"],
                       paths["unlabelled"])
    if summary["position_biased"]:
        logger.warning("judge '%s' is position-biased: the %s slot wins %.0f%% of single-order judgements "
                       "(p = %.2g); verdicts averaged over both orders", judge.name, summary["biased_towards"],
                       100 * summary["first_slot_win_rate"], summary["position_bias_p_value"])
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def label_file(input_path: str, judge: PairwiseJudge, out: str | Path, *, soft: bool = False,
               margin_scale: float = 1.0, workers: int = 1, restart: bool = False,
               on_row: Callable[[int], None] | None = None, limit: int = 0,
               with_confidence: bool = False) -> dict[str, Any]:
    """Label an input file (see the module docstring; only its first ``limit`` rows when given) with
    ``judge`` into ``out``; returns the summary."""
    from ..data import load_rows, row_number

    ds = load_rows(input_path)
    rows = [dict(r) for r in ds][: limit or None]
    numbers = [row_number(r, i) for i, r in enumerate(rows)]
    return label_rows(rows, judge, out, source=str(input_path), soft=soft, margin_scale=margin_scale,
                      workers=workers, restart=restart, row_numbers=numbers, on_row=on_row,
                      with_confidence=with_confidence,
                      fingerprint=_fingerprint(input_path, judge.name, soft, margin_scale, limit))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .spec import JUDGE_KINDS, add_judge_flags, judge_from_flags

    p = argparse.ArgumentParser(prog="rlhfkit judge", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Label candidate responses with an AI judge into preference pairs "
                                            "(prompt/chosen/rejected) that rlhfkit rm / dpo read. Resumable: "
                                            "rerun the same command after an interruption.")
    p.add_argument("input", help="JSONL/JSON/parquet/CSV: prompt + responses, prompt + response_a/response_b, "
                                 "or prompt/chosen/rejected (re-judged); optional label/gold column")
    p.add_argument("--judge", required=True, help=JUDGE_KINDS)
    p.add_argument("--out", required=True, help="output JSONL (sidecars: .unlabelled.jsonl, .progress.jsonl, "
                                                ".summary.json)")
    p.add_argument("--soft", action="store_true", help="also write margin (|logit p| * --margin-scale) and "
                                                       "label (P(chosen better))")
    p.add_argument("--margin-scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1, help="rows judged concurrently (threads)")
    add_judge_flags(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--restart", action="store_true", help="discard earlier output and progress")
    add_route_flags(p)
    a = p.parse_args(argv)
    route = router_from_flags(a) if a.route_threshold is not None else None  # checked before judging
    judge = judge_from_flags(a.judge, a, device=a.device)
    judged = route_paths(a.out)["judged"] if route else a.out  # routing: every verdict there, then split
    summary = label_file(a.input, judge, judged, soft=a.soft, margin_scale=a.margin_scale, workers=a.workers,
                         restart=a.restart, with_confidence=route is not None)
    if route:
        summary["routing"] = route(Path(judged), sidecar_paths(judged)["unlabelled"])
        sidecar_paths(a.out)["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0
