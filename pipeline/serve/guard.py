"""The ASGI guard in front of the QA app: API key, body size and request metrics, before FastAPI parses anything."""

import hmac
import time
from typing import Any

from fastapi.responses import JSONResponse

from pipeline.config import ServeConfig
from pipeline.serve.metrics import Metrics

OPEN_PATHS = {"/healthz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
ROUTES = {"/v1/search", "/v1/ask", "/v1/index", "/healthz", "/metrics"}


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    """Every error the API returns: JSON `{"error": ...}` with its status."""
    return JSONResponse({"error": message, **extra}, status_code=status)


class Guard:
    """Pure ASGI middleware (no per-request task like `BaseHTTPMiddleware`): API key, body size, request metrics.
    Runs before FastAPI parses anything, so an oversized or unauthorised body costs nothing."""

    def __init__(self, app, settings: ServeConfig, api_key: str | None, metrics: Metrics):
        self.app, self.settings, self.api_key, self.metrics = app, settings, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # the app's own path under its prefix

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            rejection, receive = await self._admit(scope, path, receive)
            await (rejection or self.app)(scope, receive, send_counted)
        finally:
            route = path if path in ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _admit(self, scope, path: str, receive):
        """(a response refusing the request, or None; the receive channel to pass on)."""
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return JSONResponse(
                    {"error": "missing or wrong API key"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                ), receive
        limit = self.settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return error(413, f"request body over {limit} bytes"), receive
            return None, receive
        if scope["method"] != "POST":
            return None, receive
        # chunked body: read it up to the limit here, then replay it to the app
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None, receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return error(413, f"request body over {limit} bytes"), receive
        body = b"".join(chunks)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay
