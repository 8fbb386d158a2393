"""Ray Serve QA application: `serve run configs/serve.yaml` (import path `pipeline.serve.app:app`).

HTTP API (fixed paths): POST /v1/search, POST /v1/ask, GET /v1/index, GET /healthz, GET /metrics, OpenAPI at
/docs. Errors are JSON `{"error": ...}`: 401 bad key, 413 body/question/batch too large, 422 malformed input;
503 when `max_queued_requests` is exceeded (from the Serve proxy) or when a backend replica is lost twice in a
row. Never a 500 for bad input. Concurrent requests are coalesced into one encoder call and one index search.
"""

# No `from __future__ import annotations` here: FastAPI resolves the request models from real annotations.

import hmac
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.exceptions import HTTPException

from pipeline.config import PipelineConfig, ServeConfig, load_config
from pipeline.index import question_settings
from pipeline.serve.deployments import QuestionEncoder, Reader, Retriever
from pipeline.storage import Storage

log = logging.getLogger("ray.serve")
OPEN_PATHS = {"/healthz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
ROUTES = {"/v1/search", "/v1/ask", "/v1/index", "/healthz", "/metrics"}


class SearchRequest(BaseModel):
    questions: list[str] = Field(min_length=1, description="questions to retrieve passages for")
    k: int = Field(10, ge=1, description="passages per question (at most serve.max_k)")


class Passage(BaseModel):
    id: str
    title: str
    text: str
    score: float


class SearchResponse(BaseModel):
    index_version: str
    results: list[list[Passage]]


class AskRequest(BaseModel):
    question: str = Field(min_length=1)
    k: int = Field(10, ge=1, description="passages to retrieve (at most serve.max_k)")
    top_answers: int = Field(3, ge=1, le=20)


class Answer(BaseModel):
    text: str
    score: float
    passage_id: str
    title: str
    start: int
    end: int


class AskResponse(BaseModel):
    answers: list[Answer]
    passages: list[Passage]
    index_version: str


api = FastAPI(title="DPR question answering", version="1", description=__doc__)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"field": ".".join(str(p) for p in e["loc"][1:]) or "body", "problem": e["msg"]} for e in exc.errors()]
    return _error(422, "invalid request", detail=problems)


@api.exception_handler(HTTPException)
async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


REPLICA_LOST = (RayActorError, ActorUnavailableError)


async def _with_one_retry(method, *args):
    """Call a deployment; if the replica dies with the call in flight, call once more: the router sends it to a
    live replica (or the replacement), so a crashed replica costs no request."""
    try:
        return await method.remote(*args)
    except REPLICA_LOST as exc:
        log.warning("a replica died with a request in flight (%s); retrying once", type(exc).__name__)
        return await method.remote(*args)


@api.exception_handler(RayActorError)
@api.exception_handler(ActorUnavailableError)
async def _replica_lost(request: Request, exc: Exception) -> JSONResponse:
    return _error(503, "a backend replica is restarting; retry shortly")


class Metrics:
    """Prometheus series of this ingress replica (scraped at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qa_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "qa_request_seconds",
            "request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.stage = Histogram(
            "qa_stage_seconds",
            "latency per stage",
            ["stage"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.version = Gauge("qa_index_version_info", "index version answering", ["version"], registry=self.registry)


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
                return _error(413, f"request body over {limit} bytes"), receive
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
                return _error(413, f"request body over {limit} bytes"), receive
        body = b"".join(chunks)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay


@serve.deployment
@serve.ingress(api)
class QAService:
    def __init__(self, encoder, retriever, reader, settings: ServeConfig):
        self.encoder, self.retriever, self.reader, self.settings = encoder, retriever, reader, settings
        api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not api_key:
            raise RuntimeError(f"serve.api_key_env names {settings.api_key_env}, which is not set on this replica")
        self.metrics = Metrics()
        self._served_version: str | None = None
        self._retrieve_together.set_max_batch_size(settings.batch_max_size)
        self._retrieve_together.set_batch_wait_timeout_s(settings.batch_wait_s)
        api.add_middleware(Guard, settings=settings, api_key=api_key, metrics=self.metrics)

    def _check(self, questions: list[str], k: int) -> JSONResponse | None:
        s = self.settings
        if len(questions) > s.max_batch_questions:
            return _error(
                413, f"{len(questions)} questions in one request; serve.max_batch_questions is {s.max_batch_questions}"
            )
        for i, question in enumerate(questions):
            if len(question) > s.max_question_chars:
                return _error(
                    413,
                    f"question {i} has {len(question)} characters; serve.max_question_chars is {s.max_question_chars}",
                )
            if not question.strip():
                return _error(422, f"question {i} is empty")
        if k > s.max_k:
            return _error(422, f"k={k} is over serve.max_k={s.max_k}")
        return None

    async def _retrieve(self, questions: list[str], k: int) -> dict[str, Any]:
        return await self._retrieve_together((questions, k))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _retrieve_together(self, requests: list[tuple[list[str], int]]) -> list[dict[str, Any]]:
        """Concurrent requests share one encoder call and one index search: per-call overhead is paid once."""
        started = time.perf_counter()
        vectors = await _with_one_retry(self.encoder.encode, [q for questions, _ in requests for q in questions])
        self.metrics.stage.labels("encode").observe(time.perf_counter() - started)
        started = time.perf_counter()
        found = await _with_one_retry(self.retriever.search, (vectors, max(k for _, k in requests)))
        self.metrics.stage.labels("search").observe(time.perf_counter() - started)
        version = found["index_version"]
        if version != self._served_version:
            if self._served_version:
                self.metrics.version.remove(self._served_version)
            self._served_version = version
            self.metrics.version.labels(version).set(1)
        answered, position = [], 0
        for questions, k in requests:
            results = [hits[:k] for hits in found["results"][position : position + len(questions)]]
            answered.append({"index_version": version, "results": results})
            position += len(questions)
        return answered

    @api.post("/v1/search", response_model=SearchResponse, responses={413: {}, 422: {}, 401: {}})
    async def search(self, body: SearchRequest):
        problem = self._check(body.questions, body.k)
        # Already the response model's shape: sent as is, not validated and re-encoded field by field again.
        return problem or JSONResponse(await self._retrieve(body.questions, body.k))

    @api.post("/v1/ask", response_model=AskResponse, responses={413: {}, 422: {}, 401: {}})
    async def ask(self, body: AskRequest):
        problem = self._check([body.question], body.k)
        if problem:
            return problem
        found = await self._retrieve([body.question], body.k)
        passages = found["results"][0]
        answers = []
        if self.reader is not None and passages:
            started = time.perf_counter()
            read = passages[: self.settings.reader_passages]
            spans = await _with_one_retry(
                self.reader.read, {"question": body.question, "passages": read, "top_answers": body.top_answers}
            )
            self.metrics.stage.labels("read").observe(time.perf_counter() - started)
            answers = [
                {
                    "text": s["text"],
                    "score": s["score"],
                    "passage_id": read[s["passage"]]["id"],
                    "title": read[s["passage"]]["title"],
                    "start": s["start"],
                    "end": s["end"],
                }
                for s in spans
            ]
        return JSONResponse({"answers": answers, "passages": passages, "index_version": found["index_version"]})

    @api.get("/v1/index")
    async def index(self):
        return await _with_one_retry(self.retriever.info)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def build_app(config: PipelineConfig):
    """The application graph: ingress → (question encoder, retriever, reader)."""
    s = config.serve
    storage = Storage(config.storage.root, config.storage.options)
    encoder = QuestionEncoder.options(
        num_replicas=s.encoder_replicas,
        ray_actor_options={"num_cpus": s.encoder_cpus, "num_gpus": s.encoder_gpus},
    ).bind(question_settings(storage, s.index_version, s.question_model, s.question_pooling), s.batch_max_size)
    # Local paths are made absolute here: replicas do not share the working directory of `serve run`.
    retriever = Retriever.options(
        num_replicas=s.retriever_replicas,
        user_config={"index_version": s.index_version},
        ray_actor_options={"num_cpus": s.retriever_cpus},
    ).bind(storage.root_url, config.storage.options, os.path.abspath(s.cache_dir), s.batch_max_size)
    reader = None
    if s.reader_model:
        reader = Reader.options(
            num_replicas=s.reader_replicas,
            ray_actor_options={"num_cpus": s.reader_cpus, "num_gpus": s.reader_gpus},
        ).bind(s.reader_model, s.reader_max_length, s.max_answer_tokens)
    # The index version lives only in the retriever's user_config: with `serve deploy` (or a RayService) a
    # change is applied in place by Retriever.reconfigure; `serve.run` rolls new replicas in before old leave.
    settings = s.model_copy(update={"index_version": None})
    # The ingress only awaits the others: it takes no CPU slot, so it is always schedulable.
    # A replaced ingress replica drains its in-flight requests (each retried on the new replicas of the others,
    # which may take a while to load their models) instead of being killed after Serve's default 20 s.
    ingress = QAService.options(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=120,
    )
    return ingress.bind(encoder, retriever, reader, settings)


def app(args: dict[str, Any]):
    """Builder for `serve run` / `serve deploy`: args `config` (a deployment YAML) and optional `set` overrides."""
    return build_app(load_config(args["config"], list(args.get("set", []))))
