"""Reviewer routes (an APIRouter included by :mod:`.web`): pages ``/review``, ``/review/{project}``,
``/review/{project}/progress``, the adjudication form and a pairs / KTO export; JSON under ``/api/review``.

Reviewers and admins only: a labeller gets 403, nobody logged in 401 (pages: a redirect to /login). Every
POST goes through the app's ``require_user`` (CSRF for cookie sessions); text passes the rule of
:mod:`.text`. Reviewers cannot label (:func:`no_labelling`, called by the labelling routes).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from ..errors import DataError
from . import adjudication, review
from . import export as export_mod
from .db import User
from .forms import form_text, read_form
from .review_templates import TEMPLATES
from .service import LabelError

REVIEW_ROLES = ("admin", "reviewer")
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
Fast = Annotated[float | None, Query(ge=0, le=3600)]  # None: the project's own threshold


def no_labelling(user: User) -> None:
    """Reviewers review; labelling stays for labellers (and admins, as before)."""
    if user.role == "reviewer":
        raise LabelError(403, "reviewers do not label: open /review")


class AdjudicationBody(BaseModel):
    task: str = Field(min_length=1, max_length=20)
    answer: dict[str, Any]
    note: str = Field(default="", max_length=adjudication.MAX_NOTE)


def _r(i: int) -> str:
    return f"R{i + 1}" if isinstance(i, int) else "?"


def describe(task: str, answer: dict | None) -> str:
    """One line for an answer in original indices (R1 = the item's first response)."""
    if not answer:
        return "–"
    if task == "pairwise":
        a, b = answer["pair"]
        w = answer["winner"]
        return f"{_r(a)} = {_r(b)} (tie)" if w is None else f"{_r(w)} better than {_r(b if w == a else a)}"
    if task == "ranking":
        return " > ".join(_r(i) for i in answer["ranking"])
    if task == "binary":
        return ", ".join(f"{'accept' if v else 'reject'} {_r(i)}" for i, v in enumerate(answer["accept"]))
    if task == "likert":
        return ", ".join(f"{_r(i)}: {v}" for i, v in enumerate(answer["ratings"]))
    if task == "critique":
        rewrite = f" / rewrite: {answer['rewrite']}" if answer.get("rewrite") else ""
        return f"{_r(answer['response'])}: {answer['critique']}{rewrite}"
    return json.dumps(answer)


def options(item: dict[str, Any], tasks: list[str]) -> dict[str, list[tuple[str, str]]]:
    """The final answers offered per task: every outcome of each pair asked (pairwise), else each distinct
    answer a labeller gave; the live decision first."""
    out: dict[str, list[tuple[str, str]]] = {}
    for task in tasks:
        if task not in adjudication.ADJUDICABLE:
            continue
        given = [lab["answers"][task] for lab in item["labels"] if task in lab["answers"]]
        if task == "pairwise":
            pairs = list(dict.fromkeys(tuple(sorted(a["pair"])) for a in given)) or [(0, 1)]
            given = [{"pair": list(p), "winner": w} for p in pairs for w in (p[0], p[1], None)]
        else:
            given = [{k: v for k, v in a.items()} for a in given]
        live = item["adjudications"].get(task)
        answers = ([live["answer"]] if live else []) + given
        seen, opts = set(), []
        for a in answers:
            value = json.dumps(a, sort_keys=True)
            if value not in seen:
                seen.add(value)
                opts.append((value, describe(task, a)))
        if opts:
            out[task] = opts
    return out


def make_router(db, require_user, page_user, csrf_of, page, env) -> APIRouter:
    """The routes, bound to the app's database, authentication and page renderer."""
    env.loader.mapping.update(TEMPLATES)
    env.globals["describe"] = describe
    router = APIRouter(include_in_schema=False)

    async def require_reviewer(user: User = Depends(require_user)) -> User:
        if user.role not in REVIEW_ROLES:
            raise HTTPException(403, "reviewers and admins only")
        return user

    def page_reviewer(request: Request) -> User | None:
        user = page_user(request)
        if user is not None and user.role not in REVIEW_ROLES:
            raise HTTPException(403, "reviewers and admins only")
        return user

    def render_review(request, user, project_id, fast, disputed, error=None, status=200):
        """``fast`` None: the project's own "very fast" threshold; a number overrides it for this view."""
        data = review.project_review(db, project_id, fast, only_disputed=disputed)
        history: dict[int, list] = {}
        for a in adjudication.adjudications(db, project_id, history=True):
            if a["superseded_at"]:
                history.setdefault(a["item_id"], []).append(a)
        return page("review.html", status, user=user, csrf=csrf_of(request, user), project=data["project"],
                    items=data["items"], quality=data["quality"], thresholds=data["thresholds"],
                    disputed=sum(it["disputed"] for it in data["items"]), only_disputed=disputed, history=history,
                    options={it["item_id"]: options(it, data["project"]["tasks"]) for it in data["items"]},
                    progress=review.progress(db, project_id), error=error, fast_override=fast)

    @router.get("/review")
    def review_index(request: Request):
        user = page_reviewer(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return page("review_index.html", user=user, csrf=csrf_of(request, user), projects=review.projects(db))

    @router.get("/review/{project_id}")
    def review_page(project_id: Id, request: Request, fast: Fast = None,
                    disputed: int = Query(0, ge=0, le=1)):
        user = page_reviewer(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return render_review(request, user, project_id, fast, bool(disputed))

    @router.get("/review/{project_id}/progress")
    def progress_page(project_id: Id, request: Request):
        user = page_reviewer(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        prog = review.progress(db, project_id)
        project = next(p for p in review.projects(db) if p["id"] == project_id)
        return page("review_progress.html", user=user, csrf=csrf_of(request, user), project=project,
                    progress=prog)

    @router.post("/review/{project_id}/items/{item_id}/adjudicate")
    async def adjudicate_form(project_id: Id, item_id: Id, request: Request,
                              user: User = Depends(require_reviewer)):
        form = await read_form(request)
        try:
            task = form_text(form, "task")
            raw = form_text(form, "answer")
            try:
                answer = json.loads(raw)
            except ValueError:
                raise LabelError(422, "field 'answer' is not JSON") from None
            adjudication.adjudicate(db, user, project_id, item_id, task, answer,
                                    form_text(form, "note", required=False) or "")
        except LabelError as exc:
            if exc.status == 404:
                raise
            return render_review(request, user, project_id, None, False, exc.detail, exc.status)
        except DataError as exc:
            return render_review(request, user, project_id, None, False, str(exc), 422)
        return RedirectResponse(f"/review/{project_id}#item-{item_id}", status_code=303)

    @router.get("/review/{project_id}/export.jsonl")
    def review_export(project_id: Id, kind: str = Query("pairs", pattern="^(pairs|kto)$"),
                      user: User = Depends(require_reviewer)):
        review.progress(db, project_id)  # 404 for an unknown project
        rows = (export_mod.preference_rows(db, project_id) if kind == "pairs"
                else export_mod.kto_rows(db, project_id))
        rows = export_mod.check_rows(rows, f"export of project {project_id}")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(text, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="project{project_id}_{kind}.jsonl"'})

    @router.get("/api/review/projects/{project_id}")
    def review_json(project_id: Id, fast: Fast = None, disputed: int = Query(0, ge=0, le=1),
                    user: User = Depends(require_reviewer)):
        return review.project_review(db, project_id, fast, only_disputed=bool(disputed))

    @router.get("/api/review/projects/{project_id}/progress")
    def progress_json(project_id: Id, user: User = Depends(require_reviewer)):
        return review.progress(db, project_id)

    @router.get("/api/review/projects/{project_id}/adjudications")
    def adjudications_json(project_id: Id, history: int = Query(0, ge=0, le=1),
                           user: User = Depends(require_reviewer)):
        review.progress(db, project_id)
        return adjudication.adjudications(db, project_id, history=bool(history))

    @router.post("/api/review/projects/{project_id}/items/{item_id}/adjudications", status_code=201)
    def adjudicate_json(project_id: Id, item_id: Id, body: AdjudicationBody, user: User = Depends(require_reviewer)):
        row = adjudication.adjudicate(db, user, project_id, item_id, body.task, body.answer, body.note)
        return {"id": row.id, "item_id": item_id, "task": row.task, "answer": row.answer}

    return router
