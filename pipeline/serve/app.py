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

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from pipeline.config import PipelineConfig, ServeConfig, load_config
from pipeline.primitives import EncodeCall, LexicalSearch, ShardSearch
from pipeline.serve.batching import Coalescer
from pipeline.serve.deployments import Lexical, PartSettings, QuestionEncoder, Reader, Retriever
from pipeline.serve.errors import Refused, status_of
from pipeline.serve.fanout import (
    ShardsDisagree,
    ShardUnavailable,
    agree,
    merged,
    refusal,
    retriever_names,
    searches,
    started_first,
)
from pipeline.serve.guard import error, request_id
from pipeline.serve.metrics import Metrics
from pipeline.serve.routes import build_api
from pipeline.serve.versions import VersionRefused
from pipeline.store.layout import published_version
from pipeline.store.lexical import fuse
from pipeline.store.storage import Storage

log = logging.getLogger("ray.serve")
REFUSED_RETRY_S = 10.0  # how often the ingress asks again for a version a part refused
START_WAIT_S = 60.0  # how long a starting ingress replica waits for every part to hold its version
REPLICA_LOST = (RayActorError, ActorUnavailableError)


async def _with_one_retry(method, *args):
    """Call a deployment; if the replica dies with the call in flight, call once more: the router sends it to a
    live replica (or the replacement), so a crashed replica costs no request."""
    try:
        return await method.remote(*args)
    except REPLICA_LOST as exc:
        log.warning("a replica died with a request in flight (%s); retrying once", type(exc).__name__)
        return await method.remote(*args)


PRIVATE = frozenset({"key", "title_ids", "text_ids"})  # what a hit carries for the ingress and the reader only


def public(hit: dict[str, Any]) -> dict[str, Any]:
    """A hit as the HTTP API gives it: id, title, text, score."""
    return {name: value for name, value in hit.items() if name not in PRIVATE}


class Ingress:
    """The ingress's logic, apart from Ray Serve's wrapping so that it runs in process with fakes of the
    deployments' handles (tests/unit/test_ingress.py); `QAService` is the deployment.

    The one place the app's version is set: the `user_config` `index_version` (null: the version `indexes/LATEST`
    names when the replica starts or the config changes). Every request names that version to the question
    encoder, the index shards and the BM25 index (`pipeline.serve.fanout`), which load it beside what they hold.
    Requests move to it once every part holds it (asked in the background); a version a part refuses is never
    answered from, in any mode, and `/v1/index` says why."""

    def __init__(
        self,
        encoder,
        retrievers: list,
        reader,
        settings: ServeConfig,
        lexical=None,
        storage: tuple[str, dict[str, Any]] = ("", {}),
    ):
        self.encoder, self.retrievers, self.reader, self.settings = encoder, retrievers, reader, settings
        self.lexical = lexical  # the BM25 deployment (None when the index has no BM25 part)
        self.storage = Storage(*storage) if storage[0] else None
        self.want: str | None = None  # the version set (user_config, or LATEST's when null)
        self.serving: str | None = None  # the version requests ask for: `want` once every part holds it
        self.pinned = False
        self.last_error: str | None = None  # why `want` is not served
        self.answered: str | None = None  # the version the last answer came from: the fallback while one moves in
        self._moving: asyncio.Task | None = None
        self.api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not self.api_key:
            raise RuntimeError(f"serve.api_key_env names {settings.api_key_env}, which is not set on this replica")
        self.metrics = Metrics()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`{"index_version": name or null}`: the version every part of the app answers from once all hold it. A
        starting replica (a settings change replaces every one) returns once they do, or after `START_WAIT_S`, so
        that its first requests do not wait for a version the parts are still loading."""
        unknown = set(user_config or {}) - {"index_version"}
        if unknown:
            raise ValueError(f"QAService user_config takes only index_version, not {sorted(unknown)}")
        pinned = (user_config or {}).get("index_version")
        want = pinned or await asyncio.to_thread(published_version, self.storage, None)
        self.pinned = pinned is not None
        if want != self.want:
            log.info("the app's version is now %s (%s)", want, "pinned" if pinned else "indexes/LATEST")
            self.want, self.last_error = want, None
            starting = self.serving is None
            self.serving = self.serving or want  # a new replica: nothing answered before to fall back on
            self._moving = asyncio.get_running_loop().create_task(self._move_to(want))
            if starting:  # Serve sends a replica traffic once this returns: not before the parts hold its version
                await asyncio.wait({self._moving}, timeout=START_WAIT_S)

    async def _move_to(self, version: str) -> None:
        """Ask every part for `version` (each starts loading it) until all hold it, then ask requests for it; while a
        part refuses it, say why and ask again now and then (a part retries after its `retry_s`)."""
        while self.want == version:
            try:
                found = await self._ask_info(version)
                why = refusal(found, version)
            except VersionRefused as exc:  # a part that held nothing and could not load it
                found, why = [], str(exc)
            except Exception as exc:  # noqa: BLE001 - a part restarting: ask again
                log.warning("asking the app's parts for %s: %s", version, exc)
                found, why = [], None
            if why:
                self.last_error = f"index version {version} refused: {why}"
                log.error("%s; still answering from %s", self.last_error, self.serving)
                await asyncio.sleep(REFUSED_RETRY_S)
            elif found and all(f["index_version"] == version for f in found):
                self.serving, self.last_error = version, None
                log.info("every part holds %s: answering from it", version)
                return
            else:
                await asyncio.sleep(0.5)

    def __serve_build_asgi_app__(self):
        """Serve asks each replica for its ASGI app once the replica is constructed."""
        return build_api(self, self.api_key)

    def _check(self, questions: list[str], k: int, mode: str) -> None:
        """Refused (413, 422) before any model or index work."""
        s = self.settings
        if mode != "dense" and self.lexical is None:
            raise Refused(422, f"mode {mode!r} needs the BM25 index, and this app's index has none (index.lexical)")
        if len(questions) > s.max_batch_questions:
            raise Refused(
                413, f"{len(questions)} questions in one request; serve.max_batch_questions is {s.max_batch_questions}"
            )
        for i, question in enumerate(questions):
            if len(question) > s.max_question_chars:
                raise Refused(
                    413,
                    f"question {i} has {len(question)} characters; serve.max_question_chars is {s.max_question_chars}",
                )
            if not question.strip():
                raise Refused(422, f"question {i} is empty")
            try:
                question.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate, escaped in the JSON (\ud800): not text
                raise Refused(
                    422,
                    f"question {i} is not Unicode text: a lone surrogate (U+{ord(question[exc.start]):04X}) at "
                    f"character {exc.start}",
                ) from None
        if k > s.max_k:
            raise Refused(422, f"k={k} is over serve.max_k={s.max_k}")

    async def _retrieve(self, questions: list[str], k: int, mode: str) -> dict[str, Any]:
        """One request's retrieval (the deployment coalesces concurrent ones into one `_retrieve_batch`)."""
        return (await self._retrieve_batch([(questions, k, mode)]))[0]

    async def _agree(self, ask) -> list[dict[str, Any]]:
        """`fanout.agree` on the version set, falling back to the one answered before; notes what answered."""
        found = await agree(ask, self.serving, self.answered)
        self.answered = found[0]["index_version"]
        self.metrics.serving(self.answered)
        return found

    async def _retrieve_batch(self, requests: list[tuple[list[str], int, str]]) -> list[dict[str, Any]]:
        """Concurrent requests share one encoder call and, per search depth (`fanout.searches`: each request at its
        own), one search of each index (the dense shards, and BM25 for sparse and hybrid questions), all answered
        from one version: per-call overhead is paid once, and each request answers as it would alone."""
        s = self.settings
        questions = [q for asked, _, _ in requests for q in asked]
        groups = searches(requests, s.hybrid_depth)
        encoded_at = sorted({p for dense, _ in groups.values() for p in dense})  # the questions needing vectors
        row = {p: i for i, p in enumerate(encoded_at)}
        want = self.serving

        def bm25(depth: int, positions: list[int]):
            return lambda version: self._search_lexical(
                LexicalSearch([questions[p] for p in positions], depth, version)
            )

        # BM25 needs no vectors: it is asked at once, while the questions are encoded.
        lexical = {depth: bm25(depth, sparse) for depth, (_, sparse) in groups.items() if sparse}
        started = {depth: asyncio.ensure_future(search(want)) for depth, search in lexical.items()}
        lexical = {depth: started_first(started[depth], want, search) for depth, search in lexical.items()}

        async def ask(version: str) -> list[dict[str, Any]]:
            if encoded_at:
                began = time.perf_counter()
                call = EncodeCall([questions[p] for p in encoded_at], version)
                encoded = await _with_one_retry(self.encoder.encode, call)
                self.metrics.stage.labels("encode").observe(time.perf_counter() - began)
                version = encoded["index_version"]  # the index parts are asked for the vectors' version
            parts = []
            for depth, (dense, sparse) in groups.items():
                if dense:
                    vectors = encoded["vectors"][[row[p] for p in dense]]
                    parts += [
                        self._search_shard(shard, ShardSearch(vectors, depth, version))
                        for shard in range(len(self.retrievers))
                    ]
                if sparse:
                    parts.append(lexical[depth](version))
            began = time.perf_counter()
            found = await asyncio.gather(*parts)
            self.metrics.stage.labels("search").observe(time.perf_counter() - began)
            return ([encoded] if encoded_at else []) + list(found)

        try:
            found = await self._agree(ask)
        finally:
            for task in started.values():
                if not task.done():
                    task.cancel()
        parts = iter(found[1:] if encoded_at else found)  # past the encoder's answer
        by_dense, by_sparse = {}, {}  # question position -> its hits, at its request's depth
        for depth, (dense, sparse) in groups.items():
            if dense:
                by_dense.update(zip(dense, merged([next(parts) for _ in self.retrievers], depth)))
            if sparse:
                by_sparse.update(zip(sparse, next(parts)["results"]))
        first = found[1] if encoded_at else found[0]  # an index part's answer: its version and token ids' tokenizer
        version, tokenizer = first["index_version"], first.get("tokenizer")
        answered, position = [], 0
        for asked, k, mode in requests:
            results = []
            for q in range(position, position + len(asked)):
                if mode == "hybrid":
                    hits = fuse(by_dense[q], by_sparse[q], k, s.rrf_k, s.dense_weight)
                else:
                    hits = (by_dense if mode == "dense" else by_sparse)[q][:k]
                results.append(hits)
            answered.append({"index_version": version, "results": results, "tokenizer": tokenizer})
            position += len(asked)
        return answered

    async def _search_lexical(self, request: LexicalSearch) -> dict[str, Any]:
        return await self._within_timeout(self.lexical.search, request, "the BM25 index (Lexical)")

    async def _search_shard(self, shard: int, request: ShardSearch) -> dict[str, Any]:
        name = retriever_names(len(self.retrievers))[shard]
        return await self._within_timeout(self.retrievers[shard].search, request, f"index shard {shard} ({name})")

    async def _within_timeout(self, method, request, what: str) -> dict[str, Any]:
        """A search of `what`, or ShardUnavailable naming it past `serve.shard_timeout_s`."""
        timeout = self.settings.shard_timeout_s
        try:
            return await asyncio.wait_for(_with_one_retry(method, request), timeout)
        except asyncio.TimeoutError:
            raise ShardUnavailable(
                f"{what} did not answer within serve.shard_timeout_s={timeout:g}s: its replicas are down or overloaded"
            ) from None

    async def search(self, questions: list[str], k: int, mode: str | None = None) -> JSONResponse:
        mode = mode or self.settings.mode
        self._check(questions, k, mode)
        found = await self._retrieve(questions, k, mode)
        # Already the response model's shape: sent as is, not validated and re-encoded field by field again.
        results = [[public(hit) for hit in hits] for hits in found["results"]]
        return JSONResponse({"index_version": found["index_version"], "results": results})

    async def ask(self, question: str, k: int, top_answers: int, mode: str | None = None) -> JSONResponse:
        mode = mode or self.settings.mode
        self._check([question], k, mode)
        found = await self._retrieve([question], k, mode)
        passages = found["results"][0]
        answers = []
        if self.reader is not None and passages:
            started = time.perf_counter()
            read = passages[: self.settings.reader_passages]
            asked = {"question": question, "passages": read, "top_answers": top_answers}
            asked["tokenizer"] = found["tokenizer"]  # what the passages' token ids are from
            spans = await _with_one_retry(self.reader.read, asked)
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
        passages = [public(hit) for hit in passages]
        return JSONResponse({"answers": answers, "passages": passages, "index_version": found["index_version"]})

    def _parts(self) -> list[tuple[str, Any]]:
        """(name, handle) of every deployment that holds versions."""
        parts = [("QuestionEncoder", self.encoder)]
        parts += list(zip(retriever_names(len(self.retrievers)), self.retrievers))
        return parts + ([("Lexical", self.lexical)] if self.lexical is not None else [])

    async def _ask_info(self, version: str) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_with_one_retry(handle.info, version) for _, handle in self._parts())))

    async def index(self, request: Request) -> dict[str, Any]:
        """The version searches are answered from now, the one set, each part's view, and why a version set was
        refused (`last_error`)."""
        try:
            found = await self._agree(self._ask_info)
        except ShardsDisagree as exc:
            refused = f"index version {self.serving} refused: {exc.refused}" if exc.refused else self.last_error
            body = {"index_version": self.answered, "target": self.want, "last_error": refused}
            return error(503, str(exc), request_id(request.scope), **body)
        parts = dict(zip((name for name, _ in self._parts()), found))
        shards = [parts[name] for name in retriever_names(len(self.retrievers))]
        info = {
            **{key: value for key, value in shards[0].items() if key not in ("refused", "results")},
            "index_version": found[0]["index_version"],
            "target": self.want,
            "pinned": self.pinned,
            "last_error": self.last_error,
            "question_model": parts["QuestionEncoder"]["question_model"],
            "bm25": self.lexical is not None,
            "held": {name: part["loaded"] for name, part in parts.items()},  # each part's versions (one replica's)
            "vectors": sum(shard["vectors"] for shard in shards),
        }
        if len(shards) > 1:
            info["shards"] = [
                {key: shard[key] for key in ("shard", "node", "index_version", "vectors", "segments")}
                for shard in shards
            ]
        return info


@serve.deployment
@serve.ingress()
class QAService(Ingress):
    """The ingress deployment: `Ingress` as Ray Serve runs it, its HTTP API built per replica, concurrent requests
    coalesced into one `_retrieve_batch` (`pipeline.serve.batching.Coalescer`, not `serve.batch`: no batch wait; a
    request that finds none in flight goes at once, those arriving meanwhile join the next, up to
    `serve.batch_max_size`; a batch that fails is retried request by request, unless a part is unavailable)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.together = Coalescer(self._retrieve_batch, self.settings.batch_max_size, shared=_unavailable)
        self.metrics.queued.set_function(lambda: self.together.queued)

    async def _retrieve(self, questions: list[str], k: int, mode: str) -> dict[str, Any]:
        return await self.together.submit((questions, k, mode))

    def batch_sizes(self) -> dict[int, int]:
        """Batch size -> batches this replica has retrieved (for a handle call: benchmarks/serve.py)."""
        return dict(self.together.sizes)


def _unavailable(exc: Exception) -> bool:
    """A part down, too slow or without the version (a 503): each request of a failed batch would meet it alone."""
    return status_of(exc) == 503


def replicas(s: ServeConfig, part: str, fixed: int) -> dict[str, Any]:
    """A part's deployment options for its replica count: `serve.autoscaling[part]` as Ray Serve's
    `autoscaling_config`, else `fixed` replicas; and how many more may start while a change replaces them."""
    scaling, surge = s.autoscaling.get(part), {"max_surge_percent": s.max_surge_percent}
    if scaling is None:
        return {"num_replicas": fixed, **surge}
    return {"autoscaling_config": scaling.model_dump(exclude_none=True), **surge}


def build_app(config: PipelineConfig):
    """The application graph: ingress → (question encoder, retriever shards, BM25, reader). The version is the
    ingress's `user_config` (`serve.index_version` its default): no other deployment takes one."""
    s = config.serve
    storage = Storage(config.storage.root, config.storage.options)
    # Local paths are made absolute here: replicas do not share the working directory of `serve run`.
    where = (storage.root_url, config.storage.options)
    budget = int(s.cache_max_bytes) if s.cache_max_bytes else None
    part = PartSettings(*where, os.path.abspath(s.cache_dir), s.batch_max_size, s.version_idle_s, budget)
    encoder = QuestionEncoder.options(
        **replicas(s, "encoder", s.encoder_replicas),
        ray_actor_options={"num_cpus": s.encoder_cpus, "num_gpus": s.encoder_gpus},
    ).bind(part, s.question_model, s.question_pooling)
    # With serve.shards > 1, one Retriever deployment per shard, each with its own replicas and its own segments.
    retrievers = [
        Retriever.options(
            name=name,
            **replicas(s, "retriever", s.retriever_replicas),
            ray_actor_options={"num_cpus": s.retriever_cpus, "resources": resources},
        ).bind(part, (shard, s.shards), s.refine_k)
        for shard, (name, resources) in enumerate(
            zip(retriever_names(s.shards), s.shard_resources or [{}] * s.shards, strict=True)
        )
    ]
    reader = None
    if s.reader_model:
        reader = Reader.options(
            **replicas(s, "reader", s.reader_replicas),
            ray_actor_options={"num_cpus": s.reader_cpus, "num_gpus": s.reader_gpus},
        ).bind(s.reader_model, s.reader_max_length, s.max_answer_tokens)
    lexical = None
    if config.index.lexical:  # the versions carry a BM25 index: sparse and hybrid searches
        lexical = Lexical.options(
            **replicas(s, "lexical", s.lexical_replicas),
            ray_actor_options={"num_cpus": s.lexical_cpus},
        ).bind(part)
    # The ingress only awaits the others: it takes no CPU slot, so it is always schedulable.
    # A replaced ingress replica drains its in-flight requests (each retried on the new replicas of the others,
    # which may take a while to load their models) instead of being killed after Serve's default 20 s.
    ingress = QAService.options(
        **replicas(s, "ingress", 1),
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=120,
        user_config={"index_version": s.index_version},
    )
    # The version reaches the ingress through its user_config alone: left out of its arguments, a version set with
    # `serve.run` moves the running replica in place instead of replacing it.
    unpinned = s.model_copy(update={"index_version": None})
    return ingress.bind(encoder, retrievers, reader, unpinned, lexical, where)


def app(args: dict[str, Any]):
    """Builder for `serve run` / `serve deploy`. Args: `settings`, the app's part of the deployment YAML as
    `python -m jobs.serve_config` writes it (`config` then only names the file it came from), or `config`, the
    deployment YAML's path (read where the app is built); optional `set` overrides (`dotted.key=value`) on top.
    Settings in the args are what make an edit reach the app: Serve rebuilds an app on `serve deploy` only when
    its args change (`pipeline.config.serve`)."""
    from pipeline.config.serve import app_settings, read_args, settings_config, settings_sha256

    settings, overrides = read_args(args)
    if settings is None:
        config, source = load_config(args["config"], overrides), f"args.config {args['config']}"
    else:
        config, source = settings_config(settings, overrides, args.get("config")), "args.settings"
    log.info("building the QA app from %s (settings %s)", source, settings_sha256(app_settings(config))[:12])
    return build_app(config)
