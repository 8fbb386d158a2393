"""The HTTP API of the QA app, built once per ingress replica around its `QAService` (no module-level app is
shared or mutated): routes, the error mapping to status codes, and the guard in front.

POST /v1/search, POST /v1/ask, GET /v1/index, GET /healthz, GET /metrics, OpenAPI at /docs. Errors are JSON
`{"error": ..., "request_id": ...}`: 401 bad key, 413 body/question/batch too large, 422 malformed input; 503 when
`max_queued_requests` is exceeded (from the Serve proxy), when a backend replica is lost twice in a row, when an
index shard does not answer within `serve.shard_timeout_s` (named), or when the app's parts hold no version to
answer from (`pipeline.serve.errors`, mapped by the guard for whatever the routes raise); 500 only for a bug.
Never a 500 for bad input, never a bare one.
"""

# No `from __future__ import annotations` here: FastAPI resolves the request models from real annotations.

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from pipeline.serve.errors import Refused
from pipeline.serve.guard import Guard, error, request_id
from pipeline.serve.metrics import CONTENT_TYPE_LATEST
from pipeline.serve.schemas import AskRequest, AskResponse, SearchRequest, SearchResponse

REFUSALS: dict[int | str, dict[str, Any]] = {401: {}, 413: {}, 422: {}, 503: {}}


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"field": ".".join(str(p) for p in e["loc"][1:]) or "body", "problem": e["msg"]} for e in exc.errors()]
    return error(422, "invalid request", request_id(request.scope), detail=problems)


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), request_id(request.scope))


async def _refused(request: Request, exc: Refused) -> JSONResponse:
    return error(exc.status, str(exc), request_id(request.scope))


def build_api(service, api_key: str | None) -> FastAPI:
    """A FastAPI app whose routes call `service` (a `pipeline.serve.app.QAService` replica)."""
    api = FastAPI(title="DPR question answering", version="1", description=__doc__)
    api.add_exception_handler(RequestValidationError, _invalid)
    api.add_exception_handler(HTTPException, _http)
    api.add_exception_handler(Refused, _refused)

    @api.post("/v1/search", response_model=SearchResponse, responses=REFUSALS)
    async def search(body: SearchRequest):
        return await service.search(body.questions, body.k, body.mode)

    @api.post("/v1/ask", response_model=AskResponse, responses=REFUSALS)
    async def ask(body: AskRequest):
        return await service.ask(body.question, body.k, body.top_answers, body.mode)

    @api.get("/v1/index")
    async def index(request: Request):
        return await service.index(request)

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    api.add_middleware(Guard, settings=service.settings, api_key=api_key, metrics=service.metrics)
    return api
