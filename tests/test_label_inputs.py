"""Labelling app input boundaries (issue 23): invalid Unicode, BOM, bidi controls, duplicate imports, task
changes, Unicode digits in forms, API docs, export to a folder, critique-only agreement, stale login tabs."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.cli import main  # noqa: E402
from rlhfkit.label import service  # noqa: E402
from rlhfkit.label.db import Database, Item, Project  # noqa: E402
from rlhfkit.label.text import BIDI_CONTROLS  # noqa: E402
from rlhfkit.label.web import create_app  # noqa: E402

SURROGATE_D800 = "contains a lone UTF-16 surrogate (U+D800) at character 4, which is not valid Unicode text"


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def login(client, token):
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"token": token, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r


def raw_json(client, url, token, body_text: str):
    """POST a JSON body written by hand, so it can hold escapes such as \\ud800 that no encoder emits."""
    return client.post(url, headers={**auth(token), "content-type": "application/json"},
                       content=body_text.encode("ascii"))


def count_items(db, name):
    with db.session() as s:
        project = s.query(Project).filter_by(name=name).one_or_none()
        return None if project is None else s.query(Item).filter_by(project_id=project.id).count()


@pytest.fixture
def app_db(label_db):
    db = Database(label_db)
    admin = service.create_user(db, "admin", "admin")[1]
    tokens = {n: service.create_user(db, n)[1] for n in ("ann", "bob")}
    yield db, TestClient(create_app(db)), admin, tokens
    db.dispose()


# ---- 1. invalid Unicode at every boundary ------------------------------------------------------------


def test_lone_surrogate_in_critique_is_422_naming_field_and_nothing_stored(app_db):
    db, client, admin, tokens = app_db
    project, _ = service.upsert_project(db, "crit", [{"prompt": "p", "responses": ["a", "b"]}], ["critique"])
    view = client.post(f"/api/projects/{project.id}/next", headers=auth(tokens["ann"])).json()["assignment"]
    url = f"/api/assignments/{view['assignment_id']}/label"
    r = raw_json(client, url, tokens["ann"], '{"idempotency_key": "surrogate-1", "answers": {"critique": '
                                             '{"critique": "bad \\ud800 text", "target": 0}}}')
    assert r.status_code == 422
    assert r.json()["detail"] == f"field 'answers.critique.critique': {SURROGATE_D800}"
    r = raw_json(client, url, tokens["ann"], '{"idempotency_key": "surrogate-2", "answers": {"critique": '
                                             '{"critique": "ok", "rewrite": "\\ud83e", "target": 0}}}')
    assert r.status_code == 422 and r.json()["detail"].startswith("field 'answers.critique.rewrite': contains")
    export = client.get(f"/api/admin/projects/{project.id}/export?kind=labels", headers=auth(admin))
    assert export.status_code == 200 and export.json() == []  # nothing stored, the export still works
    ok = client.post(url, headers=auth(tokens["ann"]), json={"idempotency_key": "surrogate-3", "answers": {
        "critique": {"critique": "fine 🙂", "target": 0}}})
    assert ok.status_code == 201
    export = client.get(f"/api/admin/projects/{project.id}/export?kind=labels", headers=auth(admin))
    assert export.status_code == 200 and export.json()[0]["answers"]["critique"]["critique"] == "fine 🙂"


def test_api_import_rejects_lone_surrogate_and_nul_naming_row_and_field(app_db):
    db, client, admin, _ = app_db
    ok = '{"prompt": "fine", "responses": ["a", "b"]}'
    for bad, field in (('{"prompt": "hi \\ud83e", "responses": ["a", "b"]}', "prompt"),
                       ('{"prompt": "hi", "responses": ["a", "b\\udc00"]}', "responses[1]"),
                       ('{"prompt": "hi", "responses": ["a", "b"], "source": ["x", "\\ud800"]}', "source[1]"),
                       ('{"prompt": "hi \\u0000", "responses": ["a", "b"]}', "prompt")):
        r = raw_json(client, "/api/admin/projects", admin, f'{{"name": "imp", "items": [{ok}, {bad}]}}')
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"].startswith(f"request, row 2, field '{field}': contains a "), r.json()
    # typed fields (names, guidelines) are refused by the request model, with the same reason
    for url, body, field in (("/api/admin/projects", f'{{"name": "imp \\ud800", "items": [{ok}]}}', "name"),
                             ("/api/admin/projects", f'{{"name": "imp", "guidelines": "gdl \\ud800", "items": [{ok}]}}',
                              "guidelines"),
                             ("/api/admin/labellers", '{"name": "eve \\ud800"}', "name")):
        r = raw_json(client, url, admin, body)
        assert r.status_code == 422 and r.json()["detail"] == [{"type": "string_unicode", "loc": ["body", field],
                                                                "msg": SURROGATE_D800}], r.text
    assert count_items(db, "imp") is None  # no project, no item: nothing of a refused import is stored


def test_cli_import_lone_surrogate_is_one_line_exit_2(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    db_path = str(tmp_path / "x.db")
    for row, field in (('{"prompt": "why \\ud83e", "responses": ["a", "b"]}', "prompt"),
                       ('{"prompt": "why", "responses": ["a", "\\ud83e"]}', "responses[1]")):
        items.write_text('{"prompt": "fine", "responses": ["a", "b"]}\n' + row + "\n", encoding="ascii")
        assert main(["label", "import", str(items), "--db", db_path, "--project", "p"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        assert f"{items}, row 2, field '{field}': contains a lone UTF-16 surrogate (U+D83E)" in err, err
    items.write_text('{"prompt": "fine", "responses": ["a", "b"]}\n')
    guide = tmp_path / "guide.md"
    guide.write_bytes(b"# Rules\n\xff\n")
    assert main(["label", "import", str(items), "--db", db_path, "--project", "p", "--guidelines", str(guide)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{guide}: not UTF-8 (invalid start byte)" in err
    db = Database(db_path)
    assert count_items(db, "p") is None
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a \\ud83e"}\n', encoding="ascii")
    assert main(["label", "generate", "--db", db_path, "--project", "g", "--model", "unused",
                 "--prompts", str(prompts)]) == 2
    assert f"{prompts}, row 1, field 'prompt': contains a lone UTF-16 surrogate" in capsys.readouterr().err


def test_cli_import_accepts_utf8_bom(tmp_path, capsys):
    items = tmp_path / "bom.jsonl"
    rows = [{"prompt": "¿qué?", "responses": ["sí", "no"]}, {"prompt": "p2", "responses": ["a\u2028b", "c"]}]
    items.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    assert main(["label", "import", str(items), "--db", str(tmp_path / "x.db"), "--project", "p"]) == 0
    assert "2 items added, 0 duplicates skipped" in capsys.readouterr().out
    db = Database(str(tmp_path / "x.db"))
    with db.session() as s:
        assert [(i.prompt, i.responses) for i in s.query(Item).order_by(Item.position)] == \
            [(r["prompt"], r["responses"]) for r in rows]


def test_bidi_controls_rendered_inert(app_db):
    db, client, admin, tokens = app_db
    prompt = "evil \u202egnp.exe and \u2067isolate\u2069 שלום"
    project, _ = service.upsert_project(db, "rtl \u202eeman", [{"prompt": prompt, "responses": ["\u202dA", "B"]}],
                                        ["pairwise", "ranking"], guidelines="Rules \u202e here")
    login(client, tokens["ann"])
    page = client.get(f"/label?project={project.id}")
    assert page.status_code == 200
    assert not set(BIDI_CONTROLS) & set(page.text)  # no live bidi control anywhere in the page
    assert re.search(r'<div id="prompt">\s*<div class="md" dir="auto"><p>evil \[U\+202E\]gnp\.exe and '
                     r'\[U\+2067\]isolate\[U\+2069\] שלום</p>', page.text)  # visible, isolated, Hebrew kept
    assert "[U+202D]A" in page.text and "<bdi>rtl [U+202E]eman</bdi>" in page.text and "Rules [U+202E] here" in page.text
    aid = int(re.search(r'action="/label/(\d+)"', page.text).group(1))
    view = client.get(f"/api/assignments/{aid}", headers=auth(tokens["ann"])).json()
    assert view["prompt"] == prompt  # the data itself is kept as imported
    admin_client = TestClient(client.app)
    login(admin_client, admin)
    html = admin_client.get("/admin").text
    assert not set(BIDI_CONTROLS) & set(html) and "<h2><bdi>rtl [U+202E]eman</bdi></h2>" in html


# ---- 2. duplicates, task changes, Unicode digits ------------------------------------------------------


def test_reimport_skips_duplicates_by_content_and_counts(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    rows = [{"prompt": "p1", "responses": ["a", "b"]}, {"prompt": "p2", "responses": ["a", "b"], "id": 7}]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["label", "import", str(items), "--db", str(tmp_path / "x.db"), "--project", "p"]
    assert main(args) == 0
    assert "2 items added, 0 duplicates skipped" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 items added, 2 duplicates skipped" in capsys.readouterr().out
    # new: the same prompt with other responses, or other metadata; duplicates: p1 again (gold does not
    # make it another item), and a row repeated inside the file
    more = [{"prompt": "p1", "responses": ["a", "c"]}, {"prompt": "p2", "responses": ["a", "b"], "id": 8},
            {"prompt": "p1", "responses": ["a", "b"], "gold": 0}, {"prompt": "p3", "responses": ["x", "y"]},
            {"prompt": "p3", "responses": ["x", "y"]}]
    items.write_text("".join(json.dumps(r) + "\n" for r in more))
    assert main(args) == 0
    assert "3 items added, 2 duplicates skipped" in capsys.readouterr().out
    assert count_items(Database(str(tmp_path / "x.db")), "p") == 5


def test_api_import_reports_duplicates(app_db):
    db, client, admin, _ = app_db
    body = {"name": "dup", "items": [{"prompt": "q", "responses": ["a", "b"]}] * 2}
    first = client.post("/api/admin/projects", headers=auth(admin), json=body).json()
    again = client.post("/api/admin/projects", headers=auth(admin), json=body).json()
    assert (first["items_added"], first["duplicates_skipped"]) == (1, 1)
    assert (again["items_added"], again["duplicates_skipped"]) == (0, 2)
    assert count_items(db, "dup") == 1


def test_tasks_of_existing_project_cannot_change(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    db_path = str(tmp_path / "x.db")
    args = ["label", "import", str(items), "--db", db_path, "--project", "p"]
    assert main([*args, "--tasks", "pairwise,likert"]) == 0
    capsys.readouterr()
    assert main([*args, "--tasks", "likert"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "project 'p' already has the tasks pairwise,likert; refusing to change them to likert" in err
    assert main([*args, "--tasks", "likert,pairwise"]) == 0  # the same tasks: fine
    assert main(args) == 0  # no --tasks: add items, keep the tasks
    db = Database(db_path)
    with db.session() as s:
        assert s.query(Project).one().tasks == ["pairwise", "likert"]
    client = TestClient(create_app(db))
    admin = service.create_user(db, "admin", "admin")[1]
    r = client.post("/api/admin/projects", headers=auth(admin), json={"name": "p", "tasks": ["binary"]})
    assert r.status_code == 409 and "already has the tasks pairwise,likert" in r.json()["detail"]


@pytest.fixture
def form_page(tmp_path):
    db = Database(str(tmp_path / "f.db"))
    token = service.create_user(db, "ann")[1]
    project, _ = service.upsert_project(db, "f", [{"prompt": "p", "responses": ["a", "b", "c"]}],
                                        ["pairwise", "ranking", "likert", "critique"])
    client = TestClient(create_app(db))
    login(client, token)
    page = client.get(f"/label?project={project.id}")
    aid = int(re.search(r'action="/label/(\d+)"', page.text).group(1))
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    form = {"csrf": csrf, "idempotency_key": "form-key-1", "pairwise_choice": "A", "pairwise_strength": "1",
            "ranking_order": "0,1,2", "ranking_confirmed": "yes", "critique_text": "ok", "critique_target": "0",
            "duration_ms": "1200",
            **{f"likert_{p}": "3" for p in range(3)}}
    yield db, client, aid, form
    db.dispose()


def test_form_unicode_digits_are_422_naming_the_field(form_page):
    db, client, aid, form = form_page
    for field, value in (("likert_0", "²"), ("duration_ms", "²"), ("pairwise_strength", "٣"),
                         ("critique_target", "9" * 5000), ("ranking_order", "0,¹,2")):
        r = client.post(f"/label/{aid}", data={**form, field: value}, follow_redirects=False)
        assert r.status_code == 422, (field, r.status_code)
        assert r.headers["content-type"].startswith("text/html")
        assert f"field &#39;{field}&#39; must be a whole number written with the digits 0-9" in r.text, field
    ok = client.post(f"/label/{aid}", data=form, follow_redirects=False)
    assert ok.status_code == 303
    from rlhfkit.label.export import stored_labels

    labels = stored_labels(db, 1)
    assert len(labels) == 1 and labels[0]["duration_ms"] == 1200


# ---- 3. API docs -------------------------------------------------------------------------------------


def test_docs_are_off_and_the_schema_is_admin_only(app_db):
    _, client, admin, tokens = app_db
    for url in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        r = client.get(url, follow_redirects=False)
        assert r.status_code == 404, url
        assert "swagger" not in r.text.lower() and "redoc" not in r.text.lower()
    assert client.get("/api/admin/openapi.json").status_code == 401
    assert client.get("/api/admin/openapi.json", headers=auth(tokens["ann"])).status_code == 403
    r = client.get("/api/admin/openapi.json", headers=auth(admin))
    assert r.status_code == 200 and "/api/assignments/{assignment_id}/label" in r.json()["paths"]


# ---- 4. export to a folder, legacy bad text, critique agreement, stale login tab ------------------------


def _labelled_project(tmp_path, responses):
    db = Database(str(tmp_path / "e.db"))
    user, _ = service.create_user(db, "ann")
    project, _ = service.upsert_project(db, "my proj", [{"prompt": "p", "responses": ["a", "b"]}], ["pairwise"])
    with db.session() as s:  # text as an older rlhfkit stored it, before the input checks
        s.query(Item).one().responses = responses
    a = service.next_assignment(db, user, project.id)
    service.submit(db, user, a.id, "export-key-1", {"pairwise": {"choice": "A"}})
    return db, project


def test_export_to_a_folder_writes_a_default_name_and_no_tmp(tmp_path, capsys):
    db, _ = _labelled_project(tmp_path, ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    base = ["label", "export", "--db", str(tmp_path / "e.db"), "--project", "my proj", "--kind", "labels"]
    assert main([*base, "--out", str(out)]) == 0
    assert f"1 labels rows written to {out / 'my_proj_labels.jsonl'}" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["my_proj_labels.jsonl"]
    assert main([*base, "--out", str(tmp_path / "new") + "/"]) == 0  # a path ending in '/' is a folder too
    assert (tmp_path / "new" / "my_proj_labels.jsonl").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([*base, "--out", str(blocker / "x.jsonl")]) == 2  # cannot create the folder: one line
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{blocker / 'x.jsonl'}: cannot write the export" in err
    assert not list(tmp_path.rglob("*.tmp"))


def test_legacy_surrogate_text_export_errors_one_line_and_pages_still_work(tmp_path, capsys):
    db, project = _labelled_project(tmp_path, ["a", "bad \ud800"])
    out = tmp_path / "pairs.jsonl"
    args = ["label", "export", "--db", str(tmp_path / "e.db"), "--project", "my proj", "--out", str(out),
            "--ties", "keep"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert re.search(rf"{re.escape(str(out))}, row 1, field '(chosen|rejected)': {re.escape(SURROGATE_D800)}", err)
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    admin = service.create_user(db, "admin", "admin")[1]
    client = TestClient(create_app(db))
    r = client.get(f"/api/admin/projects/{project.id}/export?ties=keep", headers=auth(admin))
    assert r.status_code == 422 and "row 1, field '" in r.json()["detail"]
    bob = service.create_user(db, "bob")[1]  # a labeller given that item is not stuck on a 500
    login(client, bob)
    page = client.get(f"/label?project={project.id}")
    assert page.status_code == 200 and "bad \ufffd" in page.text
    aid = int(re.search(r'action="/label/(\d+)"', page.text).group(1))
    view = client.get(f"/api/assignments/{aid}", headers=auth(bob))
    assert view.status_code == 200 and "bad \ufffd" in view.json()["responses"]


def test_critique_only_agreement_reports_its_labels(app_db):
    db, client, admin, tokens = app_db
    items = [{"prompt": f"c{i}", "responses": ["a", "b"]} for i in range(2)]
    project, _ = service.upsert_project(db, "crit", items, ["critique"], overlap=2)
    empty, _ = service.upsert_project(db, "empty", items, ["pairwise"])
    for who in ("ann", "bob"):
        while (view := client.post(f"/api/projects/{project.id}/next", headers=auth(tokens[who])).json()
               ["assignment"]) is not None:
            r = client.post(f"/api/assignments/{view['assignment_id']}/label", headers=auth(tokens[who]),
                            json={"idempotency_key": f"crit-{who}-{view['assignment_id']}",
                                  "answers": {"critique": {"critique": "meh", "target": 0}}})
            assert r.status_code == 201
    result = client.get(f"/api/admin/projects/{project.id}/agreement", headers=auth(admin)).json()
    assert result["labels"] == 4 and result["project"] == {}
    assert result["notes"] == ["agreement is not defined for free-text critiques (4 critique labels stored: "
                               "exported, not compared)"]
    login(client, admin)
    html = client.get("/admin").text
    section = html[html.index(f'id="project-{project.id}"'):html.index(f'id="project-{empty.id}"')]
    assert "no labels yet" not in section and "4 labels, none for a task with an agreement measure" in section
    assert "Agreement is not defined for free-text critiques (4 critique labels stored" in section
    assert "no labels yet" in html[html.index(f'id="project-{empty.id}"'):]


def test_login_from_an_older_tab_gets_the_login_page_again(app_db):
    _, client, _, tokens = app_db
    old_tab = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    client.get("/login")  # a newer tab replaces the login cookie
    r = client.post("/login", data={"token": tokens["ann"], "csrf": old_tab}, follow_redirects=False)
    assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
    assert ('<p class="error" role="alert">This login form has expired (opened in another tab or too long ago); '
            "please log in again.</p>") in r.text
    fresh = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)
    ok = client.post("/login", data={"token": tokens["ann"], "csrf": fresh}, follow_redirects=False)
    assert ok.status_code == 303  # the page it gave works


# ---- 4. bad bytes in CSRF values and form bodies (independent probe F1, F2) ------------------------------------

FORM = {"content-type": "application/x-www-form-urlencoded"}


def test_non_ascii_csrf_value_is_403_not_a_server_error(app_db):
    """hmac.compare_digest raises TypeError on non-ASCII str: every such value must simply not match."""
    db, _, _, tokens = app_db
    client = TestClient(create_app(db), raise_server_exceptions=False)
    client.get("/login")
    for bad in (b"%C3%A9", b"%ED%A0%80", b"%FF%FE"):
        r = client.post("/login", content=b"csrf=" + bad + b"&token=x", headers=FORM)
        assert r.status_code == 403 and "This login form has expired" in r.text, (bad, r.status_code)
    fresh = TestClient(create_app(db), raise_server_exceptions=False)  # the login cookie itself non-ASCII
    r = fresh.post("/login", content=b"csrf=abc&token=x", headers={**FORM, "cookie": b"rlk_login_csrf=\xc3\xa9"})
    assert r.status_code == 403
    login(client, tokens["ann"])
    project, _ = service.upsert_project(db, "csrf", [{"prompt": "p", "responses": ["a", "b"]}], ["pairwise"])
    aid = int(re.search(r'action="/label/(\d+)/skip"', client.get(f"/label?project={project.id}").text).group(1))
    for bad in (b"%C3%A9", b"%ED%A0%80", b"%FF%FE"):
        r = client.post(f"/label/{aid}/skip", content=b"csrf=" + bad + b"&reason=other", headers=FORM)
        assert r.status_code == 403 and r.json() == {"detail": "CSRF token missing or wrong"}, (bad, r.status_code)
    r = client.post(f"/api/projects/{project.id}/next", headers={"x-csrf-token": b"\xc3\xa9"})
    assert r.status_code == 403


def _marks(db):
    from rlhfkit.label.db import ItemMark, User

    with db.session() as s:
        return s.query(ItemMark).count(), [u.name for u in s.query(User).order_by(User.id)]


def test_form_bytes_that_are_not_utf8_are_422_naming_the_field_and_nothing_stored(form_page):
    """Starlette would store U+FFFD (urlencoded) or latin-1 mojibake (multipart): refused like bad JSON text."""
    db, client, aid, form = form_page
    csrf = form["csrf"]
    def body(**raw: bytes) -> bytes:  # the label form, with some fields as raw urlencoded bytes
        fields = [f"{k}={v}".encode() for k, v in form.items() if k not in raw]
        return b"&".join(fields + [k.encode() + b"=" + v for k, v in raw.items()])

    for field, raw in (("critique_text", b"%ED%A0%80"), ("critique_rewrite", b"ok%FF%FE")):
        r = client.post(f"/label/{aid}", content=body(**{field: raw}), headers=FORM)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"field '{field}': not valid UTF-8 text"), r.text
    r = client.post(f"/label/{aid}/skip", content=f"csrf={csrf}&reason=other&note=a%FF%FEb".encode(), headers=FORM)
    assert r.status_code == 422 and r.json()["detail"] == "field 'note': not valid UTF-8 text (byte 1)"
    r = client.post(f"/label/{aid}/flag", content=f"csrf={csrf}&reason=other&note=%ED%A0%80".encode(), headers=FORM)
    assert r.status_code == 422 and "field 'note'" in r.json()["detail"]
    from rlhfkit.label.export import stored_labels

    assert stored_labels(db, 1) == [] and _marks(db)[0] == 0
    # a U+FFFD the labeller typed is valid text, and raw (not percent-encoded) UTF-8 is read as UTF-8
    r = client.post(f"/label/{aid}", content=body(critique_text="odd+%EF%BF%BD+é".encode()), headers=FORM,
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    assert stored_labels(db, 1)[0]["answers"]["critique"]["critique"] == "odd \ufffd é"


def test_admin_forms_refuse_bytes_that_are_not_utf8(app_db):
    db, _, admin, _ = app_db
    client = TestClient(create_app(db))
    login(client, admin)
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/admin").text).group(1)
    for bad in (b"%ED%A0%80", b"%FF%FE"):
        r = client.post("/admin/labellers", content=b"csrf=" + csrf.encode() + b"&role=labeller&name=" + bad,
                        headers=FORM, follow_redirects=False)
        assert r.status_code == 422 and r.json()["detail"].startswith("field 'name': not valid UTF-8"), r.text
    assert _marks(db)[1] == ["admin", "ann", "bob"]
    # multipart: a text part's raw bytes must be UTF-8 (Starlette would decode them as latin-1)
    r = client.post("/admin/projects/new", data={"csrf": csrf, "name": "ok"},
                    files={"file": ("a.jsonl", b'{"prompt": "p", "responses": ["a", "b"]}\n')})
    assert r.status_code == 200, r.text
    boundary = b"XyZ"
    parts = [(b"csrf", csrf.encode()), (b"name", b"\xed\xa0\x80bad")]
    body = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + n + b'"\r\n\r\n' + v + b"\r\n"
                    for n, v in parts)
    body += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
             b'Content-Type: application/octet-stream\r\n\r\n{"prompt": "q", "responses": ["a", "b"]}\n\r\n--'
             + boundary + b"--\r\n")
    r = client.post("/admin/projects/new", content=body,
                    headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == 422 and r.json()["detail"] == "field 'name': not valid UTF-8 text (byte 0)", r.text
    r = client.post("/admin/projects/1/guidelines", content=b"csrf=" + csrf.encode() + b"&guidelines=x%FF",
                    headers=FORM)
    assert r.status_code == 422 and r.json()["detail"].startswith("field 'guidelines'")
    with db.session() as s:
        assert [(p.name, p.guidelines) for p in s.query(Project)] == [("ok", "")]


def test_overlong_critique_says_it_is_too_long(app_db):
    db, client, _, tokens = app_db
    project, _ = service.upsert_project(db, "long", [{"prompt": "p", "responses": ["a", "b"]}], ["critique"])
    view = client.post(f"/api/projects/{project.id}/next", headers=auth(tokens["ann"])).json()["assignment"]
    r = client.post(f"/api/assignments/{view['assignment_id']}/label", headers=auth(tokens["ann"]),
                    json={"idempotency_key": "long-critique", "answers": {"critique": {"critique": "x" * 50_001}}})
    assert r.status_code == 422 and "critique.critique is too long: at most 50000 characters" in r.text, r.text


def test_every_form_is_read_through_the_strict_reader():
    """``request.form()`` (lossy for bytes that are not UTF-8) is called by :func:`forms.read_form` only."""
    from pathlib import Path

    import rlhfkit.label as label

    lossy = [f.name for f in Path(label.__file__).parent.glob("*.py")
             if f.name != "forms.py" and "request.form()" in f.read_text(encoding="utf-8")]
    assert lossy == []
