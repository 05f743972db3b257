"""ASGI middleware of the labelling app."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

_IMPORT = re.compile(r"/api/admin/projects|/admin/projects/(new|[0-9]{1,10}/upload)")  # item imports: max_import


class BodyLimit:
    """ASGI middleware: 413 for a request body over the limit (by Content-Length or as it streams in)."""

    def __init__(self, app, max_body: int, max_import: int):
        self.app, self.max_body, self.max_import = app, max_body, max_import

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_import if _IMPORT.fullmatch(scope["path"]) else self.max_body
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(send, limit)
        seen, started, refused = 0, False, False

        async def limited_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not started:
                    # answer 413 now; the app sees a disconnected client and its reply is dropped
                    refused = True
                    await self._refuse(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not refused:
                raise

    @staticmethod
    async def _refuse(send, limit: int):
        response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)
