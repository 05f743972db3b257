"""Reviewer role, review page, adjudication (with history) and its effect on exports, per-labeller quality,
progress (issue 23, "what teams expect"); a reviewer in Chromium via Playwright (screenshot
/tmp/label_review.png)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from rlhfkit.cli import main
from rlhfkit.label import adjudication, export, review, service
from rlhfkit.label.db import Adjudication, Database, Item, Label, User, migrate, schema_version
from rlhfkit.label.testing import auth, csrf_of, logged_in, login  # noqa: E402
from rlhfkit.label.web import create_app

CHROMIUM = "/usr/bin/chromium"
XSS = "<script>window.__xss=1</script>\u202eevil"



def label(db, user, pid, winner=None, accept=None, ratings=None, ms=None, key=None):
    """Submit one label given in original indices (mapped to the assignment's display positions)."""
    a = service.next_assignment(db, user, pid)
    order = a.order
    answers = {}
    if winner is not None or accept is None:
        answers["pairwise"] = {"choice": "tie" if winner == "tie" else ("A" if order[0] == winner else "B"),
                               "strength": 1}
    if accept is not None:
        answers["binary"] = {"accept": [accept[order[p]] for p in range(len(order))]}
    if ratings is not None:
        answers["likert"] = {"ratings": [ratings[order[p]] for p in range(len(order))]}
    service.submit(db, user, a.id, key or f"key-{user.name}-{a.id}-xxxx", answers, ms)
    return a


@pytest.fixture
def seeded(label_db):
    """Three labellers on three two-response items (pairwise, binary, likert) with known answers/durations;
    SQLite and PostgreSQL."""
    db = Database(label_db)
    users = {n: service.create_user(db, n)[0] for n in ("ann", "bob", "cat")}
    rev, rev_token = service.create_user(db, "rev", "reviewer")
    items = [{"prompt": f"q{i}", "responses": [f"r{i}a", f"r{i}b"]} for i in range(3)]
    project, _ = service.upsert_project(db, "p", items, ["pairwise", "binary", "likert"], overlap=3)
    pid = project.id
    plan = {  # labeller -> per item (winner, accept, likert ratings, ms); cat leaves item 2 alone
        "ann": [(0, [True, False], [5, 1], 1000), (1, [True, False], [3, 4], 3000), (0, [True, True], [4, 4], 5000)],
        "bob": [(0, [True, False], [4, 2], 1500), (1, [True, False], [3, 4], 1900), (1, [False, True], [4, 3], 10000)],
        "cat": [(1, [True, True], [2, 3], None), (1, [True, False], [3, 4], 4000)],
    }
    for name, rows in plan.items():
        for winner, accept, ratings, ms in rows:
            label(db, users[name], pid, winner, accept, ratings, ms)
    with db.session() as s:
        ids = list(s.scalars(sa.select(Item.id).order_by(Item.position)))
    db.label_db = label_db
    yield db, pid, ids, rev, rev_token
    db.dispose()


# ---- quality, disagreement, adjudication, export --------------------------------------------------------


def test_disagreement_and_quality_figures_by_hand(seeded):
    db, pid, (i0, i1, i2), rev, _ = seeded
    adjudication.adjudicate(db, rev, pid, i0, "pairwise", {"pair": [0, 1], "winner": 1}, "cat is right")
    adjudication.adjudicate(db, rev, pid, i2, "binary", {"accept": [True, True]})
    data = review.project_review(db, pid)
    dis = {it["item_id"]: it["disagreement"] for it in data["items"]}
    assert dis[i0] == {"pairwise": True, "binary": True, "ranking_top": False, "likert_spread": 3}
    assert dis[i1] == {"pairwise": False, "binary": False, "ranking_top": False, "likert_spread": 0}
    assert dis[i2] == {"pairwise": True, "binary": True, "ranking_top": False, "likert_spread": 1}
    assert [it["disputed"] for it in data["items"]] == [True, False, True]
    assert [it["item_id"] for it in review.project_review(db, pid, only_disputed=True)["items"]] == [i0, i2]
    assert [len(it["labels"]) for it in data["items"]] == [3, 3, 2]
    q = data["quality"]
    assert {n: r["labels"] for n, r in q.items()} == {"ann": 3, "bob": 3, "cat": 2}
    assert {n: r["median_seconds"] for n, r in q.items()} == {"ann": 3.0, "bob": 1.9, "cat": 4.0}
    # pairwise + binary pairs: ann 3/5 + 8/10, bob 3/5 + 8/10, cat 2/4 + 6/8 (worked out in the docstring plan)
    assert q["ann"]["agreement_with_others"] == pytest.approx(11 / 15) and q["ann"]["pairs_compared"] == 15
    assert q["bob"]["agreement_with_others"] == pytest.approx(11 / 15)
    assert q["cat"]["agreement_with_others"] == pytest.approx(8 / 12) and q["cat"]["pairs_compared"] == 12
    # decisions: item 0 pairwise R2 wins (ann, bob miss; cat hits); item 2 accept both (ann 2/2, bob 1/2)
    assert q["ann"]["agreement_with_adjudications"] == pytest.approx(2 / 3)
    assert q["bob"]["agreement_with_adjudications"] == pytest.approx(1 / 3)
    assert q["cat"]["agreement_with_adjudications"] == 1.0 and q["cat"]["adjudicated_ratings"] == 1
    assert {n: r["very_fast"] for n, r in q.items()} == {"ann": 1, "bob": 2, "cat": 0}
    slow = review.project_review(db, pid, fast_seconds=4.5)["quality"]
    assert {n: r["very_fast"] for n, r in slow.items()} == {"ann": 2, "bob": 2, "cat": 1}


def test_very_fast_threshold_is_a_project_setting_a_query_overrides(seeded):
    """Durations (s): ann 1, 3, 5; bob 1.5, 1.9, 10; cat 4 (and one without). Default 2 s: 1 / 2 / 0."""
    db, pid, _, rev, rev_token = seeded
    admin = logged_in(TestClient(create_app(db)), service.create_user(db, "admin", "admin")[1])
    api = TestClient(create_app(db))

    def very_fast(query=""):
        data = api.get(f"/api/review/projects/{pid}{query}", headers=auth(rev_token)).json()
        return data["thresholds"]["fast_seconds"], {n: r["very_fast"] for n, r in data["quality"].items()}

    assert very_fast() == (2.0, {"ann": 1, "bob": 2, "cat": 0})
    page = admin.get("/admin").text
    r = admin.post(f"/admin/projects/{pid}/settings", data={"csrf": csrf_of(page), "fast_seconds": "4.5",
                                                           "hold_minutes": ""})
    assert r.status_code == 200 and "Settings saved: &#34;very fast&#34; below 4.5 s" in r.text
    assert very_fast() == (4.5, {"ann": 2, "bob": 2, "cat": 1})
    assert very_fast("?fast=1.6") == (1.6, {"ann": 1, "bob": 1, "cat": 0})  # a one-off view
    assert very_fast() == (4.5, {"ann": 2, "bob": 2, "cat": 1})  # the setting is unchanged
    html = api.get(f"/review/{pid}", headers=auth(rev_token)).text
    assert "under 4.5 s\n(the project's setting" in html and "&amp;fast=" not in html
    assert "under 1.6 s\n(this view" in api.get(f"/review/{pid}?fast=1.6", headers=auth(rev_token)).text
    assert 'name="fast_seconds" min="0.001"\nmax="3600" step="any" value="4.5"' in admin.get("/admin").text
    for bad in ("0", "-1", "nan", "3601", "fast"):
        r = admin.post(f"/admin/projects/{pid}/settings", data={"csrf": csrf_of(page), "fast_seconds": bad})
        assert r.status_code == 422 and "fast_seconds" in r.text, (bad, r.text)
    for bad in (0, -2, 1e9, "x"):
        r = api.post(f"/api/admin/projects/{pid}/settings", headers=auth(rev_token), json={"fast_seconds": bad})
        assert r.status_code == 403  # reviewers read the threshold, admins set it
        r = admin.post(f"/api/admin/projects/{pid}/settings", headers={"X-CSRF-Token": csrf_of(page)},
                       json={"fast_seconds": bad})
        assert r.status_code == 422, (bad, r.text)
    assert very_fast()[0] == 4.5  # nothing refused was stored
    r = admin.post(f"/api/admin/projects/{pid}/settings", headers={"X-CSRF-Token": csrf_of(page)},
                   json={"fast_seconds": None})  # back to the default
    assert r.status_code == 200 and r.json()["fast_seconds"] == 2.0
    assert very_fast() == (2.0, {"ann": 1, "bob": 2, "cat": 0})


def test_adjudication_overrules_the_majority_in_every_export(seeded, tmp_path):
    db, pid, (i0, i1, i2), rev, rev_token = seeded
    before = {r["item_id"]: r for r in export.preference_rows(db, pid)}
    assert before[i0]["chosen"] == "r0a" and before[i0]["source"] == "majority"  # 2 votes to 1
    assert set(before) == {i0, i1}  # item 2: a 1-1 tie, dropped
    client = TestClient(create_app(db))
    r = client.post(f"/api/review/projects/{pid}/items/{i0}/adjudications", headers=auth(rev_token),
                    json={"task": "pairwise", "answer": {"pair": [1, 0], "winner": 1}, "note": "R2 is right"})
    assert r.status_code == 201, r.text
    rows = {r["item_id"]: r for r in export.preference_rows(db, pid)}
    assert (rows[i0]["chosen"], rows[i0]["rejected"], rows[i0]["source"]) == ("r0b", "r0a", "adjudicated")
    assert rows[i0]["votes"] == {"chosen": 1, "rejected": 2, "tie": 0}  # the labels still show the majority
    assert rows[i0]["adjudication"]["reviewer"] == "rev"
    assert (rows[i1]["chosen"], rows[i1]["source"]) == ("r1b", "majority")
    soft = {r["item_id"]: r for r in export.preference_rows(db, pid, "soft")}
    assert soft[i0]["label"] == 1.0 and soft[i0]["margin"] == 1.0
    # KTO: item 2's response 0 is a 1-1 split (left out) until a reviewer decides it
    assert (i2, 0) not in {(r["item_id"], r["response"]) for r in export.kto_rows(db, pid)}
    adjudication.adjudicate(db, rev, pid, i2, "binary", {"accept": [False, True]})
    kto = {(r["item_id"], r["response"]): r for r in export.kto_rows(db, pid)}
    assert kto[(i2, 0)]["label"] is False and kto[(i2, 0)]["source"] == "adjudicated"
    assert kto[(i0, 0)]["source"] == "majority" and kto[(i0, 0)]["label"] is True
    assert {r["source"] for r in export.stored_labels(db, pid)} == {"label"}
    # the same through the CLI and the admin / reviewer export routes
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--project", "p", "--out", str(out), "--db", db.label_db]) == 0
    cli_rows = {r["item_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert (cli_rows[i0]["chosen"], cli_rows[i0]["source"]) == ("r0b", "adjudicated")
    text = client.get(f"/review/{pid}/export.jsonl", headers=auth(rev_token)).text
    assert {(r["item_id"], r["chosen"]) for r in map(json.loads, text.splitlines())} == {(i0, "r0b"), (i1, "r1b")}


def test_readjudication_keeps_history_and_labels(seeded):
    db, pid, (i0, _, i2), rev, rev_token = seeded
    with db.session() as s:
        n_labels = s.scalar(sa.select(sa.func.count(Label.id)))
    adjudication.adjudicate(db, rev, pid, i0, "pairwise", {"pair": [0, 1], "winner": 1}, "first")
    other = service.create_user(db, "rev2", "reviewer")[0]
    adjudication.adjudicate(db, other, pid, i0, "pairwise", {"pair": [0, 1], "winner": None}, "second")
    hist = adjudication.adjudications(db, pid, history=True)
    assert [(a["note"], a["superseded_at"] is not None) for a in hist] == [("first", True), ("second", False)]
    live = adjudication.adjudications(db, pid)
    assert len(live) == 1 and live[0]["answer"] == {"pair": [0, 1], "winner": None} and live[0]["reviewer"] == "rev2"
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count(Label.id))) == n_labels  # nothing deleted
        assert s.scalar(sa.select(sa.func.count(Adjudication.id))) == 2
    assert i0 not in {r["item_id"] for r in export.preference_rows(db, pid)}  # decided tie: dropped
    assert {r["item_id"] for r in export.preference_rows(db, pid, ties="keep") if r["tie"]} == {i0, i2}  # i2: a 1-1 split
    client = TestClient(create_app(db))
    hist_api = client.get(f"/api/review/projects/{pid}/adjudications?history=1", headers=auth(rev_token)).json()
    assert len(hist_api) == 2
    html = client.get(f"/review/{pid}", headers=auth(rev_token)).text
    assert "earlier pairwise: R2 better than R1" in html and "Final pairwise:\n<b>R1 = R2 (tie)</b>" in html


def test_bad_adjudications_are_refused(seeded):
    db, pid, (i0, _, _), rev, rev_token = seeded
    client = TestClient(create_app(db))
    url = f"/api/review/projects/{pid}/items/{i0}/adjudications"
    for body, status in [({"task": "pairwise", "answer": {"pair": [0, 5], "winner": 0}}, 422),
                         ({"task": "pairwise", "answer": {"pair": [0, 1], "winner": 7}}, 422),
                         ({"task": "ranking", "answer": {"ranking": [1, 0]}}, 422),  # not a task of p
                         ({"task": "binary", "answer": {"accept": [True]}}, 422),
                         ({"task": "likert", "answer": {"ratings": [0, 6]}}, 422)]:
        assert client.post(url, json=body, headers=auth(rev_token)).status_code == status, body
    raw = '{"task": "binary", "answer": {"accept": [true, true]}, "note": "bad \\ud800"}'
    r = client.post(url, content=raw, headers={**auth(rev_token), "content-type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.text
    assert client.post(f"/api/review/projects/{pid}/items/999/adjudications", headers=auth(rev_token),
                       json={"task": "binary", "answer": {"accept": [True, True]}}).status_code == 404
    assert adjudication.adjudications(db, pid, history=True) == []


# ---- roles and security ------------------------------------------------------------------------------


def test_roles_csrf_and_escaping(tmp_path):
    db = Database(str(tmp_path / "s.db"))
    admin = service.create_user(db, "admin", "admin")[1]
    ann_user, ann = service.create_user(db, "ann")
    bob_user, _ = service.create_user(db, "bob")
    assert main(["label", "user", "add", "rev", "--role", "reviewer", "--db", str(tmp_path / "s.db")]) == 0
    rev = service.create_user(db, "rev-api", "reviewer")[1]
    with db.session() as s:
        assert s.scalar(sa.select(User.role).where(User.name == "rev")) == "reviewer"
    project, _ = service.upsert_project(db, "x", [{"prompt": "P " + XSS, "responses": ["a " + XSS, "b"]}],
                                        ["pairwise"], overlap=2)
    pid = project.id
    label(db, ann_user, pid, 0)
    label(db, bob_user, pid, 1)
    app = create_app(db)
    with db.session() as s:
        item = s.scalar(sa.select(Item.id))
    # reviewer: review pages of every project, no admin route, no labelling
    rc = TestClient(app)
    r = login(rc, rev)
    assert r.headers["location"] == "/review"
    assert rc.get("/", follow_redirects=False).headers["location"] == "/review"
    page = rc.get(f"/review/{pid}")
    assert page.status_code == 200 and 'class="card review-item disputed"' in page.text
    assert "<script>window" not in page.text and "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page.text
    assert "[U+202E]evil" in page.text and "\u202e" not in page.text
    for path in ("/admin", "/api/admin/labellers", f"/api/admin/projects/{pid}/export"):
        assert rc.get(path).status_code == 403, path
    assert rc.post(f"/api/projects/{pid}/next", headers={"X-CSRF-Token": csrf_of(page.text)}).status_code == 403
    assert rc.get(f"/label?project={pid}").status_code == 403
    form = {"task": "pairwise", "answer": json.dumps({"pair": [0, 1], "winner": 1}), "note": XSS}
    url = f"/review/{pid}/items/{item}/adjudicate"
    assert rc.post(url, data=form, follow_redirects=False).status_code == 403  # no CSRF token
    r = rc.post(url, data={**form, "csrf": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/review/{pid}#item-{item}"
    shown = rc.get(f"/review/{pid}").text
    assert "Final pairwise:\n<b>R2 better than R1</b>" in shown and "<script>window" not in shown
    assert rc.post(url, data={**form, "answer": "{", "csrf": csrf_of(page.text)}).status_code == 422
    # ranking and critique answers are shown per labeller, in the item's own order (R1..RK)
    crit = service.upsert_project(db, "c", [{"prompt": "cq", "responses": ["one", "two"]}], ["ranking", "critique"],
                                  overlap=1)[0].id
    a = service.next_assignment(db, ann_user, crit)
    service.submit(db, ann_user, a.id, "key-critique-1", {
        "ranking": {"order": [a.order.index(1), a.order.index(0)]},
        "critique": {"critique": "too vague " + XSS, "rewrite": "better", "target": a.order.index(0)}}, 2500)
    html = rc.get(f"/review/{crit}").text
    assert "R2 &gt; R1" in html and "R1: too vague &lt;script&gt;" in html and "/ rewrite: better" in html
    assert "2.500" in html and "<script>window" not in html
    # labellers: 403 on every review route; nobody logged in: 401 / the login page
    lc = TestClient(app)
    login(lc, ann)
    lpage = lc.get(f"/label?project={pid}").text
    for path in ("/review", f"/review/{pid}", f"/review/{pid}/progress", f"/api/review/projects/{pid}",
                 f"/api/review/projects/{pid}/progress", f"/review/{pid}/export.jsonl"):
        assert lc.get(path).status_code == 403, path
    assert lc.post(url, data={**form, "csrf": csrf_of(lpage)}).status_code == 403
    anon = TestClient(app)
    assert anon.get(f"/review/{pid}", follow_redirects=False).headers["location"] == "/login"
    assert anon.get(f"/api/review/projects/{pid}").status_code == 401
    assert anon.post(url, data=form).status_code == 401
    # admins review too, and create reviewers from the admin page
    ac = TestClient(app)
    login(ac, admin)
    assert ac.get(f"/api/review/projects/{pid}/progress").status_code == 200
    html = ac.get("/admin").text
    assert '<option value="reviewer">reviewer</option>' in html
    r = ac.post("/admin/labellers", data={"name": "rita", "role": "reviewer", "csrf": csrf_of(html)},
                follow_redirects=False)
    assert r.status_code == 303
    with db.session() as s:
        assert s.scalar(sa.select(User.role).where(User.name == "rita")) == "reviewer"
    assert ac.post("/admin/labellers", data={"name": "x", "role": "boss", "csrf": csrf_of(html)}).status_code == 422
    assert TestClient(app).post("/api/admin/labellers", headers=auth(admin),
                                json={"name": "rv", "role": "reviewer"}).json()["role"] == "reviewer"
    assert TestClient(app).get(f"/api/review/projects/{pid}", headers=auth(rev)).json()["items"][0]["disputed"]
    db.dispose()


def test_migration_4_adds_adjudications_and_keeps_data(tmp_path):
    path = str(tmp_path / "m.db")
    db = Database(path, migrate_schema=False)
    assert migrate(db.engine, 3) == 3
    with db.engine.begin() as conn:
        assert not sa.inspect(conn).has_table("adjudications")
    db.dispose()
    db = Database(path)
    assert schema_version(db.engine) >= 4  # and every later migration
    with db.engine.begin() as conn:
        assert sa.inspect(conn).has_table("adjudications")
    db.dispose()


# ---- progress ------------------------------------------------------------------------------------------


def test_progress_counts_known_states(tmp_path):
    db = Database(str(tmp_path / "g.db"))
    ann = service.create_user(db, "ann")[0]
    bob = service.create_user(db, "bob")[0]
    rev_token = service.create_user(db, "rev", "reviewer")[1]
    items = [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(4)]
    pid = service.upsert_project(db, "prog", items, ["pairwise"], overlap=2)[0].id
    first = label(db, ann, pid, 0)  # item 0
    label(db, ann, pid, 0)  # item 1
    label(db, bob, pid, 1)  # item 0: now 2 labels = done
    service.next_assignment(db, bob, pid)  # item 1: open for bob, 1 label -> in progress
    with db.session() as s:
        s.execute(sa.update(Label).where(Label.assignment_id == first.id)
                  .values(created_at=dt.datetime.utcnow() - dt.timedelta(hours=30)))
    prog = review.progress(db, pid)
    assert (prog["items"], prog["done"], prog["in_progress"], prog["left"]) == (4, 1, 1, 2)
    assert prog["labels"] == 3 and prog["labels_last_24h"] == 2 and prog["labels_per_hour"] == round(2 / 24, 4)
    assert prog["labels_by_hour"] == [0] * 23 + [2]  # both recent labels fall in the last hour
    old = review.progress(db, pid, now=dt.datetime.utcnow() + dt.timedelta(hours=5))  # five hours later
    assert old["labels_by_hour"][18] == 2 and sum(old["labels_by_hour"]) == 2  # the 30 h old one is out
    assert prog["labellers"] == {
        "ann": {"done": 2, "in_progress": 0, "left": 2, "labels_last_24h": 1, "labels_per_hour": round(1 / 24, 4)},
        "bob": {"done": 1, "in_progress": 1, "left": 2, "labels_last_24h": 1, "labels_per_hour": round(1 / 24, 4)}}
    client = TestClient(create_app(db))
    assert client.get(f"/api/review/projects/{pid}/progress", headers=auth(rev_token)).json() == prog
    html = client.get(f"/review/{pid}/progress", headers=auth(rev_token)).text
    assert re.search(r'id="items-done">1</b> done ·\s*<b id="items-in-progress">1</b> in progress · '
                     r'<b id="items-left">2</b> left', html)
    assert client.get("/api/review/projects/99/progress", headers=auth(rev_token)).status_code == 404
    db.dispose()


# ---- Chromium ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reviewer_adjudicates_in_chromium(tmp_path):
    from playwright import sync_api as playwright_api

    from rlhfkit.label.testing import start_server

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (.ci/run does)")
    db = Database(str(tmp_path / "c.db"))
    users = [service.create_user(db, n)[0] for n in ("ann", "bob", "cat")]
    rev_token = service.create_user(db, "rev", "reviewer")[1]
    items = [{"prompt": "Capital of France? " + XSS, "responses": ["Lyon.", "Paris."]},
             {"prompt": "2 + 2?", "responses": ["4", "5"]}]
    pid = service.upsert_project(db, "demo", items, ["pairwise"], overlap=3)[0].id
    for user, (w0, w1) in zip(users, [(0, 0), (0, 0), (1, 0)]):  # item 0: 2 say Lyon, cat says Paris
        label(db, user, pid, w0, ms=900)
        label(db, user, pid, w1, ms=5000)
    db.dispose()
    proc, url = start_server(tmp_path / "c.db", log=tmp_path / "server.log")
    dialogs = []
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page = ctx.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url + "/login")
            page.fill("#token", rev_token)
            page.click("#login")
            page.wait_for_url(url + "/review")
            page.click(f"a[href='/review/{pid}']")
            page.wait_for_selector(".review-item.disputed")
            disputed = page.locator(".review-item.disputed")
            assert disputed.count() == 1 and "Capital of France?" in disputed.text_content()
            assert page.text_content("#quality-table tr[data-labeller='ann'] .q-fast").strip() == "1"
            choice = json.dumps({"pair": [0, 1], "winner": 1}, sort_keys=True)
            form = disputed.locator("form.adjudicate[data-task=pairwise]")
            form.locator("select[name=answer]").select_option(choice)
            form.locator("input[name=note]").fill("Paris is the capital")
            form.locator("button[type=submit]").click()
            page.wait_for_selector(".review-item.disputed .final[data-task=pairwise]")
            assert "R2 better than R1" in page.text_content(".review-item.disputed .final")
            page.screenshot(path=str(tmp_path / "label_review.png"), full_page=True)
            with page.expect_download() as download:
                page.click("#review-export")
            rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
            assert page.evaluate("window.__xss") is None
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert not dialogs
    by_prompt = {r["prompt"].split(" ")[0]: r for r in rows}
    assert (by_prompt["Capital"]["chosen"], by_prompt["Capital"]["source"]) == ("Paris.", "adjudicated")
    assert by_prompt["Capital"]["votes"] == {"chosen": 1, "rejected": 2, "tie": 0}
    assert (by_prompt["2"]["chosen"], by_prompt["2"]["source"]) == ("4", "majority")
    shutil.copy(tmp_path / "label_review.png", "/tmp/label_review.png")


def test_legacy_surrogate_text_does_not_break_review(tmp_path):
    db = Database(str(tmp_path / "l.db"))
    ann = service.create_user(db, "ann")[0]
    rev = service.create_user(db, "rev", "reviewer")[1]
    pid = service.upsert_project(db, "old", [{"prompt": "q", "responses": ["a", "b"]}], ["pairwise"], overlap=1)[0].id
    with db.session() as s:  # stored before the input checks existed
        s.query(Item).one().responses = ["a", "bad \ud800"]
    label(db, ann, pid, 1)
    client = TestClient(create_app(db))
    r = client.get(f"/api/review/projects/{pid}", headers=auth(rev))
    assert r.status_code == 200 and r.json()["items"][0]["responses"] == ["a", "bad \ufffd"]
    page = client.get(f"/review/{pid}", headers=auth(rev))
    assert page.status_code == 200 and "bad \ufffd" in page.text
    db.dispose()
