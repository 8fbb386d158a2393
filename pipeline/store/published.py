"""A published index version loaded for search: its files leased in the node cache (`pipeline.store.cache`), checked
against their sha256, then the shared quantizer with every segment's inverted lists stacked on it, the tombstone
filter and the docstores, all memory-mapped (`pipeline.store.segments` has the format). No torch here: serving imports
it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.store.blocks import BlockFile, open_table
from pipeline.store.cache import Lease, NodeCache
from pipeline.store.docstore import DOCSTORE_FILES, TOKENS_FILES, Docstore, faiss_ids, split_ids
from pipeline.store.layout import published_version, read_index_manifest
from pipeline.store.manifests import IndexManifest
from pipeline.store.segments import (
    IVF_FILE,
    KEYS_FILE,
    REFINE_FILES,
    SEGMENT_FILES,
    SegmentRef,
    Sq8,
    Sq8Vectors,
    assign_segments,
    files_of,
    free_invlists,
    ivf_of,
    open_refine,
    read_invlists,
    rescore,
    search_parameters,
    segments_of,
)
from pipeline.store.snapshots import read_npy_file
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class PublishedIndex:
    """A published version, verified and loaded: the shared quantizer with every segment's inverted lists stacked
    on it (memory-mapped), the tombstone filter, and the segments' docstores (memory-mapped Arrow)."""

    version: str
    manifest: IndexManifest
    index: faiss.Index
    store: Docstore  # the segments' passages (and token ids), row i of segment seq = FAISS id (seq << 40 | i)
    dead: np.ndarray  # sorted FAISS ids of tombstoned rows
    fetched: int = 0  # bytes downloaded to load it (what the cache lacked)
    # seq → the kept vectors, fp16 [rows, d] or sq8 codes decoded as read, memory-mapped (refine)
    stored: dict[int, np.ndarray | Sq8Vectors] = field(default_factory=dict)
    _params: faiss.SearchParameters = None
    _keep: list = field(default_factory=list)  # the C++ objects the index and the parameters point into
    lease: Lease | None = None  # the node cache keeps its files while it is held

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def docstores(self) -> dict[int, pa.Table | BlockFile]:
        return self.store.texts

    @property
    def vectors(self) -> int:
        """Live vectors (stored minus tombstoned)."""
        return int(self.index.ntotal) - len(self.dead)

    def search(self, queries: np.ndarray, k: int, refine_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(scores, FAISS ids) best first; -1 where fewer than k live vectors were found. With `refine_k`, the
        IVF-PQ search returns that many candidates (at least k), re-scored exactly (`rescore`)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not refine_k:
            return self.index.search(queries, k, params=self._params)
        if len(self.stored) != len(self.docstores):
            raise PipelineError(
                f"index {self.version} keeps no vectors to re-score with (built with index.keep_vectors: false): "
                "set refine_k to 0"
            )
        _, candidates = self.index.search(queries, max(k, refine_k), params=self._params)
        return rescore(queries, candidates, k, self.stored)

    def passages(self, ids: Sequence[int]) -> pa.Table:
        """id, title, text of each FAISS id, in the order given (zero-copy takes from the segments' docstores)."""
        return self.store.passages(ids)

    def live_ids(self) -> tuple[np.ndarray, list[str]]:
        """Every live FAISS id and its passage id, segment by segment (for checks and tests)."""
        ids, names = [], []
        for seq, table in self.docstores.items():
            segment_ids = faiss_ids(seq, 0, table.num_rows)
            live = ~np.isin(segment_ids, self.dead)
            ids.append(segment_ids[live])
            names += [name for name, keep in zip(table.column("id").to_pylist(), live) if keep]
        return np.concatenate(ids) if ids else np.empty(0, np.int64), names


def load_published(
    storage: Storage,
    version: str | None,
    cache: NodeCache | str,
    shard: tuple[int, int] = (0, 1),
    nprobe: int | None = None,
) -> PublishedIndex:
    """Lease the version in the node cache (`pipeline.store.cache`), fetch what it lists that the cache lacks, check
    every file's sha256 against the manifest, then open it; the lease is the index's until `release`. FAISS and Arrow
    never parse an unverified file (FAISS's reader is not safe on untrusted input). With `shard` = (i, n), only the
    segments `assign_segments` gives shard i (and the quantizer and tombstones). `nprobe` searches more or fewer
    lists than the manifest's (None: the manifest's, the one its recall was measured at)."""
    cache = cache if isinstance(cache, NodeCache) else NodeCache(cache)
    version = published_version(storage, version)
    manifest = read_index_manifest(storage, version)
    lease = cache.lease(manifest.version, manifest.files)
    try:
        return _open_published(storage, manifest, cache, shard, nprobe, lease)
    except BaseException:
        cache.release(lease)
        raise


def _open_published(
    storage: Storage,
    manifest: IndexManifest,
    cache: NodeCache,
    shard: tuple[int, int],
    nprobe: int | None,
    lease: Lease,
) -> PublishedIndex:
    version = manifest.version
    number, shards = shard
    listed = segments_of(manifest)
    owner = assign_segments(listed, shards)
    segments = [s for s in listed if owner[s.seq] == number]
    if shards == 1:  # everything but the BM25 index (pipeline.store.lexical loads that)
        lexical = set((manifest.lexical or {}).values())
        needed = [entry for entry in manifest.files if entry.name not in lexical]
    else:
        files = files_of(manifest)
        shared = [manifest.quantizer, *([manifest.sq8] if manifest.sq8 else [])]
        names = [*shared, *(s.file(n) for s in segments for n in SEGMENT_FILES if s.file(n) in files)]
        needed = [files[name] for name in names + ([manifest.tombstones] if manifest.tombstones else [])]
    try:
        paths, fetched = cache.fetch(storage, needed, version)
    except PipelineError as exc:
        raise PipelineError(f"{exc}: refusing to load index {version}") from None
    index = faiss.read_index(paths[manifest.quantizer])
    invlists = [read_invlists(paths[s.file(IVF_FILE)]) for s in segments]
    try:
        published = _stacked(manifest, index, invlists, segments, paths, nprobe, fetched, lease)
    except BaseException:
        free_invlists(invlists)
        raise
    weakref.finalize(published, free_invlists, invlists)  # unmapped once the version is dropped and unreferenced
    log.info(
        "index %s shard %d/%d: %d segments, %d live vectors, %d bytes fetched",
        version,
        number,
        shards,
        len(segments),
        published.index.ntotal - len(published.dead),
        fetched,
    )
    return published


def _stacked(
    manifest: IndexManifest,
    index: faiss.Index,
    invlists: list,
    segments: Sequence[SegmentRef],
    paths: dict[str, str],
    nprobe: int | None,
    fetched: int,
    lease: Lease,
) -> PublishedIndex:
    """The version searchable: the segments' lists stacked on the quantizer, vectors, tombstones and docstores."""
    version, ivf = manifest.version, ivf_of(index)
    stacked = faiss.InvertedListsPtrVector()
    for lists in invlists:
        stacked.push_back(lists)
    hstack = faiss.HStackInvertedLists(len(invlists), stacked.data()) if invlists else None
    if hstack is not None:
        ivf.replace_invlists(hstack, False)
    total = sum(s.rows for s in segments)
    ivf.ntotal = index.ntotal = total
    sq8 = Sq8.read(paths[manifest.sq8], index.d, manifest.sq8) if manifest.sq8 else None
    vectors = {}
    for segment in segments:
        named = {name: paths[segment.file(name)] for name in REFINE_FILES if segment.file(name) in paths}
        kept = open_refine(named, segment.rows, index.d, f"index {version}: {segment.name}", sq8)
        if kept is not None:
            vectors[segment.seq] = kept
    dead = dead_rows(manifest, paths, segments)
    store = open_docstore(manifest, paths, segments, dead)
    params, keep = search_parameters(index, nprobe or int(manifest.nprobe), dead)
    return PublishedIndex(
        version,
        manifest,
        index,
        store,
        dead,
        fetched,
        vectors,
        params,
        [invlists, stacked, hstack, *keep],
        lease,
    )


def dead_rows(manifest: IndexManifest, paths: dict[str, str], segments: Sequence[SegmentRef]) -> np.ndarray:
    """The sorted FAISS ids of `segments`' tombstoned rows."""
    tombstones = manifest.tombstones
    dead = read_npy_file(paths[tombstones], np.int64, tombstones) if tombstones else np.empty(0, np.int64)
    return np.sort(dead[np.isin(split_ids(dead)[0], [s.seq for s in segments])])


def open_docstore(
    manifest: IndexManifest,
    paths: dict[str, str],
    segments: Sequence[SegmentRef],
    dead: np.ndarray,
    with_keys: bool = False,
) -> Docstore:
    """The verified docstores (and token ids, and with `with_keys` the rows' passage keys) of `segments`, memory-
    mapped (block files, or the Arrow files of versions before them); a file whose row count is not its segment's is
    refused."""
    store = Docstore({}, dead=dead, tokenizer=(manifest.tokenizer or {}).get("fingerprint"))
    for segment in segments:
        for what, names in {"docstore": DOCSTORE_FILES, "token-id": TOKENS_FILES}.items():
            found = [paths[segment.file(name)] for name in names if segment.file(name) in paths]
            if not found:
                continue
            table = open_table(found[0])
            if table.num_rows != segment.rows:
                raise PipelineError(
                    f"index {manifest.version}: {segment.name} has {table.num_rows} {what} rows for {segment.rows}"
                    " vectors"
                )
            (store.texts if what == "docstore" else store.tokens)[segment.seq] = table
        if with_keys:
            store.keys[segment.seq] = read_npy_file(paths[segment.file(KEYS_FILE)], np.uint64, segment.name)
    return store


def load_docstore(storage: Storage, manifest: IndexManifest, cache: NodeCache) -> Docstore:
    """A version's passages for the BM25 deployment: every segment's docstore, token ids and keys, and the
    tombstones, each checked against its sha256 (the same cached files a Retriever on the node reads); the caller
    holds the version's lease."""
    files, segments = files_of(manifest), segments_of(manifest)
    kinds = (*DOCSTORE_FILES, *TOKENS_FILES, KEYS_FILE)
    names = [s.file(n) for s in segments for n in kinds if s.file(n) in files]
    needed = [files[name] for name in names + ([manifest.tombstones] if manifest.tombstones else [])]
    try:
        paths, _ = cache.fetch(storage, needed, manifest.version)
    except PipelineError as exc:
        raise PipelineError(f"{exc}: refusing to load the passages of index {manifest.version}") from None
    return open_docstore(manifest, paths, segments, dead_rows(manifest, paths, segments), with_keys=True)
