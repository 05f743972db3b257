"""Schemathesis fuzz of the OpenAPI schema: no 5xx on any generated request (bounded examples)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from rlhfkit.label import service  # noqa: E402
from rlhfkit.label.db import Database  # noqa: E402
from rlhfkit.label.web import create_app  # noqa: E402

_DB = Database(str(Path(tempfile.mkdtemp(prefix="rlhfkit_fuzz_")) / "fuzz.db"))
_ADMIN = service.create_user(_DB, "admin", "admin")[1]
_LABELLER = service.create_user(_DB, "ann")[1]
service.upsert_project(_DB, "fuzz", [{"prompt": f"p{i}", "responses": ["a", "b"], "gold": None} for i in range(3)],
                       ["pairwise", "likert"], overlap=2)
# the schema is served to admins only (no public /openapi.json, /docs or /redoc)
_APP = create_app(_DB)
schema = schemathesis.openapi.from_asgi("/api/admin/openapi.json", _APP,
                                        headers={"Authorization": f"Bearer {_ADMIN}"})


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@pytest.mark.parametrize("who", ["admin", "labeller", "anonymous"])
def test_no_server_errors(case, who):
    token = {"admin": _ADMIN, "labeller": _LABELLER}.get(who)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = case.call(headers=headers)
    case.validate_response(response, checks=(not_a_server_error,))


def _with_lone_surrogates(value, seen: list):
    """Every string inside a generated JSON body (keys kept) with a lone UTF-16 surrogate appended."""
    if isinstance(value, str):
        seen.append(1)
        return value + "\ud800"
    if isinstance(value, dict):
        return {k: _with_lone_surrogates(v, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_lone_surrogates(v, seen) for v in value]
    return value


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@pytest.mark.parametrize("who", ["admin", "labeller"])
def test_lone_surrogates_in_every_text_field_are_refused_not_server_errors(case, who):
    """JSON "\\ud800" (valid JSON, not valid Unicode text) in every string of every generated request body and
    query: refused (4xx), never a 5xx. The body is sent as JSON escapes, as a client would (schemathesis itself
    cannot encode it)."""
    import json
    from urllib.parse import urlencode

    from fastapi.testclient import TestClient

    seen: list = []
    body = None
    if isinstance(case.body, dict | list):
        body = json.dumps(_with_lone_surrogates(case.body, seen))  # ensure_ascii: "\ud800" as an escape
    query = _with_lone_surrogates(dict(case.query), seen) if isinstance(case.query, dict) and case.query else None
    if not seen:
        return
    token = {"admin": _ADMIN, "labeller": _LABELLER}[who]
    headers = {"Authorization": f"Bearer {token}", **({"Content-Type": "application/json"} if body else {})}
    url = case.formatted_path
    if query:  # a URL carries the surrogate as its (ill-formed) UTF-8 bytes, percent-encoded
        url += "?" + urlencode({k: str(v).encode("utf-8", "surrogatepass") for k, v in query.items()})
    with TestClient(_APP, raise_server_exceptions=False) as client:
        response = client.request(case.method, url, content=body, headers=headers)
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
    if body is not None:
        assert response.status_code >= 400, (case.method, case.formatted_path, response.status_code)


@pytest.mark.parametrize("csrf", [b"\xc3\xa9", b"\xed\xa0\x80", b"\xff\xfe", b"\x00"])
def test_non_ascii_csrf_values_on_every_state_changing_route_are_403(csrf):
    """A CSRF value that is not ASCII (header bytes, or a form field's percent-encoded bytes) on every POST /
    PUT route, pages included, with a live session: 403, never a 5xx (compare_digest raised on non-ASCII)."""
    import re
    from urllib.parse import quote_from_bytes

    from fastapi.testclient import TestClient

    from rlhfkit.label.testing import login

    with TestClient(_APP, raise_server_exceptions=False) as client:
        login(client, _LABELLER)
        every = [r for top in _APP.routes for r in (top.original_router.routes if hasattr(top, "original_router")
                                                     else [top])]  # routers included by the app, flattened
        routes = [(m, re.sub(r"\{action\}", "rotate", re.sub(r"\{\w+_id\}", "1", r.path)))
                  for r in every for m in getattr(r, "methods", ()) if m in ("POST", "PUT")]
        assert len(routes) > 20
        for method, path in routes:
            by_header = client.request(method, path, headers={"x-csrf-token": csrf}, json={})
            by_form = client.request(method, path, content=b"csrf=" + quote_from_bytes(csrf).encode(),
                                     headers={"content-type": "application/x-www-form-urlencoded"})
            assert (by_header.status_code, by_form.status_code) == (403, 403), (method, path)
