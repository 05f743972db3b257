"""The FastAPI app: a JSON API (``/api``, bearer token or session cookie) and server-rendered pages.

Security model: every route but ``/login``, ``/healthz`` and the static files needs a user; tokens are stored
as SHA-256 hashes; logging in with a token starts a server-side session (:mod:`.accounts`: random id, stored
hashed, expires after ``session_hours``, revoked by logout) whose id alone is the HttpOnly, SameSite=Strict
cookie; admins rotate tokens and disable users (refused at once). A
state-changing request authenticated by that cookie must carry the per-session CSRF token (form field
``csrf`` or header ``X-CSRF-Token``: an HMAC of the session under the database's secret); bearer requests
need none (a browser never adds that header by itself). Labellers reach only their own assignments (other
ids are 404) and no ``/admin``, ``/api/admin``, ``/review`` or ``/api/review`` route (403); reviewers reach the
review routes (:mod:`.review_web`) but no admin route and cannot label (403). Pages are Jinja2 with autoescape, guidelines
are Markdown rendered with raw HTML disabled, a Content-Security-Policy forbids inline script, and bidi
controls in user text are printed as visible markers (:mod:`.text`). There is no ``/docs``, ``/redoc`` or
public ``/openapi.json``: admins get the schema at ``/api/admin/openapi.json``. Text that is not valid Unicode
is a 422 at every input (:mod:`.text`; form bodies via :func:`.forms.read_form`). A browser asking for a page
gets errors as HTML (:mod:`.web_errors`: a stale tab sees the login form or an "out of date" page), the API
JSON. Request bodies above ``max_body`` (imports: ``max_import``) are refused
with 413.
"""

from __future__ import annotations

import hmac
import math
import secrets
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import DictLoader, Environment, select_autoescape
from markupsafe import Markup
from pydantic import BaseModel, Field

from ..errors import DataError
from . import accounts, flow, flow_web, project_web, review_web, rules, service, templates, web_errors
from . import agreement as agreement_mod
from . import export as export_mod
from .db import Database, Item, Label, Project, User
from .forms import form_answers, form_int, form_text, read_form
from .middleware import BodyLimit
from .projects import set_settings
from .render import chat_row, chat_turns, md, render_markdown
from .text import scrub, show_bidi, text_problem

SESSION_COOKIE = "rlk_session"
LOGIN_CSRF_COOKIE = "rlk_login_csrf"
LETTERS = "ABCDEFGHIJKLMNOP"
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]  # path ids: out-of-range ints are a 422, not a DB overflow
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def _inert(value: Any) -> Any:
    """Jinja ``finalize``: every string a page prints has its bidi controls shown as visible plain-text
    markers (safe in text and attributes alike; already-safe Markup stays Markup) and lone surrogates of
    rows stored before the input checks replaced, so no page can fail to encode."""
    if isinstance(value, Markup):
        return Markup(show_bidi(scrub(str(value))))
    if isinstance(value, str):
        return show_bidi(scrub(value))
    return value


def _jinja() -> Environment:
    env = Environment(loader=DictLoader({"base.html": templates.BASE, "login.html": templates.LOGIN,
                                         "projects.html": templates.PROJECTS, "label.html": templates.LABEL,
                                         "admin.html": templates.ADMIN}),
                      autoescape=select_autoescape(default=True, default_for_string=True), finalize=_inert)
    env.globals.update(letters=LETTERS, md=md, chat_turns=chat_turns)
    env.globals["fmt"] = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
    return env


class SubmitBody(BaseModel):
    idempotency_key: str = Field(min_length=8, max_length=100)
    answers: dict[str, Any]
    duration_ms: int | None = Field(default=None, ge=0, le=10**9)


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: str = Field(default="labeller", pattern="^(admin|labeller|reviewer)$")


class NewProject(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    tasks: list[str] | None = None
    overlap: int | None = Field(default=None, ge=1, le=100)
    guidelines: str | None = Field(default=None, max_length=200_000)
    min_critique_chars: int | None = Field(default=None, ge=0, le=50_000)
    fast_seconds: float | None = Field(default=None, gt=0, le=rules.MAX_FAST_SECONDS)
    hold_minutes: float | None = Field(default=None, gt=0, le=rules.MAX_HOLD_MINUTES)
    items: list[dict[str, Any]] = Field(default_factory=list, max_length=100_000)


def create_app(db: Database | str, max_body: int = 256 * 1024, max_import: int = 20 * 1024 * 1024,
               secure_cookies: bool = False, session_hours: float = accounts.DEFAULT_SESSION_HOURS,
               hold_minutes: float = flow.HOLD_MINUTES):
    if isinstance(db, str):
        db = Database(db)
    secret = db.secret()
    env = _jinja()
    # no /docs, /redoc or public /openapi.json: the pages would be blank under the CSP (CDN assets) and
    # need no login; admins get the schema at /api/admin/openapi.json
    app = FastAPI(title="rlhfkit label", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Human-feedback labelling API. Authenticate with `Authorization: Bearer <token>`.")
    app.state.db = db

    def csrf_for(user: User, session: str | None) -> str:
        """The session's CSRF token (a bearer request needs none: pages it gets carry a token-bound one)."""
        key = session or ("bearer:" + user.token_hash)
        return hmac.new(secret, ("csrf:" + key).encode(), "sha256").hexdigest()[:40]

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**ctx), status_code=status)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        for error, raw in zip(errors, exc.errors()):  # a typed str field refused invalid text: say why, as
            if isinstance(raw.get("input"), str) and text_problem(raw["input"]):  # every other boundary does
                error["msg"] = text_problem(raw["input"])
        return JSONResponse({"detail": errors}, status_code=422)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # ---- authentication ------------------------------------------------------------------------------

    def current_user(request: Request) -> tuple[User | None, str | None]:
        """(user, the session's id hash when the session cookie authenticated it); also kept on
        ``request.state.session``."""
        auth = request.headers.get("authorization", "")
        request.state.session = None
        with db.session() as s:
            if auth:
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer":
                    return None, None
                return service.authenticate(s, token.strip()), None
            found = accounts.session_user(s, request.cookies.get(SESSION_COOKIE))
        if found is None:
            return None, None
        request.state.session = found[1]
        return found

    async def require_user(request: Request) -> User:
        user, session = current_user(request)
        via_cookie = session is not None
        if user is None:
            raise HTTPException(401, "authentication required: send 'Authorization: Bearer <token>' or log in",
                                headers={"WWW-Authenticate": "Bearer"})
        if via_cookie and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("x-csrf-token")
            if sent is None and request.headers.get("content-type", "").startswith(
                    ("application/x-www-form-urlencoded", "multipart/form-data")):
                sent = (await read_form(request, strict=False)).get("csrf")
            if not accounts.same_token(sent, csrf_for(user, session)):
                raise HTTPException(403, web_errors.CSRF_WRONG)
        return user

    async def require_admin(user: User = Depends(require_user)) -> User:
        if user.role != "admin":
            raise HTTPException(403, "admin only")
        return user

    # ---- API -----------------------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"ok": True}

    @app.get("/api/admin/openapi.json", include_in_schema=False)
    def openapi_schema(admin: User = Depends(require_admin)):
        return app.openapi()

    @app.get("/api/me")
    def me(user: User = Depends(require_user)):
        return {"id": user.id, "name": user.name, "role": user.role}

    @app.get("/api/projects")
    def projects(user: User = Depends(require_user)):
        with db.session() as s:
            return [{"id": p.id, "name": p.name, "tasks": p.tasks, "guidelines": p.guidelines,
                     "guidelines_version": p.guidelines_version or 1, "archived": p.archived_at is not None,
                     **service.progress(s, user, p)} for p in s.scalars(sa.select(Project).order_by(Project.id))]

    @app.post("/api/projects/{project_id}/next")
    def next_item(project_id: Id, user: User = Depends(require_user)):
        review_web.no_labelling(user)
        flow.release_stale(db, project_id, hold_minutes)  # items held past the timeout go to whoever asks
        assignment = service.next_assignment(db, user, project_id)
        if assignment is None:
            return {"assignment": None}
        with db.session() as s:
            return {"assignment": service.assignment_view(s, assignment)}

    @app.get("/api/assignments/{assignment_id}")
    def get_assignment(assignment_id: Id, user: User = Depends(require_user)):
        with db.session() as s:
            return service.assignment_view(s, service.own_assignment(s, user, assignment_id))

    @app.post("/api/assignments/{assignment_id}/label", status_code=201)
    def post_label(assignment_id: Id, body: SubmitBody, response: Response,
                   user: User = Depends(require_user)):
        label, created = service.submit(db, user, assignment_id, body.idempotency_key, body.answers,
                                        body.duration_ms)
        if not created:
            response.status_code = 200
        return {"label_id": label.id, "assignment_id": assignment_id, "duplicate": not created}

    @app.get("/api/admin/labellers")
    def list_users(admin: User = Depends(require_admin)):
        with db.session() as s:
            counts = dict(s.execute(sa.select(Label.user_id, sa.func.count(Label.id)).group_by(Label.user_id)).all())
            return [{"id": u.id, "name": u.name, "role": u.role, "labels": counts.get(u.id, 0), "active": u.active}
                    for u in s.scalars(sa.select(User).order_by(User.id))]

    @app.post("/api/admin/labellers", status_code=201)
    def add_user(body: NewUser, admin: User = Depends(require_admin)):
        user, token = service.create_user(db, body.name, body.role)
        return {"id": user.id, "name": user.name, "role": user.role, "token": token}

    @app.post("/api/admin/projects", status_code=201)
    def add_project(body: NewProject, admin: User = Depends(require_admin)):
        settings = rules.checked(body.model_dump(include=set(rules.CHECKS), exclude_none=True))
        items = [service.check_item(chat_row(row), "request", n) for n, row in enumerate(body.items, start=1)]
        project, added, skipped = service.import_items(db, body.name, items, body.tasks, body.overlap,
                                                       body.guidelines)
        set_settings(db, project.id, settings)
        return {"id": project.id, "name": project.name, "items_added": added, "duplicates_skipped": skipped}

    def agreement_of(project_id: int) -> dict:
        with db.session() as s:
            service.get_project(s, project_id)
        return agreement_mod.project_agreement(export_mod.stored_labels(db, project_id))

    @app.get("/api/admin/projects/{project_id}/agreement")
    def get_agreement(project_id: Id, admin: User = Depends(require_admin)):
        result = agreement_of(project_id)
        result["labellers"] = {str(k): v for k, v in result["labellers"].items()}
        return result

    def export_rows(project_id: int, kind: str, aggregate: str, ties: str, tasks: str) -> list[dict]:
        with db.session() as s:
            service.get_project(s, project_id)
        if kind == "pairs":
            rows = export_mod.preference_rows(db, project_id, aggregate, ties,
                                              [t.strip() for t in tasks.split(",") if t.strip()])
        elif kind == "sft":
            rows = export_mod.sft_rows(db, project_id)
        elif kind == "kto":
            rows = export_mod.kto_rows(db, project_id)
        elif kind == "labels":
            rows = export_mod.stored_labels(db, project_id)
        else:
            raise service.LabelError(422, f"kind must be pairs, sft, kto or labels, got {kind!r}")
        return export_mod.check_rows(rows, f"export of project {project_id}")

    @app.get("/api/admin/projects/{project_id}/export")
    def get_export(project_id: Id, kind: str = Query("pairs", max_length=20),
                   aggregate: str = Query("majority", max_length=20), ties: str = Query("drop", max_length=20),
                   tasks: str = Query("pairwise,ranking", max_length=100), admin: User = Depends(require_admin)):
        return export_rows(project_id, kind, aggregate, ties, tasks)

    # ---- pages ---------------------------------------------------------------------------------------

    @app.get("/static/app.js", include_in_schema=False)
    def static_js():
        return Response(templates.JS, media_type="text/javascript", headers={"Cache-Control": "max-age=300"})

    @app.get("/static/app.css", include_in_schema=False)
    def static_css():
        return Response(templates.CSS, media_type="text/css", headers={"Cache-Control": "max-age=300"})

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request):
        token = secrets.token_urlsafe(24)
        response = page("login.html", login_csrf=token, user=None)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    def login_again(status: int, error: str) -> HTMLResponse:
        fresh = secrets.token_urlsafe(24)
        response = page("login.html", status, login_csrf=fresh, user=None, error=error)
        response.set_cookie(LOGIN_CSRF_COOKIE, fresh, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        sent = (await read_form(request, strict=False)).get("csrf")
        if not accounts.same_token(sent, request.cookies.get(LOGIN_CSRF_COOKIE)):
            # e.g. an older login tab (its form token was replaced since): a fresh form, not a bare error
            return login_again(403, "This login form has expired (opened in another tab or too long ago); "
                                    "please log in again.")
        token = (await read_form(request)).get("token")
        with db.session() as s:
            user = service.authenticate(s, token if isinstance(token, str) else None)
        if user is None:
            return login_again(401, "Unknown or disabled token.")
        previous = request.cookies.get(SESSION_COOKIE)
        if previous and len(previous) <= 200:  # logging in again replaces this browser's session
            accounts.revoke_session(db, service.hash_token(previous))
        response = RedirectResponse({"admin": "/admin", "reviewer": "/review"}.get(user.role, "/"), status_code=303)
        response.set_cookie(SESSION_COOKIE, accounts.create_session(db, user.id, session_hours), httponly=True,
                            samesite="strict", secure=secure_cookies, max_age=int(session_hours * 3600))
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    def page_user(request: Request) -> User | None:
        user, _ = current_user(request)
        return user

    def csrf_of(request: Request, user: User) -> str:
        return csrf_for(user, getattr(request.state, "session", None))

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request, user: User = Depends(require_user)):
        if request.state.session:
            accounts.revoke_session(db, request.state.session)  # the old cookie is refused from now on
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/", include_in_schema=False)
    def home(request: Request):
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        if user.role == "reviewer":
            return RedirectResponse("/review", status_code=303)
        with db.session() as s:
            rows = [{"id": p.id, "name": p.name, **service.progress(s, user, p)}
                    for p in s.scalars(sa.select(Project).order_by(Project.id))]
        if len(rows) == 1:
            return RedirectResponse(f"/label?project={rows[0]['id']}", status_code=303)
        return page("projects.html", user=user, csrf=csrf_of(request, user), projects=rows)

    def label_page(request: Request, user: User, project_id: int, error: str | None = None,
                   status: int = 200) -> HTMLResponse:
        review_web.no_labelling(user)
        flow.release_stale(db, project_id, hold_minutes)
        assignment = service.next_assignment(db, user, project_id)
        with db.session() as s:
            project = service.get_project(s, project_id)
            view = service.assignment_view(s, assignment) if assignment else None
            prog = service.progress(s, user, project)
            return page("label.html", status, user=user, csrf=csrf_of(request, user), project=project, view=view,
                        progress=prog, guidelines_html=render_markdown(project.guidelines), error=error,
                        idem_key=secrets.token_urlsafe(18), min_critique=rules.min_critique(project),
                        editing=None, first=prog["done"] == 0)

    @app.get("/label", include_in_schema=False)
    def label_get(request: Request, project: int | None = Query(None, ge=1, le=2**31 - 1)):
        user = page_user(request)
        if user is None or project is None:  # the login check first; no project: home picks one
            return RedirectResponse("/login" if user is None else "/", status_code=303)
        return label_page(request, user, project)

    @app.post("/label/{assignment_id}", include_in_schema=False)
    async def label_post(assignment_id: Id, request: Request, user: User = Depends(require_user)):
        form = await read_form(request)
        with db.session() as s:
            assignment = service.own_assignment(s, user, assignment_id)
            project = s.get(Project, assignment.project_id)
            tasks = list(project.tasks)
            k = len(service.shown_order(tasks, assignment.order))
        try:
            answers = form_answers(form, tasks, k, rules.min_critique(project))
            duration = form_int(form, "duration_ms", required=False)  # empty when the script did not run
            key = form_text(form, "idempotency_key", required=False) or ""
            service.submit(db, user, assignment_id, key, answers, duration)
        except service.LabelError as exc:
            if exc.status == 404:
                raise
            return label_page(request, user, project.id, error=exc.detail, status=exc.status)
        except DataError as exc:
            return label_page(request, user, project.id, error=str(exc), status=422)
        return RedirectResponse(f"/label?project={project.id}", status_code=303)

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request):
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        if user.role != "admin":
            raise HTTPException(403, "admin only")
        session = request.state.session  # a token made by the last POST, shown once (post/redirect/get)
        return render_admin(request, user, accounts.pop_flash(db, session) if session else None, None)

    def render_admin(request: Request, user: User, new_token: dict | None, error: str | None,
                     status: int = 200) -> HTMLResponse:
        with db.session() as s:
            counts = dict(s.execute(sa.select(Label.user_id, sa.func.count(Label.id)).group_by(Label.user_id)).all())
            users = [{"id": u.id, "name": u.name, "role": u.role, "labels": counts.get(u.id, 0), "active": u.active}
                     for u in s.scalars(sa.select(User).order_by(User.id))]
            projects = []
            for p in s.scalars(sa.select(Project).order_by(Project.id)):
                items = list(s.execute(sa.select(Item.id, Item.prompt, Item.gold).where(Item.project_id == p.id)))
                n_labels = s.scalar(sa.select(sa.func.count(Label.id)).where(Label.project_id == p.id))
                projects.append({"id": p.id, "name": p.name, "tasks": p.tasks, "overlap": p.overlap,
                                 "items": len(items), "gold": sum(g is not None for _, _, g in items),
                                 "labels": n_labels, "prompts": {i: scrub(pr) for i, pr, _ in items},
                                 "archived": p.archived_at is not None, "guidelines": scrub(p.guidelines),
                                 "version": p.guidelines_version or 1, "fast_seconds": p.fast_seconds,
                                 "hold_minutes": p.hold_minutes})
        for p in projects:
            p["agreement"] = agreement_of(p["id"])
        return page("admin.html", status, user=user, csrf=csrf_of(request, user), users=users, projects=projects,
                    new_token=new_token, error=error, hold_default=hold_minutes)

    def show_once(request: Request, admin: User, new_token: dict | None):
        """Post/redirect/get: a new token goes into the session's one-time flash and the browser to GET
        /admin, so a refresh re-posts nothing (a bearer client, without a session, gets the page itself)."""
        session = request.state.session
        if not session:
            return render_admin(request, admin, new_token, None)
        if new_token:
            accounts.set_flash(db, session, new_token)
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/labellers", include_in_schema=False)
    async def admin_add_user(request: Request, admin: User = Depends(require_admin)):
        form = await read_form(request)
        try:
            user, token = service.create_user(db, form_text(form, "name", required=False) or "",
                                              form_text(form, "role", required=False) or "labeller")
        except service.LabelError as exc:
            return render_admin(request, admin, None, exc.detail, exc.status)
        except DataError as exc:
            return render_admin(request, admin, None, str(exc), 422)
        return show_once(request, admin, {"name": user.name, "token": token})

    @app.post("/admin/users/{user_id}/{action}", include_in_schema=False)
    async def admin_user_action(user_id: Id, action: str, request: Request, admin: User = Depends(require_admin)):
        if action not in ("rotate", "disable", "enable"):
            raise HTTPException(404, "unknown action")
        try:
            if action == "rotate":
                user, token = accounts.rotate_token(db, user_id=user_id, keep_session=request.state.session)
                return show_once(request, admin, {"name": user.name, "token": token})
            if user_id == admin.id and action == "disable":
                raise service.LabelError(422, "you cannot disable yourself")
            accounts.set_active(db, action == "enable", user_id=user_id)
        except service.LabelError as exc:
            return render_admin(request, admin, None, exc.detail, exc.status)
        return show_once(request, admin, None)

    @app.get("/admin/projects/{project_id}/export.jsonl", include_in_schema=False)
    def admin_export(project_id: Id, kind: str = "pairs", aggregate: str = "majority", ties: str = "drop",
                     tasks: str = "pairwise,ranking", admin: User = Depends(require_admin)):
        import json

        rows = export_rows(project_id, kind, aggregate, ties, tasks)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(text, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="project{project_id}_{kind}.jsonl"'})

    web_errors.install(app, env, page, login_again)  # pages get HTML errors, the API keeps JSON
    app.include_router(flow_web.make_router(db, require_user, page_user, csrf_of, page, env))
    app.include_router(project_web.make_router(db, require_user, csrf_of, page, env))
    app.include_router(review_web.make_router(db, require_user, page_user, csrf_of, page, env))
    app.add_middleware(BodyLimit, max_body=max_body, max_import=max_import)
    return app
