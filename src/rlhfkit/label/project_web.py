"""Admin project set-up routes (an APIRouter included by :mod:`.web`): create a project from an uploaded file,
upload more items, edit the guidelines (versioned), the settings (:mod:`.rules`), archive / restore. Logic in
:mod:`.projects`.

Admins only (others 403, nobody logged in 401); every POST goes through the app's ``require_user`` (CSRF for
cookie sessions). Upload bodies may be as large as the app's ``max_import`` (:mod:`.middleware`).
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import BaseModel, Field

from ..errors import DataError
from . import projects, rules, service
from .db import Project, User
from .forms import form_int, form_number, form_text, read_form

Id = Annotated[int, Path(ge=1, le=2**31 - 1)]

RESULT = """{% extends "base.html" %}{% block title %}Project set-up · rlhfkit label{% endblock %}{% block body %}
<section class="card"><h1>Project <bdi>{{ project_name }}</bdi></h1>
{% if error %}<p class="error" role="alert" id="error">{{ error }}</p>
{% else %}<p class="notice" id="upload-result">{{ message }}</p>{% endif %}
<p><a class="button" href="/admin">back to admin</a></p></section>{% endblock %}
"""

# the settings fields of the new-project form and of each project's settings form (``settings``: the stored
# values, NULL shown empty: the default, given as the placeholder)
SETTINGS_FIELDS = """<label>"Very fast" labels: under <input type="number" name="fast_seconds" min="0.001"
max="{{ max_fast }}" step="any" value="{{ '%g'|format(settings.fast_seconds) if settings.fast_seconds else '' }}"
placeholder="{{ '%g'|format(fast_default) }}"> seconds (review page)</label>
<label>Hold an item for <input type="number" name="hold_minutes" min="0.001" max="{{ max_hold }}" step="any"
value="{{ '%g'|format(settings.hold_minutes) if settings.hold_minutes else '' }}"
placeholder="{{ '%g'|format(hold_default) }}"> minutes, then give it to the next labeller (empty: the server's
default)</label>
"""


class GuidelinesBody(BaseModel):
    guidelines: str = Field(max_length=projects.MAX_GUIDELINES)


class ArchiveBody(BaseModel):
    archived: bool


class SettingsBody(BaseModel):
    """Only the settings sent change; null sets one back to its default (checked by :func:`.rules.checked`)."""
    min_critique_chars: int | None = None
    fast_seconds: float | None = None
    hold_minutes: float | None = None


def form_settings(form) -> dict[str, Any]:
    """The settings fields of a form, checked (an empty field: the default)."""
    return rules.checked({name: form_number(form, name, required=False) for name in ("fast_seconds", "hold_minutes")})


def describe_settings(values: dict[str, Any]) -> str:
    held = "the server's default" if values["hold_minutes"] is None else f"{values['hold_minutes']:g} minutes"
    return f"\"very fast\" below {values['fast_seconds']:g} s; items held for {held}"


def make_router(db, require_user, csrf_of, page, env) -> APIRouter:
    env.loader.mapping.update({"project_result.html": RESULT, "project_settings.html": SETTINGS_FIELDS})
    env.globals.update(fast_default=rules.FAST_SECONDS_DEFAULT, max_fast=f"{rules.MAX_FAST_SECONDS:g}",
                       max_hold=f"{rules.MAX_HOLD_MINUTES:g}")
    router = APIRouter(include_in_schema=False)

    async def require_admin(user: User = Depends(require_user)) -> User:
        if user.role != "admin":
            raise HTTPException(403, "admin only")
        return user

    def result(request, user, name, message=None, error=None, status=200):
        return page("project_result.html", status, user=user, csrf=csrf_of(request, user), project_name=name,
                    message=message, error=error)

    async def upload_items(form):
        upload = form.get("file")
        if upload is None or isinstance(upload, str) or not upload.filename:
            raise service.LabelError(422, "please choose a file to upload (missing: file)")
        return projects.parse_upload(upload.filename, await upload.read())

    def counts(added: int, skipped: int) -> str:
        return f"{added} item{'s' if added != 1 else ''} added, {skipped} duplicate{'s' if skipped != 1 else ''} skipped."

    def refused(request: Request, admin: User, name: str, exc: Exception):
        """The admin page with the one-line reason: a LabelError's own status, a DataError's 422."""
        if isinstance(exc, service.LabelError):
            return result(request, admin, name, error=exc.detail, status=exc.status)
        return result(request, admin, name, error=str(exc), status=422)

    @router.post("/admin/projects/new")
    async def create_form(request: Request, admin: User = Depends(require_admin)):
        form = await read_form(request)
        name = ""
        try:
            name = form_text(form, "name")
            with db.session() as s:
                if s.scalar(sa.select(Project.id).where(Project.name == name)):
                    raise service.LabelError(409, f"a project named {name!r} exists: upload to it on the admin page")
            tasks = [t for t in form.getlist("tasks") if isinstance(t, str)] or ["pairwise"]
            settings = form_settings(form)
            items = await upload_items(form)
            project, added, skipped = service.import_items(
                db, name, items, tasks, form_int(form, "overlap", required=False),
                form_text(form, "guidelines", required=False) or "")
            projects.set_settings(db, project.id, settings)
        except (service.LabelError, DataError) as exc:
            return refused(request, admin, name, exc)
        return result(request, admin, project.name, f"Created with {counts(added, skipped)}")

    async def project_form(project_id: int, request: Request, admin: User, act) -> Any:
        """A project's admin form: ``await act(form, name)`` makes the change and returns the line the page
        shows; a refusal re-shows the page with its one-line reason."""
        form = await read_form(request)
        with db.session() as s:
            name = service.get_project(s, project_id).name
        try:
            message = await act(form, name)
        except (service.LabelError, DataError) as exc:
            return refused(request, admin, name, exc)
        return result(request, admin, name, message)

    @router.post("/admin/projects/{project_id}/upload")
    async def upload_form(project_id: Id, request: Request, admin: User = Depends(require_admin)):
        async def act(form, name):
            _, added, skipped = service.import_items(db, name, await upload_items(form))
            return counts(added, skipped)
        return await project_form(project_id, request, admin, act)

    @router.post("/admin/projects/{project_id}/guidelines")
    async def guidelines_form(project_id: Id, request: Request, admin: User = Depends(require_admin)):
        async def act(form, name):
            text = form_text(form, "guidelines", required=False) or ""
            return f"Guidelines saved: version {projects.set_guidelines(db, admin, project_id, text)}."
        return await project_form(project_id, request, admin, act)

    @router.post("/admin/projects/{project_id}/settings")
    async def settings_form(project_id: Id, request: Request, admin: User = Depends(require_admin)):
        async def act(form, name):
            values = projects.set_settings(db, project_id, form_settings(form))
            return f"Settings saved: {describe_settings(values)}."
        return await project_form(project_id, request, admin, act)

    @router.post("/admin/projects/{project_id}/archive")
    async def archive_form(project_id: Id, request: Request, admin: User = Depends(require_admin)):
        form = await read_form(request)
        done = projects.set_archived(db, project_id, form.get("archived") != "0")
        with db.session() as s:
            name = service.get_project(s, project_id).name
        return result(request, admin, name, "Archived: it serves no items and still exports." if done["archived"]
                      else "Restored: it serves items again.")

    @router.get("/api/admin/projects/{project_id}/guidelines")
    def guidelines_json(project_id: Id, admin: User = Depends(require_admin)):
        return projects.guidelines_history(db, project_id)

    @router.post("/api/admin/projects/{project_id}/guidelines")
    def set_guidelines_json(project_id: Id, body: GuidelinesBody, admin: User = Depends(require_admin)):
        return {"version": projects.set_guidelines(db, admin, project_id, body.guidelines)}

    @router.get("/api/admin/projects/{project_id}/settings")
    def settings_json(project_id: Id, admin: User = Depends(require_admin)):
        return projects.set_settings(db, project_id, {})

    @router.post("/api/admin/projects/{project_id}/settings")
    def set_settings_json(project_id: Id, body: SettingsBody, admin: User = Depends(require_admin)):
        return projects.set_settings(db, project_id, body.model_dump(exclude_unset=True))

    @router.post("/api/admin/projects/{project_id}/archive")
    def archive_json(project_id: Id, body: ArchiveBody, admin: User = Depends(require_admin)):
        return projects.set_archived(db, project_id, body.archived)

    return router
