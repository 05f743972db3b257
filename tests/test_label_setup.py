"""Project set-up by an admin in the browser (issue 23): create a project from an uploaded JSONL / CSV /
Parquet file (duplicates skipped by content hash, counts shown, size-limited), versioned guidelines recorded
on every label, archived projects serve nothing but still export; one upload in Chromium."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from rlhfkit.cli import main
from rlhfkit.label import export, projects, service
from rlhfkit.label.db import Database, Item, Label
from rlhfkit.label.testing import auth, csrf_of, logged_in  # noqa: E402
from rlhfkit.label.web import create_app


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


ROWS = [{"prompt": "q0", "responses": ["a", "b"]}, {"prompt": "q1", "responses": ["c", "d"], "gold": 1},
        {"prompt": "q0", "responses": ["a", "b"]}]


@pytest.fixture
def setup(tmp_path):
    db = Database(str(tmp_path / "s.db"))
    tokens = {"admin": service.create_user(db, "admin", "admin")[1], "ann": service.create_user(db, "ann")[1],
              "bob": service.create_user(db, "bob")[1]}
    app = create_app(db, max_import=20_000)
    yield db, app, tokens
    db.dispose()


def result_of(html: str) -> str:
    m = re.search(r'id="(?:upload-result|error)">([^<]*)<', html)
    return m.group(1) if m else html


def test_create_and_upload_jsonl_csv_parquet_with_counts(setup):
    db, app, tok = setup
    admin = logged_in(TestClient(app), tok["admin"])
    csrf = csrf_of(admin.get("/admin").text)
    fields = {"name": "up", "tasks": ["pairwise", "likert"], "overlap": "2", "guidelines": "Be **fair**."}
    files = {"file": ("items.jsonl", jsonl(ROWS), "application/json")}
    assert admin.post("/admin/projects/new", data=fields, files=files).status_code == 403  # no CSRF
    ann = logged_in(TestClient(app), tok["ann"])
    assert ann.post("/admin/projects/new", data={**fields, "csrf": csrf_of(ann.get("/").text)},
                    files=files).status_code == 403  # labellers: admin only
    r = admin.post("/admin/projects/new", data={**fields, "csrf": csrf}, files=files)
    assert r.status_code == 200 and result_of(r.text) == "Created with 2 items added, 1 duplicate skipped."
    with db.session() as s:
        (pid,) = s.scalars(sa.select(service.Project.id))
        project = s.get(service.Project, pid)
        assert (project.tasks, project.overlap, project.guidelines) == (["pairwise", "likert"], 2, "Be **fair**.")
    r = admin.post("/admin/projects/new", data={**fields, "csrf": csrf}, files=files)
    assert r.status_code == 409  # the name is taken: upload to it instead
    csv_text = "prompt,response_1,response_2,gold,source\nq1,c,d,1,\nq2,e,f,,web\nq3,g,h,0,web\n"
    r = admin.post(f"/admin/projects/{pid}/upload", data={"csrf": csrf},
                   files={"file": ("more.csv", csv_text.encode(), "text/csv")})
    # q1 (gold given again, an empty 'source' cell) is the same item by content hash as the JSONL's q1
    assert r.status_code == 200 and result_of(r.text) == "2 items added, 1 duplicate skipped.", r.text
    r = admin.post(f"/admin/projects/{pid}/upload", data={"csrf": csrf},
                   files={"file": ("again.csv", csv_text.encode(), "text/csv")})
    assert result_of(r.text) == "0 items added, 3 duplicates skipped."
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"prompt": "q0", "responses": ["a", "b"]},
                                         {"prompt": "q9", "responses": ["y", "z"]}]), buf)
    r = admin.post(f"/admin/projects/{pid}/upload", data={"csrf": csrf},
                   files={"file": ("p.parquet", buf.getvalue(), "application/octet-stream")})
    assert result_of(r.text) == "1 item added, 1 duplicate skipped."
    with db.session() as s:
        prompts = list(s.scalars(sa.select(Item.prompt).where(Item.project_id == pid).order_by(Item.position)))
        golds = dict(s.execute(sa.select(Item.prompt, Item.gold).where(Item.project_id == pid)).all())
    assert prompts == ["q0", "q1", "q2", "q3", "q9"] and golds["q3"] == 0 and golds["q2"] is None
    # refused uploads: wrong type, a bad row (named), too large (max_import 20 000 bytes)
    r = admin.post(f"/admin/projects/{pid}/upload", data={"csrf": csrf}, files={"file": ("x.txt", b"hi", "text/plain")})
    assert r.status_code == 422 and ".jsonl, .csv or .parquet" in r.text
    r = admin.post(f"/admin/projects/{pid}/upload", data={"csrf": csrf},
                   files={"file": ("bad.jsonl", jsonl([ROWS[0], {"prompt": "x", "responses": ["only one"]}]),
                                   "application/json")})
    assert r.status_code == 422 and "row 2" in result_of(r.text) and "responses" in result_of(r.text)
    big = jsonl([{"prompt": f"q{i}" + "x" * 300, "responses": ["a", "b"]} for i in range(100)])
    r = admin.post(f"/admin/projects/{pid}/upload", data={"csrf": csrf},
                   files={"file": ("big.jsonl", big, "application/json")})
    assert r.status_code == 413
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count(Item.id))) == 5  # nothing from the refused ones


def test_chat_transcript_rows_are_imported_as_turns(setup):
    db, app, tok = setup
    chat = [{"role": "user", "content": "Hi **there**"}, {"role": "assistant", "content": "<b>hey</b>"}]
    c = TestClient(app)
    r = c.post("/api/admin/projects", headers=auth(tok["admin"]),
               json={"name": "chat", "items": [{"prompt": chat, "responses": ["x", "y"]}]})
    assert r.status_code == 201 and r.json()["items_added"] == 1
    ann = logged_in(TestClient(app), tok["ann"])
    html = ann.get(f"/label?project={r.json()['id']}").text
    assert html.count('class="turn"') == 2 and 'data-role="assistant"' in html
    assert "<strong>there</strong>" in html and "&lt;b&gt;hey&lt;/b&gt;" in html and "<b>hey</b>" not in html


def label_one(c, token, pid, key):
    a = c.post(f"/api/projects/{pid}/next", headers=auth(token)).json()["assignment"]
    r = c.post(f"/api/assignments/{a['assignment_id']}/label", headers=auth(token),
               json={"idempotency_key": key, "answers": {"pairwise": {"choice": "A"}}})
    assert r.status_code == 201, r.text
    return r.json()["label_id"]


def test_guidelines_versions_are_recorded_on_labels(setup):
    db, app, tok = setup
    project, _ = service.upsert_project(db, "g", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(3)],
                                        ["pairwise"], overlap=1, guidelines="v1 text")
    pid = project.id
    c = TestClient(app)
    first = label_one(c, tok["ann"], pid, "ann-key-0001")
    admin = logged_in(TestClient(app), tok["admin"])
    r = admin.post(f"/admin/projects/{pid}/guidelines", data={"csrf": csrf_of(admin.get("/admin").text),
                                                              "guidelines": "v2 **text**"})
    assert result_of(r.text) == "Guidelines saved: version 2."
    assert c.post(f"/api/admin/projects/{pid}/guidelines", headers=auth(tok["admin"]),
                  json={"guidelines": "v3 text"}).json() == {"version": 3}
    assert c.post(f"/api/admin/projects/{pid}/guidelines", headers=auth(tok["admin"]),
                  json={"guidelines": "v3 text"}).json() == {"version": 3}  # unchanged: no new version
    assert c.get(f"/api/admin/projects/{pid}/guidelines", headers=auth(tok["ann"])).status_code == 403
    history = c.get(f"/api/admin/projects/{pid}/guidelines", headers=auth(tok["admin"])).json()
    assert [(h["version"], h["text"]) for h in history] == [(1, "v1 text"), (2, "v2 **text**"), (3, "v3 text")]
    assert history[1]["author"] == "admin"
    second = label_one(c, tok["bob"], pid, "bob-key-0001")
    with db.session() as s:
        assert {s.get(Label, first).guidelines_version, s.get(Label, second).guidelines_version} == {1, 3}
        assert (s.get(Label, first).guidelines_version, s.get(Label, second).guidelines_version) == (1, 3)
    assert [r["guidelines_version"] for r in export.stored_labels(db, pid)] == [1, 3]
    ann = logged_in(TestClient(app), tok["ann"])
    assert "v3 text" in ann.get(f"/label?project={pid}").text
    assert [p["guidelines_version"] for p in c.get("/api/projects", headers=auth(tok["ann"])).json()] == [3]


def test_archived_project_serves_nothing_and_still_exports(setup):
    db, app, tok = setup
    project, _ = service.upsert_project(db, "arch", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(3)],
                                        ["pairwise"], overlap=1)
    pid = project.id
    c = TestClient(app)
    label_one(c, tok["ann"], pid, "ann-key-0001")
    held = c.post(f"/api/projects/{pid}/next", headers=auth(tok["bob"])).json()["assignment"]
    assert held is not None
    admin = logged_in(TestClient(app), tok["admin"])
    r = admin.post(f"/admin/projects/{pid}/archive", data={"csrf": csrf_of(admin.get("/admin").text), "archived": "1"})
    assert "Archived" in result_of(r.text)
    assert 'class="badge archived"' in admin.get("/admin").text
    for name in ("ann", "bob"):
        assert c.post(f"/api/projects/{pid}/next", headers=auth(tok[name])).json()["assignment"] is None
    ann = logged_in(TestClient(app), tok["ann"])
    page = ann.get(f"/label?project={pid}").text
    assert "All done" in page and re.search(r'id="remaining">0<', page)
    assert c.post(f"/api/assignments/{held['assignment_id']}/label", headers=auth(tok["bob"]),
                  json={"idempotency_key": "bob-late-key", "answers": {"pairwise": {"choice": "A"}}}).status_code == 409
    rows = c.get(f"/api/admin/projects/{pid}/export?kind=labels", headers=auth(tok["admin"])).json()
    assert len(rows) == 1 and rows[0]["coder"] == "ann"
    assert [p["archived"] for p in c.get("/api/projects", headers=auth(tok["ann"])).json()] == [True]
    assert c.post(f"/api/admin/projects/{pid}/archive", headers=auth(tok["ann"]), json={"archived": False}).status_code == 403
    assert c.post(f"/api/admin/projects/{pid}/archive", headers=auth(tok["admin"]),
                  json={"archived": False}).json()["archived"] is False
    assert c.post(f"/api/projects/{pid}/next", headers=auth(tok["ann"])).json()["assignment"] is not None
    assert projects.set_archived(db, pid, True)["released"] == 1  # ann's new open assignment


def settings_of(db, name: str) -> tuple:
    with db.session() as s:
        project = s.scalar(sa.select(service.Project).where(service.Project.name == name))
        return None if project is None else (project.fast_seconds, project.hold_minutes)


def test_fast_and_hold_settings_when_creating_and_later_in_the_browser(setup):
    db, app, tok = setup
    admin = logged_in(TestClient(app), tok["admin"])
    page = admin.get("/admin").text
    assert 'name="fast_seconds"' in page and 'placeholder="30"> minutes' in page  # the app's --hold-minutes
    csrf = csrf_of(page)
    fields = {"csrf": csrf, "name": "timed", "tasks": "pairwise", "overlap": "1"}
    files = {"file": ("items.jsonl", jsonl(ROWS), "application/json")}
    for fast, hold in (("-3", "5"), ("0", "5"), ("2", "0"), ("2", "1e3"), ("2", "99999"), ("²", "5")):
        r = admin.post("/admin/projects/new", data={**fields, "fast_seconds": fast, "hold_minutes": hold}, files=files)
        assert r.status_code == 422 and re.search("fast_seconds|hold_minutes", result_of(r.text)), (fast, hold)
    assert settings_of(db, "timed") is None  # a refused setting makes no project
    r = admin.post("/admin/projects/new", data={**fields, "fast_seconds": "3.5", "hold_minutes": "5"}, files=files)
    assert r.status_code == 200 and settings_of(db, "timed") == (3.5, 5.0)
    r = admin.post("/admin/projects/new", data={**fields, "name": "plain"}, files=files)
    assert r.status_code == 200 and settings_of(db, "plain") == (None, None)  # the defaults
    pid = next(p["id"] for p in TestClient(app).get("/api/projects", headers=auth(tok["admin"])).json()
               if p["name"] == "timed")
    assert 'step="any"\nvalue="5"' in admin.get("/admin").text  # the set-up form shows the stored value
    r = admin.post(f"/admin/projects/{pid}/settings", data={"csrf": csrf, "fast_seconds": "1", "hold_minutes": "-1"})
    assert r.status_code == 422 and "hold_minutes" in result_of(r.text) and settings_of(db, "timed") == (3.5, 5.0)
    r = admin.post(f"/admin/projects/{pid}/settings", data={"csrf": csrf, "fast_seconds": "1", "hold_minutes": ""})
    assert result_of(r.text) == "Settings saved: &#34;very fast&#34; below 1 s; items held for the server&#39;s default."
    assert settings_of(db, "timed") == (1.0, None)
    assert admin.post(f"/admin/projects/{pid}/settings", data={"fast_seconds": "9"}).status_code == 403  # no CSRF
    ann = logged_in(TestClient(app), tok["ann"])
    assert ann.post(f"/admin/projects/{pid}/settings", data={"csrf": csrf_of(ann.get("/").text),
                                                            "fast_seconds": "9"}).status_code == 403
    api = TestClient(app)
    r = api.post("/api/admin/projects", headers=auth(tok["admin"]), json={
        "name": "api", "fast_seconds": 0.5, "hold_minutes": 45, "items": ROWS[:1]})
    assert r.status_code == 201 and settings_of(db, "api") == (0.5, 45.0)
    r = api.post("/api/admin/projects", headers=auth(tok["admin"]), json={
        "name": "api-bad", "hold_minutes": -1, "items": ROWS[:1]})
    assert r.status_code == 422 and settings_of(db, "api-bad") is None
    r = api.post(f"/api/admin/projects/{pid}/settings", headers=auth(tok["admin"]), json={"hold_minutes": 20})
    assert r.json() == {"min_critique_chars": 1, "fast_seconds": 1.0, "hold_minutes": 20.0}  # the rest unchanged
    assert api.get(f"/api/admin/projects/{pid}/settings", headers=auth(tok["admin"])).json()["hold_minutes"] == 20


def test_fast_and_hold_settings_from_the_cli(setup, capsys):
    db, _, _ = setup
    path = str(db.engine.url.database)
    items = Path(path).with_name("items.jsonl")
    items.write_bytes(jsonl(ROWS))
    assert main(["label", "import", str(items), "--db", path, "--project", "cli", "--fast-seconds", "2.5",
                 "--hold-minutes", "7"]) == 0
    assert settings_of(db, "cli") == (2.5, 7.0)
    capsys.readouterr()
    assert main(["label", "settings", "--db", path, "--project", "cli", "--hold-minutes", "12"]) == 0
    assert json.loads(capsys.readouterr().out) == {"project": "cli", "min_critique_chars": 1, "fast_seconds": 2.5,
                                                   "hold_minutes": 12.0}
    assert main(["label", "settings", "--db", path, "--project", "cli", "--hold-minutes", "default"]) == 0
    assert settings_of(db, "cli") == (2.5, None)  # serve's --hold-minutes from now on
    for flag, value in (("--fast-seconds", "0"), ("--fast-seconds", "nan"), ("--hold-minutes", "-5")):
        assert main(["label", "settings", "--db", path, "--project", "cli", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"field '{flag[2:].replace('-', '_')}': must be a number above 0" in err
    assert main(["label", "import", str(items), "--db", path, "--project", "new", "--hold-minutes", "-1"]) == 2
    assert settings_of(db, "new") is None and settings_of(db, "cli") == (2.5, None)  # nothing stored


@pytest.mark.slow
def test_upload_a_project_in_chromium(tmp_path):
    from playwright import sync_api as playwright_api

    from rlhfkit.label.testing import start_server

    db = Database(str(tmp_path / "u.db"))
    token = service.create_user(db, "admin", "admin")[1]
    db.dispose()
    upload = tmp_path / "items.jsonl"
    upload.write_bytes(jsonl(ROWS + [{"prompt": "q5", "responses": ["x", "y"]}]))
    proc, url = start_server(tmp_path / "u.db", log=tmp_path / "server.log")
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/login")
            page.fill("#token", token)
            page.click("#login")
            page.wait_for_selector("#new-project")
            page.fill("#new-project-name", "browser upload")
            page.check("input[name=tasks][value=likert]")
            page.fill("#new-project-guidelines", "Read **carefully**.")
            page.set_input_files("#new-project-file", str(upload))
            page.click("#create-project")
            page.wait_for_selector("#upload-result")
            assert page.text_content("#upload-result") == "Created with 3 items added, 1 duplicate skipped."
            page.click("text=back to admin")
            page.wait_for_selector("section.project")
            assert "3 items (1 gold)" in page.text_content("section.project")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    db = Database(str(tmp_path / "u.db"))
    with db.session() as s:
        project = s.scalar(sa.select(service.Project))
        assert (project.name, project.tasks) == ("browser upload", ["pairwise", "likert"])
    db.dispose()
    assert Path(tmp_path / "server.log").exists()
