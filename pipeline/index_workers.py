"""The build stage's work that runs on the cluster: with `index.segment_vectors` set, one Ray task per group of
embedding shards reads them, adds their vectors to the shared trained quantizer as one segment, uploads that segment
itself and returns only its manifest entries and the held-out queries' top-k over its rows. Training is a task too
(on a GPU with `index.train_gpus`), fed by the sampling tasks. The driver keeps what does not grow with the corpus:
the plan, the trained index, the queries and their merged top-k.

Groups are consecutive shards and the sample is drawn at the same positions as a one-process build, so a
distributed build trains on the same vectors, gives the same codes and measures the same recall: IVF search probes
the same lists of every segment (one coarse quantizer), so the merged per-segment top-k is the whole index's top-k.

No torch here: a worker imports faiss, numpy and pyarrow only.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import resource
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
from faiss.contrib.exhaustive_search import knn_ground_truth

from pipeline.errors import InputError
from pipeline.manifests import FileEntry, SegmentEntry
from pipeline.segments import (
    VECTORS_FILE,
    SegmentWriter,
    best_by_score,
    exact_scores,
    faiss_ids,
    ivf_of,
    open_vectors,
    upload_once,
)
from pipeline.snapshots import Link, LiveEmbeddings
from pipeline.storage import Storage


def plan_groups(shard_rows: Sequence[int], segment_vectors: int) -> list[list[int]]:
    """Consecutive shards with at most `segment_vectors` stored rows per group (a larger shard alone): one segment
    and one add task each, so a task's memory is bounded by the setting, not by the corpus. Pure."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for shard, count in enumerate(shard_rows):
        if current and rows + count > segment_vectors:
            groups.append(current)
            current, rows = [], 0
        current.append(shard)
        rows += count
    if current:
        groups.append(current)
    return groups


def refine_merged(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], depth: int, k: int) -> np.ndarray:
    """The ids a refined search over all the segments returns: the IVF-PQ top `depth` of the union of the
    segments' candidate lists, re-ordered by their exact scores, first k (pure). Each segment's top `depth` holds
    its share of the union's, so this equals refining one search over the whole index."""
    _, merged = merge_topk([(ann, ids) for ann, ids, _ in parts], depth)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    exact = np.concatenate([p[2] for p in parts], axis=1)
    scores = np.full(merged.shape, -np.inf, dtype=np.float32)
    for query in range(len(merged)):
        order = np.argsort(ids[query])
        found = merged[query] >= 0
        at = order[np.searchsorted(ids[query], merged[query][found], sorter=order)]
        scores[query, found] = exact[query, at]
    return best_by_score(scores, merged, k)[1]


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query top-k (largest inner product first, ties to the smaller id, empty slots last as -1) of partial
    top-k lists over disjoint rows. Pure."""
    scores = np.concatenate([np.asarray(p[0], np.float32) for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p[1], np.int64) for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    merged_ids = np.take_along_axis(ids, order, axis=1)
    merged_scores = np.take_along_axis(scores, order, axis=1)
    return merged_scores, np.where(np.isfinite(merged_scores), merged_ids, -1)


@contextlib.contextmanager
def training_on_gpus(index: faiss.Index):
    """k-means of the coarse quantizer on the GPUs when faiss has any (the index itself stays on CPU)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or faiss.get_num_gpus() == 0:
        yield
        return
    clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    ivf.clustering_index = clustering
    try:
        yield
    finally:
        ivf.clustering_index = None


def split_and_train(
    parts: Sequence[np.ndarray], trained: faiss.Index | None, factory: str, train_size: int, seed: int
) -> tuple[faiss.Index, np.ndarray]:
    """Split the sample (drawn in shard order) into training vectors and held-out queries, and train a new index
    unless given a trained one: (the trained, empty index, the queries)."""
    sample = np.concatenate(parts)
    order = np.random.default_rng(seed + 1).permutation(len(sample))
    train, queries = sample[order[:train_size]], sample[order[train_size:]]
    if trained is not None:
        return trained, queries
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(ivf_of(index))  # a factory that cannot be segmented is refused before the k-means
    # index_factory turns on polysemous training for PQ codes (about 1 s per sub-quantizer: 52 s of a 600-vector
    # IVF4,PQ32x8 build); it only permutes the codes for Hamming-filtered search, which is never used here.
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    with training_on_gpus(index):
        index.train(train)
    return index, queries


@dataclass
class TrainedIndex:
    """What the training task sends back: the trained, empty index (faiss.serialize_index bytes) and the held-out
    queries, a size set by the settings (centroids, codebooks, `index.queries`), not by the corpus."""

    index: np.ndarray
    queries: np.ndarray
    node: str
    gpus: int  # the GPUs its k-means ran on
    seconds: float


def train_sample(
    factory: str, train_size: int, seed: int, trained: np.ndarray | None, *parts: np.ndarray | None
) -> TrainedIndex:
    """The distributed build's training, as a task with `index.train_cpus` / `train_gpus`: the sample parts come
    from the sampling tasks through the object store, so the driver never holds the training sample."""
    started = time.perf_counter()
    index, queries = split_and_train(
        [p for p in parts if p is not None],
        faiss.deserialize_index(trained) if trained is not None else None,
        factory,
        train_size,
        seed,
    )
    return TrainedIndex(
        index=faiss.serialize_index(index),
        queries=queries,
        node=node_id(),
        gpus=faiss.get_num_gpus() if trained is None else 0,
        seconds=round(time.perf_counter() - started, 3),
    )


def node_id() -> str:
    """The Ray node this runs on (the host name outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else os.uname().nodename


@contextlib.contextmanager
def assigning_on_gpus(index: faiss.Index):
    """Coarse assignment during add on the GPUs (65536 centroids x 21M vectors is hours on CPU); the trained CPU
    quantizer is put back before the index is saved."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or faiss.get_num_gpus() == 0:
        yield
        return
    cpu_quantizer = ivf.quantizer
    gpu_quantizer = faiss.index_cpu_to_all_gpus(cpu_quantizer)  # referenced here until restored
    ivf.quantizer = gpu_quantizer
    try:
        yield
    finally:
        ivf.quantizer = cpu_quantizer


def read_and_match(live: LiveEmbeddings, shard: int) -> tuple[np.ndarray, pa.Table]:
    """A shard's live vectors and their passages (id, title, text), after checking both list the same ids."""
    ids, vectors, keep = live.read(shard)
    passages = live.passages(shard)
    if passages.column("id").to_pylist() != ids:
        link, entry = live.shards[shard]
        raise InputError(
            live.storage.url(live.links[link].embeddings_dir, entry.name),
            None,
            "embedding ids do not match the passage shard of the same name",
        )
    return vectors[keep], passages.filter(pa.array(keep))


def exact_ids(scores: np.ndarray, rows: np.ndarray, seq: int, count: int) -> np.ndarray:
    """knn_ground_truth's row positions as the segment's FAISS ids; -1 where a query got no row."""
    found = np.isfinite(scores) & (rows >= 0)
    if not count:
        return np.full(rows.shape, -1, np.int64)
    return np.where(found, faiss_ids(seq, 0, count)[np.where(found, rows, 0)], -1)


def reset_peak_rss() -> None:
    """Start `peak_rss` afresh (Linux: writing 5 to clear_refs resets VmHWM), so it measures the work that follows
    and not the imports before it."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_rss() -> int:
    """This process's peak resident memory in bytes since `reset_peak_rss` (since it started elsewhere)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class AddSettings:
    nprobe: int
    k: int  # the held-out queries' top-k measured (recall@k)
    refine_k: int  # candidates re-scored exactly (0: off)
    keep_vectors: bool


@dataclass
class AddedSegment:
    """What an add task sends back: small, whatever the segment's size."""

    segment: SegmentEntry
    files: list[FileEntry]
    written: int  # bytes uploaded (0 for objects already there whole)
    exact: tuple[np.ndarray, np.ndarray]  # the queries' exact top-k over the segment's rows: scores, FAISS ids
    ann: tuple[np.ndarray, np.ndarray]  # and the segment's IVF-PQ top-k at nprobe
    # With refine: the segment's IVF-PQ top max(k, refine_k) (scores, ids) and each candidate's exact score
    candidates: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    node: str
    peak_rss: int
    seconds: float


def sample_group(root: str, options: dict, links: list[Link], shards: list[int], picks: list[np.ndarray]):
    """The live vectors at `picks` (offsets within each shard), in shard order; None when none is live."""
    live = LiveEmbeddings(Storage(root, options), links)
    parts = []
    for shard, offsets in zip(shards, picks):
        if len(offsets):
            _, vectors, keep = live.read(shard)
            parts.append(vectors[offsets][keep[offsets]])
    return np.concatenate(parts) if parts else None


def add_group(
    root: str,
    options: dict,
    links: list[Link],
    shards: list[int],
    seq: int,
    quantizer: np.ndarray,
    queries: np.ndarray,
    settings: AddSettings,
) -> AddedSegment:
    """Add the live vectors of `shards` to the serialized trained quantizer as segment `seq` (docstore written on
    the same pass), upload it (content-addressed: a retried task finds its objects there), and search it."""
    started = time.perf_counter()
    reset_peak_rss()  # a reused worker: this task's own peak
    storage = Storage(root, options)
    live = LiveEmbeddings(storage, links)
    with tempfile.TemporaryDirectory(prefix="add-") as work_dir:
        writer = SegmentWriter(faiss.deserialize_index(quantizer), seq, work_dir, settings.keep_vectors)

        def added() -> Iterator[np.ndarray]:
            for shard in shards:
                vectors, passages = read_and_match(live, shard)
                if len(vectors):
                    writer.add(vectors, passages)
                    yield vectors

        k = settings.k
        with assigning_on_gpus(writer.index):
            scores, rows = knn_ground_truth(queries, added(), k, faiss.METRIC_INNER_PRODUCT)
        exact = (scores, exact_ids(scores, rows, seq, writer.rows))
        faiss.ParameterSpace().set_index_parameter(writer.index, "nprobe", settings.nprobe)
        ann = writer.index.search(queries, k)
        local = writer.close()
        candidates = None
        if settings.refine_k:
            ann_scores, ids = writer.index.search(queries, max(k, settings.refine_k))
            stored = {seq: open_vectors(local.paths[VECTORS_FILE], local.rows, writer.index.d, f"segment {seq}")}
            candidates = (ann_scores, ids, exact_scores(queries, ids, stored))
        files, written = [], 0
        if local.rows:
            name = local.name
            for file, path in sorted(local.paths.items()):
                entry, size = upload_once(storage, path, posixpath.join(name, file))
                files.append(entry)
                written += size
        else:
            name = ""
    return AddedSegment(
        segment=SegmentEntry(name=name, seq=seq, rows=local.rows),
        files=files,
        written=written,
        exact=exact,
        ann=ann,
        candidates=candidates,
        node=node_id(),
        peak_rss=peak_rss(),
        seconds=round(time.perf_counter() - started, 3),
    )
