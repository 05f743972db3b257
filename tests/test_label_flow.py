"""Labeller flow (issue 23): skip with a reason (never served again, slot freed, counted on the review page,
not a label), flag (shown to reviewers), go back and edit (history kept, exports use the current label),
held items released after a timeout; login / CSRF / isolation on the new routes; the label page in Chromium
(skip, flag, edit; screenshots /tmp/label_page_desktop.png and /tmp/label_page_390.png)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from rlhfkit.label import export, flow, projects, review, rules, service
from rlhfkit.label.db import (
    Assignment,
    Database,
    ItemMark,
    Label,
    LabelRevision,
    Project,
    migrate,
    schema_version,
    utcnow,
)
from rlhfkit.label.testing import auth, csrf_of, logged_in  # noqa: E402
from rlhfkit.label.web import create_app

XSS = "<script>window.__xss=1</script>"



def make(where, n_items=3, overlap=1, users=("ann", "bob", "cat"), tasks=("pairwise",), guidelines="Be **kind**."):
    """``where``: a label_db (SQLite file or PostgreSQL URL) or a tmp_path (a SQLite file in it)."""
    db = Database(where if isinstance(where, str) else str(where / "f.db"))
    tokens = {n: service.create_user(db, n)[1] for n in users}
    tokens["rev"] = service.create_user(db, "rev", "reviewer")[1]
    tokens["admin"] = service.create_user(db, "admin", "admin")[1]
    items = [{"prompt": f"q{i}", "responses": [f"r{i}a", f"r{i}b"]} for i in range(n_items)]
    project, _ = service.upsert_project(db, "p", items, list(tasks), overlap=overlap, guidelines=guidelines)
    return db, project.id, tokens


def answer_for(assignment: dict, winner_text: str) -> dict:
    """Pairwise answer choosing the response whose text is ``winner_text``."""
    return {"pairwise": {"choice": "A" if assignment["responses"][0] == winner_text else "B", "strength": 1}}


# ---- skip ------------------------------------------------------------------------------------------------


def test_skip_is_not_served_again_frees_the_slot_and_is_no_label(label_db):
    db, pid, tok = make(label_db, n_items=3, overlap=1)
    c = TestClient(create_app(db))
    a = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
    assert a["prompt"] == "q0"
    r = c.post(f"/api/assignments/{a['assignment_id']}/skip", headers=auth(tok["ann"]), json={"reason": "nope"})
    assert r.status_code == 422  # not one of the fixed reasons
    r = c.post(f"/api/assignments/{a['assignment_id']}/skip", headers=auth(tok["bob"]), json={"reason": "unclear"})
    assert r.status_code == 404  # not bob's
    r = c.post(f"/api/assignments/{a['assignment_id']}/skip", headers=auth(tok["ann"]),
               json={"reason": "unclear", "note": "which France?"})
    assert r.status_code == 201, r.text
    assert c.post(f"/api/assignments/{a['assignment_id']}/skip", headers=auth(tok["ann"]),
                  json={"reason": "unclear"}).status_code == 409  # closed now
    served = []
    for _ in range(3):  # ann: the two other items, then nothing; q0 never again
        nxt = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
        if nxt is None:
            break
        served.append(nxt["prompt"])
        assert c.post(f"/api/assignments/{nxt['assignment_id']}/label", headers=auth(tok["ann"]),
                      json={"idempotency_key": f"ann-{nxt['assignment_id']}-key",
                            "answers": answer_for(nxt, nxt["responses"][0])}).status_code == 201
    assert served == ["q1", "q2"]
    # overlap 1: the slot ann gave up is free, so bob gets q0 (the only item left)
    b = c.post(f"/api/projects/{pid}/next", headers=auth(tok["bob"])).json()["assignment"]
    assert b["prompt"] == "q0"
    labels = export.stored_labels(db, pid)
    assert len(labels) == 2 and {lab["coder"] for lab in labels} == {"ann"}  # the skip is no label
    assert len(c.get(f"/api/admin/projects/{pid}/export?kind=labels", headers=auth(tok["admin"])).json()) == 2
    q = review.project_review(db, pid)["quality"]
    assert (q["ann"]["skipped"], q["ann"]["labels"]) == (1, 2)
    html = c.get(f"/review/{pid}", headers=auth(tok["rev"])).text
    assert "<th>skipped</th>" in html
    assert re.search(r'data-labeller="ann">.*?<td class="q-skipped">1</td>', html, re.S)
    assert "Skipped by 1" in html and "which France?" in html
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count(ItemMark.id)).where(ItemMark.kind == "skip")) == 1
    db.dispose()


def test_labeller_who_only_skipped_has_a_quality_row(tmp_path):
    db, pid, tok = make(tmp_path, n_items=2, overlap=2)
    c = TestClient(create_app(db))
    for _ in range(2):
        a = c.post(f"/api/projects/{pid}/next", headers=auth(tok["cat"])).json()["assignment"]
        c.post(f"/api/assignments/{a['assignment_id']}/skip", headers=auth(tok["cat"]), json={"reason": "other"})
    assert c.post(f"/api/projects/{pid}/next", headers=auth(tok["cat"])).json()["assignment"] is None
    q = review.project_review(db, pid)["quality"]
    assert q["cat"]["skipped"] == 2 and q["cat"]["labels"] == 0
    db.dispose()


# ---- flag ------------------------------------------------------------------------------------------------


def test_flag_is_shown_on_the_review_page_escaped_and_keeps_the_item(tmp_path):
    db, pid, tok = make(tmp_path, n_items=2, overlap=1)
    c = TestClient(create_app(db))
    a = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
    r = c.post(f"/api/assignments/{a['assignment_id']}/flag", headers=auth(tok["ann"]),
               json={"reason": "harmful", "note": "bad " + XSS})
    assert r.status_code == 201, r.text
    assert c.post(f"/api/assignments/{a['assignment_id']}/flag", headers=auth(tok["ann"]),
                  json={"reason": "spam?"}).status_code == 422
    again = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
    assert again["assignment_id"] == a["assignment_id"]  # a flag does not take the item away
    html = c.get(f"/review/{pid}", headers=auth(tok["rev"])).text
    assert html.count('class="error item-flag"') == 1 and "Flagged: harmful content" in html
    assert XSS not in html and "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    item = next(it for it in review.project_review(db, pid)["items"] if it["prompt"] == "q0")
    assert [(f["labeller"], f["reason"]) for f in item["flags"]] == [("ann", "harmful")]
    db.dispose()


# ---- go back and edit ------------------------------------------------------------------------------------


def test_edit_replaces_the_label_keeps_history_and_exports_the_current_one(label_db):
    db, pid, tok = make(label_db, n_items=1, overlap=3)
    c = TestClient(create_app(db))
    label_ids = {}
    for name in ("ann", "bob", "cat"):
        a = c.post(f"/api/projects/{pid}/next", headers=auth(tok[name])).json()["assignment"]
        r = c.post(f"/api/assignments/{a['assignment_id']}/label", headers=auth(tok[name]),
                   json={"idempotency_key": f"{name}-first-key", "answers": answer_for(a, "r0a")})
        label_ids[name] = (r.json()["label_id"], a)
    (row,) = export.preference_rows(db, pid)
    assert (row["chosen"], row["votes"]) == ("r0a", {"chosen": 3, "rejected": 0, "tie": 0})
    lid, a = label_ids["ann"]
    mine = c.get(f"/api/projects/{pid}/my-labels", headers=auth(tok["ann"])).json()
    assert [m["label_id"] for m in mine] == [lid] and mine[0]["edits"] == 0
    body = {"idempotency_key": "ann-edit-key-1", "answers": answer_for(a, "r0b")}
    assert c.put(f"/api/labels/{lid}", headers=auth(tok["bob"]), json=body).status_code == 404  # not bob's
    r = c.put(f"/api/labels/{lid}", headers=auth(tok["ann"]), json=body)
    assert r.status_code == 200 and r.json() == {"label_id": lid, "changed": True, "revisions": 1}
    assert c.put(f"/api/labels/{lid}", headers=auth(tok["ann"]), json=body).json()["changed"] is False  # retry
    (row,) = export.preference_rows(db, pid)
    assert (row["chosen"], row["votes"]) == ("r0a", {"chosen": 2, "rejected": 1, "tie": 0})
    labels = export.stored_labels(db, pid)
    assert len(labels) == 3  # still one label per labeller
    ann_label = next(lab for lab in labels if lab["coder"] == "ann")
    assert ann_label["answers"]["pairwise"]["winner"] == 1
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count(LabelRevision.id))) == 1
        old = s.scalar(sa.select(LabelRevision))
        assert old.answers["pairwise"]["winner"] == 0 and old.superseded_at is not None
    # bob's and cat's edits flip the majority
    for name in ("bob", "cat"):
        blid, ba = label_ids[name]
        assert c.put(f"/api/labels/{blid}", headers=auth(tok[name]),
                     json={"idempotency_key": f"{name}-edit-key", "answers": answer_for(ba, "r0b")}).status_code == 200
    (row,) = export.preference_rows(db, pid)
    assert (row["chosen"], row["votes"]) == ("r0b", {"chosen": 3, "rejected": 0, "tie": 0})
    assert c.get(f"/api/projects/{pid}/my-labels", headers=auth(tok["ann"])).json()[0]["edits"] == 1
    db.dispose()


def test_recent_labels_are_the_last_20_newest_first(tmp_path):
    db, pid, tok = make(tmp_path, n_items=25, overlap=1, users=("ann",))
    c = TestClient(create_app(db))
    ids = []
    for n in range(25):
        a = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
        r = c.post(f"/api/assignments/{a['assignment_id']}/label", headers=auth(tok["ann"]),
                   json={"idempotency_key": f"ann-key-{n:04d}", "answers": answer_for(a, a["responses"][0])})
        ids.append(r.json()["label_id"])
    mine = c.get(f"/api/projects/{pid}/my-labels", headers=auth(tok["ann"])).json()
    assert len(mine) == 20 and [m["label_id"] for m in mine] == ids[::-1][:20]
    db.dispose()


def test_edit_through_the_pages_with_session_and_csrf(tmp_path):
    db, pid, tok = make(tmp_path, n_items=2, overlap=2)
    app = create_app(db)
    ann, bob = logged_in(TestClient(app), tok["ann"]), logged_in(TestClient(app), tok["bob"])
    page = ann.get(f"/label?project={pid}").text
    aid = int(re.search(r'action="/label/(\d+)"', page).group(1))
    key = re.search(r'name="idempotency_key" value="([^"]+)"', page).group(1)
    r = ann.post(f"/label/{aid}", data={"csrf": csrf_of(page), "idempotency_key": key, "pairwise_choice": "A",
                                        "pairwise_strength": "1"}, follow_redirects=False)
    assert r.status_code == 303
    recent = ann.get(f"/label/recent?project={pid}").text
    (lid,) = map(int, re.findall(r'href="/label/edit/(\d+)"', recent))
    assert bob.get(f"/label/edit/{lid}").status_code == 404  # another labeller's label
    assert TestClient(app).get(f"/label/edit/{lid}", follow_redirects=False).status_code == 303  # to /login
    edit = ann.get(f"/label/edit/{lid}").text
    assert f'action="/label/edit/{lid}"' in edit and 'id="editing"' in edit and 'id="skip-form"' not in edit
    assert 'name="pairwise_choice" value="A" required checked>' in edit  # opens with the current answer
    assert edit.count(" checked>") == 2  # choice A, strength 1
    form = {"idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', edit).group(1),
            "pairwise_choice": "B", "pairwise_strength": "2"}
    assert ann.post(f"/label/edit/{lid}", data=form, follow_redirects=False).status_code == 403  # no CSRF
    assert bob.post(f"/label/edit/{lid}", data={**form, "csrf": csrf_of(bob.get("/").text)},
                    follow_redirects=False).status_code == 404
    r = ann.post(f"/label/edit/{lid}", data={**form, "csrf": csrf_of(edit)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/label/recent?project={pid}"
    with db.session() as s:
        lab = s.get(Label, lid)
        assert lab.answers["pairwise"]["strength"] == 2
        assert s.scalar(sa.select(sa.func.count(LabelRevision.id))) == 1
    assert "edited 1×" in ann.get(f"/label/recent?project={pid}").text
    db.dispose()


def test_edit_page_opens_with_the_current_answers(tmp_path):
    db, pid, tok = make(tmp_path, n_items=1, overlap=1, users=("ann",), tasks=("likert", "binary", "critique"))
    c = TestClient(create_app(db))
    a = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
    answers = {"likert": {"ratings": [5, 2]}, "binary": {"accept": [False, True]},
               "critique": {"critique": "too short " + XSS, "target": 1, "rewrite": None}}
    lid = c.post(f"/api/assignments/{a['assignment_id']}/label", headers=auth(tok["ann"]),
                 json={"idempotency_key": "ann-key-0001", "answers": answers}).json()["label_id"]
    edit = logged_in(TestClient(create_app(db)), tok["ann"]).get(f"/label/edit/{lid}").text
    checked = re.findall(r'name="(\w+)" value="(\w+)"(?: required)? checked>', edit)
    assert sorted(checked) == [("binary_0", "reject"), ("binary_1", "accept"), ("likert_0", "5"), ("likert_1", "2")]
    assert '<option value="1" selected>B</option>' in edit
    assert "too short &lt;script&gt;" in edit and XSS not in edit
    db.dispose()


def as_submitted(html: str) -> dict[str, str]:
    """What a browser submits of the label form left as it opened: hidden fields, ticked boxes and radios."""
    fields = {}
    for tag in re.findall(r"<input [^>]*>", html[html.index('id="label-form"'):]):
        name, value = re.search(r'name="(\w+)"', tag), re.search(r'value="([^"]*)"', tag)
        if name and value and ('type="hidden"' in tag or " checked" in tag):
            fields[name.group(1)] = value.group(1)
    return fields


def test_edit_page_opens_with_the_stored_ranking_and_saves_it_untouched(tmp_path):
    db, _, tok = make(tmp_path, n_items=0, users=("ann", "bob"))
    items = [{"prompt": "rank me", "responses": ["first", "second", "third"]}]
    pid = service.upsert_project(db, "rank", items, ["ranking"], overlap=2)[0].id
    c = TestClient(create_app(db))
    a = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
    r = c.post(f"/api/assignments/{a['assignment_id']}/label", headers=auth(tok["ann"]),
               json={"idempotency_key": "ann-rank-01", "answers": {"ranking": {"order": [2, 0, 1]}}})
    stored = export.stored_labels(db, pid)[0]["answers"]["ranking"]["ranking"]
    assert [items[0]["responses"][i] for i in stored] == [a["responses"][p] for p in (2, 0, 1)]
    ann = logged_in(TestClient(create_app(db)), tok["ann"])
    edit = ann.get(f"/label/edit/{r.json()['label_id']}").text
    listed = re.findall(r'<li draggable="true" data-pos="(\d)">.*?<span class="snippet" dir="auto">(\w+)</span>',
                        edit, re.S)
    assert listed == [("2", a["responses"][2]), ("0", a["responses"][0]), ("1", a["responses"][1])]
    assert 'id="ranking_order" value="2,0,1"' in edit
    assert 'id="ranking_confirmed" value="yes" checked>' in edit  # confirmed when first labelled
    form = as_submitted(edit)
    assert (form["ranking_order"], form["ranking_touched"], form["ranking_confirmed"]) == ("2,0,1", "", "yes")
    r = ann.post(f"/label/edit/{r.json()['label_id']}", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    (label,) = export.stored_labels(db, pid)
    assert label["answers"]["ranking"]["ranking"] == stored and len(flow.revisions(db, label["label_id"])) == 1
    # a first label still has to show that the ranking was looked at
    bob = logged_in(TestClient(create_app(db)), tok["bob"])
    page = bob.get(f"/label?project={pid}").text
    assert 'id="ranking_order" value="0,1,2"' in page and 'value="yes">' in page and "yes\" checked" not in page
    aid = int(re.search(r'action="/label/(\d+)"', page).group(1))
    r = bob.post(f"/label/{aid}", data=as_submitted(page))
    assert r.status_code == 422 and "ranking_confirmed" in r.text
    assert len(export.stored_labels(db, pid)) == 1
    db.dispose()


def test_skip_and_flag_forms_need_login_csrf_and_labelling_role(tmp_path):
    db, pid, tok = make(tmp_path, n_items=2, overlap=1)
    app = create_app(db)
    ann = logged_in(TestClient(app), tok["ann"])
    page = ann.get(f"/label?project={pid}").text
    aid = int(re.search(r'action="/label/(\d+)/skip"', page).group(1))
    assert ann.post(f"/label/{aid}/skip", data={"reason": "unclear"}, follow_redirects=False).status_code == 403
    assert TestClient(app).post(f"/label/{aid}/skip", data={"reason": "unclear"}).status_code == 401
    assert TestClient(app).post(f"/api/assignments/{aid}/flag", headers=auth(tok["rev"]),
                                json={"reason": "harmful"}).status_code == 403  # reviewers do not label
    r = ann.post(f"/label/{aid}/flag", data={"csrf": csrf_of(page), "reason": "broken", "note": "empty B"},
                 follow_redirects=False)
    assert r.status_code == 303
    r = ann.post(f"/label/{aid}/skip", data={"csrf": csrf_of(page), "reason": "expertise"}, follow_redirects=False)
    assert r.status_code == 303
    nxt = ann.get(f"/label?project={pid}").text
    assert int(re.search(r'action="/label/(\d+)/skip"', nxt).group(1)) != aid
    with db.session() as s:
        kinds = sorted(s.scalars(sa.select(ItemMark.kind)))
    assert kinds == ["flag", "skip"]
    db.dispose()


def test_a_reposted_flag_is_stored_once(tmp_path):
    """A refresh after the flag POST (or a double click) answers as the first did and adds no second row."""
    db, pid, tok = make(tmp_path, n_items=2, overlap=1)
    app = create_app(db)
    ann = logged_in(TestClient(app), tok["ann"])
    page = ann.get(f"/label?project={pid}").text
    aid = int(re.search(r'action="/label/(\d+)/flag"', page).group(1))
    for _ in range(2):
        r = ann.post(f"/label/{aid}/flag", data={"csrf": csrf_of(page), "reason": "broken", "note": "dup?"},
                     follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/label?project={pid}"
    api = TestClient(app)
    first, again = (api.post(f"/api/assignments/{aid}/flag", headers=auth(tok["ann"]),
                             json={"reason": "harmful"}).json() for _ in range(2))
    assert first == again and first["kind"] == "flag"
    api.post(f"/api/assignments/{aid}/flag", headers=auth(tok["ann"]), json={"reason": "harmful", "note": "more"})
    with db.session() as s:
        rows = sorted((m.reason, m.note) for m in s.scalars(sa.select(ItemMark)))
    assert rows == [("broken", "dup?"), ("harmful", ""), ("harmful", "more")]  # a different flag is a new row
    db.dispose()


HTML = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def test_a_stale_tab_gets_an_html_page_not_json(tmp_path):
    """Logged out (401) or logged in again (CSRF 403) in another tab: a browser gets a page; the API, JSON."""
    db, pid, tok = make(tmp_path, n_items=2, overlap=1)
    ann = logged_in(TestClient(create_app(db)), tok["ann"])
    page = ann.get(f"/label?project={pid}").text
    aid = int(re.search(r'action="/label/(\d+)/flag"', page).group(1))
    flag = {"csrf": csrf_of(page), "reason": "broken"}
    ann.post("/logout", data={"csrf": csrf_of(page)})  # "another tab" logs out
    r = ann.post(f"/label/{aid}/flag", data=flag, headers=HTML, follow_redirects=False)
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
    assert "You are logged out" in r.text and 'id="token"' in r.text  # the login form, with why
    assert ann.post(f"/label/{aid}/flag", data=flag).json()["detail"].startswith("authentication required")
    logged_in(ann, tok["ann"])  # "another tab" logs in again: a new session, the page's token is old
    r = ann.post(f"/label/{aid}/flag", data=flag, headers=HTML, follow_redirects=False)
    assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
    assert "This page was out of date" in r.text and 'href="/" id="back"' in r.text
    r = ann.post(f"/api/projects/{pid}/next", headers={**HTML, "x-csrf-token": flag["csrf"]})
    assert r.status_code == 403 and r.json() == {"detail": "CSRF token missing or wrong"}  # the API keeps JSON
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count(ItemMark.id))) == 0
    db.dispose()


def test_label_pages_check_login_first_and_refuse_reviewers(tmp_path):
    db, pid, tok = make(tmp_path, n_items=1, overlap=1)
    app = create_app(db)
    for path in ("/label", "/label/recent"):
        r = TestClient(app).get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login", path  # not a 422 for no project
        r = logged_in(TestClient(app), tok["ann"]).get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/", path
    rev = logged_in(TestClient(app), tok["rev"])
    assert rev.get(f"/label/recent?project={pid}").status_code == 403  # as every other labelling route
    db.dispose()


# ---- timeout -----------------------------------------------------------------------------------------------


def test_held_item_is_released_after_the_timeout(label_db):
    db, pid, tok = make(label_db, n_items=1, overlap=1)
    c = TestClient(create_app(db, hold_minutes=30))
    a = c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
    assert c.post(f"/api/projects/{pid}/next", headers=auth(tok["bob"])).json()["assignment"] is None

    def backdate(minutes):
        with db.session() as s:
            s.get(Assignment, a["assignment_id"]).created_at = utcnow() - dt.timedelta(minutes=minutes)

    backdate(29)
    assert c.post(f"/api/projects/{pid}/next", headers=auth(tok["bob"])).json()["assignment"] is None
    backdate(31)
    b = c.post(f"/api/projects/{pid}/next", headers=auth(tok["bob"])).json()["assignment"]
    assert b is not None and b["prompt"] == "q0"
    r = c.post(f"/api/assignments/{a['assignment_id']}/label", headers=auth(tok["ann"]),
               json={"idempotency_key": "ann-late-key", "answers": answer_for(a, "r0a")})
    assert r.status_code == 409  # released: too late
    assert c.post(f"/api/assignments/{b['assignment_id']}/label", headers=auth(tok["bob"]),
                  json={"idempotency_key": "bob-key-0001", "answers": answer_for(b, "r0a")}).status_code == 201
    assert len(export.stored_labels(db, pid)) == 1
    assert flow.release_stale(db, pid, 30, now=utcnow() + dt.timedelta(hours=5)) == 0  # nothing open
    db.dispose()


def test_each_project_holds_items_for_its_own_timeout(label_db):
    db, short, tok = make(label_db, n_items=1, overlap=1)
    long, unset = (service.upsert_project(db, name, [{"prompt": name, "responses": ["x", "y"]}], ["pairwise"],
                                          overlap=1)[0].id for name in ("long", "unset"))
    projects.set_settings(db, short, {"hold_minutes": 5})
    projects.set_settings(db, long, {"hold_minutes": 15})
    c = TestClient(create_app(db, hold_minutes=8))  # the default of projects that set none
    held = {pid: c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"]
            for pid in (short, long, unset)}
    ten_later = utcnow() + dt.timedelta(minutes=10)
    assert [flow.release_stale(db, pid, 30, now=ten_later) for pid in (short, long, unset)] == [1, 0, 0]
    with db.session() as s:  # held 10 minutes in every project
        for a in held.values():
            s.get(Assignment, a["assignment_id"]).created_at = utcnow() - dt.timedelta(minutes=10)
    got = {pid: c.post(f"/api/projects/{pid}/next", headers=auth(tok["bob"])).json()["assignment"]
           for pid in (short, long, unset)}
    assert got[short]["prompt"] == "q0" and got[long] is None and got[unset]["prompt"] == "unset"
    with db.session() as s:
        released = {s.get(Assignment, a["assignment_id"]).project_id: s.get(Assignment, a["assignment_id"]).done
                    for a in held.values()}
    assert released == {short: True, long: False, unset: True}
    db.dispose()


def test_migration_6_adds_project_settings_and_keeps_data(tmp_path):
    path = str(tmp_path / "m.db")
    engine = Database(path, migrate_schema=False).engine
    assert migrate(engine, 5) == 5
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO projects (name, guidelines, tasks, overlap, created_at, min_critique_chars, "
                          "guidelines_version) VALUES ('old', 'g', '[\"pairwise\"]', 2, '2024-01-01 00:00:00', 7, 3)"))
        c.execute(sa.text("INSERT INTO items (project_id, position, prompt, responses) "
                          "VALUES (1, 0, 'q', '[\"a\", \"b\"]')"))
        c.execute(sa.text("INSERT INTO users (name, role, token_hash, active, created_at) "
                          "VALUES ('ann', 'labeller', 'h', 1, '2024-01-01 00:00:00')"))
        c.execute(sa.text("INSERT INTO assignments (item_id, user_id, project_id, slot, display_order, done, "
                          "created_at) VALUES (1, 1, 1, 0, '[1, 0]', 1, '2024-01-01 00:00:00')"))
        c.execute(sa.text("INSERT INTO labels (assignment_id, item_id, user_id, project_id, idempotency_key, "
                          "answers, created_at, guidelines_version) VALUES (1, 1, 1, 1, 'old-key-1', "
                          "'{\"pairwise\": {\"pair\": [1, 0], \"winner\": 0, \"strength\": 1}}', "
                          "'2024-01-01 00:00:00', 3)"))
    engine.dispose()
    db = Database(path)
    assert schema_version(db.engine) >= 6
    with db.session() as s:
        old = s.get(Project, 1)
        assert (old.name, old.guidelines, old.overlap, old.min_critique_chars, old.guidelines_version) == \
            ("old", "g", 2, 7, 3)
        assert (old.fast_seconds, old.hold_minutes) == (None, None)  # NULL: the defaults
        assert rules.fast_seconds(old) == 2.0 and rules.hold_minutes(old, 30.0) == 30.0
    (lab,) = export.stored_labels(db, 1)
    assert lab["answers"]["pairwise"]["winner"] == 0 and lab["created_at"] == "2024-01-01T00:00:00Z"
    assert review.project_review(db, 1)["thresholds"]["fast_seconds"] == 2.0
    db.dispose()


def test_migration_5_from_version_4_keeps_data(tmp_path):
    path = str(tmp_path / "m.db")
    db = Database(path, migrate_schema=False)
    assert migrate(db.engine, 4) == 4
    with db.engine.begin() as conn:
        assert not sa.inspect(conn).has_table("item_marks")
    db.dispose()
    db = Database(path)
    assert schema_version(db.engine) >= 5  # and every later migration
    with db.engine.begin() as conn:
        insp = sa.inspect(conn)
        assert insp.has_table("item_marks") and insp.has_table("label_revisions")
        assert "released_at" in {c["name"] for c in insp.get_columns("assignments")}
    db.dispose()


def test_guidelines_open_on_the_first_item_only(tmp_path):
    db, pid, tok = make(tmp_path, n_items=2, overlap=1, users=("ann",))
    ann = logged_in(TestClient(create_app(db)), tok["ann"])
    page = ann.get(f"/label?project={pid}").text
    assert '<details id="guidelines-details" open>' in page and "<strong>kind</strong>" in page
    aid = int(re.search(r'action="/label/(\d+)"', page).group(1))
    ann.post(f"/label/{aid}", data={"csrf": csrf_of(page), "idempotency_key": "first-item-key",
                                    "pairwise_choice": "A", "pairwise_strength": "1"})
    page = ann.get(f"/label?project={pid}").text
    assert '<details id="guidelines-details">' in page
    db.dispose()


# ---- the label page in Chromium ------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHAT = json.dumps([{"role": "user", "content": "Hi, who are **you**?"},
                   {"role": "assistant", "content": "A bot."}, {"role": "user", "content": "Prove it"}])
CONTROLS = """() => Array.from(document.querySelectorAll(
  'button, select, textarea, summary, input:not([type=hidden])')).filter(el => el.offsetParent !== null).map(el => {
  const target = (el.type === 'radio' || el.type === 'checkbox') ? (el.closest('label') || el) : el;
  const r = target.getBoundingClientRect();
  return {what: el.outerHTML.slice(0, 80), w: r.width, h: r.height};
})"""


@pytest.mark.slow
def test_label_page_flow_in_chromium(tmp_path):
    from playwright import sync_api as playwright_api

    from rlhfkit.label.testing import start_server

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found")
    db = Database(str(tmp_path / "c.db"))
    token = service.create_user(db, "lab")[1]
    items = [{"prompt": "Explain **bold** " + XSS + "\n\n```\nprint('hi')\n```", "responses": ["*yes*", "no"]},
             {"prompt": "Skip me", "responses": ["x", "y"]},
             {"prompt": CHAT, "responses": ["I am a bot.", "Trust me."]}]
    service.upsert_project(db, "demo", items, ["pairwise", "ranking", "likert"], overlap=1,
                           guidelines="## Rules\nPrefer **correct** answers.")
    db.dispose()
    proc, url = start_server(tmp_path / "c.db", log=tmp_path / "server.log")
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

            def session(**viewport):
                ctx = browser.new_context(**viewport)
                page = ctx.new_page()
                page.goto(url + "/login")
                page.fill("#token", token)
                page.click("#login")
                page.wait_for_selector("#label-form")
                return ctx, page

            def answer(page, choice):
                page.check(f"input[name=pairwise_choice][value={choice}]")
                page.click("input[name=likert_0][value='4']")
                page.click("input[name=likert_1][value='2']")
                page.check("#ranking_confirmed")

            ctx, page = session(viewport={"width": 1280, "height": 900})
            # first item: Markdown rendered safely, guidelines open
            assert page.text_content("#prompt strong") == "bold"
            assert page.text_content("#prompt pre code").strip() == "print('hi')"
            assert "<script>window.__xss=1</script>" in page.text_content("#prompt")  # inert text
            assert page.evaluate("window.__xss") is None
            assert page.get_attribute("#guidelines-details", "open") is not None
            assert page.locator(".response .md em").all_text_contents() == ["yes"]  # order is shuffled
            page.screenshot(path="/tmp/label_page_desktop.png", full_page=True)
            aid = page.get_attribute("#skip-form", "action")
            # flag: stays on the same item
            page.select_option("#flag-reason", "harmful")
            page.fill("#flag-note", "looks " + XSS)
            page.click("#flag")
            page.wait_for_selector("#label-form")
            assert page.get_attribute("#skip-form", "action") == aid
            answer(page, "A")
            page.click("#ranking li[data-pos='0'] button.down")  # ranked B over A
            page.click("#submit")
            page.wait_for_selector("#skip-form")
            # second item: skip it; never shown again
            assert "Skip me" in page.text_content("#prompt")
            assert page.get_attribute("#guidelines-details", "open") is None  # closed after the first item
            page.select_option("#skip-reason", "unclear")
            page.click("#skip")
            page.wait_for_selector("#label-form")
            # third item: a chat transcript as turns with role labels
            roles = page.eval_on_selector_all("#prompt .turn", "els => els.map(e => e.dataset.role)")
            assert roles == ["user", "assistant", "user"]
            assert page.text_content("#prompt .turn .role") == "user"
            assert page.text_content("#prompt .turn strong") == "you"
            ctx2, phone = session(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            small = [c for c in phone.evaluate(CONTROLS) if c["w"] < 44 or c["h"] < 44]
            assert small == [], small
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
            phone.screenshot(path="/tmp/label_page_390.png", full_page=True)
            ctx2.close()
            answer(page, "B")
            page.click("#submit")
            page.wait_for_selector("text=All done")
            # go back: edit the first label
            page.click("#recent-link")
            assert page.locator("#recent li").count() == 2
            page.locator("#recent li a.edit").last.click()
            page.wait_for_selector("#editing")
            # the stored ranking, confirmed once: saving it unchanged needs no move and no tick
            assert page.get_attribute("#ranking_order", "value") == "1,0" and page.is_checked("#ranking_confirmed")
            assert page.eval_on_selector_all("#ranking li", "els => els.map(e => e.dataset.pos)") == ["1", "0"]
            answer(page, "B")
            page.click("#submit")
            page.wait_for_selector("#recent")
            assert "edited 1×" in page.text_content("#recent")
            assert page.evaluate("window.__xss") is None
            ctx.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    db = Database(str(tmp_path / "c.db"))
    with db.session() as s:
        assert sorted(s.scalars(sa.select(ItemMark.kind))) == ["flag", "skip"]
        assert s.scalar(sa.select(sa.func.count(Label.id))) == 2
        assert s.scalar(sa.select(sa.func.count(LabelRevision.id))) == 1
    first = min(export.stored_labels(db, 1), key=lambda lab: lab["label_id"])
    order = first["display_order"]
    assert first["answers"]["pairwise"]["winner"] == order[1]  # the edit's B, not the first A
    assert first["answers"]["ranking"]["ranking"] == [order[1], order[0]]  # kept through the edit
    db.dispose()
