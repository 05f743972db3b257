"""Helpers for tests and the load benchmark: a real server subprocess and scripted answers."""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def auth(token: str) -> dict[str, str]:
    """The API's Bearer header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


def csrf_of(html: str) -> str:
    """The CSRF token of a page's form."""
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def login(client: Any, token: str) -> Any:
    """Log a test client (FastAPI's TestClient) in through the login form; returns the 303 response."""
    r = client.post("/login", data={"token": token, "csrf": csrf_of(client.get("/login").text)},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return r


def logged_in(client: Any, token: str) -> Any:
    """The test client, logged in (:func:`login`)."""
    login(client, token)
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str | Path, port: int | None = None, log: str | Path | None = None,
                 timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``rlhfkit label serve`` in a subprocess on loopback; returns (process, base URL) once it answers."""
    import httpx

    port = port or free_port()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "label", "serve", "--db", str(db), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (log: {log})")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in time")


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` folder (``/usr/lib/postgresql/N/bin``, not on PATH), else PATH's."""
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if p.parent.parent.name.isdigit()]
    if debian:
        return max(debian, key=lambda b: int(b.parent.name))
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def postgres_missing() -> str | None:
    """Why :func:`temporary_postgres` cannot run here (one line), or None."""
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: install the Debian package `postgresql` " \
               "(.ci/run does)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no `postgres` user to run the server as: install the Debian " \
                   "package `postgresql` (.ci/run does)"
    return None


@contextmanager
def temporary_postgres(max_connections: int = 200) -> Iterator[Callable[[], str]]:
    """A throwaway PostgreSQL cluster in a temporary folder, reachable only on a unix socket there.

    Yields ``new_database()``, which creates an empty database and returns its SQLAlchemy URL
    (``postgresql+psycopg://postgres@/NAME?host=DIR``); on exit the cluster is stopped and deleted.
    Durability is switched off (``fsync=off``): it only serves tests. The server refuses to run as root,
    so under root the binaries run as the ``postgres`` user that Debian's package creates.
    """
    problem = postgres_missing()
    if problem:
        raise RuntimeError(problem)
    bindir = postgres_bindir()
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="rlk_pg_")  # short: a unix socket path is limited to ~100 bytes
    if os.geteuid() == 0:
        import pwd

        pg = pwd.getpwnam("postgres")
        os.chown(root, pg.pw_uid, pg.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True)
        if done.returncode != 0:
            server_log = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
            tail = ((done.stderr or done.stdout).strip().splitlines() + server_log.strip().splitlines())[-4:]
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {' / '.join(tail)}")

    started = False
    try:
        run(str(bindir / "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
            "--no-sync")
        options = (f"-c listen_addresses='' -k {root} -p 5432 -c max_connections={max_connections} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run(str(bindir / "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
        started = True
        counter = itertools.count(1)

        def new_database() -> str:
            import psycopg

            name = f"rlk_{os.getpid()}_{next(counter)}"
            with psycopg.connect(host=root, port=5432, user="postgres", dbname="postgres",
                                 autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql+psycopg://postgres@/{name}?host={root}&port=5432"

        yield new_database
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def random_answers(tasks: list[str], k: int, rng: random.Random) -> dict[str, Any]:
    """Valid answers (display positions) for every task type."""
    out: dict[str, Any] = {}
    for task in tasks:
        if task == "pairwise":
            out[task] = {"choice": rng.choice(["A", "B", "tie"]), "strength": rng.randint(1, 3)}
        elif task == "ranking":
            order = list(range(k))
            rng.shuffle(order)
            out[task] = {"order": order}
        elif task == "binary":
            out[task] = {"accept": [rng.random() < 0.5 for _ in range(k)]}
        elif task == "likert":
            out[task] = {"ratings": [rng.randint(1, 5) for _ in range(k)]}
        elif task == "critique":
            out[task] = {"critique": "too short", "rewrite": "a better answer", "target": 0}
    return out


def seed_load_db(db_path: str | Path, labellers: int, items: int, overlap: int,
                 tasks: tuple[str, ...] = ("pairwise",)) -> tuple[list[str], int]:
    """A database with ``items`` two-response items and ``labellers`` labellers; returns (tokens, project)."""
    from . import service
    from .db import Database

    db = Database(str(db_path))
    tokens = [service.create_user(db, f"load{i}")[1] for i in range(labellers)]
    rows = [{"prompt": f"load prompt {i}", "responses": [f"answer {i}a", f"answer {i}b"], "gold": None}
            for i in range(items)]
    project, _ = service.upsert_project(db, "load", rows, list(tasks), overlap=overlap)
    db.dispose()
    return tokens, project.id


def run_load(url_of, tokens: list[str], project_id: int, per_labeller: int, deadline_s: float = 120.0,
             on_ack=None) -> dict[str, Any]:
    """Each token labels ``per_labeller`` items concurrently (one thread each) through the JSON API.

    ``url_of()`` gives the current base URL; connection failures and 5xx are retried with the same
    idempotency key until ``deadline_s``. Returns acknowledged keys, duplicates seen and latencies (s).
    """
    import threading

    import httpx

    acked: list[str] = []
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def call(client, method, path, **kw):
        while time.monotonic() < stop_at:
            try:
                r = client.request(method, url_of() + path, **kw)
                if r.status_code < 500:
                    return r
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(path)

    def worker(i: int, token: str):
        rng = random.Random(i)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(headers=headers, timeout=30.0) as client:
            try:
                for n in range(per_labeller):
                    r = call(client, "POST", f"/api/projects/{project_id}/next")
                    view = r.json()["assignment"]
                    if view is None:
                        with lock:
                            errors.append(f"labeller {i}: nothing left after {n}")
                        return
                    key = f"load-{i}-{n}-{view['assignment_id']}"
                    body = {"idempotency_key": key,
                            "answers": random_answers(view["tasks"], len(view["responses"]), rng)}
                    t0 = time.perf_counter()
                    r = call(client, "POST", f"/api/assignments/{view['assignment_id']}/label", json=body)
                    dt = time.perf_counter() - t0
                    if r.status_code not in (200, 201):
                        with lock:
                            errors.append(f"labeller {i}: {r.status_code} {r.text[:200]}")
                        return
                    with lock:
                        acked.append(key)
                        latencies.append(dt)
                    if on_ack:
                        on_ack(len(acked))
            except TimeoutError as exc:
                with lock:
                    errors.append(f"labeller {i}: timed out on {exc}")

    threads = [threading.Thread(target=worker, args=(i, t), daemon=True) for i, t in enumerate(tokens)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def q(p):
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"acked": acked, "errors": errors, "wall_s": wall, "p50_ms": 1000 * q(0.5), "p95_ms": 1000 * q(0.95),
            "max_ms": 1000 * (lat[-1] if lat else float("nan")), "submissions": len(acked)}
