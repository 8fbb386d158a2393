"""The ASGI guard in front of the QA app: request ids, API key, body size and request metrics before FastAPI
parses anything, and a JSON answer for any error that escapes the routes."""

import hmac
import logging
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from pipeline.config import ServeConfig
from pipeline.errors import PipelineError
from pipeline.serve.errors import status_of
from pipeline.serve.metrics import Metrics

log = logging.getLogger("ray.serve")

OPEN_PATHS = {"/healthz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
ROUTES = {"/v1/search", "/v1/ask", "/v1/index", "/healthz", "/metrics"}


def error(status: int, message: str, request_id: str | None = None, **extra: Any) -> JSONResponse:
    """Every error the API returns: JSON `{"error": ..., "request_id": ...}` with its status."""
    return JSONResponse({"error": message, **extra, "request_id": request_id}, status_code=status)


def request_id(scope) -> str:
    """The request's id: the one Ray Serve's proxy gave it (its `x-request-id`, also in Serve's log lines and the
    response's header), else a new one; kept in the request's state for the error handlers."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        headers = dict(scope.get("headers") or [])
        state["request_id"] = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
    return state["request_id"]


def unexpected(exc: BaseException, rid: str, route: str) -> JSONResponse:
    """An error raised past the routes' checks: 503 when a part the app depends on is down, slow, full or without
    a version to answer from (the client may retry), else 500 (a bug, its traceback logged); either way JSON with
    the request id, which the log line carries too."""
    status = status_of(exc)
    if status == 503:
        log.warning("request %s to %s: 503, %s: %s", rid, route, type(exc).__name__, exc)
        cause = getattr(exc, "cause", exc)  # raised inside a deployment: its own error, not Ray's traceback text
        known = isinstance(cause, PipelineError)  # our own words: they name the part
        return error(503, f"{cause}; retry shortly" if known else "a backend replica is restarting; retry shortly", rid)
    log.error("request %s to %s failed with %s: %s", rid, route, type(exc).__name__, exc, exc_info=exc)
    return error(500, f"internal error ({type(exc).__name__}); report request id {rid}", rid)


class Guard:
    """Pure ASGI middleware (no per-request task like `BaseHTTPMiddleware`): API key, body size, request metrics.
    Runs before FastAPI parses anything, so an oversized or unauthorised body costs nothing."""

    def __init__(self, app, settings: ServeConfig, api_key: str | None, metrics: Metrics):
        self.app, self.settings, self.api_key, self.metrics = app, settings, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, started_response = time.perf_counter(), [500], [False]
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # the app's own path under its prefix

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0], started_response[0] = message["status"], True
            await send(message)

        rid = request_id(scope)
        route = path if path in ROUTES else "other"
        self.metrics.in_flight.labels(route).inc()
        try:
            rejection, receive = await self._admit(scope, path, rid, receive)
            await (rejection or self.app)(scope, receive, send_counted)
        except Exception as exc:
            if started_response[0]:  # nothing else can be sent
                raise
            await unexpected(exc, rid, path)(scope, receive, send_counted)
        finally:
            self.metrics.in_flight.labels(route).dec()
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _admit(self, scope, path: str, rid: str, receive):
        """(a response refusing the request, or None; the receive channel to pass on)."""
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                refused = error(401, "missing or wrong API key", rid)
                refused.headers["WWW-Authenticate"] = "Bearer"
                return refused, receive
        limit = self.settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return error(413, f"request body over {limit} bytes", rid), receive
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
                return error(413, f"request body over {limit} bytes", rid), receive
        body = b"".join(chunks)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay
