"""Snapshot chains: a passage snapshot is either full or a delta on a base snapshot.

A delta snapshot's shards hold only the rows that are new or changed since its base; its tombstones
(`_tombstones.npy`, the 64-bit keys of the ids removed from the base: deleted and changed passages) are listed in
its manifest with their sha256 like every shard. The embeddings of a snapshot mirror it: a delta's embedding shards
hold the vectors of its own rows only, and unchanged passages' vectors stay where they were written, referenced
through the base, never copied (Lucene's and Milvus's segments and tombstones, applied to snapshots).

Reading a snapshot resolves its chain, oldest first: a row stored by link i is live unless a later link tombstones
its key. Keys are `keys.id_hash(id)`; ingest refuses a corpus in which two ids share one, so a key names exactly
one passage.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError, PipelineError
from pipeline.store.keys import content_keys, keys_of
from pipeline.store.layout import embeddings_dir, snapshot_dir
from pipeline.store.manifests import EmbeddingManifest, PassageManifest
from pipeline.store.shards import embedding_matrix, read_passage_shard, read_shard
from pipeline.store.storage import Storage

TOMBSTONES_NAME = "_tombstones.npy"
MAX_CHAIN = 1000  # a guard against a cycle of bases, far above any configured nightly.max_chain


def read_shard_keys(storage: Storage, directory: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(id keys, content keys) of a shard's rows, from its `id` and `content_hash` columns only (the texts and
    vectors stay on the store)."""
    import pyarrow.parquet as pq

    from pipeline.store.storage import pyarrow_filesystem

    fs, root = pyarrow_filesystem(storage.root_url, storage.options)
    try:
        table = pq.read_table(
            posixpath.join(root, directory, name), columns=["id", "content_hash"], filesystem=fs, use_threads=False
        )
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise InputError(storage.url(directory, name), None, f"cannot read its keys ({exc})") from None
    return keys_of(table.column("id").to_pylist()), content_keys(table.column("content_hash").to_pylist())


def npy_bytes(array: np.ndarray) -> bytes:
    """A plain .npy (no pickle: numeric dtypes only)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_npy(data: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise InputError(where, None, f"not a numeric .npy array ({exc})") from None
    if array.dtype != dtype or array.ndim != 1:
        raise InputError(where, None, f"expected a 1-d {np.dtype(dtype)} array, found {array.ndim}-d {array.dtype}")
    return array


def read_npy_file(path: str, dtype: np.dtype, where: str) -> np.ndarray:
    """A local .npy already checked against its manifest's sha256."""
    with open(path, "rb") as handle:
        return read_npy(handle.read(), np.dtype(dtype), where)


@dataclass(frozen=True)
class Link:
    """One snapshot of a chain: its passage shards, its embeddings (when asked for) and what it removes."""

    snapshot: str
    passages: PassageManifest
    tombstones: np.ndarray  # sorted uint64 keys removed from the links before this one
    embeddings_dir: str | None = None
    embeddings: EmbeddingManifest | None = None

    @property
    def passages_dir(self) -> str:
        return snapshot_dir(self.snapshot)

    @property
    def base(self) -> str | None:
        return self.passages.base


def read_tombstones(storage: Storage, directory: str, manifest: PassageManifest) -> np.ndarray:
    entry = manifest.tombstones
    if entry is None:
        return np.empty(0, np.uint64)
    data = storage.read_verified(directory, entry)
    return read_npy(data, np.dtype(np.uint64), storage.url(directory, entry.name))


def passage_chain(storage: Storage, snapshot: str) -> list[Link]:
    """The snapshot and its bases, oldest (a full snapshot) first; a missing base is an error naming it."""
    links, name, wanted_by = [], snapshot, None
    while name is not None:
        manifest = storage.read_manifest(snapshot_dir(name), PassageManifest)
        if manifest is None:
            if wanted_by is None:
                raise PipelineError(
                    f"{storage.url(snapshot_dir(name))} has no manifest: ingest snapshot {name!r} first"
                )
            raise PipelineError(
                f"snapshot {wanted_by!r} is a delta on {name!r}, whose manifest "
                f"{storage.url(snapshot_dir(name), '_manifest.json')} is missing"
            )
        links.append(Link(name, manifest, read_tombstones(storage, snapshot_dir(name), manifest)))
        if len(links) > MAX_CHAIN:
            raise PipelineError(f"snapshot {snapshot!r}: its chain of bases is longer than {MAX_CHAIN} (a cycle?)")
        wanted_by, name = name, manifest.base
    return links[::-1]


def embedding_chain(storage: Storage, snapshot: str, fingerprint: str) -> list[Link]:
    """The passage chain with each link's embeddings by `fingerprint`, which must all be published."""
    links = []
    for link in passage_chain(storage, snapshot):
        directory = embeddings_dir(link.snapshot, fingerprint)
        manifest = storage.read_manifest(directory, EmbeddingManifest)
        if manifest is None:
            raise PipelineError(
                f"{storage.url(directory)} has no manifest: the embeddings of snapshot "
                f"{link.snapshot!r} (in the chain of {snapshot!r}) are missing: run jobs.encode"
            )
        links.append(Link(link.snapshot, link.passages, link.tombstones, directory, manifest))
    return links


def removed_later(links: list[Link]) -> list[np.ndarray]:
    """Per link, the keys that later links tombstone (its rows with those keys are dead)."""
    out, after = [], np.empty(0, np.uint64)
    for link in reversed(links):
        out.append(after)
        after = np.union1d(after, link.tombstones)
    return out[::-1]


def live_rows(links: list[Link]) -> int:
    """Passages in the chain's last snapshot (recorded by ingest)."""
    return links[-1].passages.live_rows


class LiveEmbeddings:
    """Every live vector of an embedding chain, shard by shard, with its passage id (verified reads)."""

    def __init__(self, storage: Storage, links: list[Link]):
        self.storage, self.links = storage, links
        self.removed = removed_later(links)
        self.shards = [(i, entry) for i, link in enumerate(links) for entry in link.embeddings.files]

    @property
    def stored_rows(self) -> list[int]:
        """Rows stored per shard, dead ones included (what sampling draws positions from)."""
        return [entry.rows or 0 for _, entry in self.shards]

    def read(self, shard: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, vectors as float32, live mask) of one shard."""
        link, entry = self.shards[shard]
        table = read_shard(self.storage, self.links[link].embeddings_dir, entry)
        ids = table.column("id").to_pylist()
        vectors = np.ascontiguousarray(embedding_matrix(table), dtype=np.float32)
        removed = self.removed[link]
        live = ~np.isin(keys_of(ids), removed) if len(removed) else np.ones(len(ids), bool)
        return ids, vectors, live

    def passages(self, shard: int) -> pa.Table:
        """The passage shard the embedding shard was computed from (same name, same rows)."""
        link, entry = self.shards[shard]
        passages = {e.name: e for e in self.links[link].passages.files}
        return read_passage_shard(self.storage, self.links[link].passages_dir, passages[entry.name])

    def live_passages(self, shard: int) -> pa.Table:
        """The shard's passages (id, title, text, ...) that no later link removes."""
        table = self.passages(shard)
        removed = self.removed[self.shards[shard][0]]
        if not len(removed):
            return table
        return table.filter(pa.array(~np.isin(keys_of(table.column("id").to_pylist()), removed)))

    def __iter__(self) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """(shard, live ids, live vectors)."""
        for shard in range(len(self.shards)):
            ids, vectors, live = self.read(shard)
            yield shard, [pid for pid, keep in zip(ids, live) if keep], vectors[live]
