"""Browser sessions, apart from API tokens, and the admin's token actions (rotate, disable, enable).

Logging in with a token creates a :class:`~.db.WebSession`: a random id (the cookie's only content) stored
as its SHA-256, with an expiry; logging out revokes it at once. API tokens stay Bearer credentials, stored
hashed: rotating one replaces its hash (the old token is refused at once) and ends the user's sessions;
disabling a user refuses their tokens and sessions at once. A session can carry a one-time ``flash`` (a new
token for the admin page after a redirect), cleared when shown.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import secrets

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .db import Database, User, WebSession, utcnow
from .service import LabelError, hash_token, new_token

DEFAULT_SESSION_HOURS = 12.0


def same_token(sent: object, expected: str | None) -> bool:
    """Constant-time comparison of a CSRF value sent by the client with the expected one. Bytes, not str:
    ``hmac.compare_digest`` raises TypeError on non-ASCII str, which would be a 500 for any bad value."""
    if not isinstance(sent, str) or not expected:
        return False
    return hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def create_session(db: Database, user_id: int, hours: float = DEFAULT_SESSION_HOURS) -> str:
    """A new session for the user; returns its id (for the cookie; only its hash is stored)."""
    sid = secrets.token_urlsafe(32)
    now = utcnow()
    with db.session() as s:
        s.add(WebSession(id_hash=hash_token(sid), user_id=user_id, created_at=now,
                         expires_at=now + dt.timedelta(hours=hours)))
        # housekeeping: sessions over a day past their end are of no use to anyone
        s.execute(sa.delete(WebSession).where(WebSession.expires_at < now - dt.timedelta(days=1)))
    return sid


def session_user(s: Session, sid: str | None) -> tuple[User, str] | None:
    """(user, session id hash) for a live session of an active user; None otherwise."""
    if not sid or len(sid) > 200:
        return None
    row = s.execute(sa.select(User, WebSession.id_hash).join(WebSession, WebSession.user_id == User.id).where(
        WebSession.id_hash == hash_token(sid), WebSession.revoked_at.is_(None),
        WebSession.expires_at > utcnow(), User.active.is_(True))).first()
    return (row[0], row[1]) if row else None


def revoke_session(db: Database, id_hash: str) -> None:
    with db.session() as s:
        s.execute(sa.update(WebSession).where(WebSession.id_hash == id_hash, WebSession.revoked_at.is_(None))
                  .values(revoked_at=utcnow(), flash=None))


def _revoke_user_sessions(s: Session, user_id: int, keep: str | None = None) -> None:
    query = sa.update(WebSession).where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
    if keep:
        query = query.where(WebSession.id_hash != keep)
    s.execute(query.values(revoked_at=utcnow(), flash=None))


def _user(s: Session, name: str | None = None, user_id: int | None = None) -> User:
    user = (s.get(User, user_id) if user_id is not None
            else s.scalar(sa.select(User).where(User.name == name)))
    if user is None:
        raise LabelError(404, f"no user {name!r}" if name is not None else f"no user {user_id}")
    return user


def rotate_token(db: Database, name: str | None = None, user_id: int | None = None,
                 keep_session: str | None = None) -> tuple[User, str]:
    """A new token for the user (shown once): the old one is refused from now on, and the user's browser
    sessions end (but ``keep_session``, the acting admin's own)."""
    token = new_token()
    with db.session() as s:
        user = _user(s, name, user_id)
        user.token_hash = hash_token(token)
        _revoke_user_sessions(s, user.id, keep_session)
    return user, token


def set_active(db: Database, active: bool, name: str | None = None, user_id: int | None = None) -> User:
    """Disable (tokens and sessions refused at once, sessions revoked) or enable a user."""
    with db.session() as s:
        user = _user(s, name, user_id)
        user.active = active
        if not active:
            _revoke_user_sessions(s, user.id)
    return user


def set_flash(db: Database, id_hash: str, value: dict) -> None:
    with db.session() as s:
        s.execute(sa.update(WebSession).where(WebSession.id_hash == id_hash).values(flash=json.dumps(value)))


def pop_flash(db: Database, id_hash: str) -> dict | None:
    """The session's one-time message, cleared as it is read."""
    with db.session() as s:
        row = s.scalar(sa.select(WebSession).where(WebSession.id_hash == id_hash).with_for_update())
        if row is None or row.flash is None:
            return None
        value, row.flash = row.flash, None
    return json.loads(value)
