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
schema = schemathesis.openapi.from_asgi("/api/admin/openapi.json", create_app(_DB),
                                        headers={"Authorization": f"Bearer {_ADMIN}"})


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@pytest.mark.parametrize("who", ["admin", "labeller", "anonymous"])
def test_no_server_errors(case, who):
    token = {"admin": _ADMIN, "labeller": _LABELLER}.get(who)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = case.call(headers=headers)
    case.validate_response(response, checks=(not_a_server_error,))
