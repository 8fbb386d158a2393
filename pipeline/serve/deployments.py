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
from ray import serve

from pipeline.errors import PipelineError
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


@serve.deployment
class Retriever:
    """The published index on CPU replicas. The version comes from `user_config`; a new one is loaded beside the
    current one (fetching only the segments the cache lacks), verified and probed, then swapped in with one
    assignment: every request sees exactly one version, and a version that fails to load leaves the current one
    serving. Cached files that the serving version no longer lists are then evicted."""

    def __init__(self, storage_root: str, storage_options: dict[str, Any], cache_dir: str, batch_max_size: int):
        self.search.set_max_batch_size(batch_max_size)
        self.storage = Storage(storage_root, storage_options)
        self.cache_dir = cache_dir or tempfile.mkdtemp(prefix="index-cache-")
        self.current: PublishedIndex | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        with self._lock:
            wanted = user_config.get("index_version")
            try:
                candidate = load_published(self.storage, wanted, self.cache_dir)
                probe = np.zeros((1, candidate.d), dtype=np.float32)
                _, rows = candidate.search(probe, 1)
                if candidate.vectors and rows[0, 0] < 0:
                    raise PipelineError(f"index {candidate.version}: the probe query found nothing")
            except Exception as exc:  # noqa: BLE001 - any failure keeps the current version serving
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.current is None:
                    raise
                log.error("index version %s refused, still serving %s: %s", wanted, self.current.version, exc)
                return
            self.current, self.last_error = candidate, None
            log.info("serving index %s (%d vectors)", candidate.version, candidate.vectors)
            evict(self.cache_dir, [candidate.manifest])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0)  # merges queued calls only, as the encoder does
    async def search(self, requests: list[tuple[np.ndarray, int]]) -> list[dict[str, Any]]:
        """Concurrent requests' questions in one FAISS search and one docstore take; each request gets its rows."""
        current = self.current  # one version for the whole batch, whatever reconfigure does meanwhile
        queries = np.concatenate(
            [np.asarray(vectors, dtype=np.float32).reshape(-1, current.d) for vectors, _ in requests]
        )
        scores, rows = current.search(queries, max(k for _, k in requests))
        table = current.passages([int(r) for r in rows.ravel() if r >= 0])
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
                            }
                        )
                    position += 1
                results.append(hits)
                question += 1
            answered.append({"index_version": current.version, "results": results})
        return answered

    def info(self) -> dict[str, Any]:
        current = self.current
        manifest = current.manifest.model_dump(exclude={"files"})
        return {
            "index_version": current.version,
            "vectors": current.vectors,
            "lineage": manifest,
            "last_error": self.last_error,
        }


@serve.deployment
class Reader:
    """`pipeline.reader.SpanReader` as a deployment, concurrent questions batched into one forward pass."""

    def __init__(self, model: str, max_length: int, max_answer_tokens: int):
        from pipeline.reader import SpanReader

        self.reader = SpanReader(model, max_length, max_answer_tokens)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def read(self, requests: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return self.reader.read(requests)
