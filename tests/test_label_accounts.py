"""Labelling app accounts and page behaviour (issue 23): sessions apart from API tokens (logout, expiry),
token rotation and disabling (admin page and CLI), post/redirect/get for new tokens, ranking interaction
and minimum critique length, Enter on buttons, and the prompt in view on load (Chromium via Playwright)."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.cli import main  # noqa: E402
from rlhfkit.label import rules, service  # noqa: E402
from rlhfkit.label.db import Database, Label, Project, User, WebSession, migrate  # noqa: E402
from rlhfkit.label.testing import auth, csrf_of, login  # noqa: E402
from rlhfkit.label.web import SESSION_COOKIE, create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"



@pytest.fixture
def app(label_db):
    db = Database(label_db)
    admin = service.create_user(db, "admin", "admin")[1]
    tokens = {n: service.create_user(db, n)[1] for n in ("ann", "bob")}
    items = [{"prompt": f"q{i}", "responses": ["a", "b", "c"]} for i in range(3)]
    project, _ = service.upsert_project(db, "p", items, ["ranking", "critique"], overlap=2)
    yield db, create_app(db, session_hours=2), admin, tokens, project.id
    db.dispose()


def user_id(db, name):
    with db.session() as s:
        return s.scalar(sa.select(User.id).where(User.name == name))


# ---- A. sessions apart from tokens ----------------------------------------------------------------------


def test_cookie_is_a_session_id_and_logout_revokes_it(app):
    db, application, _, tokens, pid = app
    client = TestClient(application)
    r = login(client, tokens["ann"])
    sid = client.cookies[SESSION_COOKIE]
    assert sid != tokens["ann"] and tokens["ann"] not in r.headers["set-cookie"]  # not the API token
    assert "Max-Age=7200" in r.headers["set-cookie"]  # session_hours=2
    with db.session() as s:
        stored = s.scalars(sa.select(WebSession.id_hash)).all()
    assert stored == [service.hash_token(sid)]  # stored hashed, never the id itself
    assert client.get("/api/me").json()["name"] == "ann"
    login(client, tokens["ann"])  # logging in again in this browser replaces its session
    assert TestClient(application, cookies={SESSION_COOKIE: sid}).get("/api/me").status_code == 401
    sid = client.cookies[SESSION_COOKIE]
    assert client.get("/api/me").json()["name"] == "ann"
    page = client.get(f"/label?project={pid}")
    assert client.post("/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False).status_code == 303
    replay = TestClient(application, cookies={SESSION_COOKIE: sid})  # the old cookie, kept by an attacker
    assert replay.get("/api/me").status_code == 401
    assert replay.get(f"/label?project={pid}", follow_redirects=False).headers["location"] == "/login"
    assert client.get("/api/me", headers=auth(tokens["ann"])).status_code == 200  # the API token still works


def test_expired_session_is_refused(app):
    db, application, _, tokens, _ = app
    client = TestClient(application)
    login(client, tokens["ann"])
    assert client.get("/api/me").status_code == 200
    with db.session() as s:
        s.execute(sa.update(WebSession).values(expires_at=dt.datetime(2020, 1, 1)))
    assert client.get("/api/me").status_code == 401


def test_admin_page_rotates_and_disables_at_once(app):
    db, application, admin, tokens, pid = app
    admin_client, ann = TestClient(application), TestClient(application)
    login(admin_client, admin)
    login(ann, tokens["ann"])
    ann_id = user_id(db, "ann")
    html = admin_client.get("/admin").text
    assert f'action="/admin/users/{ann_id}/rotate"' in html and f'action="/admin/users/{ann_id}/disable"' in html
    assert admin_client.post(f"/admin/users/{ann_id}/rotate", follow_redirects=False).status_code == 403  # CSRF
    bob = TestClient(application)
    login(bob, tokens["bob"])
    assert bob.post(f"/admin/users/{ann_id}/rotate", data={"csrf": csrf_of(bob.get(f"/label?project={pid}").text)},
                    follow_redirects=False).status_code == 403  # labellers: admin only
    r = admin_client.post(f"/admin/users/{ann_id}/rotate", data={"csrf": csrf_of(html)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin"
    shown = admin_client.get("/admin").text
    new = re.search(r'id="new-token">Token for <b><bdi>ann</bdi></b> \(shown once\):\s*<code>(rlk_[^<]+)</code>',
                    shown).group(1)
    assert 'id="new-token"' not in admin_client.get("/admin").text  # shown once
    assert ann.get("/api/me", headers=auth(tokens["ann"])).status_code == 401  # old token: refused at once
    assert TestClient(application, cookies=dict(ann.cookies)).get("/api/me").status_code == 401  # her session too
    assert admin_client.get("/api/me").status_code == 200  # the admin's own session goes on
    assert ann.get("/api/me", headers=auth(new)).status_code == 200
    # disable: her new token and a new session stop working at once; enable brings the token back
    login(ann, new)
    r = admin_client.post(f"/admin/users/{ann_id}/disable", data={"csrf": csrf_of(html)}, follow_redirects=False)
    assert r.status_code == 303
    assert TestClient(application).get("/api/me", headers=auth(new)).status_code == 401
    assert ann.get("/api/me").status_code == 401
    assert "disabled" in admin_client.get("/admin").text
    fresh = TestClient(application)
    r = fresh.post("/login", data={"token": new, "csrf": csrf_of(fresh.get("/login").text)}, follow_redirects=False)
    assert r.status_code == 401
    admin_client.post(f"/admin/users/{ann_id}/enable", data={"csrf": csrf_of(html)}, follow_redirects=False)
    assert TestClient(application).get("/api/me", headers=auth(new)).status_code == 200
    assert ann.get("/api/me").status_code == 401  # revoked sessions stay revoked
    # an admin cannot lock themselves out
    r = admin_client.post(f"/admin/users/{user_id(db, 'admin')}/disable", data={"csrf": csrf_of(html)})
    assert r.status_code == 422 and "cannot disable yourself" in r.text


def test_cli_user_rotate_disable_enable(tmp_path, capsys):
    path = str(tmp_path / "c.db")
    db = Database(path)
    old = service.create_user(db, "ann")[1]
    assert main(["label", "user", "rotate", "ann", "--db", path]) == 0
    new = capsys.readouterr().out.strip().splitlines()[-1]
    with db.session() as s:
        assert service.authenticate(s, old) is None and service.authenticate(s, new).name == "ann"
    assert main(["label", "user", "disable", "ann", "--db", path]) == 0
    with db.session() as s:
        assert service.authenticate(s, new) is None
    assert main(["label", "user", "enable", "ann", "--db", path]) == 0
    with db.session() as s:
        assert service.authenticate(s, new).name == "ann"
    assert main(["label", "user", "rotate", "nobody", "--db", path]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    db.dispose()


# ---- B. post/redirect/get for a new labeller's token ------------------------------------------------------


def test_create_labeller_redirects_and_shows_the_token_once(app):
    db, application, admin, _, _ = app
    client = TestClient(application)
    login(client, admin)
    csrf = csrf_of(client.get("/admin").text)
    r = client.post("/admin/labellers", data={"csrf": csrf, "name": "dan"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin"
    page = client.get("/admin")  # the GET a refresh repeats
    token = re.search(r"<code>(rlk_[^<]+)</code>", page.text).group(1)
    assert "Token for <b><bdi>dan</bdi></b>" in page.text
    again = client.get("/admin")
    assert again.status_code == 200 and token not in again.text and 'id="new-token"' not in again.text
    with db.session() as s:
        assert service.authenticate(s, token).name == "dan"
        assert s.scalar(sa.select(sa.func.count()).select_from(WebSession).where(WebSession.flash.is_not(None))) == 0
    dup = client.post("/admin/labellers", data={"csrf": csrf, "name": "dan"}, follow_redirects=False)
    assert dup.status_code == 409 and "already exists" in dup.text  # an error is shown, not redirected


# ---- C. ranking interaction and minimum critique length ---------------------------------------------------


def test_ranking_must_be_touched_and_critique_long_enough(app):
    db, application, admin, tokens, pid = app
    api = TestClient(application)
    r = api.post("/api/admin/projects", headers=auth(admin), json={
        "name": "strict", "tasks": ["ranking", "critique"], "min_critique_chars": 10,
        "items": [{"prompt": f"s{i}", "responses": ["x", "y"]} for i in range(2)]})
    assert r.status_code == 201, r.text
    strict = r.json()["id"]
    client = TestClient(application)
    login(client, tokens["ann"])
    page = client.get(f"/label?project={strict}").text
    assert "(at least 10 characters)" in page and 'minlength="10"' in page and 'id="ranking_confirmed"' in page
    aid = int(re.search(r'action="/label/(\d+)"', page).group(1))
    form = {"csrf": csrf_of(page), "idempotency_key": "strict-form-1", "ranking_order": "0,1",
            "critique_target": "0", "critique_text": "long enough text"}
    r = client.post(f"/label/{aid}", data=form)  # order never touched nor confirmed
    assert r.status_code == 422 and "field &#39;ranking_confirmed&#39;" in r.text
    r = client.post(f"/label/{aid}", data={**form, "ranking_touched": "moved", "critique_text": "  short   "})
    assert r.status_code == 422 and "field &#39;critique_text&#39;: write a critique of at least 10" in r.text
    api_body = {"idempotency_key": "strict-api-1", "answers": {"ranking": {"order": [0, 1]},
                                                               "critique": {"critique": "short", "target": 0}}}
    r = api.post(f"/api/assignments/{aid}/label", headers=auth(tokens["ann"]), json=api_body)
    assert r.status_code == 422 and r.json()["detail"].startswith("critique.critique: write a critique of at least 10")
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count(Label.id))) == 0
    assert client.post(f"/label/{aid}", data={**form, "ranking_confirmed": "yes"},
                       follow_redirects=False).status_code == 303
    # the default project (no setting): an empty critique is refused, one character is enough
    view = api.post(f"/api/projects/{pid}/next", headers=auth(tokens["bob"])).json()["assignment"]
    body = {"idempotency_key": "default-crit-1", "answers": {"ranking": {"order": [0, 1, 2]},
                                                             "critique": {"critique": " ", "target": 0}}}
    url = f"/api/assignments/{view['assignment_id']}/label"
    assert api.post(url, headers=auth(tokens["bob"]), json=body).status_code == 422
    body["answers"]["critique"]["critique"] = "x"
    assert api.post(url, headers=auth(tokens["bob"]), json=body).status_code == 201


def test_min_critique_from_cli_import_and_default_for_old_projects(tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "p", "responses": ["a", "b"]}\n')
    path = str(tmp_path / "m.db")
    engine = Database(path, migrate_schema=False).engine
    migrate(engine, target=2)  # a database from before sessions and the setting
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO projects (name, guidelines, tasks, overlap, created_at) "
                          "VALUES ('old', '', '[\"critique\"]', 1, '2024-01-01 00:00:00')"))
    engine.dispose()
    assert main(["label", "import", str(items), "--db", path, "--project", "new", "--tasks", "critique",
                 "--min-critique-chars", "5"]) == 0
    db = Database(path)
    with db.session() as s:
        by_name = {p.name: p for p in s.scalars(sa.select(Project))}
    assert by_name["old"].min_critique_chars is None and rules.min_critique(by_name["old"]) == 1
    assert by_name["new"].min_critique_chars == 5
    assert main(["label", "import", str(items), "--db", path, "--project", "new", "--min-critique-chars", "-1"]) == 2
    assert "min_critique_chars" in capsys.readouterr().err
    db.dispose()


# ---- browser: C (Enter on buttons, ranking confirmation) and D (prompt in view) ----------------------------


@pytest.fixture
def browser_server(tmp_path):
    from rlhfkit.label.testing import start_server

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (.ci/run does)")
    db = Database(str(tmp_path / "b.db"))
    tokens = [service.create_user(db, n)[1] for n in ("keys", "phone", "desk")]
    tokens.append(service.create_user(db, "boss", "admin")[1])
    service.upsert_project(db, "rank", [{"prompt": f"Rank these {i}", "responses": ["one", "two", "three"]}
                                        for i in range(2)], ["ranking", "pairwise"], overlap=1)
    tall = " ".join(f"word{i}" for i in range(430))  # ~3000 characters
    guidelines = "\n\n".join(f"{n}. Read the whole response before you rate it; prefer the correct one, then the "
                             "clearer one, and say why." for n in range(1, 21))  # ~2000 characters
    service.upsert_project(db, "tall", [{"prompt": "PROMPT-TOP: summarise", "responses": [tall, tall[::-1]]}],
                           ["pairwise", "likert"], overlap=3, guidelines=guidelines)
    db.dispose()
    proc, url = start_server(tmp_path / "b.db", log=tmp_path / "server.log")
    yield url, tokens, tmp_path / "b.db"
    proc.terminate()
    proc.wait(10)


def labels_stored(path) -> int:
    with sqlite3.connect(path) as con:
        return con.execute("SELECT count(*) FROM labels").fetchone()[0]


@pytest.mark.slow
def test_refresh_after_create_labeller_does_not_post_again_and_revocation_is_immediate(browser_server):
    from playwright import sync_api as playwright_api

    url, (*_, boss), path = browser_server
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        statuses = []
        page.on("response", lambda r: statuses.append((r.request.method, r.status)))
        page.goto(url + "/login")
        page.fill("#token", boss)
        page.click("#login")
        page.fill("input[name=name]", "eve")
        page.click("#add-labeller")
        page.wait_for_selector("#new-token")
        assert page.url.endswith("/admin")  # redirected to a GET page
        token = page.text_content("#new-token code").strip()
        with sqlite3.connect(path) as con:
            assert con.execute("SELECT count(*) FROM users WHERE name = 'eve'").fetchone()[0] == 1
        statuses.clear()
        response = page.reload()  # a refresh repeats the GET, not the POST
        assert response.status == 200 and ("POST", 409) not in statuses
        assert [m for m, _ in statuses if m == "POST"] == []
        assert page.query_selector("#new-token") is None  # the token was shown once
        import httpx

        assert httpx.get(url + "/api/me", headers=auth(token)).json()["name"] == "eve"
        # eve logs in in her own browser; the admin resets her token from the admin page: at once, the old
        # token gets 401 and her browser session is gone
        eve = browser.new_context().new_page()
        eve.goto(url + "/login")
        eve.fill("#token", token)
        eve.click("#login")
        eve.wait_for_load_state()
        assert "/login" not in eve.url
        page.click("xpath=//tr[td[contains(., 'eve')]]//button[@class='rotate']")
        page.wait_for_selector("#new-token")
        new_token = page.text_content("#new-token code").strip()
        assert new_token != token
        assert httpx.get(url + "/api/me", headers=auth(token)).status_code == 401
        assert httpx.get(url + "/api/me", headers=auth(new_token)).json()["name"] == "eve"
        eve.reload()
        assert eve.url.endswith("/login") or eve.query_selector("#token") is not None
        # disabled: the new token is refused too
        page.click("xpath=//tr[td[contains(., 'eve')]]//button[@class='disable']")
        page.wait_for_load_state()
        assert httpx.get(url + "/api/me", headers=auth(new_token)).status_code == 401
        browser.close()


@pytest.mark.slow
def test_enter_on_buttons_does_not_submit_and_ranking_needs_confirmation(browser_server):
    from playwright import sync_api as playwright_api

    url, (keys, _, _, _), path = browser_server
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        posts = []
        page.on("request", lambda req: posts.append(req.url) if req.method == "POST" else None)
        page.goto(url + "/login")
        page.fill("#token", keys)
        page.click("#login")
        page.goto(url + "/label?project=1")
        page.wait_for_selector("#label-form")
        page.check("input[name=pairwise_choice][value=A]")
        page.focus("#ranking li[data-pos='1'] button.up")
        page.keyboard.press("Enter")  # the ▲ button's own action: B moves up, nothing is submitted
        page.wait_for_timeout(500)
        assert page.input_value("#ranking_order") == "1,0,2"
        assert not [u for u in posts if "/label/" in u] and labels_stored(path) == 0
        page.reload()  # a fresh page: the order untouched
        page.wait_for_selector("#label-form")
        page.check("input[name=pairwise_choice][value=A]")
        page.click("#submit")  # order neither moved nor confirmed: refused in the page
        page.wait_for_timeout(300)
        assert page.is_visible("#client-error") and "this order is right" in page.text_content("#client-error")
        assert labels_stored(path) == 0
        page.check("#ranking_confirmed")
        page.click("#submit")
        page.wait_for_load_state()
        page.wait_for_selector("#label-form")
        assert labels_stored(path) == 1
        posts.clear()
        page.focus("header button.link")  # log out
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r".*/login$"))
        assert [u for u in posts if "/label/" in u] == [] and labels_stored(path) == 1
        page.goto(url + "/label?project=1")
        assert page.url.endswith("/login")  # the session ended
        browser.close()


@pytest.mark.slow
@pytest.mark.parametrize("size", [(390, 844), (1366, 650)])
def test_prompt_in_view_on_load_with_a_tall_response(browser_server, size):
    from playwright import sync_api as playwright_api

    url, (_, phone, desk, _), _ = browser_server
    width, height = size
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        ctx = browser.new_context(viewport={"width": width, "height": height}, is_mobile=width < 500)
        page = ctx.new_page()
        page.goto(url + "/login")
        page.fill("#token", phone if width < 500 else desk)
        page.click("#login")
        page.goto(url + "/label?project=2")
        page.wait_for_selector("#label-form")
        page.wait_for_timeout(500)
        assert page.locator("#resp-0").bounding_box()["height"] > height  # the response is taller than the screen
        box = page.locator("#prompt").bounding_box()
        assert "PROMPT-TOP" in page.text_content("#prompt")
        assert box["y"] >= 0 and box["y"] + box["height"] <= height, (size, box, page.evaluate("window.scrollY"))
        assert page.evaluate("window.scrollY") == 0
        # the first item opens ~2000 characters of guidelines: still open, and the prompt above is in view
        assert page.evaluate("document.getElementById('guidelines-details').open")
        assert len(page.text_content("#guidelines .md")) > 1900
        summaries = page.eval_on_selector_all("summary", "els => els.map(e => e.getBoundingClientRect().height)")
        assert len(summaries) == 2 and min(summaries) >= 44, summaries  # tap targets
        browser.close()
