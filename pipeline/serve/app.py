"""Ray Serve QA application: `serve run configs/serve.yaml` (import path `pipeline.serve.app:app`).

The ingress (`QAService`) checks requests, coalesces concurrent ones into one question-encoder call and one index
search, and asks the reader; its HTTP API (`pipeline.serve.routes`) is built per replica. The model and index
deployments are in `pipeline.serve.deployments`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from pipeline.config import PipelineConfig, ServeConfig, load_config
from pipeline.lexical import fuse
from pipeline.serve.deployments import Lexical, QuestionEncoder, Reader, Retriever
from pipeline.serve.fanout import ShardUnavailable, agree, agreed_version, merged, retriever_names, started_first
from pipeline.serve.guard import error
from pipeline.serve.metrics import Metrics
from pipeline.serve.routes import build_api
from pipeline.storage import Storage
from pipeline.text_encoder import question_settings

log = logging.getLogger("ray.serve")
REPLICA_LOST = (RayActorError, ActorUnavailableError)


async def _with_one_retry(method, *args):
    """Call a deployment; if the replica dies with the call in flight, call once more: the router sends it to a
    live replica (or the replacement), so a crashed replica costs no request."""
    try:
        return await method.remote(*args)
    except REPLICA_LOST as exc:
        log.warning("a replica died with a request in flight (%s); retrying once", type(exc).__name__)
        return await method.remote(*args)


@serve.deployment
@serve.ingress()
class QAService:
    def __init__(self, encoder, retrievers: list, reader, settings: ServeConfig, lexical=None):
        self.encoder, self.retrievers, self.reader, self.settings = encoder, retrievers, reader, settings
        self.lexical = lexical  # the BM25 deployment (None when the index has no BM25 part)
        self.api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not self.api_key:
            raise RuntimeError(f"serve.api_key_env names {settings.api_key_env}, which is not set on this replica")
        self.metrics = Metrics()
        self._retrieve_together.set_max_batch_size(settings.batch_max_size)
        self._retrieve_together.set_batch_wait_timeout_s(settings.batch_wait_s)

    def __serve_build_asgi_app__(self):
        """Serve asks each replica for its ASGI app once the replica is constructed."""
        return build_api(self, self.api_key)

    def _check(self, questions: list[str], k: int, mode: str) -> JSONResponse | None:
        s = self.settings
        if mode != "dense" and self.lexical is None:
            return error(422, f"mode {mode!r} needs the BM25 index, and this app's index has none (index.lexical)")
        if len(questions) > s.max_batch_questions:
            return error(
                413, f"{len(questions)} questions in one request; serve.max_batch_questions is {s.max_batch_questions}"
            )
        for i, question in enumerate(questions):
            if len(question) > s.max_question_chars:
                return error(
                    413,
                    f"question {i} has {len(question)} characters; serve.max_question_chars is {s.max_question_chars}",
                )
            if not question.strip():
                return error(422, f"question {i} is empty")
        if k > s.max_k:
            return error(422, f"k={k} is over serve.max_k={s.max_k}")
        return None

    async def _retrieve(self, questions: list[str], k: int, mode: str) -> dict[str, Any]:
        return await self._retrieve_together((questions, k, mode))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _retrieve_together(self, requests: list[tuple[list[str], int, str]]) -> list[dict[str, Any]]:
        """Concurrent requests share one encoder call and one search of each index (the dense shards, and BM25 when
        a request is sparse or hybrid), all answered from one version: per-call overhead is paid once."""
        s = self.settings
        modes = {mode for _, _, mode in requests}
        questions = [q for asked, _, _ in requests for q in asked]
        depth = max(k for _, k, _ in requests)
        depth = max(depth, s.hybrid_depth) if "hybrid" in modes else depth
        dense, sparse = bool(modes - {"sparse"}), bool(modes - {"dense"})
        calls = []
        # BM25 needs no vectors: it is asked at once, while the questions are encoded.
        lexical = (lambda version: self._search_lexical((questions, depth, version))) if sparse else None
        bm25 = asyncio.ensure_future(lexical(None)) if sparse else None
        if dense:
            started = time.perf_counter()
            try:
                vectors = await _with_one_retry(self.encoder.encode, questions)
            except BaseException:
                if bm25 is not None:
                    bm25.cancel()
                raise
            self.metrics.stage.labels("encode").observe(time.perf_counter() - started)
            calls += [self._asking_shard(shard, vectors, depth) for shard in range(len(self.retrievers))]
        if sparse:
            calls.append(started_first(bm25, lexical))
        started = time.perf_counter()
        found = await agree(calls)
        self.metrics.stage.labels("search").observe(time.perf_counter() - started)
        version = found[0]["index_version"]
        self.metrics.serving(version)
        by_dense = merged(found[: len(self.retrievers)], depth) if dense else None
        by_sparse = found[-1]["results"] if sparse else None
        answered, position = [], 0
        for asked, k, mode in requests:
            results = []
            for q in range(position, position + len(asked)):
                if mode == "hybrid":
                    hits = fuse(by_dense[q], by_sparse[q], k, s.rrf_k, s.dense_weight)
                else:
                    hits = (by_dense if mode == "dense" else by_sparse)[q][:k]
                results.append([{key: value for key, value in hit.items() if key != "key"} for hit in hits])
            answered.append({"index_version": version, "results": results})
            position += len(asked)
        return answered

    def _asking_shard(self, shard: int, vectors, depth: int):
        return lambda version: self._search_shard(
            shard, (vectors, depth) if version is None else (vectors, depth, version)
        )

    async def _search_lexical(self, request: tuple) -> dict[str, Any]:
        timeout = self.settings.shard_timeout_s
        try:
            return await asyncio.wait_for(_with_one_retry(self.lexical.search, request), timeout)
        except asyncio.TimeoutError:
            raise ShardUnavailable(
                f"the BM25 index (Lexical) did not answer within serve.shard_timeout_s={timeout:g}s: "
                "its replicas are down or overloaded"
            ) from None

    async def _search_shard(self, shard: int, request: tuple) -> dict[str, Any]:
        timeout = self.settings.shard_timeout_s
        try:
            return await asyncio.wait_for(_with_one_retry(self.retrievers[shard].search, request), timeout)
        except asyncio.TimeoutError:
            name = retriever_names(len(self.retrievers))[shard]
            raise ShardUnavailable(
                f"index shard {shard} ({name}) did not answer within serve.shard_timeout_s={timeout:g}s: "
                "its replicas are down or overloaded"
            ) from None

    async def search(self, questions: list[str], k: int, mode: str | None = None) -> JSONResponse:
        mode = mode or self.settings.mode
        problem = self._check(questions, k, mode)
        # Already the response model's shape: sent as is, not validated and re-encoded field by field again.
        return problem or JSONResponse(await self._retrieve(questions, k, mode))

    async def ask(self, question: str, k: int, top_answers: int, mode: str | None = None) -> JSONResponse:
        mode = mode or self.settings.mode
        problem = self._check([question], k, mode)
        if problem:
            return problem
        found = await self._retrieve([question], k, mode)
        passages = found["results"][0]
        answers = []
        if self.reader is not None and passages:
            started = time.perf_counter()
            read = passages[: self.settings.reader_passages]
            spans = await _with_one_retry(
                self.reader.read, {"question": question, "passages": read, "top_answers": top_answers}
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

    async def index(self) -> dict[str, Any]:
        """The version a search is answered from now, its lineage, and with shards each shard's part."""
        infos = await asyncio.gather(*(_with_one_retry(r.info) for r in self.retrievers))
        if len(infos) == 1:
            return infos[0]
        return {
            **infos[0],
            "index_version": agreed_version(infos) or infos[0]["index_version"],
            "vectors": sum(info["vectors"] for info in infos),
            "last_error": next((info["last_error"] for info in infos if info["last_error"]), None),
            "shards": [
                {key: info[key] for key in ("shard", "node", "index_version", "vectors", "segments")} for info in infos
            ],
        }


def build_app(config: PipelineConfig):
    """The application graph: ingress → (question encoder, retriever shards, reader)."""
    s = config.serve
    storage = Storage(config.storage.root, config.storage.options)
    encoder = QuestionEncoder.options(
        num_replicas=s.encoder_replicas,
        ray_actor_options={"num_cpus": s.encoder_cpus, "num_gpus": s.encoder_gpus},
    ).bind(question_settings(storage, s.index_version, s.question_model, s.question_pooling), s.batch_max_size)
    # Local paths are made absolute here: replicas do not share the working directory of `serve run`. With
    # serve.shards > 1, one Retriever deployment per shard, each with its own replicas and its own segments.
    retrievers = [
        Retriever.options(
            name=name,
            num_replicas=s.retriever_replicas,
            user_config={"index_version": s.index_version},
            ray_actor_options={"num_cpus": s.retriever_cpus, "resources": resources},
        ).bind(
            storage.root_url,
            config.storage.options,
            os.path.abspath(s.cache_dir),
            s.batch_max_size,
            (shard, s.shards),
            s.refine_k,
        )
        for shard, (name, resources) in enumerate(
            zip(retriever_names(s.shards), s.shard_resources or [{}] * s.shards, strict=True)
        )
    ]
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
    lexical = None
    if config.index.lexical:  # the versions carry a BM25 index: sparse and hybrid searches
        lexical = Lexical.options(
            num_replicas=s.lexical_replicas,
            user_config={"index_version": s.index_version},
            ray_actor_options={"num_cpus": s.lexical_cpus},
        ).bind(storage.root_url, config.storage.options, os.path.abspath(s.cache_dir), s.batch_max_size)
    return ingress.bind(encoder, retrievers, reader, settings, lexical)


def app(args: dict[str, Any]):
    """Builder for `serve run` / `serve deploy`: args `config` (a deployment YAML) and optional `set` overrides."""
    return build_app(load_config(args["config"], list(args.get("set", []))))
