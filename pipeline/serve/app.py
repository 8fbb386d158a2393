"""Ray Serve QA application: `serve run configs/serve.yaml` (import path `pipeline.serve.app:app`).

HTTP API (fixed paths): POST /v1/search, POST /v1/ask, GET /v1/index, GET /healthz, GET /metrics, OpenAPI at
/docs. Errors are JSON `{"error": ...}`: 401 bad key, 413 body/question/batch too large, 422 malformed input;
the Serve proxy answers 503 when `max_queued_requests` is exceeded. Never a 500 for bad input.
"""

# No `from __future__ import annotations` here: FastAPI resolves the request models from real annotations.

import asyncio
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
from starlette.exceptions import HTTPException

from pipeline.config import PipelineConfig, ServeConfig, load_config
from pipeline.encoder import EncoderSettings
from pipeline.index import INDEX_MANIFEST, published_version
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


class Metrics:
    """Prometheus series of this ingress replica (scraped at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qa_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("qa_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.stage = Histogram("qa_stage_seconds", "latency per stage", ["stage"], registry=self.registry,
                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.version = Gauge("qa_index_version_info", "index version answering", ["version"], registry=self.registry)


@serve.deployment
@serve.ingress(api)
class QAService:
    def __init__(self, encoder, retriever, reader, settings: ServeConfig):
        self.encoder, self.retriever, self.reader, self.settings = encoder, retriever, reader, settings
        self.api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not self.api_key:
            raise RuntimeError(f"serve.api_key_env names {settings.api_key_env}, which is not set on this replica")
        self.metrics = Metrics()
        self._served_version: str | None = None

        @api.middleware("http")
        async def guard(request: Request, call_next):
            started = time.perf_counter()
            response = await self._guarded(request, call_next)
            route = request.url.path if request.url.path in ROUTES else "other"
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            return response

    async def _guarded(self, request: Request, call_next) -> Response:
        if self.api_key and request.url.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return JSONResponse({"error": "missing or wrong API key"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return _error(413, f"request body over {self.settings.max_body_bytes} bytes")
        if request.method == "POST" and length is None:
            body = await request.body()
            if len(body) > self.settings.max_body_bytes:
                return _error(413, f"request body over {self.settings.max_body_bytes} bytes")
        return await call_next(request)

    def _check(self, questions: list[str], k: int) -> JSONResponse | None:
        s = self.settings
        if len(questions) > s.max_batch_questions:
            return _error(413, f"{len(questions)} questions in one request; serve.max_batch_questions is "
                               f"{s.max_batch_questions}")
        for i, question in enumerate(questions):
            if len(question) > s.max_question_chars:
                return _error(413, f"question {i} has {len(question)} characters; serve.max_question_chars is "
                                   f"{s.max_question_chars}")
            if not question.strip():
                return _error(422, f"question {i} is empty")
        if k > s.max_k:
            return _error(422, f"k={k} is over serve.max_k={s.max_k}")
        return None

    async def _retrieve(self, questions: list[str], k: int) -> dict[str, Any]:
        started = time.perf_counter()
        vectors = await asyncio.gather(*(self.encoder.encode.remote(q) for q in questions))
        self.metrics.stage.labels("encode").observe(time.perf_counter() - started)
        started = time.perf_counter()
        found = await self.retriever.search.remote(vectors, k)
        self.metrics.stage.labels("search").observe(time.perf_counter() - started)
        if found["index_version"] != self._served_version:
            if self._served_version:
                self.metrics.version.remove(self._served_version)
            self._served_version = found["index_version"]
            self.metrics.version.labels(self._served_version).set(1)
        return found

    @api.post("/v1/search", response_model=SearchResponse, responses={413: {}, 422: {}, 401: {}})
    async def search(self, body: SearchRequest):
        problem = self._check(body.questions, body.k)
        return problem or await self._retrieve(body.questions, body.k)

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
            spans = await self.reader.read.remote({"question": body.question, "passages": read,
                                                   "top_answers": body.top_answers})
            self.metrics.stage.labels("read").observe(time.perf_counter() - started)
            answers = [{"text": s["text"], "score": s["score"], "passage_id": read[s["passage"]]["id"],
                        "title": read[s["passage"]]["title"], "start": s["start"], "end": s["end"]} for s in spans]
        return {"answers": answers, "passages": passages, "index_version": found["index_version"]}

    @api.get("/v1/index")
    async def index(self):
        return await self.retriever.info.remote()

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def question_settings(config: PipelineConfig, storage: Storage) -> EncoderSettings:
    """The question side must match how the index's passages were encoded (pooling, normalization, length)."""
    version = published_version(storage, config.serve.index_version)
    manifest = storage.read_manifest(f"indexes/{version}", name=INDEX_MANIFEST)
    encoder = dict(manifest.encoder) if manifest is not None else {}
    pooling = config.serve.question_pooling or encoder.get("pooling", "dpr")
    return EncoderSettings(model=config.serve.question_model, pooling=pooling,
                           max_length=int(encoder.get("max_length", 256)),
                           normalize=bool(encoder.get("normalize", False)), dtype="auto", question=pooling == "dpr")


def build_app(config: PipelineConfig):
    """The application graph: ingress → (question encoder, retriever, reader)."""
    s = config.serve
    storage = Storage(config.storage.root, config.storage.options)
    encoder = QuestionEncoder.options(
        ray_actor_options={"num_cpus": s.encoder_cpus, "num_gpus": s.encoder_gpus},
    ).bind(question_settings(config, storage), s.batch_max_size, s.batch_wait_s)
    # Local paths are made absolute here: replicas do not share the working directory of `serve run`.
    retriever = Retriever.options(
        user_config={"index_version": s.index_version}, ray_actor_options={"num_cpus": s.retriever_cpus},
    ).bind(storage.root_url, config.storage.options, os.path.abspath(s.cache_dir))
    reader = None
    if s.reader_model:
        reader = Reader.options(
            ray_actor_options={"num_cpus": s.reader_cpus, "num_gpus": s.reader_gpus},
        ).bind(s.reader_model, s.reader_max_length, s.max_answer_tokens)
    # The index version lives only in the retriever's user_config: with `serve deploy` (or a RayService) a
    # change is applied in place by Retriever.reconfigure; `serve.run` rolls new replicas in before old leave.
    settings = s.model_copy(update={"index_version": None})
    # The ingress only awaits the others: it takes no CPU slot, so it is always schedulable.
    ingress = QAService.options(
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(encoder, retriever, reader, settings)


def app(args: dict[str, Any]):
    """Builder for `serve run` / `serve deploy`: args `config` (a deployment YAML) and optional `set` overrides."""
    return build_app(load_config(args["config"], list(args.get("set", []))))
