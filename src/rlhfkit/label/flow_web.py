"""Labeller-flow routes (an APIRouter included by :mod:`.web`): skip / flag an item, the recent-labels page,
editing one's own label; JSON under ``/api``. Logic lives in :mod:`.flow`.

Every route needs a user; POSTs go through the app's ``require_user`` (CSRF for cookie sessions). A labeller
reaches only their own assignments and labels (others' ids are 404); reviewers do not label (403).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field

from ..errors import DataError
from . import flow, review_web, rules, service
from .db import Assignment, Project, User
from .flow_templates import TEMPLATES
from .forms import form_answers, form_int, form_text, read_form
from .render import render_markdown

Id = Annotated[int, Path(ge=1, le=2**31 - 1)]


class MarkBody(BaseModel):
    reason: str = Field(min_length=1, max_length=40)
    note: str = Field(default="", max_length=flow.MAX_NOTE)


class EditBody(BaseModel):
    idempotency_key: str = Field(min_length=8, max_length=100)
    answers: dict[str, Any]
    duration_ms: int | None = Field(default=None, ge=0, le=10**9)


def make_router(db, require_user, page_user, csrf_of, page, env) -> APIRouter:
    env.loader.mapping.update(TEMPLATES)
    env.globals["skip_reasons"] = flow.SKIP_REASONS
    env.globals["flag_reasons"] = flow.FLAG_REASONS
    router = APIRouter(include_in_schema=False)

    # ---- JSON ----------------------------------------------------------------------------------------

    @router.post("/api/assignments/{assignment_id}/skip", status_code=201)
    def skip_json(assignment_id: Id, body: MarkBody, user: User = Depends(require_user)):
        review_web.no_labelling(user)
        mark = flow.skip(db, user, assignment_id, body.reason, body.note)
        return {"id": mark.id, "item_id": mark.item_id, "kind": "skip", "reason": mark.reason}

    @router.post("/api/assignments/{assignment_id}/flag", status_code=201)
    def flag_json(assignment_id: Id, body: MarkBody, user: User = Depends(require_user)):
        review_web.no_labelling(user)
        mark = flow.flag(db, user, assignment_id, body.reason, body.note)
        return {"id": mark.id, "item_id": mark.item_id, "kind": "flag", "reason": mark.reason}

    @router.get("/api/projects/{project_id}/my-labels")
    def my_labels(project_id: Id, limit: int = Query(flow.RECENT, ge=1, le=100), user: User = Depends(require_user)):
        return flow.recent_labels(db, user, project_id, limit)

    @router.put("/api/labels/{label_id}")
    def edit_json(label_id: Id, body: EditBody, user: User = Depends(require_user)):
        review_web.no_labelling(user)
        label, changed = flow.edit_label(db, user, label_id, body.idempotency_key, body.answers, body.duration_ms)
        return {"label_id": label.id, "changed": changed, "revisions": len(flow.revisions(db, label.id))}

    # ---- pages ---------------------------------------------------------------------------------------

    def back_to(project_id: int) -> RedirectResponse:
        return RedirectResponse(f"/label?project={project_id}", status_code=303)

    async def mark_form(request: Request, user: User, assignment_id: int, kind: str):
        review_web.no_labelling(user)
        form = await read_form(request)
        with db.session() as s:
            project_id = service.own_assignment(s, user, assignment_id).project_id
        try:
            (flow.skip if kind == "skip" else flow.flag)(db, user, assignment_id, form_text(form, "reason"),
                                                         form_text(form, "note", required=False))
        except service.LabelError as exc:
            if exc.status == 404:
                raise
        except DataError:
            pass  # a bad note: nothing stored, back to the item
        return back_to(project_id)

    @router.post("/label/{assignment_id}/skip")
    async def skip_form(assignment_id: Id, request: Request, user: User = Depends(require_user)):
        return await mark_form(request, user, assignment_id, "skip")

    @router.post("/label/{assignment_id}/flag")
    async def flag_form(assignment_id: Id, request: Request, user: User = Depends(require_user)):
        return await mark_form(request, user, assignment_id, "flag")

    @router.get("/label/recent")
    def recent_page(request: Request, project: int | None = Query(None, ge=1, le=2**31 - 1)):
        user = page_user(request)
        if user is None or project is None:  # the login check first; no project: home picks one
            return RedirectResponse("/login" if user is None else "/", status_code=303)
        review_web.no_labelling(user)  # 403, as on every other labelling route
        labels = flow.recent_labels(db, user, project)
        with db.session() as s:
            proj = service.get_project(s, project)
            return page("recent.html", user=user, csrf=csrf_of(request, user), project=proj, labels=labels,
                        limit=flow.RECENT)

    def edit_page(request: Request, user: User, label_id: int, error: str | None = None, status: int = 200):
        review_web.no_labelling(user)
        with db.session() as s:
            label = flow.own_label(s, user, label_id)
            assignment = s.get(Assignment, label.assignment_id)
            project = s.get(Project, label.project_id)
            return page("label.html", status, user=user, csrf=csrf_of(request, user), project=project,
                        view=service.assignment_view(s, assignment), progress=service.progress(s, user, project),
                        guidelines_html=render_markdown(project.guidelines), error=error,
                        idem_key=secrets.token_urlsafe(18), min_critique=rules.min_critique(project),
                        editing={"label_id": label.id, "action": f"/label/edit/{label.id}"}, first=False,
                        pre=flow.form_values(label.answers, list(project.tasks), list(assignment.order)))

    @router.get("/label/edit/{label_id}")
    def edit_get(label_id: Id, request: Request):
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return edit_page(request, user, label_id)

    @router.post("/label/edit/{label_id}")
    async def edit_post(label_id: Id, request: Request, user: User = Depends(require_user)):
        review_web.no_labelling(user)
        form = await read_form(request)
        with db.session() as s:
            label = flow.own_label(s, user, label_id)
            assignment = s.get(Assignment, label.assignment_id)
            project = s.get(Project, label.project_id)
            tasks, project_id = list(project.tasks), project.id
            k = len(service.shown_order(tasks, assignment.order))
        try:
            answers = form_answers(form, tasks, k, rules.min_critique(project))
            flow.edit_label(db, user, label_id, form_text(form, "idempotency_key", required=False) or "", answers,
                            form_int(form, "duration_ms", required=False))
        except service.LabelError as exc:
            if exc.status == 404:
                raise
            return edit_page(request, user, label_id, exc.detail, exc.status)
        except DataError as exc:
            return edit_page(request, user, label_id, str(exc), 422)
        return RedirectResponse(f"/label/recent?project={project_id}", status_code=303)

    return router
