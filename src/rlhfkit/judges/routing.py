"""Routing between AI and human labels (``rlhfkit judge --route-threshold``): the judge labels the pairs it is
sure of, people in the labelling app the others.

Every judged pair has a ``confidence`` = |p − ½| (p = P(a better), averaged over both presentation orders, see
:mod:`.base`) and ``orders_agree`` (both orders picked the same winner). A pair is *confident* when
confidence ≥ the threshold and the orders agree; confident pairs go to ``--out`` (``source: "judge"``), every
other pair (ties and pairs the judge could not label included) to ``OUT.routed.jsonl`` with the judge's
verdict, and from there, without it, to a project of the labelling app (``POST /api/admin/projects``: prompt,
the two responses in a canonical order, ``meta`` = {pair_id}; the app never shows meta to labellers). A seeded
share of the confident pairs (``--route-audit-fraction``) goes to the app too, so the judge's accuracy on
its confident share can be measured against people (``rlhfkit label merge``).

Files beside OUT: ``OUT.judged.jsonl`` (every verdict; the resumable ``rlhfkit judge`` output with its own
sidecars), ``OUT.routed.jsonl`` and ``OUT.posted.jsonl`` (the pair ids the app has acknowledged, batch by
batch). A rerun judges nothing again, rewrites OUT and the routed file from the verdicts, and posts only
pairs the posted journal does not hold (the app also skips an item it holds by content hash): nothing is
posted twice, nothing lost.

Active selection: with ``--route-priority-rm`` every posted pair gets ``priority`` = the disagreement of a
reward-model ensemble on it (:func:`ensemble_disagreement`), and the app serves higher priorities first.
Where a label budget buys only some of the candidate pairs, :func:`budget_pairs` spends a share of it on the
pairs the ensemble disagrees on most (the ``routed_collect`` stage's ``active_budget``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.jsonl import numbered_rows, write_jsonl
from ..errors import ConfigError, DataError

logger = logging.getLogger("rlhfkit")

__all__ = ["audit_ids", "budget_pairs", "confidence", "ensemble_disagreement", "http_poster", "pair_id",
           "route_judged", "route_paths", "verdict_confidence"]

Poster = Callable[[list[dict[str, Any]]], Mapping[str, Any]]
POST_BATCH = 200  # items per request to the app


def confidence(p_a: float) -> float:
    """The judge's confidence in a verdict: |p_a − ½|, from 0 (a coin flip or a tie) to ½ (certain), where
    p_a = P(a better) averaged over both presentation orders. Rounded to 12 decimals, so that p = 0.7 is
    confidence 0.2 (not 0.19999999999999996) and meets a threshold of 0.2."""
    return round(abs(float(p_a) - 0.5), 12)


def verdict_confidence(p_a: float, consistent: bool) -> dict[str, Any]:
    """The fields every judged pair carries: ``confidence`` (:func:`confidence`) and ``orders_agree`` (the
    two presentation orders picked the same winner: :attr:`.base.Verdict.consistent`)."""
    return {"confidence": confidence(p_a), "orders_agree": bool(consistent)}


def pair_id(prompt: Any, a: str, b: str) -> str:
    """A pair's stable id: SHA-256 (hex, 16 characters) of the prompt and the two responses sorted, so the
    same pair has the same id whichever response was chosen or shown first."""
    key = json.dumps([prompt, sorted([str(a), str(b)])], sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(key.encode("ascii")).hexdigest()[:16]


def audit_ids(ids: Sequence[str], fraction: float, seed: int = 0) -> set[str]:
    """Exactly round(fraction · len(ids)) of ``ids``: those with the smallest SHA-256 of ``seed:id`` (a seeded
    draw that does not depend on the order of ``ids``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--route-audit-fraction must be in [0, 1], got {fraction}")
    k = round(fraction * len(ids))
    ranked = sorted(set(ids), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(ranked[:k])


def ensemble_disagreement(judges: Sequence[Any], prompts: list[Any], a: list[str], b: list[str]) -> list[float]:
    """Per pair, the standard deviation over the reward models of (score_a − score_b).

    Each model's score difference is its Bradley–Terry logit of "a better than b"; differences, unlike raw
    scores, do not depend on a model's offset for the prompt. Where the models agree on the preference the
    spread is small, where they disagree it is large: query by committee, the pairs a reward model trained on
    them would learn most from. Population standard deviation (ddof 0); needs at least two models."""
    import numpy as np

    if len(judges) < 2:
        raise ConfigError(f"ensemble disagreement needs at least 2 reward models, got {len(judges)}")
    if not prompts:
        return []
    diffs = []
    for judge in judges:
        scores = judge.score_many([p for p in prompts for _ in (0, 1)], [x for pair in zip(a, b) for x in pair])
        diffs.append([float(scores[2 * i]) - float(scores[2 * i + 1]) for i in range(len(prompts))])
    values = np.asarray(diffs).std(axis=0)
    if not np.isfinite(values).all():
        raise ConfigError("a priority reward model returned a non-finite score")
    return [float(v) for v in values]


def budget_pairs(disagreement: Sequence[float], budget: int, active_share: float, seed: int = 0) -> list[int]:
    """Which of n candidate pairs a label budget buys: the ``round(active_share · budget)`` pairs with the
    largest ensemble disagreement (:func:`ensemble_disagreement`; ties: the earlier pair), then the rest of
    the budget drawn at random (``random.Random(seed)``) from the other pairs. Returns sorted indices.

    The naive equivalent: ``active_share = 0`` is ``sorted(random.Random(seed).sample(range(n), budget))``,
    and this returns exactly that. Why only a share: the pairs a committee disagrees on most are the ones a
    reward model learns most from, but taken alone they are also where the labels are noisiest (near gold
    ties), and a reward model trained on them only stops seeing the ordinary pairs it must still rank."""
    import random

    if not 0.0 <= active_share <= 1.0:
        raise ConfigError(f"active_budget must be in [0, 1], got {active_share}")
    n = len(disagreement)
    if budget >= n:
        return list(range(n))
    top = round(active_share * budget)
    chosen = sorted(range(n), key=lambda i: (-float(disagreement[i]), i))[:top] if top else []
    taken = set(chosen)
    rest = [i for i in range(n) if i not in taken]
    return sorted(chosen + random.Random(seed).sample(rest, budget - top))


def load_scorers(specs: Sequence[str], device: str = "cpu") -> list[Any]:
    """Scoring judges (reward models: ``model:PATH`` or a folder; any scoring spec) for
    :func:`ensemble_disagreement`; pairwise-only kinds are refused (they give no score of one response)."""
    from .spec import build_judge, is_pairwise_spec

    specs = [s.strip() for s in specs if s.strip()]
    bad = [s for s in specs if is_pairwise_spec(s)]
    if bad:
        raise ConfigError(f"--route-priority-rm: {bad[0]} is a pairwise judge; give reward models (model:PATH)")
    if len(specs) < 2:
        raise ConfigError(f"--route-priority-rm: disagreement needs at least 2 reward models, got {len(specs)}")
    return [build_judge(s, device=device) for s in specs]


def http_poster(url: str, project: str, token: str, timeout: float = 60.0) -> Poster:
    """Items -> the app's ``POST /api/admin/projects`` (creates the project, or adds to it); the reply's
    counts. Any failure is a one-line ConfigError naming the URL and the app's reason."""
    import httpx

    endpoint = url.rstrip("/") + "/api/admin/projects"

    def post(items: list[dict[str, Any]]) -> Mapping[str, Any]:
        try:
            reply = httpx.post(endpoint, json={"name": project, "items": items}, timeout=timeout,
                               headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise ConfigError(f"{endpoint}: cannot post the routed pairs ({type(exc).__name__}: {exc})") from None
        if reply.status_code != 201:
            try:
                detail = reply.json().get("detail")
            except ValueError:
                detail = reply.text[:200]
            raise ConfigError(f"{endpoint}: the app refused the routed pairs (HTTP {reply.status_code}: {detail})")
        return reply.json()

    return post


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 0.5:
        raise ConfigError(f"--route-threshold must be in [0, 0.5] (a confidence |p - 1/2|), got {threshold}")


def route_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {name: out.with_name(f"{out.name}.{name}.jsonl") for name in ("judged", "routed", "posted")}


def _posted(path: Path) -> set[str]:
    """The pair ids of the posted journal; a torn last line (a crash mid-write) is ignored."""
    ids: set[str] = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                ids.update(json.loads(line)["pair_ids"])
            except (ValueError, KeyError, TypeError):
                break
    return ids


def _judged_pairs(judged: Path, unlabelled: Path) -> tuple[list[dict[str, Any]], int]:
    """Every verdict as {pair_id, row (as written), labelled, responses (sorted)}, the first occurrence of a
    pair only; (pairs, duplicates dropped)."""
    pairs: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for source, labelled in ((judged, True), (unlabelled, False)):
        for n, row in numbered_rows(source) if source.exists() else ():
            x, y = (row.get("chosen"), row.get("rejected")) if labelled else (row.get("response_a"),
                                                                            row.get("response_b"))
            if "prompt" not in row or x is None or y is None:
                raise DataError("expected prompt and two responses", source=str(source), row=n)
            if labelled and "confidence" not in row:
                raise DataError("no confidence (written by an older rlhfkit judge); rerun it with --restart",
                                source=str(source), row=n, field="confidence")
            pid = pair_id(row["prompt"], x, y)
            if pid in pairs:
                duplicates += 1
                continue
            pairs[pid] = {"pair_id": pid, "row": row, "labelled": labelled, "responses": sorted([str(x), str(y)])}
    return list(pairs.values()), duplicates


def route_judged(judged: str | Path, unlabelled: str | Path, out: str | Path, threshold: float, poster: Poster, *,
                 audit_fraction: float = 0.0, seed: int = 0,
                 priority: Callable[[list[Any], list[str], list[str]], list[float]] | None = None,
                 batch: int = POST_BATCH) -> dict[str, Any]:
    """Split the verdicts of ``judged`` (labelled pairs, with confidence) and ``unlabelled`` (ties, failures)
    into ``out`` (confident pairs, ``source: "judge"``, ``pair_id``, ``audit``) and ``OUT.routed.jsonl`` (the
    others, with the judge's verdict under ``judge``), and post the routed and audited pairs ``poster`` has
    not acknowledged yet (see the module docstring). Returns the routing summary."""
    _check_threshold(threshold)
    paths = route_paths(out)
    pairs, duplicates = _judged_pairs(Path(judged), Path(unlabelled))
    confident = [p for p in pairs if p["labelled"] and p["row"]["confidence"] >= threshold
                 and p["row"]["orders_agree"]]
    audit = audit_ids([p["pair_id"] for p in confident], audit_fraction, seed)
    sure = {p["pair_id"] for p in confident}
    routed = [p for p in pairs if p["pair_id"] not in sure]
    write_jsonl(out, ({**p["row"], "source": "judge", "pair_id": p["pair_id"], "audit": p["pair_id"] in audit}
                      for p in confident))
    earlier = {r.get("pair_id"): r.get("priority") for _, r in numbered_rows(paths["routed"])} \
        if paths["routed"].exists() else {}
    posted = _posted(paths["posted"])
    send = [p for p in routed + [p for p in confident if p["pair_id"] in audit] if p["pair_id"] not in posted]
    priorities = {p["pair_id"]: earlier[p["pair_id"]] for p in send if earlier.get(p["pair_id"]) is not None}
    todo = [p for p in send if p["pair_id"] not in priorities]
    if priority is not None and todo:
        values = priority([p["row"]["prompt"] for p in todo], [p["responses"][0] for p in todo],
                          [p["responses"][1] for p in todo])
        priorities.update((p["pair_id"], v) for p, v in zip(todo, values))
    for p in routed:
        row = p["row"]
        verdict = {k: row.get(k) for k in ("chosen", "rejected", "confidence", "orders_agree", "reason")
                   if row.get(k) is not None}
        p["routed"] = {"pair_id": p["pair_id"], "prompt": row["prompt"], "responses": p["responses"],
                       "source_row": row.get("source_row"), "judge": verdict}
        value = priorities.get(p["pair_id"], earlier.get(p["pair_id"]))  # posted earlier: as recorded then
        if value is not None:
            p["routed"]["priority"] = value
    write_jsonl(paths["routed"], (p["routed"] for p in routed))
    added = skipped = 0
    with paths["posted"].open("a", encoding="utf-8") as journal:
        for start in range(0, len(send), batch):
            chunk = send[start:start + batch]
            items = [{"prompt": p["row"]["prompt"], "responses": p["responses"], "pair_id": p["pair_id"],
                      **({"priority": priorities[p["pair_id"]]} if p["pair_id"] in priorities else {})}
                     for p in chunk]
            reply = poster(items)  # the judge's verdict stays here: the app gets texts and the pair id only
            added += int(reply.get("items_added", 0))
            skipped += int(reply.get("duplicates_skipped", 0))
            journal.write(json.dumps({"pair_ids": [p["pair_id"] for p in chunk]}) + "\n")
            journal.flush()
    summary = {"threshold": threshold, "pairs": len(pairs), "duplicate_pairs": duplicates,
               "confident": len(confident), "routed": len(routed), "audited": len(audit),
               "judge_share": len(confident) / len(pairs) if pairs else None,
               "posted_this_run": len(send), "already_posted": len(posted), "app_items_added": added,
               "app_duplicates_skipped": skipped, "prioritised": len(priorities),
               "out": str(out), "routed_file": str(paths["routed"])}
    logger.info("routing: %d of %d pairs confident (judge), %d to the app (+%d audited); %d posted now",
                len(confident), len(pairs), len(routed), len(audit), len(send))
    return summary


def add_route_flags(parser: Any) -> None:
    """The routing flags of ``rlhfkit judge``."""
    g = parser.add_argument_group("routing to the labelling app (see rlhfkit.judges.routing)")
    g.add_argument("--route-threshold", type=float, default=None,
                   help="route: pairs with confidence |p - 1/2| >= T whose two orders agree go to --out, the "
                        "others to OUT.routed.jsonl and the labelling app")
    g.add_argument("--route-app", help="the labelling app's URL (http://host:port)")
    g.add_argument("--route-project", help="the app project that receives the routed pairs (created or added to)")
    g.add_argument("--route-token-env", default="RLHFKIT_LABEL_TOKEN", help="variable holding an admin token")
    g.add_argument("--route-audit-fraction", type=float, default=0.0,
                   help="share of the confident pairs also sent to the app, to measure the judge against people")
    g.add_argument("--route-seed", type=int, default=0, help="seed of the audit draw")
    g.add_argument("--route-priority-rm", default=None,
                   help="comma-separated reward models (model:PATH, >= 2): the app serves first the pairs they "
                        "disagree on most")


def router_from_flags(a: Any) -> Callable[[Path, Path], dict[str, Any]]:
    """``route(judged, unlabelled)``: :func:`route_judged` configured by :func:`add_route_flags`' flags, all
    checked (and the priority models loaded) here, before any pair is judged."""
    missing = [f"--route-{n}" for n in ("app", "project") if not getattr(a, f"route_{n}")]
    if missing:
        raise ConfigError(f"--route-threshold needs {' and '.join(missing)}")
    _check_threshold(a.route_threshold)
    audit_ids([], a.route_audit_fraction)
    if Path(f"{a.out}.progress.jsonl").exists():
        raise ConfigError(f"{a.out}: written by rlhfkit judge without routing; give routing another --out")
    token = os.environ.get(a.route_token_env)
    if not token:
        raise ConfigError(f"--route-token-env: ${a.route_token_env} is not set (an admin token of the app)")
    priority = None
    if a.route_priority_rm:
        scorers = load_scorers(a.route_priority_rm.split(","), device=getattr(a, "device", "cpu"))

        def priority(prompts: list[Any], xs: list[str], ys: list[str]) -> list[float]:
            return ensemble_disagreement(scorers, prompts, xs, ys)

    def route(judged: Path, unlabelled: Path) -> dict[str, Any]:
        return route_judged(judged, unlabelled, a.out, a.route_threshold,
                            http_poster(a.route_app, a.route_project, token),
                            audit_fraction=a.route_audit_fraction, seed=a.route_seed, priority=priority)

    return route
