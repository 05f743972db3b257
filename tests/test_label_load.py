"""Load and fault tests against a real ``rlhfkit label serve`` subprocess on loopback: SQLite file (WAL), and the
load test also on PostgreSQL (a smaller run: it checks the backend's locking, not its speed)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from rlhfkit.label.db import Assignment, Database  # noqa: E402
from rlhfkit.label.export import preference_rows, stored_labels  # noqa: E402
from rlhfkit.label.testing import free_port, run_load, seed_load_db, start_server  # noqa: E402

pytestmark = pytest.mark.slow


def _check_store(db_path, pid, acked, overlap):
    db = Database(str(db_path))
    labels = stored_labels(db, pid)
    keys = [lab["idempotency_key"] for lab in labels]
    assert len(keys) == len(set(keys)), "duplicated submissions"
    lost = set(acked) - set(keys)
    assert not lost, f"{len(lost)} acknowledged submissions lost"
    with db.session() as s:
        per_item = {}
        for a in s.query(Assignment):
            per_item.setdefault(a.item_id, []).append(a.user_id)
    assert all(len(users) == len(set(users)) <= overlap for users in per_item.values())
    return db, labels


def _exported_votes(db, pid) -> int:
    """Votes in the pairs export with ties kept, counted once per item and pair (a kept tie is written as two
    rows, one per orientation, each carrying the pair's votes)."""
    per_pair = {(r["item_id"], frozenset((r["chosen"], r["rejected"]))): sum(r["votes"].values())
                for r in preference_rows(db, pid, ties="keep")}
    return sum(per_pair.values())


@pytest.mark.parametrize("label_db, labellers, per_labeller", [("sqlite", 50, 20), ("postgresql", 20, 10)],
                         indirect=["label_db"])
def test_load_no_lost_no_duplicated(label_db, labellers, per_labeller, tmp_path):
    tokens, pid = seed_load_db(label_db, labellers=labellers, items=labellers * per_labeller // 3 + labellers,
                               overlap=3)
    proc, url = start_server(label_db, log=tmp_path / "server.log")
    try:
        res = run_load(lambda: url, tokens, pid, per_labeller=per_labeller, deadline_s=150)
    finally:
        proc.terminate()
        proc.wait(10)
    n = labellers * per_labeller
    print(f"\nload: {res['submissions']} submissions in {res['wall_s']:.1f} s; label POST latency "
          f"p50 {res['p50_ms']:.0f} ms, p95 {res['p95_ms']:.0f} ms, max {res['max_ms']:.0f} ms")
    assert not res["errors"], res["errors"][:3]
    assert res["submissions"] == n
    db, labels = _check_store(label_db, pid, res["acked"], overlap=3)
    assert len(labels) == n
    assert _exported_votes(db, pid) == n  # each label (one pairwise vote) reaches the export once
    db.dispose()


def test_kill_9_mid_load_keeps_every_acknowledged_label(tmp_path):
    db_path = tmp_path / "fault.db"
    tokens, pid = seed_load_db(db_path, labellers=20, items=20 * 15 // 2 + 20, overlap=2)
    port = free_port()
    log = tmp_path / "server.log"
    state = {"proc": start_server(db_path, port=port, log=log)[0], "killed": False}
    url = f"http://127.0.0.1:{port}"
    killed = threading.Event()

    def on_ack(n):
        if n >= 100 and not killed.is_set():
            killed.set()
            os.kill(state["proc"].pid, signal.SIGKILL)  # no shutdown, no flush: as a crash

    restarter = threading.Thread(target=lambda: (killed.wait(60), state["proc"].wait(),
                                                 state.update(proc=start_server(db_path, port=port, log=log)[0])))
    restarter.start()
    try:
        res = run_load(lambda: url, tokens, pid, per_labeller=15, deadline_s=90, on_ack=on_ack)
    finally:
        restarter.join(60)
        state["proc"].terminate()
        state["proc"].wait(10)
    assert killed.is_set() and not res["errors"], res["errors"][:3]
    assert res["submissions"] == 20 * 15
    db, labels = _check_store(db_path, pid, res["acked"], overlap=2)
    assert len(labels) == 300  # every 2xx stored once; retries across the crash not counted twice
    # and every acknowledged label is in the export (raw labels; pairs pooled from them)
    exported = {lab["idempotency_key"] for lab in stored_labels(db, pid)}
    assert set(res["acked"]) <= exported
    assert _exported_votes(db, pid) == 300
