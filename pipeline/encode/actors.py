"""The encode stage's Ray actors: CPU tokenizer actors that read a passage shard (verified against its manifest) and
tokenize it, and encoder actors (one pinned to each GPU, or CPU actors that tokenize for themselves) that run the
model and write the embedding shard under the passage shard's own name, so a retried shard overwrites itself."""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from pipeline.config import PipelineConfig
from pipeline.encode.plan import Carry, ShardKeys
from pipeline.errors import PipelineError
from pipeline.models.settings import EncoderSettings
from pipeline.runtime.raycluster import get
from pipeline.store.manifests import FileEntry
from pipeline.store.shards import embedding_matrix, embedding_table, read_passage_shard, read_shard
from pipeline.store.snapshots import read_shard_keys
from pipeline.store.storage import Storage, parquet_bytes

if TYPE_CHECKING:
    from pipeline.models.text_encoder import Tokens

log = logging.getLogger(__name__)


TOKENIZERS_PER_GPU = 6


@ray.remote(num_cpus=0.5)
def read_keys(storage_root: str, options: dict[str, Any], directory: str, name: str) -> ShardKeys:
    """Only the id and content_hash columns (column projection: the texts and vectors stay on the store)."""
    return ShardKeys(*read_shard_keys(Storage(storage_root, options), directory, name))


class TokenizerActor:
    """The reader/mapper half, on CPU: verified passage shard → (ids, tokens). Long-lived, so the tokenizer and
    the imports are loaded once, before the first shard is timed. Also used inline by CPU encoder actors."""

    def __init__(
        self, settings: EncoderSettings, storage_root: str, options: dict[str, Any], max_shard_bytes: int | None = None
    ):
        self.storage = Storage(storage_root, options)
        self.max_shard_bytes = max_shard_bytes
        from pipeline.models.text_encoder import PassageTokenizer  # torch: in the actor, not the job's driver

        self.tokenize = PassageTokenizer(settings)

    def ready(self) -> bool:
        return True

    def tokenize_shard(self, passages: str, entry: FileEntry) -> tuple[list[str], list[str], Tokens]:
        table = read_passage_shard(self.storage, passages, entry, self.max_shard_bytes)
        tokens = self.tokenize(table.column("title").to_pylist(), table.column("text").to_pylist())
        return table.column("id").to_pylist(), table.column("content_hash").to_pylist(), tokens


@dataclass(frozen=True)
class WriterSettings:
    storage_root: str
    storage_options: dict[str, Any]
    embedding_dtype: str
    batch_tokens: int | None
    max_batch_size: int
    cpu_threads: int | None
    max_shard_bytes: int
    compile: bool = False


class EncoderActor:
    """The model half: one per GPU (or CPU actors), encodes tokenized shards and writes embedding shards."""

    def __init__(self, settings: EncoderSettings, writer: WriterSettings):
        import torch

        from pipeline.models.text_encoder import TextEncoder  # torch: in the actor, not the job's driver

        if not torch.cuda.is_available():
            torch.set_num_threads(writer.cpu_threads or len(os.sched_getaffinity(0)))
        self.writer = writer
        self.storage = Storage(writer.storage_root, writer.storage_options)
        self.encoder = TextEncoder(
            settings, batch_tokens=writer.batch_tokens, max_batch_size=writer.max_batch_size, compile=writer.compile
        )
        self._fingerprint = self.encoder.fingerprint()
        # Without a GPU to keep busy, tokenizing here beats shipping tokens from other actors on the same cores.
        self.reader = TokenizerActor(settings, writer.storage_root, writer.storage_options, writer.max_shard_bytes)

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": self._fingerprint,
            "dim": self.encoder.dim,
            "device": str(self.encoder.device),
            "dtype": str(self.encoder.compute_dtype).removeprefix("torch."),
            "pid": os.getpid(),
        }

    def encode_shard(
        self,
        output: str,
        passages: str,
        entry: FileEntry,
        shard: tuple[list[str], list[str], Tokens] | None,
        carry: Carry | None = None,
    ) -> FileEntry:
        if carry is not None:
            ids, hashes, vectors, encoded = self._carry_and_encode(passages, entry, carry)
        else:
            ids, hashes, tokens = shard if shard is not None else self.reader.tokenize_shard(passages, entry)
            vectors, encoded = self.encoder.encode_tokens(tokens), len(ids)
        data = parquet_bytes(embedding_table(ids, hashes, vectors, self.writer.embedding_dtype))
        digest = self.storage.write_bytes(posixpath.join(output, entry.name), data)
        return FileEntry(
            name=entry.name, bytes=len(data), sha256=digest, rows=len(ids), source_sha256=entry.sha256, encoded=encoded
        )

    def _carry_and_encode(
        self, passages: str, entry: FileEntry, carry: Carry
    ) -> tuple[list[str], list[str], np.ndarray, int]:
        """Copy the vectors of passages whose id and content hash are unchanged; encode only the others."""
        table = read_passage_shard(self.storage, passages, entry, self.writer.max_shard_bytes)
        ids, hashes = table.column("id").to_pylist(), table.column("content_hash").to_pylist()
        found: dict[str, tuple[str, np.ndarray, int]] = {}
        for directory, source in carry.sources:
            previous = read_shard(self.storage, directory, source)
            matrix = embedding_matrix(previous)
            for row, (pid, digest) in enumerate(
                zip(previous.column("id").to_pylist(), previous.column("content_hash").to_pylist())
            ):
                found[pid] = (digest, matrix, row)
        vectors = np.empty((len(ids), self.encoder.dim), dtype=np.float32)
        todo = []
        for row, (pid, digest) in enumerate(zip(ids, hashes)):
            hit = found.get(pid)
            if hit is not None and hit[0] == digest:
                vectors[row] = hit[1][hit[2]]
            else:
                todo.append(row)
        if todo:
            titles, texts = table.column("title").take(todo), table.column("text").take(todo)
            vectors[todo] = self.encoder.encode_tokens(self.reader.tokenize(titles.to_pylist(), texts.to_pylist()))
        return ids, hashes, vectors, len(todo)


@dataclass
class ActorPool:
    encoders: list
    tokenizers: list
    encoder_resources: str = "1 CPU each"

    def kill(self) -> None:
        for actor in self.encoders + self.tokenizers:
            ray.kill(actor)


def started(pool: ActorPool, timeout_s: float) -> list[dict[str, Any]]:
    """The encoder actors' descriptions once every actor of `pool` has started; a PipelineError naming what was
    asked for and what the cluster has free if they have not within `timeout_s` (Ray would wait for ever for
    resources no node has)."""
    described = [actor.describe.remote() for actor in pool.encoders]
    ready = [actor.ready.remote() for actor in pool.tokenizers]
    _, waiting = ray.wait(described + ready, num_returns=len(described) + len(ready), timeout=timeout_s)
    if waiting:
        free = {k: round(v, 2) for k, v in sorted(ray.available_resources().items()) if k in ("CPU", "GPU")}
        total = {k: round(v, 2) for k, v in sorted(ray.cluster_resources().items()) if k in ("CPU", "GPU")}
        raise PipelineError(
            f"{len(waiting)} of {len(described) + len(ready)} encode actors did not start within {timeout_s:.0f} s "
            f"(encode.start_timeout_s): asked for {len(pool.encoders)} encoder actor(s) ({pool.encoder_resources}) "
            f"and {len(pool.tokenizers)} tokenizer actor(s) (1 CPU each); the cluster has {total}, {free} free. "
            "Lower encode.actors or encode.tokenizer_actors, or add nodes"
        )
    return get(described)


def start_actors(config: PipelineConfig, settings: EncoderSettings, writer: WriterSettings) -> ActorPool:
    """Encoder actors pinned one per GPU (else CPU actors), and CPU tokenizer actors to keep them fed."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    encoders = config.encode.actors or max(gpus, 1)
    options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    tokenizers = config.encode.tokenizer_actors
    if tokenizers is None:
        tokenizers = max(1, min(TOKENIZERS_PER_GPU * encoders, cpus - encoders)) if gpus else 0
    log.info(
        "starting %d encoder actor(s) on %s and %d tokenizer actor(s)", encoders, "GPU" if gpus else "CPU", tokenizers
    )
    encoder_class = ray.remote(max_restarts=-1, max_task_retries=0, **options)(EncoderActor)
    tokenizer_class = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(TokenizerActor)
    return ActorPool(
        encoder_resources="1 GPU and 1 CPU each" if gpus else "1 CPU each",
        encoders=[encoder_class.remote(settings, writer) for _ in range(encoders)],
        tokenizers=[
            tokenizer_class.remote(settings, config.storage.root, config.storage.options, writer.max_shard_bytes)
            for _ in range(tokenizers)
        ],
    )
