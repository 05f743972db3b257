"""Real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright: two labellers (mouse; keyboard at
phone width), XSS inert, an admin sees agreement and exports. Screenshots also go to /tmp/label_screens/."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from playwright import sync_api as playwright_api  # noqa: E402

from rlhfkit.label import export, service  # noqa: E402
from rlhfkit.label.db import Database  # noqa: E402
from rlhfkit.label.testing import start_server  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
XSS = "<script>window.__xss=1;alert(1)</script><img src=x onerror=\"window.__xss=2\">"


@pytest.fixture
def server(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (.ci/run does)")
    db = Database(str(tmp_path / "b.db"))
    admin = service.create_user(db, "admin", "admin")[1]
    tokens = [service.create_user(db, n)[1] for n in ("mouse", "keys")]
    items = [{"prompt": "What is the capital of France?", "responses": ["Paris.", "Lyon, probably."], "gold": 0},
             {"prompt": "Greet me " + XSS, "responses": ["Hello!", XSS + " hi"], "gold": None},
             {"prompt": "Name a colour.", "responses": ["Blue.", "Seven."], "gold": None}]
    service.upsert_project(db, "demo", items, ["pairwise", "ranking", "likert"], overlap=2,
                           guidelines="## Guidelines\nPrefer **correct** answers. " + XSS)
    db.dispose()
    proc, url = start_server(tmp_path / "b.db", log=tmp_path / "server.log")
    yield url, admin, tokens
    proc.terminate()
    proc.wait(10)


def test_two_labellers_and_admin_in_chromium(server, tmp_path):
    url, admin, (mouse_token, keys_token) = server
    shots = tmp_path / "screens"
    shots.mkdir()
    dialogs = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

        def session(token, **viewport):
            ctx = browser.new_context(**viewport, accept_downloads=True)
            page = ctx.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url + "/login")
            page.fill("#token", token)
            page.click("#login")
            return ctx, page

        # labeller 1: the mouse (click, drag to rank), desktop width
        ctx, page = session(mouse_token, viewport={"width": 1280, "height": 900})
        for n in range(3):
            page.wait_for_selector("#label-form")
            if n == 0:
                page.screenshot(path=str(shots / "1_mouse_label.png"), full_page=True)
            page.check("input[name=pairwise_choice][value=A]")
            page.click("#resp-0 input[name=likert_0][value='5']")
            page.click("#resp-1 input[name=likert_1][value='2']")
            page.drag_and_drop("#ranking li[data-pos='1']", "#ranking li[data-pos='0']")
            page.click("#ranking li[data-pos='0'] button.up")  # and back up with the button
            assert page.input_value("#ranking_order") == "0,1"
            page.click("#submit")
        page.wait_for_selector("text=All done")
        assert page.text_content("#remaining").strip() == "0"
        ctx.close()

        # labeller 2: the keyboard only, phone width
        ctx, page = session(keys_token, viewport={"width": 390, "height": 844}, is_mobile=True)
        for _ in range(3):
            page.wait_for_selector("#label-form")
            if "Greet me" in page.text_content("#prompt"):
                assert "<script>window.__xss=1" in page.text_content("#prompt")  # shown as text
                assert page.evaluate("window.__xss") is None
                page.screenshot(path=str(shots / "2_keys_phone_xss_as_text.png"), full_page=True)
            page.keyboard.press("b")
            page.keyboard.press("s")
            page.keyboard.press("3")
            page.keyboard.press("d")  # current response (A) one down the ranking
            page.keyboard.press("j")
            page.keyboard.press("4")
            assert page.is_checked("input[name=pairwise_choice][value=B]")
            assert page.is_checked("input[name=pairwise_strength][value='2']")
            assert page.input_value("#ranking_order") == "1,0"
            page.keyboard.press("Enter")
            page.wait_for_load_state()
        page.wait_for_selector("text=All done")
        page.screenshot(path=str(shots / "3_keys_phone_done.png"), full_page=True)
        ctx.close()

        # admin: agreement and export
        ctx, page = session(admin, viewport={"width": 1280, "height": 900})
        page.wait_for_selector("table.agreement")
        text = page.text_content("table.agreement")
        assert "pairwise" in text and "likert" in text
        assert re.search(r"\b3 items \(1 gold\)", page.text_content("body")), "project summary line"
        page.screenshot(path=str(shots / "4_admin_agreement.png"), full_page=True)
        with page.expect_download() as download:
            page.click("#export-1-majority")
        rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
        assert all({"prompt", "chosen", "rejected", "labellers"} <= set(r) for r in rows)
        # Orders are shuffled per labeller with SystemRandom, so which items the two agree on is random: the
        # mouse always picked shown slot A, the keyboard shown slot B. Expected majority export from the orders.
        db = Database(str(tmp_path / "b.db"))
        picks: dict[int, dict[str, int]] = {}
        for lab in export.stored_labels(db, 1):
            slot = 0 if lab["coder"] == "mouse" else 1
            picks.setdefault(lab["item_id"], {})[lab["coder"]] = lab["display_order"][slot]
        assert rows == export.preference_rows(db, 1, "majority", "drop")
        db.dispose()
        with sqlite3.connect(tmp_path / "b.db") as con:
            responses = {i: json.loads(r) for i, r in con.execute("SELECT id, responses FROM items")}
        agreed = {i: p["mouse"] for i, p in picks.items() if p["mouse"] == p["keys"]}
        assert len(picks) == 3 and all(len(p) == 2 for p in picks.values())
        assert sorted((r["item_id"], r["chosen"]) for r in rows) == \
            sorted((i, responses[i][w]) for i, w in agreed.items())
        assert page.evaluate("window.__xss") is None
        ctx.close()
        browser.close()
    assert not dialogs, f"a script ran: {dialogs}"
    out = Path("/tmp/label_screens")
    out.mkdir(exist_ok=True)
    for f in shots.iterdir():
        shutil.copy(f, out / f.name)
    assert len(list(shots.iterdir())) == 4
