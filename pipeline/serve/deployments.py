"""The model and index halves of the QA service, one Ray Serve deployment each so they scale apart.

The model code (torch, transformers) is imported inside the model deployments only: a Retriever replica, which
holds the index, never loads it.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray import serve

from pipeline.errors import PipelineError
from pipeline.primitives import INGRESS, EncodeCall, LexicalSearch, ShardSearch
from pipeline.runtime.raycluster import use_assigned_cpus
from pipeline.serve.batching import Coalescer
from pipeline.serve.fanout import retriever_names
from pipeline.serve.versions import Versions
from pipeline.store.cache import NodeCache
from pipeline.store.layout import published_version, read_index_manifest
from pipeline.store.lexical import LexicalIndex, load_lexical
from pipeline.store.published import PublishedIndex, load_published
from pipeline.store.segments import footprint
from pipeline.store.storage import Storage

if TYPE_CHECKING:
    from pipeline.models.settings import EncoderSettings

log = logging.getLogger("ray.serve")


def _start_version(storage: Storage) -> str | None:
    """What a replica loads as it starts, before it takes traffic: the version its app is set to (`_pinned`), else
    the one `indexes/LATEST` names; None when there is none."""
    pinned = _pinned()
    if pinned is not None:
        return pinned
    try:
        return published_version(storage, None)
    except PipelineError as exc:
        log.warning("no published index version to load at start: %s", exc)
        return None


def _pinned() -> str | None:
    """The version this replica's app is set to answer from: the ingress's `user_config.index_version` as the Serve
    controller's target holds it. The target is set before any replica of a deploy starts, so a replica started by a
    settings change, by autoscaling or on a restarted node loads the app's version, not `LATEST` and then the
    version on its first request. None when the app follows `LATEST`, or outside Serve."""
    try:
        from ray.serve.context import _get_global_client

        app = serve.get_replica_context().replica_id.deployment_id.app_name
        deployments = _get_global_client().get_serve_details()["applications"][app]["deployments"]
        return ((deployments[INGRESS]["deployment_config"].get("user_config") or {}).get("index_version")) or None
    except Exception as exc:  # noqa: BLE001 - not a replica, or the controller did not answer: LATEST it is
        log.warning("the app's version is unknown at start (%s: %s): loading indexes/LATEST", type(exc).__name__, exc)
        return None


@dataclass(frozen=True)
class PartSettings:
    """What every replica of a versioned deployment is given: where the versions are published, where their files
    are cached on the node, how many queued calls one batch merges, how long a version no request names stays
    held."""

    storage_root: str
    storage_options: dict[str, Any]
    cache_dir: str
    batch_max_size: int
    idle_s: float = 120
    cache_max_bytes: int | None = None


class _Versioned:
    """What the question encoder, the Retriever and the BM25 deployment share: the versions they hold
    (`pipeline.serve.versions`), the app's version (or the one `indexes/LATEST` names) loaded as the replica starts,
    before Serve sends it a request, the others when a request first names them. Every answer says which version
    answered and what the replica holds, so the ingress can keep one version per response."""

    def _versions_init(self, part: PartSettings, what: str) -> None:
        self.storage = Storage(part.storage_root, part.storage_options)
        self.cache = NodeCache(part.cache_dir or tempfile.mkdtemp(prefix="index-cache-"), part.cache_max_bytes)
        self.versions = Versions(self._load, what, on_change=self._held_changed, idle_s=part.idle_s)
        first = _start_version(self.storage)
        if first is not None:
            self.versions.preload(first)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Configs of older releases set `index_version` here: null is harmless, a name would silently not pin."""
        if (user_config or {}).get("index_version") is not None:
            raise ValueError(
                f"{type(self).__name__} takes no index_version: the app's version is set in one place, the "
                "QAService's user_config (docs/serving.md: Pinning and rolling back a version)"
            )
        if user_config:
            log.warning(
                "ignoring %s's user_config %s: the version is the QAService's", type(self).__name__, user_config
            )

    def _load(self, version: str):
        raise NotImplementedError

    def _held_changed(self, held: list, dropped: list) -> None:
        """After a load or a drop: what the replica holds and what it let go. Files a dropped version leased in the
        node cache go once no process on the node holds them (`pipeline.store.cache`)."""
        for loaded in dropped:
            if getattr(loaded, "lease", None) is not None:
                self.cache.release(loaded.lease)
        if any(getattr(loaded, "lease", None) is not None for loaded in [*held, *dropped]):
            self.cache.evict()

    def _answer(self, version: str, **fields: Any) -> dict[str, Any]:
        return {"index_version": version, **self.versions.status(), **fields}

    async def info(self, version: str) -> dict[str, Any]:
        """The version this replica answers `version` from (loading it when not held), and its details."""
        used, loaded = await self.versions.get(version)
        return self._answer(used, **self._details(loaded))

    def _details(self, loaded) -> dict[str, Any]:
        return {}


@serve.deployment
class QuestionEncoder(_Versioned):
    """Questions → vectors with the question encoder each index version pairs with: the model its manifest records
    (`encode.question_model`; `serve.question_model` for versions that record none), with its passages' pooling,
    normalization and length. A version whose model cannot be loaded, or whose vectors do not have its index's
    dimension, is refused. Versions using the same model share one copy, and a replica drops a version no request
    has named for `serve.version_idle_s`: two models only for the minutes of an encoder upgrade. Calls queued
    together are batched (`pipeline.serve.batching`: no wait, and one bad call fails alone)."""

    def __init__(self, part: PartSettings, fallback_model: str, pooling: str | None):
        self.fallback_model, self.pooling = fallback_model, pooling
        self._models: dict[EncoderSettings, Any] = {}
        self._models_lock = threading.Lock()
        self.together = Coalescer(self._encode_batch, part.batch_max_size)
        self._versions_init(part, "question encoder of")

    def _load(self, version: str) -> _QuestionModel:
        from pipeline.models.text_encoder import TextEncoder, question_settings

        manifest = read_index_manifest(self.storage, version)
        settings = question_settings(manifest, self.fallback_model, self.pooling)
        with self._models_lock:
            encoder = self._models.get(settings)
        if encoder is None:
            encoder = TextEncoder(settings)
        dim = encoder.encode(None, ["which version answers this probe?"]).shape[1]
        if dim != manifest.dim:
            raise PipelineError(
                f"index {version}: its question encoder {settings.model} gives {dim}-d vectors, its index holds "
                f"{manifest.dim}-d ones (a question encoder that does not pair with the passage encoder)"
            )
        with self._models_lock:
            self._models.setdefault(settings, encoder)
        return _QuestionModel(settings, self._models[settings])

    def _held_changed(self, held: list[_QuestionModel], dropped: list[_QuestionModel]) -> None:
        with self._models_lock:
            used = {model.settings for model in held}
            for settings in [s for s in self._models if s not in used]:
                log.info("question model %s no longer used by a held version: freed", settings.model)
                del self._models[settings]

    def _details(self, loaded: _QuestionModel) -> dict[str, Any]:
        return {"question_model": loaded.settings.model, "pooling": loaded.settings.pooling}

    async def encode(self, call: EncodeCall) -> dict[str, Any]:
        """The call's questions (from one ingress batch) as vectors of the version it names, or of the one held."""
        return await self.together.submit(call)

    async def _encode_batch(self, calls: list[EncodeCall]) -> list[dict[str, Any]]:
        """Calls queued together (from several ingress replicas); the calls answered by one version go through its
        model together. Each answer: the version used, the vectors, and what the replica holds."""
        answered: list[dict[str, Any] | None] = [None] * len(calls)
        for used, loaded, positions in await self.versions.grouped([call.version for call in calls]):
            vectors = loaded.encoder.encode(None, [q for p in positions for q in calls[p].questions])
            parts = np.split(vectors, np.cumsum([len(calls[p].questions) for p in positions])[:-1])
            for position, part in zip(positions, parts):
                answered[position] = self._answer(used, vectors=part)
        return answered


class _QuestionModel:
    """A version's question encoder: its settings and the (shared) model."""

    def __init__(self, settings: EncoderSettings, encoder):
        self.settings, self.encoder = settings, encoder


@serve.deployment
class Retriever(_Versioned):
    """The published index on CPU replicas: the whole version, or with `shard` = (i, n) the segments
    `assign_segments` gives shard i (the app then runs n Retriever deployments). A version is loaded beside the
    ones held (fetching only the segments the cache lacks), verified and probed before it answers; a version that
    fails to load is refused and the ones held keep answering. Cached files that no held version lists are then
    evicted."""

    def __init__(self, part: PartSettings, shard: tuple[int, int] = (0, 1), refine_k: int | None = None):
        use_assigned_cpus()  # FAISS's threads: `serve.retriever_cpus`
        self.together = Coalescer(self._search_batch, part.batch_max_size)
        self.refine_k = refine_k  # None: each version's own index.refine_k
        self.shard = tuple(shard)
        self._versions_init(part, f"index shard {self.shard[0]} ({retriever_names(self.shard[1])[self.shard[0]]}) of")

    def _load(self, version: str) -> PublishedIndex:
        candidate = load_published(self.storage, version, self.cache, self.shard)
        try:
            probe = np.zeros((1, candidate.d), dtype=np.float32)
            _, rows = candidate.search(probe, 1, self._refine_k(candidate))  # refine needs the vectors
            if candidate.vectors and rows[0, 0] < 0:
                raise PipelineError(f"index {candidate.version}: the probe query found nothing")
        except BaseException:
            self.cache.release(candidate.lease)
            raise
        log.info("index %s loaded (%d vectors, shard %s)", candidate.version, candidate.vectors, self.shard)
        return candidate

    def _refine_k(self, index: PublishedIndex) -> int:
        return index.manifest.refine_k if self.refine_k is None else self.refine_k

    async def search(self, request: ShardSearch) -> dict[str, Any]:
        return await self.together.submit(request)

    async def _search_batch(self, requests: list[ShardSearch]) -> list[dict[str, Any]]:
        """Concurrent requests' questions in one FAISS search and one docstore take per version; each request
        (vectors, k, version) gets its rows, best first (ties: the smaller FAISS id, the `key` the ingress merges
        shards by), from the version it names when held."""
        answered: list[dict[str, Any] | None] = [None] * len(requests)
        for used, index, positions in await self.versions.grouped([request.version for request in requests]):
            if any(requests[p].vectors.shape[-1] != index.d for p in positions):  # the ingress asks again
                for position in positions:
                    answered[position] = self._answer(used, results=None)
                continue
            asked = [(requests[p].vectors, requests[p].k) for p in positions]
            for position, results in zip(positions, _search(index, asked, self._refine_k(index))):
                answered[position] = self._answer(used, results=results, tokenizer=index.store.tokenizer)
        return answered

    def _details(self, index: PublishedIndex) -> dict[str, Any]:
        return {
            "vectors": index.vectors,
            "shard": list(self.shard),
            "node": ray.get_runtime_context().get_node_id(),  # where this shard's answering replica runs
            "segments": len(index.docstores),
            "bytes_per_passage": footprint(index.manifest),
            "lineage": index.manifest.model_dump(exclude={"files"}),
        }


@serve.deployment
class Lexical(_Versioned):
    """The version's BM25 index (`pipeline.store.lexical`, tantivy) for sparse and hybrid searches, verified before it
    is opened; versions are held and refused as the Retriever's are, so a hybrid answer comes from one version."""

    def __init__(self, part: PartSettings):
        self.together = Coalescer(self._search_batch, part.batch_max_size)
        self._versions_init(part, "BM25 index of")

    def _load(self, version: str) -> LexicalIndex:
        candidate = load_lexical(self.storage, read_index_manifest(self.storage, version), self.cache)
        if candidate is None:
            raise PipelineError(f"index {version} has no BM25 index (built with index.lexical: false)")
        return candidate

    async def search(self, request: LexicalSearch) -> dict[str, Any]:
        return await self.together.submit(request)

    async def _search_batch(self, requests: list[LexicalSearch]) -> list[dict[str, Any]]:
        """A request is (questions, k, version); each gets its hits per question, best first."""
        answered = []
        for questions, k, version in requests:
            used, index = await self.versions.get(version)
            tokenizer = index.store.tokenizer if index.store is not None else None
            answered.append(self._answer(used, results=index.search(questions, k), tokenizer=tokenizer))
        return answered


def _search(
    index: PublishedIndex, requests: list[tuple[np.ndarray, int]], refine_k: int
) -> list[list[list[dict[str, Any]]]]:
    """Per request, per question: the hits (id, title, text, score, key = FAISS id, and the reader's token ids when
    the version has them), best first; with refine_k, the scores are exact inner products of the re-scored
    candidates. The requests of one k are searched together, each k apart (a top-k is not the head of a deeper
    top-k where scores tie, nor are refined candidates the same): a request answers as it would alone."""
    answered: list = [None] * len(requests)
    for k in sorted({k for _, k in requests}):
        positions = [p for p, (_, asked) in enumerate(requests) if asked == k]
        vectors = [np.asarray(requests[p][0], dtype=np.float32).reshape(-1, index.d) for p in positions]
        scores, rows = index.search(np.concatenate(vectors), k, refine_k)
        hits = iter(index.store.hits(rows[rows >= 0], scores[rows >= 0]))  # one docstore take for all of them
        found = [[next(hits) for _ in range(int(live))] for live in (rows >= 0).sum(axis=1)]
        for hits_of in found:
            hits_of.sort(key=lambda hit: (-hit["score"], hit["key"]))
        for p, part in zip(positions, np.split(np.arange(len(found)), np.cumsum([len(v) for v in vectors])[:-1])):
            answered[p] = [found[q] for q in part]
    return answered


@serve.deployment
class Reader:
    """`pipeline.models.reader.SpanReader` as a deployment: questions that arrive while a forward pass runs go through
    the next one together (up to 8; `pipeline.serve.batching`: a lone question waits for nothing). The pass runs on a
    thread, so the replica keeps taking requests meanwhile."""

    def __init__(self, model: str, max_length: int, max_answer_tokens: int):
        from pipeline.models.reader import SpanReader

        self.reader = SpanReader(model, max_length, max_answer_tokens)
        self.together = Coalescer(self._read_batch, 8)

    async def _read_batch(self, requests: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return await asyncio.to_thread(self.reader.read, requests)

    async def read(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.together.submit(request)
