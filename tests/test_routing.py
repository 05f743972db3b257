"""Routing between AI and human labels (issue 26): confidence, the routed ``rlhfkit judge`` posting to a served
labelling app over HTTP, the merge of both sources, active selection by priority, migration 7, and the demo
world's routed_collect stage.

The judge is scripted: a ``pairfn:`` whose P(first better) is fixed per prompt and per order, so which pairs
are confident (|p - 1/2| >= T and both orders agree) is known in advance and compared with what landed where.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import sqlalchemy as sa
from statsmodels.stats.proportion import proportion_confint
from toy import ServerThread

from rlhfkit.cli import main as rlhfkit_main
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.judges.routing import (
    audit_ids,
    confidence,
    ensemble_disagreement,
    pair_id,
    route_judged,
    route_paths,
)
from rlhfkit.label import service
from rlhfkit.label.db import Database, Item, migrate, schema_version
from rlhfkit.label.merge import service_poster

T = 0.2
N_PROMPTS = 40
AUDIT = 0.25


def _script(seed: int = 0) -> dict[str, tuple[float | None, float | None]]:
    """prompt -> (P(x better) with x first, P(y better) with y first); None: no verdict."""
    rng = random.Random(seed)
    fixed = {"q0": (0.9, 0.1), "q1": (0.2, 0.8), "q2": (0.65, 0.35), "q3": (1.0, 0.55), "q4": (0.5, 0.5),
             "q5": (None, None), "q6": (0.7, 0.3)}  # q6: confidence exactly T (0.2): confident
    for i in range(len(fixed), N_PROMPTS):
        p = rng.choice([0.05, 0.15, 0.35, 0.45, 0.6, 0.8, 0.95])
        fixed[f"q{i}"] = (p, 1 - p) if i % 5 else (p, p)  # every fifth: order-dependent
    return fixed


SCRIPT = _script()


def _expected() -> tuple[set[str], set[str]]:
    """(confident pair ids, routed pair ids) recomputed from the script by the definition."""
    sure, routed = set(), set()
    for prompt, (px, py) in SCRIPT.items():
        pid = pair_id(prompt, f"x {prompt}", f"y {prompt}")
        if px is None:
            routed.add(pid)
            continue
        forward, backward = px, 1 - py  # P(x better) in each order
        p = (forward + backward) / 2
        agree = (forward > 0.5) - (forward < 0.5) == (backward > 0.5) - (backward < 0.5)
        (sure if round(abs(p - 0.5), 12) >= T and agree else routed).add(pid)
    return sure, routed


@pytest.fixture
def judge_input(tmp_path):
    script = tmp_path / "scripted.py"
    script.write_text(f"SCRIPT = {SCRIPT!r}\n\n"
                      "def judge(prompt, first, second):\n"
                      "    px, py = SCRIPT[prompt]\n"
                      "    return px if first.startswith('x') else py\n")
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": q, "response_a": f"x {q}", "response_b": f"y {q}"}) + "\n"
                            for q in SCRIPT))
    return f"pairfn:{script}:judge", rows


class ServedApp(ServerThread):
    """The labelling app (uvicorn) on a free localhost port in a daemon thread, with an admin token."""

    def __init__(self, db_path: str):
        from rlhfkit.label.web import create_app

        self.db = Database(db_path)
        _, self.token = service.create_user(self.db, "admin", "admin")
        super().__init__(create_app(self.db))

    def items(self) -> list[Item]:
        with self.db.session() as s:
            return list(s.scalars(sa.select(Item).order_by(Item.position)))

    def close(self) -> None:
        super().close()
        self.db.dispose()


@pytest.fixture
def app(tmp_path, monkeypatch):
    served = ServedApp(str(tmp_path / "app.db"))
    monkeypatch.setenv("RLHFKIT_LABEL_TOKEN", served.token)
    yield served
    served.close()


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _judge(spec, rows, out, app, *extra) -> dict:
    argv = ["judge", str(rows), "--judge", spec, "--out", str(out), "--route-threshold", str(T),
            "--route-app", app.url, "--route-project", "routed", "--route-audit-fraction", str(AUDIT), *extra]
    assert rlhfkit_main(argv) == 0
    return json.loads(out.with_name(out.name + ".summary.json").read_text())


def test_confidence_and_audit_draw():
    assert confidence(0.9) == pytest.approx(0.4) and confidence(0.1) == pytest.approx(0.4) and confidence(0.5) == 0
    ids = [f"p{i}" for i in range(37)]
    drawn = audit_ids(ids, 0.25, seed=3)
    assert len(drawn) == round(0.25 * 37) == 9 and drawn <= set(ids)
    assert audit_ids(ids[::-1], 0.25, seed=3) == drawn and audit_ids(ids, 0.25, seed=4) != drawn
    assert pair_id("q", "a", "b") == pair_id("q", "b", "a") != pair_id("q", "a", "c")


def test_routing_sends_exactly_the_unsure_pairs_to_the_app_over_http(judge_input, app, tmp_path):
    spec, rows = judge_input
    out = tmp_path / "judge.jsonl"
    summary = _judge(spec, rows, out, app)
    sure, routed = _expected()
    assert len(sure) + len(routed) == N_PROMPTS and len(sure) >= 12 and len(routed) >= 8
    confident_rows = _lines(out)
    assert {r["pair_id"] for r in confident_rows} == sure and len(confident_rows) == len(sure)
    assert all(r["source"] == "judge" and r["confidence"] >= T and r["orders_agree"] for r in confident_rows)
    q0 = next(r for r in confident_rows if r["prompt"] == "q0")
    assert (q0["chosen"], q0["rejected"], q0["confidence"]) == ("x q0", "y q0", pytest.approx(0.4))
    routed_rows = _lines(route_paths(out)["routed"])
    assert {r["pair_id"] for r in routed_rows} == routed
    by_prompt = {r["prompt"]: r for r in routed_rows}
    assert by_prompt["q3"]["judge"]["orders_agree"] is False  # confident enough, but the orders disagree
    assert "reason" in by_prompt["q5"]["judge"] and "chosen" not in by_prompt["q5"]["judge"]  # no verdict
    audited = {r["pair_id"] for r in confident_rows if r["audit"]}
    assert len(audited) == round(AUDIT * len(sure)) and audited <= sure
    items = app.items()
    assert {it.meta["pair_id"] for it in items} == routed | audited and len(items) == len(routed | audited)
    for it in items:  # the app gets the texts and the pair id: nothing of the judge's verdict
        assert it.meta == {"pair_id": it.meta["pair_id"]} and it.responses == sorted(it.responses)
        assert pair_id(it.prompt, *it.responses) == it.meta["pair_id"] and it.priority is None
    assert summary["routing"]["posted_this_run"] == len(items) and summary["routing"]["app_items_added"] == len(items)
    assert summary["routing"]["confident"] == len(sure) and summary["routing"]["routed"] == len(routed)

    again = _judge(spec, rows, out, app)  # a rerun judges nothing again and posts nothing twice
    assert again["resumed_from_row"] == N_PROMPTS and again["routing"]["posted_this_run"] == 0
    assert len(app.items()) == len(items) and {r["pair_id"] for r in _lines(out)} == sure
    route_paths(out)["posted"].unlink()  # the posted journal lost: the app still recognises every item
    lost = _judge(spec, rows, out, app)
    assert lost["routing"]["app_items_added"] == 0 and lost["routing"]["app_duplicates_skipped"] == len(items)
    assert len(app.items()) == len(items)


def test_routing_flags_are_checked_before_judging(judge_input, tmp_path, monkeypatch, capsys):
    spec, rows = judge_input
    out = tmp_path / "o.jsonl"
    monkeypatch.delenv("RLHFKIT_LABEL_TOKEN", raising=False)
    base = ["judge", str(rows), "--judge", spec, "--out", str(out), "--route-threshold", "0.2"]
    app = ["--route-app", "http://127.0.0.1:9", "--route-project", "p"]

    def error(argv: list[str]) -> str:
        assert rlhfkit_main(argv) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1  # one line, no traceback
        return lines[0]

    assert "needs --route-app and --route-project" in error(base)
    assert "$RLHFKIT_LABEL_TOKEN is not set" in error(base + app)
    monkeypatch.setenv("RLHFKIT_LABEL_TOKEN", "x")
    assert "must be in [0, 0.5]" in error(base[:-1] + ["0.7"] + app)
    assert "must be in [0, 1]" in error(base + app + ["--route-audit-fraction", "1.5"])
    assert "at least 2 reward models" in error(base + app + ["--route-priority-rm", "fn:a.py:f"])
    assert not out.exists() and not route_paths(out)["judged"].exists()  # nothing judged
    with pytest.raises(ConfigError, match="at least 2 reward models"):
        ensemble_disagreement([object()], ["q"], ["a"], ["b"])


def test_merge_gives_every_pair_once_with_its_source(judge_input, app, tmp_path, capsys):
    spec, rows = judge_input
    out = tmp_path / "judge.jsonl"
    _judge(spec, rows, out, app)
    capsys.readouterr()
    sure, routed = _expected()
    confident_rows = {r["pair_id"]: r for r in _lines(out)}
    audited = {p for p, r in confident_rows.items() if r["audit"]}
    items = app.items()
    project_id = items[0].project_id
    # people: "ann" labels all but the last 3 items (pending), always picking the response starting with "x";
    # "bob" labels one item ann labelled and picks the other side (a 1-1 tie)
    ann, _ = service.create_user(app.db, "ann")
    bob, _ = service.create_user(app.db, "bob")
    picked: dict[str, str] = {}
    tie_pid = None
    for n in range(len(items) - 3):
        a = service.next_assignment(app.db, ann, project_id)
        with app.db.session() as s:
            item = s.get(Item, a.item_id)
            shown = [item.responses[i] for i in a.order[:2]]
        choice = "A" if shown[0].startswith("x") else "B"
        service.submit(app.db, ann, a.id, f"ann-key-{n:04d}", {"pairwise": {"choice": choice}})
        picked[item.meta["pair_id"]] = next(r for r in item.responses if r.startswith("x"))
    b = service.next_assignment(app.db, bob, project_id)
    with app.db.session() as s:
        item = s.get(Item, b.item_id)
        shown = [item.responses[i] for i in b.order[:2]]
        tie_pid = item.meta["pair_id"]
    other_side = "B" if shown[0].startswith("x") else "A"
    service.submit(app.db, bob, b.id, "bob-key-0001", {"pairwise": {"choice": other_side}})
    merged_file = tmp_path / "merged.jsonl"
    pending_file = tmp_path / "pending.jsonl"
    assert rlhfkit_main(["label", "merge", "--db", str(tmp_path / "app.db"), "--project", "routed",
                         "--judge-labels", str(out), "--routed", str(route_paths(out)["routed"]),
                         "--out", str(merged_file), "--pending-out", str(pending_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "merged.summary.json").read_text())
    merged = _lines(merged_file)
    ids = [r["pair_id"] for r in merged]
    assert len(ids) == len(set(ids))  # no pair twice
    sent = routed | audited
    labelled = set(picked) - {tie_pid}
    assert {r["pair_id"] for r in merged if r["source"] == "judge"} == sure - audited
    assert {r["pair_id"] for r in merged if r["source"] == "human"} == labelled
    pending = _lines(pending_file)
    assert {r["pair_id"] for r in pending if r["status"] == "pending"} == sent - set(picked)
    assert [r["pair_id"] for r in pending if r["status"] == "tie"] == [tie_pid]
    assert summary["pending"] == 3 and summary["ties"] == 1
    assert summary["by_source"] == {"judge": len(sure - audited), "human": len(labelled)}
    assert summary["pairs"] == N_PROMPTS == len(merged) + summary["pending"] + summary["ties"]  # nothing lost
    assert summary["human_share"] == pytest.approx(len(labelled) / len(merged))
    for r in merged:
        assert {"prompt", "chosen", "rejected", "source", "pair_id"} <= set(r)
        if r["source"] == "human":
            assert r["chosen"] == picked[r["pair_id"]] and r["chosen"].startswith("x")
        else:
            assert (r["chosen"], r["rejected"]) == (confident_rows[r["pair_id"]]["chosen"],
                                                    confident_rows[r["pair_id"]]["rejected"])
    # the judge against people on the audited confident pairs: people always chose x
    compared = [p for p in audited if p in labelled]
    agree = sum(confident_rows[p]["chosen"].startswith("x") for p in compared)
    audit = summary["judge_vs_human_on_audited"]
    assert (audit["audited"], audit["compared"], audit["agree"]) == (len(audited), len(compared), agree)
    if compared:
        low, high = proportion_confint(agree, len(compared), method="wilson")
        assert audit["accuracy"] == pytest.approx(agree / len(compared))
        assert (audit["ci_low"], audit["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    from rlhfkit.data import PREFERENCE_FORMATS, DataFormat, detect_format, load_rows

    ds = load_rows(str(merged_file))  # what rlhfkit rm / dpo read
    assert detect_format(ds.column_names, allowed=PREFERENCE_FORMATS) is DataFormat.PREFERENCE_EXPLICIT


def test_app_serves_by_priority_then_import_order(label_db):
    db = Database(label_db)
    rows = [{"prompt": "low", "responses": ["a", "b"], "priority": 0.1},
            {"prompt": "none", "responses": ["a", "b"]},
            {"prompt": "high", "responses": ["a", "b"], "priority": 0.9},
            {"prompt": "none later", "responses": ["a", "b"], "priority": None}]
    items = [service.check_item(r, "rows", n) for n, r in enumerate(rows, start=1)]
    assert [it["priority"] for it in items] == [0.1, None, 0.9, None]
    assert all("priority" not in (it["meta"] or {}) for it in items)
    project, added, _ = service.import_items(db, "p", items, overlap=1)
    user, _ = service.create_user(db, "ann")
    served = []
    while (a := service.next_assignment(db, user, project.id)) is not None:
        with db.session() as s:
            served.append(s.get(Item, a.item_id).prompt)
        service.submit(db, user, a.id, f"key-{a.id:06d}", {"pairwise": {"choice": "A"}})
    assert served == ["high", "low", "none", "none later"]
    # the priority is no part of an item's identity: the same item again with another priority is a duplicate
    again = service.check_item({"prompt": "low", "responses": ["a", "b"], "priority": 5}, "rows", 1)
    assert service.import_items(db, "p", [again])[1:] == (0, 1)
    for bad in (float("nan"), float("inf"), "high", True, [1]):
        with pytest.raises(DataError, match=r"rows, row 7.*priority.*finite number") as exc:
            service.check_item({"prompt": "q", "responses": ["a", "b"], "priority": bad}, "rows", 7)
        assert "\n" not in str(exc.value)
    assert service.check_item({"prompt": "q", "responses": ["a", "b"], "priority": "0.5"}, "r", 1)["priority"] == 0.5
    db.dispose()


def test_migration_7_adds_priority_and_keeps_rows(tmp_path):
    path = str(tmp_path / "m.db")
    engine = Database(path, migrate_schema=False).engine
    assert migrate(engine, 6) == 6
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO projects (name, guidelines, tasks, overlap, created_at) "
                          "VALUES ('old', 'g', '[\"pairwise\"]', 1, '2024-01-01 00:00:00')"))
        for n, q in enumerate(("first", "second")):
            c.execute(sa.text("INSERT INTO items (project_id, position, prompt, responses, meta) "
                              f"VALUES (1, {n}, '{q}', '[\"a\", \"b\"]', '{{\"k\": {n}}}')"))
    engine.dispose()
    db = Database(path)
    assert schema_version(db.engine) == 7
    with db.session() as s:
        old = list(s.scalars(sa.select(Item).order_by(Item.position)))
        assert [(i.prompt, i.responses, i.meta, i.priority) for i in old] == [
            ("first", ["a", "b"], {"k": 0}, None), ("second", ["a", "b"], {"k": 1}, None)]
    service.import_items(db, "old", [service.check_item({"prompt": "new", "responses": ["a", "b"], "priority": 1},
                                                        "r", 1)])
    user, _ = service.create_user(db, "ann")
    a = service.next_assignment(db, user, 1)
    with db.session() as s:
        assert s.get(Item, a.item_id).prompt == "new"  # prioritised before the old (NULL) rows
    db.dispose()


def test_priority_is_the_ensemble_disagreement(tmp_path):
    fns = tmp_path / "rms.py"
    fns.write_text("def short(prompts, responses):\n    return [-float(len(r)) for r in responses]\n\n"
                   "def vowels(prompts, responses):\n"
                   "    return [float(sum(c in 'aeiou' for c in r)) for r in responses]\n")
    from rlhfkit.judges.routing import load_scorers

    scorers = load_scorers([f"fn:{fns}:short", f"fn:{fns}:vowels"])
    with pytest.raises(ConfigError, match="at least 2"):
        load_scorers([f"fn:{fns}:short"])
    judged = tmp_path / "j.jsonl"
    texts = [("p1", "aaaa", "b"), ("p2", "xyz", "xy"), ("p3", "eeeee", "bcdfg")]
    judged.write_text("".join(json.dumps({"prompt": p, "chosen": a, "rejected": b, "confidence": 0.01,
                                          "orders_agree": True}) + "\n" for p, a, b in texts))
    db = Database(str(tmp_path / "a.db"))
    summary = route_judged(judged, tmp_path / "none.jsonl", tmp_path / "out.jsonl", 0.3, service_poster(db, "p", 1),
                           priority=lambda p, a, b: ensemble_disagreement(scorers, p, a, b))
    assert summary["routed"] == summary["prioritised"] == 3
    expected = {}
    for p, a, b in texts:
        x, y = sorted([a, b])
        diffs = [-(len(x)) + len(y), sum(c in "aeiou" for c in x) - sum(c in "aeiou" for c in y)]
        expected[p] = float(np.std(diffs))
    with db.session() as s:
        got = {it.prompt: it.priority for it in s.scalars(sa.select(Item))}
    assert got == pytest.approx(expected)
    user, _ = service.create_user(db, "ann")
    a = service.next_assignment(db, user, 1)
    with db.session() as s:
        assert s.get(Item, a.item_id).prompt == max(expected, key=expected.get)
    db.dispose()


def test_routed_collect_stage_reports_judge_accuracy_against_gold(tmp_path, monkeypatch):
    from rlhfkit.stage import StageContext
    from rlhfkit.world import GoldJudge, build_world, route_stage, sampling

    world = build_world(0, num_countries=4)
    world.save(tmp_path / "world.json")

    def policy(model, prompts, k, temperature, max_new, seed):  # a scripted policy: the world's own styles
        rng = random.Random(seed)
        out = []
        for p in prompts:
            req = world.request(p)
            out.append([world.respond(req, rng.choice(world.styles_for(req.category)), rng) for _ in range(k)])
        return out

    monkeypatch.setattr(route_stage, "sample_responses", policy)  # held-out samples
    monkeypatch.setattr(sampling, "sample_responses", policy)  # the pairs' replies
    fns = tmp_path / "judge.py"
    fns.write_text("def short(prompts, responses):\n    return [-0.2 * len(r.split()) for r in responses]\n\n"
                   "def polite(prompts, responses):\n    return [float('sorry' in r.lower()) for r in responses]\n")
    ctx = StageContext(name="routed", output_dir=tmp_path / "routed", run_dir=tmp_path, seed=0, defaults={},
                       results={}, options={"policy": "scripted", "world": str(tmp_path), "judge": f"fn:{fns}:short",
                                            "confidence_threshold": 0.15, "audit_fraction": 0.2, "annotators": 3,
                                            "overlap": 1, "max_prompts": 12, "num_samples": 3, "active": True,
                                            "priority_models": [f"fn:{fns}:short", f"fn:{fns}:polite"]})
    result = route_stage.routed_collect_stage(ctx)
    out = tmp_path / "routed"
    summary = json.loads((out / "route_summary.json").read_text())
    labels = _lines(out / "labels.jsonl")
    assert summary["pending"] == 0 and summary["pairs"] == len(labels) + summary["ties"]  # annotators label all
    assert {r["source"] for r in labels} <= {"judge", "human"} and summary["human_labels"] > 0
    assert all(r["prompt"][0]["role"] == "user" for r in labels)
    assert summary["human_share"] == pytest.approx(sum(r["source"] == "human" for r in labels) / len(labels))
    gold = GoldJudge(world)
    hits = []
    for r in _lines(out / "judge_labels.jsonl"):  # every confident pair, audited ones included
        d = gold.judge(r["prompt"], r["chosen"]).total - gold.judge(r["prompt"], r["rejected"]).total
        if abs(d) > 1e-9:
            hits.append(d > 0)
    conf = summary["judge_vs_gold_confident"]
    assert conf["compared"] == len(hits) > 0 and conf["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert result["judge_accuracy_confident"] == conf["accuracy"]
    assert 0 <= summary["humans_vs_gold"]["accuracy"] <= 1
    with Database(str(out / "labels.db")).session() as s:
        priorities = [it.priority for it in s.scalars(sa.select(Item))]
    assert priorities and all(p is not None and p >= 0 for p in priorities)
    # the same seed gives the same labels: the simulated annotators' display orders are seeded too (the app's
    # own stay unpredictable), and their position bias would otherwise flip some of their choices
    again = StageContext(name="again", output_dir=tmp_path / "again", run_dir=tmp_path, seed=0, defaults={},
                         results={}, options=ctx.options)
    route_stage.routed_collect_stage(again)
    assert _lines(tmp_path / "again" / "labels.jsonl") == labels


def test_routed_collect_stage_samples_a_real_policy(tmp_path, tiny_model_dir):
    from rlhfkit.stage import StageContext
    from rlhfkit.world import build_world, route_stage

    build_world(0, num_countries=4).save(tmp_path / "world.json")
    fns = tmp_path / "judge.py"
    fns.write_text("def short(prompts, responses):\n    return [-0.5 * len(r) for r in responses]\n")
    ctx = StageContext(name="routed", output_dir=tmp_path / "routed", run_dir=tmp_path, seed=0, defaults={},
                       results={}, options={"policy": str(tiny_model_dir), "world": str(tmp_path),
                                            "judge": f"fn:{fns}:short", "annotators": 2, "overlap": 1,
                                            "max_prompts": 4, "num_samples": 3, "max_new_tokens": 6})
    result = route_stage.routed_collect_stage(ctx)
    labels = _lines(tmp_path / "routed" / "labels.jsonl")
    assert result["pairs"] == len(labels) + result["pending"] + result["ties"] > 0 and result["pending"] == 0
    assert result["judge_labels"] + result["human_labels"] == len(labels)


def test_routed_collect_takes_prompts_a_second_policy_and_makes_fresh_gold_pairs(tmp_path, monkeypatch):
    """prompts: a prompt file instead of the world's training split; other_policy: its samples join each
    prompt's pairs; heldout_samples: gold-labelled pairs of the policy's samples on the held-out prompts."""
    from rlhfkit.stage import StageContext
    from rlhfkit.world import GoldJudge, build_world, route_stage, sampling

    world = build_world(0, num_countries=4)
    world.save(tmp_path / "world.json")
    calls = []

    def policy(model, prompts, k, temperature, max_new, seed):  # the policy answers concisely, "sft" pads
        calls.append((model, len(prompts), k))
        rng = random.Random(seed)
        style = "padded" if model == "sft" else None
        return [[world.respond(world.request(p), style or rng.choice(world.styles_for(world.request(p).category)),
                               rng) for _ in range(k)] for p in prompts]

    monkeypatch.setattr(route_stage, "sample_responses", policy)  # held-out samples
    monkeypatch.setattr(sampling, "sample_responses", policy)  # the pairs' replies
    chosen = [r.prompt for r in world.split("train", "benign")[:5]]
    with open(tmp_path / "prompts.jsonl", "w") as fh:
        for p in chosen:
            fh.write(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n")
    fns = tmp_path / "judge.py"
    fns.write_text("def short(prompts, responses):\n    return [-0.2 * len(r.split()) for r in responses]\n")
    ctx = StageContext(name="routed", output_dir=tmp_path / "routed", run_dir=tmp_path, seed=0, defaults={},
                       results={}, options={"policy": "policy", "world": str(tmp_path), "judge": f"fn:{fns}:short",
                                            "annotators": 2, "overlap": 1, "num_samples": 2,
                                            "prompts": str(tmp_path / "prompts.jsonl"), "other_policy": "sft",
                                            "other_samples": 1, "heldout_samples": 3})
    route_stage.routed_collect_stage(ctx)
    held = world.split("eval")
    assert calls == [("policy", 5, 2), ("sft", 5, 1), ("policy", len(held), 3)]
    labels = _lines(tmp_path / "routed" / "labels.jsonl")
    assert {r["prompt"][0]["content"] for r in labels} <= set(chosen)
    assert any(r["chosen"].count(" ") > 8 or r["rejected"].count(" ") > 8 for r in labels)  # "sft" padded ones
    gold = GoldJudge(world)
    fresh = _lines(tmp_path / "routed" / "gold_pairs.jsonl")
    assert fresh and all(gold.judge(r["prompt"], r["chosen"]).total > gold.judge(r["prompt"], r["rejected"]).total
                         for r in fresh)
    assert {r["prompt"][0]["content"] for r in fresh} <= {r.prompt for r in held}
    # a label budget: exactly max_pairs pairs are judged (the scripted replies give more), the rest counted
    ctx.options.update(max_pairs=6, heldout_samples=0)
    result = route_stage.routed_collect_stage(ctx)
    assert result["pairs"] == 6 and result["pairs_over_budget"] > 0
    assert len(_lines(tmp_path / "routed" / "labels.jsonl")) + result["ties"] + result["pending"] == 6
    # the policy's hotter samples and replies borrowed from the nearest other prompt join the pairs (as collect's)
    calls.clear()
    ctx.options.update(max_pairs=0, explore_samples=1, explore_temperature=1.6)
    hot = route_stage.routed_collect_stage(ctx)["pairs"]
    assert calls == [("policy", 5, 2), ("sft", 5, 1), ("policy", 5, 1)]
    ctx.options.update(off_prompt_samples=1)
    borrowed = route_stage.routed_collect_stage(ctx)["pairs"]
    assert borrowed > hot
    ctx.options.update(near_miss_samples=1)
    assert route_stage.routed_collect_stage(ctx)["pairs"] >= borrowed  # these five prompts share one country
    sums = [r.prompt for r in world.split("train", "benign") if r.kind == "math"][:12]
    pools = sampling.reply_pools(ctx, sums, 2, 1.0, 16, 0)
    edits = [(r, x) for r in pools for x, source in zip(r["responses"], r["sources"]) if source == "near_miss"]
    assert len(edits) >= len(sums) // 2
    assert all(x not in r["responses"][:2] for r, x in edits)  # never one of the policy's own replies
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    ctx.options["prompts"] = str(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="bad.jsonl.*row 1.*prompt"):
        route_stage.routed_collect_stage(ctx)
