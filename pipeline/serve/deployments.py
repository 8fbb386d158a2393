"""The model and index halves of the QA service, one Ray Serve deployment each so they scale apart.

The model code (torch, transformers) is imported inside the model deployments only: a Retriever replica, which
holds the index, never loads it.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray import serve

from pipeline.errors import PipelineError
from pipeline.layout import published_version, read_index_manifest
from pipeline.lexical import LexicalIndex, load_lexical
from pipeline.segments import PublishedIndex, evict, load_published
from pipeline.storage import Storage

if TYPE_CHECKING:
    from pipeline.text_encoder import EncoderSettings

log = logging.getLogger("ray.serve")


@serve.deployment
class QuestionEncoder:
    """Questions → vectors, batched across concurrent requests with `serve.batch` (GPU when present)."""

    def __init__(self, settings: EncoderSettings, batch_max_size: int):
        from pipeline.text_encoder import TextEncoder

        self.encoder = TextEncoder(settings)
        self.encode.set_max_batch_size(batch_max_size)

    # No waiting here: the ingress already waited to fill its batch; this only merges calls that are queued
    # together (from several ingress replicas).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0)
    async def encode(self, calls: list[list[str]]) -> list[np.ndarray]:
        """Each call brings a list of questions; all of them go through the model together."""
        vectors = self.encoder.encode(None, [question for questions in calls for question in questions])
        return np.split(vectors, np.cumsum([len(questions) for questions in calls])[:-1])


class _Versioned:
    """What the Retriever and the BM25 deployment share: the current version and the one before, loaded from
    `user_config`; a version that fails to load leaves the current one serving (`last_error` says why)."""

    def _versions_init(self, storage_root: str, storage_options: dict[str, Any], cache_dir: str) -> None:
        self.storage = Storage(storage_root, storage_options)
        self.cache_dir = cache_dir or tempfile.mkdtemp(prefix="index-cache-")
        self.current = self.previous = None
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def _swap(self, user_config: dict[str, Any], load, what: str) -> bool:
        """Load `load(version asked for)` and make it current (the current one becomes the one before); False and
        the current one kept when it fails (raised when there is none yet)."""
        wanted = user_config.get("index_version")
        try:
            candidate = load(wanted)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the current version serving
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.current is None:
                raise
            log.error("%s %s refused, still serving %s: %s", what, wanted, self.current.version, exc)
            return False
        if self.current is None or candidate.version != self.current.version:
            self.previous = self.current
        self.current, self.last_error = candidate, None
        return True

    def _version(self, name: str | None):
        """The version asked for when loaded here, else the current one (the answer says which was used)."""
        current, previous = self.current, self.previous
        return previous if previous is not None and name == previous.version else current

    def _loaded(self) -> list[str]:
        return [v.version for v in (self.current, self.previous) if v is not None]


@serve.deployment
class Retriever(_Versioned):
    """The published index on CPU replicas: the whole version, or with `shard` = (i, n) the segments
    `assign_segments` gives shard i (the app then runs n Retriever deployments). The version comes from
    `user_config`; a new one is loaded beside the current one (fetching only the segments the cache lacks), verified
    and probed, then swapped in with one assignment, and a version that fails to load leaves the current one
    serving. The version before stays loaded too, so that while shards move to a new version one after another the
    ingress can still ask every shard for the one they all have: no response mixes versions. Cached files that
    neither lists are then evicted."""

    def __init__(
        self,
        storage_root: str,
        storage_options: dict[str, Any],
        cache_dir: str,
        batch_max_size: int,
        shard: tuple[int, int] = (0, 1),
        refine_k: int | None = None,
    ):
        self.search.set_max_batch_size(batch_max_size)
        self.refine_k = refine_k  # None: each version's own index.refine_k
        self.shard = tuple(shard)
        self._versions_init(storage_root, storage_options, cache_dir)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        with self._lock:
            if self._swap(user_config, self._load, "index version"):
                current = self.current
                log.info("serving index %s (%d vectors, shard %s)", current.version, current.vectors, self.shard)
                evict(self.cache_dir, [v.manifest for v in (self.current, self.previous) if v is not None])

    def _load(self, wanted: str | None) -> PublishedIndex:
        candidate = load_published(self.storage, wanted, self.cache_dir, self.shard)
        probe = np.zeros((1, candidate.d), dtype=np.float32)
        _, rows = candidate.search(probe, 1, self._refine_k(candidate))  # refine needs the vectors
        if candidate.vectors and rows[0, 0] < 0:
            raise PipelineError(f"index {candidate.version}: the probe query found nothing")
        return candidate

    def _refine_k(self, index: PublishedIndex) -> int:
        return index.manifest.refine_k if self.refine_k is None else self.refine_k

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0)  # merges queued calls only, as the encoder does
    async def search(self, requests: list[tuple]) -> list[dict[str, Any]]:
        """Concurrent requests' questions in one FAISS search and one docstore take per version asked for; each
        request gets its rows, best first (ties: the smaller FAISS id, the `key` the ingress merges shards by).
        A request is (vectors, k) or (vectors, k, version): None is the current version."""
        loaded = self._loaded()
        answered: list[dict[str, Any] | None] = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(request[2] if len(request) > 2 else None, []).append(position)
        for name, positions in groups.items():
            index = self._version(name)  # one version for the whole group, whatever reconfigure does meanwhile
            asked = [requests[p][:2] for p in positions]
            for position, results in zip(positions, _search(index, asked, self._refine_k(index))):
                answered[position] = {"index_version": index.version, "loaded": loaded, "results": results}
        return answered

    def info(self) -> dict[str, Any]:
        current = self.current
        manifest = current.manifest.model_dump(exclude={"files"})
        return {
            "index_version": current.version,
            "loaded": self._loaded(),
            "vectors": current.vectors,
            "shard": list(self.shard),
            "node": ray.get_runtime_context().get_node_id(),  # where this shard's answering replica runs
            "segments": len(current.docstores),
            "lineage": manifest,
            "last_error": self.last_error,
        }


@serve.deployment
class Lexical(_Versioned):
    """The version's BM25 index (`pipeline.lexical`, tantivy) for sparse and hybrid searches, verified before it
    is opened; versions move as the Retriever's do (`user_config`, the one before kept loaded, a version that fails
    to load leaves the current one serving), so a hybrid answer comes from one version."""

    def __init__(self, storage_root: str, storage_options: dict[str, Any], cache_dir: str, batch_max_size: int):
        self.search.set_max_batch_size(batch_max_size)
        self._versions_init(storage_root, storage_options, cache_dir)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        with self._lock:
            if self._swap(user_config, self._load, "BM25 index of"):
                log.info("serving the BM25 index of %s", self.current.version)

    def _load(self, wanted: str | None) -> LexicalIndex:
        version = published_version(self.storage, wanted)
        candidate = load_lexical(self.storage, read_index_manifest(self.storage, version), self.cache_dir)
        if candidate is None:
            raise PipelineError(f"index {version} has no BM25 index (built with index.lexical: false)")
        return candidate

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0)
    async def search(self, requests: list[tuple]) -> list[dict[str, Any]]:
        """A request is (questions, k) or (questions, k, version); each gets its hits per question, best first."""
        loaded = self._loaded()
        answered = []
        for request in requests:
            index = self._version(request[2] if len(request) > 2 else None)
            answered.append(
                {"index_version": index.version, "loaded": loaded, "results": index.search(request[0], request[1])}
            )
        return answered


def _search(
    index: PublishedIndex, requests: list[tuple[np.ndarray, int]], refine_k: int
) -> list[list[list[dict[str, Any]]]]:
    """Per request, per question: the hits (id, title, text, score, key = FAISS id), best first; with refine_k,
    the scores are exact inner products of the re-scored candidates."""
    queries = np.concatenate([np.asarray(vectors, dtype=np.float32).reshape(-1, index.d) for vectors, _ in requests])
    scores, rows = index.search(queries, max(k for _, k in requests), refine_k)
    table = index.passages([int(r) for r in rows.ravel() if r >= 0])
    ids, titles, texts = (table.column(c).to_pylist() for c in ("id", "title", "text"))
    answered, question, position = [], 0, 0
    for vectors, k in requests:
        results = []
        for _ in range(len(vectors)):
            hits = []
            for rank, row in enumerate(rows[question]):
                if row < 0:
                    continue
                if rank < k:
                    hits.append(
                        {
                            "id": ids[position],
                            "title": titles[position],
                            "text": texts[position],
                            "score": float(scores[question, rank]),
                            "key": int(row),
                        }
                    )
                position += 1
            hits.sort(key=lambda hit: (-hit["score"], hit["key"]))
            results.append(hits)
            question += 1
        answered.append(results)
    return answered


@serve.deployment
class Reader:
    """`pipeline.reader.SpanReader` as a deployment, concurrent questions batched into one forward pass."""

    def __init__(self, model: str, max_length: int, max_answer_tokens: int):
        from pipeline.reader import SpanReader

        self.reader = SpanReader(model, max_length, max_answer_tokens)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def read(self, requests: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return self.reader.read(requests)
