"""Storage of the labelling app: SQLAlchemy 2 models, engine set-up and ordered schema migrations.

A SQLite file is the default (WAL journal, ``synchronous=FULL``, write transactions opened with
``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing); PostgreSQL by URL
(``postgresql+psycopg://...``; the tests run against a real server). The app logic uses only portable SQL:
uniqueness rules (one slot per item and replica, one assignment per item and labeller, one label per
idempotency key) are unique constraints, so they hold on every backend; row locks (``FOR UPDATE``) are
rendered where the backend has them and left out on SQLite, whose writers are serialised anyway.

Migrations: ``schema_version`` holds the version; :data:`MIGRATIONS` are applied in order, each in its own
transaction, and never drop data. Migration 1 creates the version-1 tables from frozen definitions (so a
new column added later is a new migration, not a silent change of migration 1).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..errors import ConfigError


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(sa.Text, default="")
    tasks: Mapped[list] = mapped_column(sa.JSON)  # e.g. ["pairwise", "likert"]
    overlap: Mapped[int] = mapped_column(default=3)  # labellers per (non-gold) item
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    min_critique_chars: Mapped[int | None] = mapped_column(default=1)  # migration 3; NULL: the default (1)
    guidelines_version: Mapped[int | None] = mapped_column(default=None)  # migration 5; NULL: version 1
    archived_at: Mapped[dt.datetime | None] = mapped_column(default=None)  # migration 5: serves no items
    fast_seconds: Mapped[float | None] = mapped_column(default=None)  # migration 6; NULL: the default (2 s)
    hold_minutes: Mapped[float | None] = mapped_column(default=None)  # migration 6; NULL: the app's default


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (sa.UniqueConstraint("project_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id"), index=True)
    position: Mapped[int]  # order of import
    prompt: Mapped[str] = mapped_column(sa.Text)
    responses: Mapped[list] = mapped_column(sa.JSON)
    gold: Mapped[int | None] = mapped_column(default=None)  # original index of the best response
    meta: Mapped[dict | None] = mapped_column(sa.JSON, default=None)
    priority: Mapped[float | None] = mapped_column(default=None)  # migration 7: served higher first, NULL last


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    role: Mapped[str] = mapped_column(sa.String(20))  # admin | labeller | reviewer
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (sa.UniqueConstraint("item_id", "user_id"), sa.UniqueConstraint("item_id", "slot"))
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id"), index=True)
    slot: Mapped[int | None] = mapped_column(default=None)  # 0..overlap-1; NULL for gold items
    order: Mapped[list] = mapped_column("display_order", sa.JSON)  # display position -> original index
    done: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    released_at: Mapped[dt.datetime | None] = mapped_column(default=None)  # migration 5: skipped / timed out


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(sa.ForeignKey("assignments.id"), unique=True)
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id"), index=True)
    idempotency_key: Mapped[str] = mapped_column(sa.String(100), unique=True)
    answers: Mapped[dict] = mapped_column(sa.JSON)  # per task, in original response indices
    gold_correct: Mapped[float | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    duration_ms: Mapped[int | None] = mapped_column(default=None)  # added by migration 2
    guidelines_version: Mapped[int | None] = mapped_column(default=None)  # migration 5; NULL: before versions


class WebSession(Base):
    """A browser session (migration 3): the cookie holds a random id, only its SHA-256 is stored here.
    ``flash`` holds a one-time message (a new token) shown by the next GET of the admin page."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    id_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    flash: Mapped[str | None] = mapped_column(sa.Text, default=None)


class Adjudication(Base):
    """A reviewer's final answer for one task of one item (migration 4), in original response indices.
    Re-adjudicating sets ``superseded_at`` on the live row and adds a new one: the history is kept, and the
    labels themselves are never touched."""

    __tablename__ = "adjudications"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), index=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id"), index=True)
    task: Mapped[str] = mapped_column(sa.String(20))
    answer: Mapped[dict] = mapped_column(sa.JSON)
    reviewer_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    note: Mapped[str] = mapped_column(sa.Text, default="")
    superseded_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class ItemMark(Base):
    """A labeller's skip (``kind="skip"``: the assignment is released, the item never served to them again) or
    flag (``kind="flag"``: shown to reviewers) of an item, with a fixed reason and optional note (migration 5)."""

    __tablename__ = "item_marks"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), index=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(sa.String(10))
    reason: Mapped[str] = mapped_column(sa.String(40))
    note: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class LabelRevision(Base):
    """An earlier version of a label that its labeller edited (migration 5): the ``labels`` row always holds
    the current answers (what exports read); each edit first copies the replaced answers here, marked
    ``superseded_at``, so the history is kept and nothing is deleted. ``edit_key`` is the idempotency key of
    the edit that replaced it (a retried edit is not applied twice)."""

    __tablename__ = "label_revisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    label_id: Mapped[int] = mapped_column(sa.ForeignKey("labels.id"), index=True)
    answers: Mapped[dict] = mapped_column(sa.JSON)
    gold_correct: Mapped[float | None] = mapped_column(default=None)
    duration_ms: Mapped[int | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime]
    superseded_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    edit_key: Mapped[str] = mapped_column(sa.String(100), unique=True)
    guidelines_version: Mapped[int | None] = mapped_column(default=None)


class GuidelinesVersion(Base):
    """One version of a project's guidelines (migration 5); the project row holds the current text and number."""

    __tablename__ = "guidelines_versions"
    __table_args__ = (sa.UniqueConstraint("project_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id"), index=True)
    version: Mapped[int]
    text: Mapped[str] = mapped_column(sa.Text)
    author_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


@event.listens_for(Label, "before_insert")
def _label_guidelines_version(_mapper, conn: Connection, label: Label) -> None:
    """Every new label records the version of its project's guidelines it was made under (1 before any edit)."""
    if label.guidelines_version is None:
        version = conn.execute(sa.select(Project.guidelines_version).where(Project.id == label.project_id)).scalar()
        label.guidelines_version = version or 1


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(sa.String(50), primary_key=True)
    value: Mapped[str] = mapped_column(sa.Text)


# ---- migrations -------------------------------------------------------------------------------------


def _v1_tables(md: sa.MetaData) -> None:
    """The version-1 schema, frozen (do not edit: add a migration instead)."""
    sa.Table("projects", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("name", sa.String(200), unique=True, nullable=False),
             sa.Column("guidelines", sa.Text, nullable=False), sa.Column("tasks", sa.JSON, nullable=False),
             sa.Column("overlap", sa.Integer, nullable=False), sa.Column("created_at", sa.DateTime, nullable=False))
    sa.Table("items", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("project_id", sa.ForeignKey("projects.id"), nullable=False, index=True),
             sa.Column("position", sa.Integer, nullable=False), sa.Column("prompt", sa.Text, nullable=False),
             sa.Column("responses", sa.JSON, nullable=False), sa.Column("gold", sa.Integer),
             sa.Column("meta", sa.JSON), sa.UniqueConstraint("project_id", "position"))
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("name", sa.String(100), unique=True, nullable=False),
             sa.Column("role", sa.String(20), nullable=False),
             sa.Column("token_hash", sa.String(64), unique=True, nullable=False),
             sa.Column("active", sa.Boolean, nullable=False), sa.Column("created_at", sa.DateTime, nullable=False))
    sa.Table("assignments", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("item_id", sa.ForeignKey("items.id"), nullable=False, index=True),
             sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
             sa.Column("project_id", sa.ForeignKey("projects.id"), nullable=False, index=True),
             sa.Column("slot", sa.Integer), sa.Column("display_order", sa.JSON, nullable=False),
             sa.Column("done", sa.Boolean, nullable=False), sa.Column("created_at", sa.DateTime, nullable=False),
             sa.UniqueConstraint("item_id", "user_id"), sa.UniqueConstraint("item_id", "slot"))
    sa.Table("labels", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("assignment_id", sa.ForeignKey("assignments.id"), unique=True, nullable=False),
             sa.Column("item_id", sa.ForeignKey("items.id"), nullable=False, index=True),
             sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
             sa.Column("project_id", sa.ForeignKey("projects.id"), nullable=False, index=True),
             sa.Column("idempotency_key", sa.String(100), unique=True, nullable=False),
             sa.Column("answers", sa.JSON, nullable=False), sa.Column("gold_correct", sa.Float),
             sa.Column("created_at", sa.DateTime, nullable=False))
    sa.Table("settings", md, sa.Column("key", sa.String(50), primary_key=True),
             sa.Column("value", sa.Text, nullable=False))


def _migration_1(conn: Connection) -> None:
    md = sa.MetaData()
    _v1_tables(md)
    md.create_all(conn)
    conn.execute(sa.text("INSERT INTO settings (key, value) VALUES ('secret', :v)"),
                 {"v": secrets.token_hex(32)})


def _migration_2(conn: Connection) -> None:
    """Time spent on an item (ms, as measured by the browser): portable ALTER TABLE, existing rows NULL."""
    conn.execute(sa.text("ALTER TABLE labels ADD COLUMN duration_ms INTEGER"))


def _migration_3(conn: Connection) -> None:
    """Browser sessions apart from API tokens (a new table, frozen here) and the per-project minimum
    critique length (existing projects NULL: the default)."""
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True))  # for the foreign key only
    sa.Table("web_sessions", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("id_hash", sa.String(64), unique=True, nullable=False),
             sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
             sa.Column("created_at", sa.DateTime, nullable=False), sa.Column("expires_at", sa.DateTime, nullable=False),
             sa.Column("revoked_at", sa.DateTime), sa.Column("flash", sa.Text))
    md.tables["web_sessions"].create(conn)
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN min_critique_chars INTEGER"))


def _migration_4(conn: Connection) -> None:
    """Reviewers' adjudications (a new table, frozen here; the reviewer role needs no schema change)."""
    md = sa.MetaData()
    for name in ("users", "items", "projects"):  # for the foreign keys only
        sa.Table(name, md, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table("adjudications", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("item_id", sa.ForeignKey("items.id"), nullable=False, index=True),
             sa.Column("project_id", sa.ForeignKey("projects.id"), nullable=False, index=True),
             sa.Column("task", sa.String(20), nullable=False), sa.Column("answer", sa.JSON, nullable=False),
             sa.Column("reviewer_id", sa.ForeignKey("users.id"), nullable=False),
             sa.Column("created_at", sa.DateTime, nullable=False), sa.Column("note", sa.Text, nullable=False),
             sa.Column("superseded_at", sa.DateTime))
    md.tables["adjudications"].create(conn)


def _migration_5(conn: Connection) -> None:
    """Labeller flow and project set-up (issue 23): skips and flags (``item_marks``), edits with history
    (``label_revisions``), ``assignments.released_at`` (skipped or held past the timeout: the slot is free
    again), guidelines versions (``guidelines_versions``, ``projects.guidelines_version`` and the version each
    label was made under), ``projects.archived_at``. Frozen here."""
    md = sa.MetaData()
    for name in ("users", "items", "projects", "labels"):  # for the foreign keys only
        sa.Table(name, md, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table("item_marks", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("item_id", sa.ForeignKey("items.id"), nullable=False, index=True),
             sa.Column("project_id", sa.ForeignKey("projects.id"), nullable=False, index=True),
             sa.Column("user_id", sa.ForeignKey("users.id"), nullable=False, index=True),
             sa.Column("kind", sa.String(10), nullable=False), sa.Column("reason", sa.String(40), nullable=False),
             sa.Column("note", sa.Text, nullable=False), sa.Column("created_at", sa.DateTime, nullable=False))
    sa.Table("label_revisions", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("label_id", sa.ForeignKey("labels.id"), nullable=False, index=True),
             sa.Column("answers", sa.JSON, nullable=False), sa.Column("gold_correct", sa.Float),
             sa.Column("duration_ms", sa.Integer), sa.Column("created_at", sa.DateTime, nullable=False),
             sa.Column("superseded_at", sa.DateTime, nullable=False),
             sa.Column("edit_key", sa.String(100), unique=True, nullable=False),
             sa.Column("guidelines_version", sa.Integer))
    sa.Table("guidelines_versions", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("project_id", sa.ForeignKey("projects.id"), nullable=False, index=True),
             sa.Column("version", sa.Integer, nullable=False), sa.Column("text", sa.Text, nullable=False),
             sa.Column("author_id", sa.ForeignKey("users.id")), sa.Column("created_at", sa.DateTime, nullable=False),
             sa.UniqueConstraint("project_id", "version"))
    for name in ("item_marks", "label_revisions", "guidelines_versions"):
        md.tables[name].create(conn)
    conn.execute(sa.text("ALTER TABLE assignments ADD COLUMN released_at TIMESTAMP"))
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN guidelines_version INTEGER"))
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN archived_at TIMESTAMP"))
    conn.execute(sa.text("ALTER TABLE labels ADD COLUMN guidelines_version INTEGER"))


def _migration_6(conn: Connection) -> None:
    """Per-project review and hold settings: ``projects.fast_seconds`` (the review page's "very fast"
    threshold) and ``projects.hold_minutes`` (how long an item stays held by a labeller); existing projects
    NULL: the defaults (2 s; the app's ``--hold-minutes``)."""
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN fast_seconds FLOAT"))
    conn.execute(sa.text("ALTER TABLE projects ADD COLUMN hold_minutes FLOAT"))


def _migration_7(conn: Connection) -> None:
    """Active selection: ``items.priority`` (an item with a higher priority is served first, e.g. the pairs a
    reward-model ensemble disagrees on most); existing items NULL: served after prioritised ones, in import
    order, as before."""
    conn.execute(sa.text("ALTER TABLE items ADD COLUMN priority FLOAT"))


MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2, _migration_3, _migration_4,
                                                  _migration_5, _migration_6, _migration_7]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(engine: Engine) -> int:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("schema_version"):
            return 0
        return int(conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one_or_none() or 0)


def migrate(engine: Engine, target: int | None = None) -> int:
    """Apply the pending migrations up to ``target`` (default: all); returns the resulting version."""
    target = SCHEMA_VERSION if target is None else target
    with engine.begin() as conn:
        if not sa.inspect(conn).has_table("schema_version"):
            conn.execute(sa.text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
            conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (0)"))
    current = schema_version(engine)
    if current > SCHEMA_VERSION:
        raise ConfigError(f"database schema version {current} is newer than this rlhfkit ({SCHEMA_VERSION}); "
                          "upgrade rlhfkit")
    for version in range(current + 1, target + 1):
        with engine.begin() as conn:
            MIGRATIONS[version - 1](conn)
            conn.execute(sa.text("UPDATE schema_version SET version = :v"), {"v": version})
    return max(current, target)


# ---- engine -----------------------------------------------------------------------------------------


def db_url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL as is, otherwise a SQLite file path."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def make_engine(db: str, synchronous: str = "NORMAL") -> Engine:
    """``synchronous`` (SQLite): NORMAL keeps every committed transaction through a crash or kill of the
    server process (WAL); FULL also through power loss / OS crash, at one fsync per commit."""
    if synchronous.upper() not in ("NORMAL", "FULL"):
        raise ConfigError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
    url = db_url(db)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                                  pool_size=20, max_overflow=40)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # take the write lock up front: a deferred transaction that later writes can fail with
            # SQLITE_BUSY_SNAPSHOT under concurrency instead of waiting its turn
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        try:
            engine = sa.create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=40)
        except ModuleNotFoundError as exc:  # the driver is imported here: name it instead of a traceback
            raise ConfigError(f"the database driver {exc.name!r} for {url.split(':', 1)[0]} is not installed "
                              "(PostgreSQL: pip install 'rlhfkit[app]', which brings psycopg)") from None
    return engine


class Database:
    """An engine (migrated to the current schema) and a session factory."""

    def __init__(self, db: str, migrate_schema: bool = True, synchronous: str = "NORMAL"):
        try:
            self.engine = make_engine(db, synchronous)
            if migrate_schema:
                migrate(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigError(f"{db}: cannot open the database ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0]})") from None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def secret(self) -> bytes:
        with self.session() as s:
            return bytes.fromhex(s.get(Setting, "secret").value)

    def dispose(self) -> None:
        self.engine.dispose()
