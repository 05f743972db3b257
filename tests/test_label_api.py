"""Labelling app API: assignment, gold, order randomisation, idempotency, security rules, migrations, CLI."""

from __future__ import annotations

import datetime as dt
import json
import random
import re

import pytest
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.label import service  # noqa: E402
from rlhfkit.label.db import Database, Item, migrate, schema_version  # noqa: E402
from rlhfkit.label.testing import random_answers  # noqa: E402
from rlhfkit.label.web import create_app  # noqa: E402

XSS = "<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\">"
TASKS = ["pairwise", "ranking", "binary", "likert", "critique"]


@pytest.fixture
def setup(label_db):
    db = Database(label_db)
    _, admin = service.create_user(db, "admin", "admin")
    tokens = {name: service.create_user(db, name)[1] for name in ("ann", "bob", "cat")}
    items = [{"prompt": f"question {i}", "responses": [f"r{i}-{j}" for j in range(3)], "gold": None}
             for i in range(4)]
    items.insert(2, {"prompt": "gold question", "responses": ["right", "wrong", "also wrong"], "gold": 0})
    items.append({"prompt": "xss " + XSS, "responses": ["plain", XSS], "gold": None})
    project, _ = service.upsert_project(db, "proj", items, TASKS, overlap=2, guidelines="# Be *fair*\n" + XSS)
    client = TestClient(create_app(db))
    yield db, client, admin, tokens, project.id
    db.dispose()  # the PostgreSQL cluster is shared by the session: give its connections back


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def label_all(client, token, pid, rng, answer=None):
    done = []
    while True:
        r = client.post(f"/api/projects/{pid}/next", headers=auth(token))
        assert r.status_code == 200, r.text
        view = r.json()["assignment"]
        if view is None:
            return done
        answers = answer(view) if answer else random_answers(view["tasks"], len(view["responses"]), rng)
        r = client.post(f"/api/assignments/{view['assignment_id']}/label", headers=auth(token),
                        json={"idempotency_key": f"k-{token[-8:]}-{view['assignment_id']}", "answers": answers})
        assert r.status_code == 201, r.text
        done.append(view)


def test_overlap_never_twice_and_gold_accuracy(setup):
    db, client, admin, tokens, pid = setup
    rng = random.Random(0)

    def answer(view):  # ann and bob always pick the gold's right answer as best; cat the opposite
        a = random_answers(view["tasks"], len(view["responses"]), rng)
        if view["prompt"] == "gold question":
            right = view["responses"].index("right")
            others = [p for p in range(3) if p != right]
            best = right if who != "cat" else others[0]
            rest = [p for p in range(3) if p != best]
            a["ranking"] = {"order": [best] + rest}
            a["likert"] = {"ratings": [5 if p == best else 1 for p in range(3)]}
            a["binary"] = {"accept": [p == best for p in range(3)]}
            pair = view["responses"][:2]
            a["pairwise"] = {"choice": "A" if pair[0] == view["responses"][best] else
                             ("B" if pair[1] == view["responses"][best] else "tie"), "strength": 2}
        return a

    seen = {}
    for who in ("ann", "bob", "cat"):
        seen[who] = [v["prompt"] for v in label_all(client, tokens[who], pid, rng, answer)]
        assert len(seen[who]) == len(set(seen[who]))  # never twice to the same labeller
    counts = {}
    for prompts in seen.values():
        for p in prompts:
            counts[p] = counts.get(p, 0) + 1
    assert counts.pop("gold question") == 3  # gold goes to everyone
    assert set(counts.values()) == {2} and len(counts) == 5  # every other item exactly R = 2 times
    r = client.get(f"/api/admin/projects/{pid}/agreement", headers=auth(admin))
    assert r.status_code == 200
    labellers = r.json()["labellers"]
    assert labellers["ann"]["gold_accuracy"] == 1.0 and labellers["bob"]["gold_accuracy"] == 1.0
    assert labellers["cat"]["gold_accuracy"] < 0.6 and "gold accuracy" in labellers["cat"]["flag"]
    progress = client.get("/api/projects", headers=auth(tokens["ann"])).json()[0]
    assert progress["remaining"] == 0 and progress["done"] == len(seen["ann"])


def test_order_randomised_recorded_and_mapped_back(setup):
    db, client, admin, tokens, pid = setup
    orders = set()
    for who in ("ann", "bob"):
        view = client.post(f"/api/projects/{pid}/next", headers=auth(tokens[who])).json()["assignment"]
        original = ["r0-0", "r0-1", "r0-2"]
        order = [original.index(r) for r in view["responses"]]  # display -> original
        orders.add(tuple(order))
        answers = {"pairwise": {"choice": "B", "strength": 3}, "ranking": {"order": [2, 0, 1]},
                   "binary": {"accept": [True, False, False]}, "likert": {"ratings": [5, 1, 3]},
                   "critique": {"critique": "meh", "rewrite": "better", "target": 1}}
        r = client.post(f"/api/assignments/{view['assignment_id']}/label", headers=auth(tokens[who]),
                        json={"idempotency_key": f"order-{who}-1", "answers": answers})
        assert r.status_code == 201
        from rlhfkit.label.db import Assignment, Label

        with db.session() as s:
            label = s.get(Label, r.json()["label_id"])
            assert s.get(Assignment, view["assignment_id"]).order == order  # recorded
            a = label.answers
        assert a["pairwise"] == {"pair": [order[0], order[1]], "winner": order[1], "strength": 3}
        assert a["ranking"]["ranking"] == [order[2], order[0], order[1]]
        assert a["binary"]["accept"][order[0]] is True and sum(a["binary"]["accept"]) == 1
        assert a["likert"]["ratings"][order[0]] == 5 and a["likert"]["ratings"][order[1]] == 1
        assert a["critique"]["response"] == order[1]
    # the service draws every assignment's order afresh: over 40 three-response items one labeller sees
    # more than one permutation, and position 0 holds each original response sometimes (p(fail) = 3·(2/3)^40 < 1e-6)
    items = [{"prompt": f"spread {i}", "responses": ["x", "y", "z"], "gold": None} for i in range(40)]
    spread, _ = service.upsert_project(db, "spread", items, ["pairwise"], overlap=1)
    shown = label_all(client, tokens["cat"], spread.id, random.Random(2))
    firsts = {v["responses"][0] for v in shown}
    assert len(shown) == 40 and len({tuple(v["responses"]) for v in shown}) > 1 and firsts == {"x", "y", "z"}


def test_concurrent_requests_fill_exactly_the_free_slots(label_db):
    """24 labellers ask at once for the 24 slots of 8 items (R = 3): each gets one (none is told "nothing
    left" while another holds an item's lock) and every item gets exactly R; one labeller asking 4 times
    at once gets a single open assignment."""
    import threading
    from collections import Counter

    db = Database(label_db)
    users = [service.create_user(db, f"c{i}")[0] for i in range(25)]
    items = [{"prompt": f"race {i}", "responses": ["a", "b", "c"], "gold": None} for i in range(8)]
    full, _ = service.upsert_project(db, "race", items, ["pairwise"], overlap=3)
    spare, _ = service.upsert_project(db, "spare", items, ["pairwise"], overlap=3)

    def at_once(calls):
        out, barrier = [None] * len(calls), threading.Barrier(len(calls))

        def work(i):
            barrier.wait()
            out[i] = calls[i]()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    got = at_once([lambda u=u: service.next_assignment(db, u, full.id) for u in users[:24]])
    assert all(a is not None for a in got)
    assert sorted(Counter(a.item_id for a in got).values()) == [3] * 8
    assert service.next_assignment(db, users[24], full.id) is None  # and then it is full
    same = at_once([lambda: service.next_assignment(db, users[24], spare.id)] * 4)
    assert len({a.id for a in same}) == 1
    db.dispose()


def test_pairwise_k3_asks_every_pair_maps_back_and_exports(label_db):
    """K = 3, pairwise only: an item's 6 labellers are spread over its 3 pairs (twice each) and see just
    that pair; the stored pair and winner are the original indices of the texts shown and chosen, whatever
    the shuffled order; the export turns them into the right chosen / rejected rows."""
    from collections import Counter

    from rlhfkit.label.export import preference_rows, stored_labels

    db = Database(label_db)
    names = [f"p{i}" for i in range(6)]
    tokens = {n: service.create_user(db, n)[1] for n in names}
    items = [{"prompt": f"k3 {i}", "responses": [f"item{i} resp{j}" for j in range(3)], "gold": None}
             for i in range(4)]
    project, _ = service.upsert_project(db, "k3", items, ["pairwise"], overlap=6)
    client = TestClient(create_app(db))
    page_client = TestClient(client.app)
    login(page_client, tokens["p0"])
    page = page_client.get(f"/label?project={project.id}").text
    assert 'id="resp-1"' in page and 'id="resp-2"' not in page  # exactly the compared pair on the page
    shown, chosen = {}, {}  # assignment id -> texts shown (A, B); -> text chosen (None: tie)

    def answer(view):
        a, b = view["responses"]
        shown[view["assignment_id"]] = (a, b)
        if who == "p5":  # one labeller always says tie
            chosen[view["assignment_id"]] = None
            return {"pairwise": {"choice": "tie"}}
        chosen[view["assignment_id"]] = min(a, b)  # the others prefer the lower original index
        return {"pairwise": {"choice": "A" if a < b else "B", "strength": 2}}

    for who in names:
        assert len(label_all(client, tokens[who], project.id, random.Random(0), answer)) == 4
    with db.session() as sess:
        texts = {item.id: item.responses for item in sess.query(Item).filter_by(project_id=project.id)}
    asked = {item: Counter() for item in texts}
    orientations = set()
    for lab in stored_labels(db, project.id):
        responses, pairwise = texts[lab["item_id"]], lab["answers"]["pairwise"]
        pair, winner = pairwise["pair"], pairwise["winner"]
        assert pair == lab["display_order"][:2]  # the assignment's pair, recorded in original indices
        assert (responses[pair[0]], responses[pair[1]]) == shown[lab["assignment_id"]]  # mapped back
        assert (None if winner is None else responses[winner]) == chosen[lab["assignment_id"]]
        asked[lab["item_id"]][tuple(sorted(pair))] += 1
        orientations.add(pair[0] < pair[1])
    assert all(c == {(0, 1): 2, (0, 2): 2, (1, 2): 2} for c in asked.values())  # every pair, evenly
    assert orientations == {True, False}  # shuffled: p(one orientation in all 24) ~ 1e-7
    rows = preference_rows(db, project.id, aggregate="soft", ties="drop")
    assert len(rows) == 12  # 4 items x 3 pairs, none tied: each pair had one or two "lower index" votes
    for row in rows:
        lo, hi = sorted(t for t in texts[row["item_id"]] if t in (row["chosen"], row["rejected"]))
        votes = [chosen[a] for a, pair in shown.items() if set(pair) == {lo, hi}]
        assert (row["chosen"], row["rejected"]) == (lo, hi)
        assert row["votes"] == {"chosen": votes.count(lo), "rejected": 0, "tie": votes.count(None)}
        assert row["label"] == pytest.approx((votes.count(lo) + 0.5 * votes.count(None)) / 2)
    assert sum(r["votes"]["tie"] for r in rows) == 4  # p5's four ties, one per item
    # K = 4: the next labeller gets the pair disjoint from the one already asked
    assert service.pick_pair(4, [[1, 0]]) == (2, 3)
    db.dispose()


def test_idempotent_retry_counted_once(setup):
    db, client, admin, tokens, pid = setup
    view = client.post(f"/api/projects/{pid}/next", headers=auth(tokens["ann"])).json()["assignment"]
    body = {"idempotency_key": "retry-key-123", "answers": random_answers(TASKS, 3, random.Random(1))}
    url = f"/api/assignments/{view['assignment_id']}/label"
    first = client.post(url, headers=auth(tokens["ann"]), json=body)
    again = client.post(url, headers=auth(tokens["ann"]), json=body)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["duplicate"] and again.json()["label_id"] == first.json()["label_id"]
    other = client.post(url, headers=auth(tokens["ann"]), json={**body, "idempotency_key": "another-key-1"})
    assert other.status_code == 409
    stolen = client.post(url, headers=auth(tokens["bob"]), json=body)
    assert stolen.status_code in (404, 409)
    labels = client.get(f"/api/admin/projects/{pid}/export?kind=labels", headers=auth(admin)).json()
    assert len(labels) == 1


def test_bad_answers_are_4xx_json(setup):
    db, client, admin, tokens, pid = setup
    view = client.post(f"/api/projects/{pid}/next", headers=auth(tokens["ann"])).json()["assignment"]
    url = f"/api/assignments/{view['assignment_id']}/label"
    bad = random_answers(TASKS, 3, random.Random(2))
    bad["ranking"] = {"order": [0, 0, 1]}
    r = client.post(url, headers=auth(tokens["ann"]), json={"idempotency_key": "bad-answers-1", "answers": bad})
    assert r.status_code == 422 and "permutation" in r.json()["detail"]
    r = client.post(url, headers={**auth(tokens["ann"]), "content-type": "application/json"}, content=b"{nope")
    assert r.status_code == 422


# ---- security: one test per rule ---------------------------------------------------------------------


def test_no_token_is_401(setup):
    _, client, _, _, pid = setup
    for method, url in (("get", "/api/me"), ("post", f"/api/projects/{pid}/next"), ("get", "/api/projects"),
                        ("get", f"/api/admin/projects/{pid}/agreement"), ("post", "/api/assignments/1/label")):
        r = getattr(client, method)(url)
        assert r.status_code == 401, (url, r.status_code)
    assert client.get("/api/me", headers=auth("rlk_wrong")).status_code == 401
    assert client.get("/label?project=1", follow_redirects=False).status_code == 303  # to the login page


def test_other_labellers_assignment_is_404(setup):
    _, client, _, tokens, pid = setup
    view = client.post(f"/api/projects/{pid}/next", headers=auth(tokens["ann"])).json()["assignment"]
    aid = view["assignment_id"]
    assert client.get(f"/api/assignments/{aid}", headers=auth(tokens["bob"])).status_code == 404
    r = client.post(f"/api/assignments/{aid}/label", headers=auth(tokens["bob"]),
                    json={"idempotency_key": "bob-steals-1", "answers": random_answers(TASKS, 3, random.Random())})
    assert r.status_code == 404
    assert client.get(f"/api/assignments/{aid}", headers=auth(tokens["ann"])).status_code == 200
    # ids past a 32-bit INTEGER column are a 422 up front (PostgreSQL would fail the query: a 500)
    assert client.get(f"/api/assignments/{2**31}", headers=auth(tokens["ann"])).status_code == 422
    assert client.get(f"/label?project={2**31}", headers=auth(tokens["ann"])).status_code == 422


def test_admin_routes_are_403_for_labellers(setup):
    _, client, _, tokens, pid = setup
    h = auth(tokens["ann"])
    assert client.get("/api/admin/labellers", headers=h).status_code == 403
    assert client.post("/api/admin/labellers", headers=h, json={"name": "eve"}).status_code == 403
    assert client.get(f"/api/admin/projects/{pid}/export", headers=h).status_code == 403
    assert client.get(f"/api/admin/projects/{pid}/agreement", headers=h).status_code == 403
    assert client.post("/api/admin/projects", headers=h, json={"name": "x"}).status_code == 403
    assert client.get("/admin", headers=h).status_code == 403


def login(client, token):
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"token": token, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    return r


def test_xss_payload_rendered_inert(setup):
    db, client, admin, tokens, pid = setup
    login(client, tokens["ann"])
    # label until the XSS item is shown
    for _ in range(10):
        page = client.get(f"/label?project={pid}")
        assert page.status_code == 200
        if "xss" in page.text:
            break
        aid = int(re.search(r'action="/label/(\d+)"', page.text).group(1))
        client.post(f"/api/assignments/{aid}/label", headers=auth(tokens["ann"]),
                    json={"idempotency_key": f"skip-{aid}-xx", "answers": random_answers(TASKS, 3, random.Random())})
    html = page.text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    assert "<script>window" not in html and "<img src=x" not in html
    assert "<h1>Be <em>fair</em></h1>" in html  # guidelines Markdown is rendered, its raw HTML escaped
    assert "script-src 'self'" in page.headers["content-security-policy"]
    admin_client = TestClient(client.app)
    login(admin_client, admin)
    assert "<script>window" not in admin_client.get("/admin").text


def test_csrf_missing_is_403(setup):
    _, client, _, tokens, pid = setup
    login(client, tokens["ann"])
    page = client.get(f"/label?project={pid}")
    aid = int(re.search(r'action="/label/(\d+)"', page.text).group(1))
    form = {"pairwise_choice": "A", "pairwise_strength": "1", "ranking_order": "0,1,2", "critique_text": "ok",
            "ranking_confirmed": "yes", "critique_target": "0", "idempotency_key": "csrf-test-1",
            **{f"binary_{p}": "accept" for p in range(3)}, **{f"likert_{p}": "3" for p in range(3)}}
    assert client.post(f"/label/{aid}", data=form, follow_redirects=False).status_code == 403
    assert client.post(f"/label/{aid}", data={**form, "csrf": "forged"}, follow_redirects=False).status_code == 403
    assert client.post(f"/api/projects/{pid}/next").status_code == 403  # cookie-authenticated JSON post too
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    ok = client.post(f"/label/{aid}", data={**form, "csrf": csrf}, follow_redirects=False)
    assert ok.status_code == 303
    # the login form is protected as well (double-submit cookie)
    fresh = TestClient(client.app)
    assert fresh.post("/login", data={"token": tokens["bob"]}).status_code == 403


def test_oversized_body_is_413(setup):
    _, client, admin, tokens, pid = setup
    view = client.post(f"/api/projects/{pid}/next", headers=auth(tokens["ann"])).json()["assignment"]
    big = {"idempotency_key": "big-body-1", "answers": {"critique": {"critique": "x" * 400_000}}}
    r = client.post(f"/api/assignments/{view['assignment_id']}/label", headers=auth(tokens["ann"]), json=big)
    assert r.status_code == 413
    # a chunked body without Content-Length is cut off as well
    r = client.post(f"/api/assignments/{view['assignment_id']}/label",
                    headers={**auth(tokens["ann"]), "content-type": "application/json"},
                    content=iter([b"{" + b" " * 200_000, b" " * 200_000 + b"}"]))
    assert r.status_code == 413
    # imports have their own (larger) limit
    items = [{"prompt": "p", "responses": ["a", "b"]}] * 10
    r = client.post("/api/admin/projects", headers=auth(admin), json={"name": "small", "items": items})
    assert r.status_code == 201


def test_tokens_stored_hashed(setup):
    db, _, admin, tokens, _ = setup
    from rlhfkit.label.db import User

    with db.session() as s:
        hashes = {u.token_hash for u in s.query(User)}
    assert not (set(tokens.values()) | {admin}) & hashes
    assert service.hash_token(tokens["ann"]) in hashes


# ---- storage and CLI ---------------------------------------------------------------------------------


def test_migration_keeps_existing_labels(label_db):
    import sqlalchemy as sa

    from rlhfkit.label.db import MIGRATIONS, _v1_tables, make_engine

    engine = make_engine(label_db)
    assert migrate(engine, target=1) == 1
    v1 = sa.MetaData()
    _v1_tables(v1)  # rows written through the frozen version-1 tables: typed, so portable to every backend
    t = v1.tables
    when = dt.datetime(2024, 1, 1)
    with engine.begin() as c:
        def add(table, **row):
            return c.execute(t[table].insert().values(**row)).inserted_primary_key[0]

        pid = add("projects", name="p", guidelines="", tasks=["pairwise"], overlap=2, created_at=when)
        item = add("items", project_id=pid, position=0, prompt="q", responses=["a", "b"])
        uid = add("users", name="ann", role="labeller", token_hash="h", active=True, created_at=when)
        aid = add("assignments", item_id=item, user_id=uid, project_id=pid, slot=0, display_order=[1, 0],
                  done=True, created_at=when)
        add("labels", assignment_id=aid, item_id=item, user_id=uid, project_id=pid, idempotency_key="key-old-1",
            answers={"pairwise": {"pair": [1, 0], "winner": 1, "strength": 1}}, created_at=when)
    engine.dispose()
    db = Database(label_db)  # opening migrates to the current version
    try:
        assert schema_version(db.engine) == len(MIGRATIONS)
        from rlhfkit.label.export import stored_labels

        labels = stored_labels(db, pid)
        assert len(labels) == 1 and labels[0]["answers"]["pairwise"]["winner"] == 1
        assert labels[0]["duration_ms"] is None and labels[0]["created_at"] == "2024-01-01T00:00:00Z"
        # the upgraded database keeps working: new rows get fresh ids next to the old ones
        user, token = service.create_user(db, "bob")
        assert user.id != uid
        assert service.next_assignment(db, user, pid).item_id == item
    finally:
        db.dispose()


def test_cli_errors_name_file_row_field(tmp_path, capsys):
    from rlhfkit.cli import main

    bad = tmp_path / "items.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n"
                   + json.dumps({"prompt": "p", "responses": ["a", "b"], "gold": 5}) + "\n")
    assert main(["label", "import", str(bad), "--db", str(tmp_path / "x.db"), "--project", "p"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "items.jsonl, row 2, field 'gold'" in err
    bad.write_text("{not json\n")
    assert main(["label", "import", str(bad), "--db", str(tmp_path / "x.db"), "--project", "p"]) == 2
    assert "row 1" in capsys.readouterr().err
    assert main(["label", "import", str(bad), "--db", str(tmp_path / "x.db"), "--project", "p",
                 "--tasks", "vibes"]) == 2
