"""Errors as a browser sees them: page routes answer HTML, the JSON API (``/api/``) keeps its JSON errors.

Without this a form in a stale tab shows raw JSON: after logging out in another tab (401), or after logging
in again there (a new session, so the page's CSRF token is old: 403). A request that accepts ``text/html``
and is not under ``/api/`` gets instead: 401 -> the login form with a one-line reason; a CSRF 403 -> a page
saying the page was out of date and nothing was saved, with a link back to it; any other error -> a page
with its one-line reason. API clients and tests (``Accept: */*``) keep their JSON.
"""

from __future__ import annotations

import re

from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .service import LabelError

CSRF_WRONG = "CSRF token missing or wrong"
LOGGED_OUT = ("You are logged out (in another tab, or the session expired), so that was not saved: "
              "please log in again.")
STALE = ("This page was out of date (you logged in again in another tab, or it was open too long), so nothing "
         "was saved. Open it again and repeat the last step.")
_BACK = re.compile(r"/(admin|review/[0-9]+)\b")

ERROR = """{% extends "base.html" %}{% block title %}{{ title }} · rlhfkit label{% endblock %}{% block body %}
<section class="card narrow"><h1>{{ title }}</h1><p class="error" role="alert" id="error">{{ message }}</p>
<p><a class="button" href="{{ back }}" id="back">{{ back_text }}</a></p></section>{% endblock %}
"""


def wants_html(request) -> bool:
    """A browser asking for a page (not the JSON API)."""
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


def back_to(path: str) -> str:
    """The page a form posted to ``path`` came from, as near as the path tells (labelling: the home page,
    which opens the labeller's project)."""
    found = _BACK.match(path)
    return found.group() if found else "/"


def install(app, env, page, login_again) -> None:
    """Exception handlers for :class:`~.service.LabelError` and HTTP errors; ``page`` renders a template,
    ``login_again(status, error)`` the login form with a message."""
    env.loader.mapping["error.html"] = ERROR

    def browser_error(request, status: int, detail):
        if status == 401:
            return login_again(401, LOGGED_OUT)
        if status == 403 and detail == CSRF_WRONG:
            return page("error.html", 403, user=None, title="This page was out of date", message=STALE,
                        back=back_to(request.url.path), back_text="Open the page again")
        return page("error.html", status, user=None, title="That did not work", message=str(detail),
                    back=back_to(request.url.path), back_text="Back")

    @app.exception_handler(LabelError)
    async def _label_error(request, exc: LabelError):
        if wants_html(request):
            return browser_error(request, exc.status, exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if wants_html(request) and exc.status_code >= 400:
            return browser_error(request, exc.status_code, exc.detail)
        return await http_exception_handler(request, exc)
