"""The HTTP API of the QA app, built once per ingress replica around its `QAService` (no module-level app is
shared or mutated): routes, the error mapping to status codes, and the guard in front.

POST /v1/search, POST /v1/ask, GET /v1/index, GET /healthz, GET /metrics, OpenAPI at /docs. Errors are JSON
`{"error": ...}`: 401 bad key, 413 body/question/batch too large, 422 malformed input; 503 when
`max_queued_requests` is exceeded (from the Serve proxy), when a backend replica is lost twice in a row, when an
index shard does not answer within `serve.shard_timeout_s` (named), or when index shards share no version (two
swaps overlapping). Never a 500 for bad input.
"""

# No `from __future__ import annotations` here: FastAPI resolves the request models from real annotations.

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.exceptions import HTTPException

from pipeline.serve.fanout import ShardsDisagree, ShardUnavailable
from pipeline.serve.guard import Guard, error
from pipeline.serve.metrics import CONTENT_TYPE_LATEST
from pipeline.serve.schemas import AskRequest, AskResponse, SearchRequest, SearchResponse

REFUSALS: dict[int | str, dict[str, Any]] = {401: {}, 413: {}, 422: {}}


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"field": ".".join(str(p) for p in e["loc"][1:]) or "body", "problem": e["msg"]} for e in exc.errors()]
    return error(422, "invalid request", detail=problems)


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


async def _replica_lost(request: Request, exc: Exception) -> JSONResponse:
    return error(503, "a backend replica is restarting; retry shortly")


async def _shard_trouble(request: Request, exc: Exception) -> JSONResponse:
    return error(503, f"{exc}; retry shortly")


def build_api(service, api_key: str | None) -> FastAPI:
    """A FastAPI app whose routes call `service` (a `pipeline.serve.app.QAService` replica)."""
    api = FastAPI(title="DPR question answering", version="1", description=__doc__)
    api.add_exception_handler(RequestValidationError, _invalid)
    api.add_exception_handler(HTTPException, _http)
    api.add_exception_handler(RayActorError, _replica_lost)
    api.add_exception_handler(ActorUnavailableError, _replica_lost)
    api.add_exception_handler(ShardsDisagree, _shard_trouble)
    api.add_exception_handler(ShardUnavailable, _shard_trouble)

    @api.post("/v1/search", response_model=SearchResponse, responses=REFUSALS)
    async def search(body: SearchRequest):
        return await service.search(body.questions, body.k, body.mode)

    @api.post("/v1/ask", response_model=AskResponse, responses=REFUSALS)
    async def ask(body: AskRequest):
        return await service.ask(body.question, body.k, body.top_answers, body.mode)

    @api.get("/v1/index")
    async def index():
        return await service.index()

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    api.add_middleware(Guard, settings=service.settings, api_key=api_key, metrics=service.metrics)
    return api
