"""Build stage (the merge job): embedding shards → a segmented FAISS IVF-PQ index version, measured, published
atomically (the format is in `pipeline.segments`).

A build is one of three kinds, planned before any work (`plan_build`):
- delta: the published version was built for an earlier snapshot of the same chain with the same settings: one new
  segment for the rows the later delta snapshots add, on the published quantizer, and tombstones for the published
  rows they delete or replace. Work and bytes follow the change, not the corpus. It stands while the version's
  relative quantization error (its rows at their recorded error, the new rows measured) stays within
  `index.max_drift` of the error measured with the last recall; else the build is a full one, which measures
  recall again.
- full: every live row of the chain into one segment, on the published quantizer while its recall holds, else on a
  newly trained one. Phases, each timed: plan (training size, memory estimate: refuse before any work when it
  cannot fit) → sample (uniform over all shards: psgs_w100 is ordered by article) → train (on GPU when faiss sees
  one) → add (shard by shard; the docstore is written in the same pass, and the exact top-k of held-out queries
  is accumulated for the recall gate) → measure.
- current: the published version already indexes the snapshot: nothing to do.
Then: refuse below `index.min_recall` → compact past `index.max_segments` / `index.max_tombstone_fraction` (codes
copied, tombstoned rows dropped) → upload what is new → manifest → LATEST.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import ray
from faiss.contrib.evaluation import knn_intersection_measure
from faiss.contrib.exhaustive_search import knn_ground_truth
from tqdm import tqdm

from pipeline.config import IndexConfig, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.index_workers import (
    AddedSegment,
    AddSettings,
    add_group,
    assigning_on_gpus,
    exact_ids,
    merge_topk,
    peak_rss,
    plan_groups,
    read_and_match,
    refine_merged,
    reset_peak_rss,
    sample_group,
    split_and_train,
    train_sample,
)
from pipeline.layout import (
    INDEX_MANIFEST,
    INDEXES,
    latest_snapshot,
    point_latest,
    published_version,
    read_index_manifest,
    read_latest,
    version_dir,
)
from pipeline.lexical import build_lexical, build_lexical_task
from pipeline.manifests import EmbeddingManifest, FileEntry, IndexManifest, SegmentEntry
from pipeline.raycluster import connect, get
from pipeline.segments import (
    DOCSTORE_FILE,
    DOCSTORE_SCHEMA,
    IVF_FILE,
    KEYS_FILE,
    TOMBSTONES_FILE,
    VECTORS_FILE,
    LocalSegment,
    SegmentRef,
    SegmentWriter,
    VectorWriter,
    copy_live_codes,
    faiss_ids,
    fetch_verified,
    files_of,
    finish_segment,
    ivf_of,
    open_vectors,
    read_invlists,
    rescore,
    segments_of,
    split_ids,
    upload_once,
)
from pipeline.snapshots import Link, LiveEmbeddings, embedding_chain, live_rows, npy_bytes, read_npy_file
from pipeline.storage import Storage

log = logging.getLogger(__name__)

RECALL_K = (10, 100)
GiB = 2**30


# -- planning (pure) ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexPlan:
    vectors: int
    dim: int
    nlist: int | None
    train_size: int
    queries: int
    code_bytes: int  # per vector in the index (codes + 8-byte id for IVF lists)
    memory_bytes: int


def plan_index(factory: str, dim: int, vectors: int, largest_shard: int, config: IndexConfig) -> IndexPlan:
    """Size the build before doing it: training points (>= 39 per centroid, capped) and the peak memory of the
    process that adds (with `segment_vectors`, each add task holds one segment's codes, not the corpus's)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise PipelineError(
            f"index.factory {factory!r} is not a valid FAISS factory for dim {dim}: {str(exc).splitlines()[-1]}"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else None
    wanted = 39 * max(nlist or 1, 256)
    queries = min(config.queries, max(1, vectors // 10))
    train_size = min(config.train_size, wanted, vectors - queries)
    code_bytes = int(ivf.code_size) + 8 if ivf is not None else int(index.sa_code_size())
    memory = (
        min(vectors, config.segment_vectors or vectors) * code_bytes  # the codes (and ids) of the vectors added
        + train_size * dim * 4 * 2  # the training sample, and its transformed copy during training
        + (nlist or 0) * dim * 4  # coarse centroids
        + largest_shard * dim * 4 * 2  # one shard being added (read + float32 copy)
        + queries * (dim * 4 + max(RECALL_K) * 12 * 2)  # held-out queries and their exact/ANN top-k
    )
    return IndexPlan(vectors, dim, nlist, train_size, queries, code_bytes, memory)


def sample_positions(shard_rows: Sequence[int], count: int, seed: int) -> list[np.ndarray]:
    """`count` distinct rows drawn uniformly over all shards: per shard, the sorted offsets within it. Pure."""
    total = int(sum(shard_rows))
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(shard_rows)])
    shard = np.searchsorted(starts, picks, side="right") - 1
    return [picks[shard == i] - starts[i] for i in range(len(shard_rows))]


# -- phases ---------------------------------------------------------------------------------------------------------
class PhaseTimer:
    """autofaiss-style nested timing of the phases, for logs and the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        log.info("%s…", phase)
        start = time.perf_counter()
        yield
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 3)
        log.info("%s: %.1fs", phase, self.seconds[phase])


def recall_at(ann: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over the queries."""
    k = min(k, exact.shape[1])
    return float(knn_intersection_measure(ann[:, :k], exact[:, :k]))


def measure_recall(index: faiss.Index, queries: np.ndarray, exact: np.ndarray, nprobe: int) -> dict[int, float]:
    """recall@k of `index` at `nprobe` against exact top-k ids, for k in RECALL_K."""
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    _, ann = index.search(queries, exact.shape[1])
    return {r: recall_at(ann, exact, r) for r in RECALL_K}


def measure_refined(
    index: faiss.Index, queries: np.ndarray, exact: np.ndarray, config: IndexConfig, stored: dict[int, np.ndarray]
) -> dict[int, float]:
    """recall@k when each search re-scores `index.refine_k` IVF-PQ candidates exactly ({} when refine is off)."""
    if not config.refine_k:
        return {}
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", config.nprobe)
    _, candidates = index.search(queries, max(exact.shape[1], config.refine_k))
    _, refined = rescore(queries, candidates, exact.shape[1], stored)
    return {r: recall_at(refined, exact, r) for r in RECALL_K}


def distortion(index: faiss.Index, vectors: np.ndarray) -> float:
    """Relative squared error of the index's codes, sum ||x - decode(encode(x))||^2 / sum ||x||^2: coarse and PQ
    fit in one number that, unlike recall@k, does not depend on how many vectors it is measured on."""
    if not len(vectors):
        return 0.0
    decoded = index.sa_decode(index.sa_encode(vectors))
    return float(((vectors - decoded) ** 2).sum() / max(float((vectors**2).sum()), 1e-30))


def blended(rows: int, error: float | None, new_rows: int, new_error: float) -> float | None:
    """A version's error after a delta (pure): its rows at the error recorded for them, the new rows at theirs.
    Nights accumulate: a quantizer that fits each night's rows a little worse drifts away night after night."""
    if error is None:
        return None
    return (rows * error + new_rows * new_error) / max(rows + new_rows, 1)


def drifted(reference: float | None, measured: float | None, max_drift: float) -> bool:
    """Whether a version's rows fit the quantizer worse than the rows its recall was measured on, past the
    allowance (pure). Without figures (a version built before they were recorded) a delta cannot be vouched for."""
    return reference is None or measured is None or measured > reference * (1 + max_drift)


def plan_compaction(rows: Sequence[int], dead: Sequence[int], config: IndexConfig) -> list[int]:
    """Which segments to merge into one (positions; empty: none), Lucene-style (pure). Past `max_segments` small
    segments or `max_tombstone_fraction` dead rows: every segment, or with `segment_vectors` set only the small ones
    (under half of it: nightly deltas) and those whose own dead fraction is past the limit, so a merge stays within a
    few segments' size and the big segments of a distributed build are not copied again."""
    if config.compact == "never":
        return []
    bound = config.segment_vectors
    small = [i for i, count in enumerate(rows) if bound is None or count < bound // 2]
    heavy = [i for i, (count, gone) in enumerate(zip(rows, dead)) if gone > config.max_tombstone_fraction * count]
    total = sum(rows)
    if config.compact == "always":
        merge = sorted(set(small) | {i for i, gone in enumerate(dead) if gone})
    elif len(small) > config.max_segments or (total and sum(dead) / total > config.max_tombstone_fraction):
        merge = sorted(set(small) | set(heavy))
    else:
        return []
    return merge if len(merge) > 1 or any(dead[i] for i in merge) else []


def plan_build(chain: Sequence[str], previous_snapshot: str | None, same_settings: bool) -> tuple[str, int]:
    """How to index the last snapshot of `chain` given the published version's snapshot (pure):
    ("current", -) it is already indexed; ("delta", i) add a segment for chain[i:] onto the published version;
    ("full", -) build every live row into one segment."""
    if previous_snapshot is None or not same_settings:
        return "full", 0
    if previous_snapshot == chain[-1]:
        return "current", len(chain)
    if previous_snapshot in chain:
        return "delta", list(chain).index(previous_snapshot) + 1
    return "full", 0


@dataclass
class Built:
    """Everything a version needs before publication."""

    quantizer: str | FileEntry  # a local path (newly trained) or the published entry (reused)
    segments: list[LocalSegment | SegmentRef]
    dead: np.ndarray  # FAISS ids of tombstoned rows
    recall: dict[int, float]
    refined: dict[int, float]  # recall with index.refine_k ({} without refine)
    new_rows: int  # vectors added to a new segment this run
    # Relative quantization error on the rows recall was measured with (the reference), and on this run's rows.
    reference_distortion: float | None
    distortion: float | None
    # A distributed build's segments are uploaded by the tasks that wrote them: their entries, and bytes written.
    uploaded: dict[str, FileEntry] = field(default_factory=dict)
    written: int = 0
    nodes: tuple[str, ...] = ()  # the Ray nodes its add tasks ran on

    @property
    def stored(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def gated_recall(self) -> float:
        """The recall@100 that searches get: refined when the version is searched with refine."""
        return (self.refined or self.recall)[100]


def _train(
    parts: list[np.ndarray],
    trained: faiss.Index | None,
    config: IndexConfig,
    plan: IndexPlan,
    work_dir: str,
    timer: PhaseTimer,
) -> tuple[faiss.Index, str, np.ndarray]:
    """Train in this process (unless given a trained index); returns the trained, empty index, its file in the
    work dir and the held-out queries."""
    with timer("train"):
        index, queries = split_and_train(parts, trained, config.factory, plan.train_size, config.seed)
    return index, _save_quantizer(index, work_dir), queries


def _save_quantizer(index: faiss.Index, work_dir: str) -> str:
    quantizer = os.path.join(work_dir, "quantizer.faiss")
    faiss.write_index(index, quantizer)
    return quantizer


def build_full(
    live: LiveEmbeddings,
    config: IndexConfig,
    plan: IndexPlan,
    work_dir: str,
    timer: PhaseTimer,
    trained: faiss.Index | None = None,
) -> Built:
    """Train (unless given an already trained, empty index), add every live vector into one segment and measure
    recall on held-out corpus vectors against exact search."""
    with timer("sample"):
        positions = sample_positions(live.stored_rows, plan.train_size + plan.queries, config.seed)
        parts = []
        for shard, picks in enumerate(positions):
            if len(picks):
                _, vectors, keep = live.read(shard)
                parts.append(vectors[picks][keep[picks]])
    index, quantizer, queries = _train(parts, trained, config, plan, work_dir, timer)
    writer = SegmentWriter(index, 1, work_dir, config.keep_vectors)
    with (
        assigning_on_gpus(writer.index),
        timer("add"),
        tqdm(total=plan.vectors, desc="add", unit=" vectors", unit_scale=True, mininterval=2) as bar,
    ):

        def added():
            """Each shard's live vectors, added to the segment on the way (one read serves both)."""
            for shard in range(len(live.shards)):
                vectors, passages = read_and_match(live, shard)
                if len(vectors):
                    writer.add(vectors, passages)
                    bar.update(len(vectors))
                    yield vectors

        # The exact top-k of the held-out queries, accumulated over the same pass; positions are segment rows.
        scores, rows = knn_ground_truth(queries, added(), min(max(RECALL_K), plan.vectors), faiss.METRIC_INNER_PRODUCT)
    exact = exact_ids(scores, rows, writer.seq, writer.rows)
    segment = writer.close()
    with timer("measure"):
        recall = measure_recall(writer.index, queries, exact, config.nprobe)
        stored = (
            {segment.seq: open_vectors(segment.paths[VECTORS_FILE], segment.rows, plan.dim, f"segment {segment.seq}")}
            if config.refine_k
            else {}
        )
        refined = measure_refined(writer.index, queries, exact, config, stored)
        error = distortion(writer.index, queries)
    return Built(quantizer, [segment], np.empty(0, np.int64), recall, refined, writer.rows, error, error)


def build_distributed(
    live: LiveEmbeddings,
    config: IndexConfig,
    plan: IndexPlan,
    work_dir: str,
    timer: PhaseTimer,
    trained: faiss.Index | None = None,
) -> Built:
    """`build_full` spread over the Ray cluster: sampling and adding run as tasks, one per group of at most
    `index.segment_vectors` rows, each writing its own segment to storage (`pipeline.index_workers`). The driver
    trains and merges the held-out queries' top-k: its memory follows the settings, not the corpus."""
    connect()
    groups = plan_groups(live.stored_rows, config.segment_vectors)
    root, options = live.storage.root_url, live.storage.options
    links = ray.put(live.links)
    resources = {"num_cpus": config.add_cpus, "num_gpus": config.add_gpus}
    log.info("%d add tasks of at most %d vectors each", len(groups), config.segment_vectors)
    with timer("train"):
        positions = sample_positions(live.stored_rows, plan.train_size + plan.queries, config.seed)
        sampler = ray.remote(sample_group).options(num_cpus=config.add_cpus)
        parts = [
            sampler.remote(root, options, links, group, [positions[s] for s in group])
            for group in groups
            if any(len(positions[s]) for s in group)
        ]
        trainer = ray.remote(train_sample).options(num_cpus=config.train_cpus, num_gpus=config.train_gpus)
        reused = faiss.serialize_index(trained) if trained is not None else None
        [fit] = get([trainer.remote(config.factory, plan.train_size, config.seed, reused, *parts)])
        del parts
    log.info("trained on node %s with %d GPU(s) in %.1fs", fit.node, fit.gpus, fit.seconds)
    index, queries = faiss.deserialize_index(fit.index), fit.queries
    quantizer = _save_quantizer(index, work_dir)
    k = min(max(RECALL_K), plan.vectors)
    settings = AddSettings(config.nprobe, k, config.refine_k, config.keep_vectors)
    serialized, held_out = ray.put(fit.index), ray.put(queries)
    adder = ray.remote(add_group).options(**resources)
    with (
        timer("add"),
        tqdm(total=plan.vectors, desc="add", unit=" vectors", unit_scale=True, mininterval=2) as bar,
    ):
        pending = [
            adder.remote(root, options, links, group, seq, serialized, held_out, settings)
            for seq, group in enumerate(groups, start=1)
        ]
        added: list[AddedSegment] = []
        try:
            while pending:
                [ref], pending = ray.wait(pending, num_returns=1)
                [result] = get([ref])
                added.append(result)
                bar.update(result.segment.rows)
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
    added.sort(key=lambda a: a.segment.seq)
    with timer("measure"):
        _, exact = merge_topk([a.exact for a in added], k)
        _, ann = merge_topk([a.ann for a in added], k)
        recall = {r: recall_at(ann, exact, r) for r in RECALL_K}
        refined = {}
        if config.refine_k:
            refined_ids = refine_merged([a.candidates for a in added], max(k, config.refine_k), k)
            refined = {r: recall_at(refined_ids, exact, r) for r in RECALL_K}
        error = distortion(index, queries)
    log.info(
        "add tasks: %d on %d node(s), peak worker RSS %.0f MiB",
        len(added),
        len({a.node for a in added}),
        max(a.peak_rss for a in added) / 2**20,
    )
    kept = [a for a in added if a.segment.rows]
    return Built(
        quantizer,
        [SegmentRef(a.segment.name, a.segment.seq, a.segment.rows) for a in kept],
        np.empty(0, np.int64),
        recall,
        refined,
        sum(a.segment.rows for a in added),
        error,
        error,
        uploaded={entry.name: entry for a in kept for entry in a.files},
        written=sum(a.written for a in added),
        nodes=tuple(sorted({a.node for a in added})),
    )


def build_delta(
    storage: Storage, previous: IndexManifest, deltas: list[Link], config: IndexConfig, work_dir: str, timer: PhaseTimer
) -> Built:
    """One new segment for the rows the deltas add, on the published version's quantizer, and tombstones for the
    published rows they delete or replace. Recall is carried from the published version; the new rows'
    quantization error is measured for the drift gate."""
    files = files_of(previous)
    cache = os.path.join(work_dir, "published")
    quantizer_entry = files[previous.quantizer]
    paths, _ = fetch_verified(storage, [quantizer_entry], cache)
    quantizer = faiss.read_index(paths[previous.quantizer])
    segments = segments_of(previous)
    writer = SegmentWriter(quantizer, max((s.seq for s in segments), default=0) + 1, work_dir, config.keep_vectors)
    live = LiveEmbeddings(storage, deltas)
    added = []
    with timer("add"):
        for shard in range(len(live.shards)):
            vectors, passages = read_and_match(live, shard)
            if len(vectors):
                writer.add(vectors, passages)
                added.append(vectors)
    # Recall@k among a night's few new rows says little about the version (their top 100 is a large share of
    # them): the quantizer's fit to the version's rows is compared instead with its fit when recall was last
    # measured, as the full build's recall is measured over the whole corpus.
    recall = {10: previous.recall_at_10, 100: previous.recall_at_100}
    refined = (
        {10: previous.refined_recall_at_10, 100: previous.refined_recall_at_100}
        if previous.refined_recall_at_100 is not None and previous.refine_k == config.refine_k
        else {}
    )
    reference = previous.reference_distortion
    with timer("measure"):
        vectors = np.concatenate(added) if added else np.empty((0, quantizer.d), np.float32)
        picks = np.random.default_rng(config.seed).choice(
            len(vectors), min(config.queries, len(vectors)), replace=False
        )
        new_error = distortion(writer.index, vectors[np.sort(picks)])
        error = blended(previous.vectors, previous.distortion, len(vectors), new_error)
        log.info("new rows' quantization error %.4f, the version's %s (reference %s)", new_error, error, reference)
    with timer("tombstone"):
        removed = np.unique(np.concatenate([link.tombstones for link in deltas] or [np.empty(0, np.uint64)]))
        dead = (
            [
                read_npy_file(path, np.int64, name)
                for name, path in fetch_verified(storage, [files[previous.tombstones]], cache)[0].items()
            ]
            if previous.tombstones
            else []
        )
        keys = fetch_verified(storage, [files[s.file(KEYS_FILE)] for s in segments], cache)[0]
        for segment in segments:
            rows = np.nonzero(np.isin(read_npy_file(keys[segment.file(KEYS_FILE)], np.uint64, segment.name), removed))[
                0
            ]
            dead.append(faiss_ids(segment.seq, 0, segment.rows)[rows])
        dead_ids = np.unique(np.concatenate(dead)) if dead else np.empty(0, np.int64)
    if writer.rows:
        new = [writer.close()]
    else:  # nothing new (a compaction of the published version): no segment
        new = []
        writer.discard()
    return Built(quantizer_entry, [*segments, *new], dead_ids, recall, refined, writer.rows, reference, error)


def compact(
    storage: Storage, built: Built, merge: list[int], files: dict[str, FileEntry], work_dir: str, timer: PhaseTimer
) -> Built:
    """Merge the segments at positions `merge` into one and drop their tombstoned rows, copying codes (no vector is
    read or re-encoded); the other segments and their tombstones stay as they are."""
    kept = [s for i, s in enumerate(built.segments) if i not in merge]
    merged_seqs = {built.segments[i].seq for i in merge}
    built = replace(built, segments=[built.segments[i] for i in merge])
    with timer("compact"):
        paths = fetch_verified(
            storage,
            [
                files[s.file(n)]
                for s in built.segments
                if isinstance(s, SegmentRef)
                for n in (IVF_FILE, DOCSTORE_FILE, KEYS_FILE, VECTORS_FILE)
                if s.file(n) in files
            ],
            os.path.join(work_dir, "published"),
        )[0]
        local = {s.seq: s.paths for s in built.segments if isinstance(s, LocalSegment)}

        def path(segment, name: str) -> str | None:
            return local[segment.seq].get(name) if segment.seq in local else paths.get(segment.file(name))

        quantizer = faiss.read_index(
            built.quantizer
            if isinstance(built.quantizer, str)
            else fetch_verified(storage, [built.quantizer], os.path.join(work_dir, "published"))[0][
                built.quantizer.name
            ]
        )
        ivf = ivf_of(quantizer)
        seq = max(s.seq for s in [*kept, *built.segments]) + 1
        directory = os.path.join(work_dir, f"segment-{seq:06d}")
        os.makedirs(directory, exist_ok=True)
        remap, sources, keys, rows = {}, [], [], 0
        # The live rows' vectors are copied too, when every merged segment kept them (refine stays possible).
        with_vectors = all(path(segment, VECTORS_FILE) for segment in built.segments)
        vectors = VectorWriter(os.path.join(directory, VECTORS_FILE), ivf.d) if with_vectors else None
        with (
            pa.OSFile(os.path.join(directory, DOCSTORE_FILE), "wb") as sink,
            pa.ipc.new_file(sink, DOCSTORE_SCHEMA) as out,
        ):
            for segment in built.segments:
                alive = ~np.isin(faiss_ids(segment.seq, 0, segment.rows), built.dead)
                remap[segment.seq] = np.where(alive, rows + np.cumsum(alive) - 1, -1)
                rows += int(alive.sum())
                sources.append(read_invlists(path(segment, IVF_FILE)))
                docstore = pa.ipc.open_file(pa.memory_map(path(segment, DOCSTORE_FILE), "r")).read_all()
                out.write_table(docstore.filter(pa.array(alive)))
                keys.append(read_npy_file(path(segment, KEYS_FILE), np.uint64, segment.name)[alive])
                if vectors is not None:
                    stored = open_vectors(path(segment, VECTORS_FILE), segment.rows, ivf.d, f"segment {segment.seq}")
                    for start in range(0, segment.rows, 65536):  # bounded memory, whatever the segment's size
                        vectors.add(stored[start : start + 65536][alive[start : start + 65536]])
        if vectors is not None:
            vectors.close()
        merged = copy_live_codes(sources, remap, seq, ivf.nlist, ivf.code_size)
        segment = finish_segment(seq, rows, merged, keys, directory)
    dead_seqs, _ = split_ids(built.dead)
    log.info(
        "compacted %d segments (%d rows, %d dead) into %s (%d rows)",
        len(built.segments),
        built.stored,
        int(np.isin(dead_seqs, list(merged_seqs)).sum()),
        segment.name,
        rows,
    )
    return replace(
        built,
        segments=[*kept, segment],
        dead=built.dead[~np.isin(dead_seqs, list(merged_seqs))],
    )


# -- publishing -----------------------------------------------------------------------------------------------------
def publish(
    storage: Storage,
    version: str,
    built: Built,
    previous_files: dict[str, FileEntry],
    lexical: dict[str, FileEntry] | None,
    lineage: dict[str, Any],
) -> tuple[IndexManifest | None, int]:
    """Upload what is new (segments and quantizer are content-addressed: what exists is not written again), the
    tombstones, then the manifest (sha256 of every file the version needs), then LATEST: a version is complete or
    invisible. The manifest is created with a conditional write: of two runs racing to publish one version, one
    wins and the other gets None. Returns (manifest, bytes written)."""
    entries, written = [], 0
    if isinstance(built.quantizer, str):
        with open(built.quantizer, "rb") as handle:
            name = f"quantizers/{hashlib.sha256(handle.read()).hexdigest()[:16]}.faiss"
        entry, size = upload_once(storage, built.quantizer, name)
        entries.append(entry)
        written += size
    else:
        entries.append(built.quantizer)
    segments = []
    for segment in built.segments:
        if isinstance(segment, LocalSegment):
            name = segment.name
            for file, path in sorted(segment.paths.items()):
                entry, size = upload_once(storage, path, posixpath.join(name, file))
                entries.append(entry)
                written += size
            segments.append(SegmentEntry(name=name, seq=segment.seq, rows=segment.rows))
        else:
            kinds = (DOCSTORE_FILE, IVF_FILE, KEYS_FILE, VECTORS_FILE)  # the vectors when the segment kept them
            entries += [previous_files[segment.file(n)] for n in kinds if segment.file(n) in previous_files]
            segments.append(SegmentEntry(name=segment.name, seq=segment.seq, rows=segment.rows))
    tombstones = None
    if len(built.dead):
        tombstones = posixpath.join(version, TOMBSTONES_FILE)
        data = npy_bytes(np.sort(built.dead).astype(np.int64))
        entries.append(
            FileEntry(
                name=tombstones,
                bytes=len(data),
                sha256=storage.write_bytes(posixpath.join("indexes", tombstones), data),
            )
        )
        written += len(data)
    entries += list((lexical or {}).values())  # uploaded by build_lexical (content-addressed)
    manifest = storage.write_manifest(
        posixpath.join("indexes", version),
        IndexManifest(
            files=entries,
            version=version,
            quantizer=entries[0].name,
            segments=segments,
            tombstones=tombstones,
            lexical={name: entry.name for name, entry in lexical.items()} if lexical is not None else None,
            **lineage,
        ),
        name=INDEX_MANIFEST,
        exclusive=True,
    )
    if manifest is None:
        log.warning("index %s was published by another run meanwhile: not publishing it again", version)
        return None, written
    point_latest(storage, INDEXES, version)
    return manifest, written


# -- the job --------------------------------------------------------------------------------------------------------
def find_embeddings(storage: Storage, config: IndexConfig) -> tuple[str, str]:
    """(snapshot, fingerprint): the configured ones, else the newest published encode of the snapshot."""
    snapshot = config.snapshot or latest_snapshot(storage)
    base = posixpath.join("embeddings", snapshot)
    candidates = [config.fingerprint] if config.fingerprint else storage.list_names(base)
    published = [
        (m, name)
        for name in candidates
        if (m := storage.read_manifest(posixpath.join(base, name), EmbeddingManifest)) is not None
    ]
    if not published:
        raise PipelineError(
            f"no published embeddings under {storage.url(base)}"
            f"{'/' + config.fingerprint if config.fingerprint else ''}: run jobs.encode first"
        )
    return snapshot, max(published, key=lambda item: item[0].created_at)[1]


def settings_digest(config: IndexConfig) -> str:
    """What, besides the vectors, decides a version's content."""
    return hashlib.sha256(
        json.dumps(
            {
                "factory": config.factory,
                "nprobe": config.nprobe,
                "train_size": config.train_size,
                "queries": config.queries,
                "seed": config.seed,
                "keep_vectors": config.keep_vectors,
                "refine_k": config.refine_k,
                "lexical": config.lexical,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]


def index_version(
    snapshot: str, links: Sequence[Link], config: IndexConfig, on: str | None = None, question_model: str | None = None
) -> str:
    """Same inputs and settings → same version, so a rerun finds its own published work; the question encoder the
    version pairs with is part of it (versions without one keep their names)."""
    paired = {"question_model": question_model} if question_model else {}
    digest = hashlib.sha256(
        json.dumps(
            {
                **paired,
                "embeddings": [(link.snapshot, [(e.name, e.sha256) for e in link.embeddings.files]) for link in links],
                "tombstones": [link.tombstones.tobytes().hex()[:64] + str(len(link.tombstones)) for link in links],
                "settings": settings_digest(config),
                "on": on,
                "compact": config.compact,
                "segment_vectors": config.segment_vectors,  # how the rows are cut into segments (and so shards)
                "max_segments": config.max_segments,
                "max_tombstone_fraction": config.max_tombstone_fraction,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    return f"{snapshot}-{digest[:10]}"


def compatible_previous(
    storage: Storage, config: IndexConfig, embeddings: EmbeddingManifest
) -> tuple[str, IndexManifest] | None:
    """The published version, when it was built for the same encoder, dimension and factory (vectors of another
    model live in another space) in the segmented format."""
    if not config.reuse_trained:
        return None
    version = read_latest(storage, INDEXES)
    if version is None:
        return None
    try:
        manifest = storage.read_manifest(version_dir(version), IndexManifest, name=INDEX_MANIFEST)
    except PipelineError as exc:  # e.g. a version of an older format: build anew rather than on it
        log.warning("not building on the published version %s: %s", version, exc)
        return None
    if manifest is None or (manifest.fingerprint, manifest.factory, manifest.dim) != (
        embeddings.fingerprint,
        config.factory,
        embeddings.dim,
    ):
        return None
    return version, manifest


def _reused(storage: Storage, version: str, manifest: IndexManifest) -> dict[str, Any]:
    """The summary of a version published earlier (by this run's inputs, or one that already indexes them)."""
    point_latest(storage, INDEXES, version)
    seconds = dict(manifest.seconds or {})
    return {
        "version": version,
        "output": storage.url("indexes", version),
        "vectors": manifest.vectors,
        "mode": "current",
        "segments": len(segments_of(manifest)),
        "tombstones": None,
        "added": 0,
        "recall_at_10": manifest.recall_at_10,
        "recall_at_100": manifest.recall_at_100,
        "distortion": manifest.distortion,
        "bytes_per_vector": manifest.bytes_per_vector,
        "bytes_written": 0,
        "train_seconds": seconds.get("train", 0.0),
        "add_seconds": seconds.get("add", 0.0),
        "phase_seconds": seconds,
        "retrained": manifest.retrained,
        "trained_from": manifest.trained_from,
        "reused": True,
    }


def run_build_index(config: PipelineConfig) -> dict[str, Any]:
    reset_peak_rss()  # the summary's driver_peak_rss: the build's own, not the imports'
    storage = Storage(config.storage.root, config.storage.options)
    snapshot, fingerprint = find_embeddings(storage, config.index)
    links = embedding_chain(storage, snapshot, fingerprint)
    head = links[-1].embeddings
    previous = compatible_previous(storage, config.index, head)
    mode, start = plan_build(
        [link.snapshot for link in links],
        previous[1].snapshot if previous else None,
        previous is not None
        and previous[1].settings == settings_digest(config.index)
        and config.encode.question_model in (None, previous[1].encoder.get("question_model")),
    )
    compact_already = len(segments_of(previous[1])) <= 1 and not previous[1].tombstones if previous else False
    if mode == "current" and (config.index.compact != "always" or compact_already):
        log.info("index %s already serves snapshot %s: pointing LATEST at it", previous[0], snapshot)
        return _reused(storage, *previous)
    if mode == "current":
        mode, start = "delta", len(links)
    # the question encoder paired with these vectors: the config's, else the one the published version records
    question_model = config.encode.question_model or (previous[1].encoder.get("question_model") if previous else None)
    version = index_version(
        snapshot,
        links[start:] if mode == "delta" else links,
        config.index,
        previous[0] if mode == "delta" else None,
        question_model,
    )
    existing = storage.read_manifest(version_dir(version), IndexManifest, name=INDEX_MANIFEST)
    if existing is not None:
        log.info("index %s is already published: pointing LATEST at it", version)
        return _reused(storage, version, existing)
    live = LiveEmbeddings(storage, links)
    rows = live.stored_rows
    plan = plan_index(config.index.factory, int(head.dim), live_rows(links), max(rows), config.index)
    log.info(
        "plan: %s build, %d live vectors x %d, nlist %s, train on %d, %d held-out queries, ~%.2f GiB peak",
        mode,
        plan.vectors,
        plan.dim,
        plan.nlist,
        plan.train_size,
        plan.queries,
        plan.memory_bytes / GiB,
    )
    if mode == "full" and plan.memory_bytes > config.index.max_memory:
        raise PipelineError(
            f"building {config.index.factory} over {plan.vectors} x {plan.dim} vectors needs about "
            f"{plan.memory_bytes / GiB:.2f} GiB, over index.max_memory "
            f"({config.index.max_memory / GiB:.2f} GiB): raise it or choose a smaller factory"
        )
    timer = PhaseTimer()
    # The BM25 index is a delta when the dense build planned one, even if that falls back to a full build.
    on = previous[1] if previous and mode == "delta" else None
    lexical_task = _start_lexical(storage, links, start if on else None, on, config.index)
    with tempfile.TemporaryDirectory(prefix="build-index-") as work_dir, _cancelled_on_error(lexical_task):
        built, trained_from, mode = _build(storage, mode, links, start, previous, config.index, plan, work_dir, timer)
        recall = built.recall[100]
        log.info("recall@10 %.4f, recall@100 %.4f vs exact at nprobe %d", built.recall[10], recall, config.index.nprobe)
        if built.refined:
            log.info("refine_k %d: recall@10 %.4f, recall@100 %.4f", config.index.refine_k, *built.refined.values())
        if built.gated_recall < config.index.min_recall:
            raise PipelineError(
                f"recall@100 {built.gated_recall:.4f} of {config.index.factory} at nprobe {config.index.nprobe}"
                f"{f' refined from {config.index.refine_k}' if built.refined else ''} is below index.min_recall "
                f"{config.index.min_recall}: version {version} not published"
            )
        previous_files = {**(files_of(previous[1]) if previous else {}), **built.uploaded}
        dead_seqs = split_ids(built.dead)[0]
        merge = plan_compaction(
            [s.rows for s in built.segments], [int((dead_seqs == s.seq).sum()) for s in built.segments], config.index
        )
        if merge:
            built = compact(storage, built, merge, previous_files, work_dir, timer)
        lexical = None
        if config.index.lexical:
            with timer("lexical"):  # a distributed build's: the wait for its task, after the dense add
                if lexical_task is not None:
                    [lexical] = get([lexical_task])
                else:
                    lexical = build_lexical(storage, links, start if on else None, on, work_dir)
        with timer("publish"):
            ivf_bytes = sum(
                os.path.getsize(s.paths[IVF_FILE])
                if isinstance(s, LocalSegment)
                else previous_files[s.file(IVF_FILE)].bytes
                for s in built.segments
            )
            vectors = built.stored - len(built.dead)
            bytes_per_vector = round(ivf_bytes / max(1, vectors), 2)
            manifest, written = publish(
                storage,
                version,
                built,
                previous_files,
                lexical,
                {
                    "snapshot": snapshot,
                    "embeddings": storage.url(links[-1].embeddings_dir),
                    "fingerprint": head.fingerprint,
                    "encoder": {**head.encoder, **({"question_model": question_model} if question_model else {})},
                    "dim": plan.dim,
                    "factory": config.index.factory,
                    "metric": "inner_product",
                    "nprobe": config.index.nprobe,
                    "settings": settings_digest(config.index),
                    "train_size": plan.train_size,
                    "vectors": vectors,
                    "queries": plan.queries,
                    "recall_at_10": built.recall[10],
                    "recall_at_100": recall,
                    "refine_k": config.index.refine_k if built.refined else 0,
                    "refined_recall_at_10": built.refined.get(10),
                    "refined_recall_at_100": built.refined.get(100),
                    "reference_distortion": built.reference_distortion,
                    "distortion": built.distortion,
                    "bytes_per_vector": bytes_per_vector,
                    "passages_manifest": links[-1].passages.created_at,
                    "seconds": timer.seconds,
                    "trained_from": trained_from,
                    "retrained": trained_from is None,
                    "built_on": previous[0] if mode == "delta" else None,
                    "mode": mode,
                },
            )
    return {
        "version": version,
        "output": storage.url("indexes", version),
        "vectors": vectors,
        "mode": mode,
        "segments": len(built.segments),
        "tombstones": len(built.dead),
        "added": built.new_rows,
        "recall_at_10": round(built.recall[10], 4),
        "recall_at_100": round(recall, 4),
        **{f"refined_recall_at_{r}": round(value, 4) for r, value in built.refined.items()},
        "distortion": round(built.distortion, 5),
        "bytes_per_vector": bytes_per_vector,
        "bytes_written": written + built.written,
        "train_seconds": timer.seconds.get("train", 0.0),
        "add_seconds": timer.seconds.get("add", 0.0),
        "phase_seconds": timer.seconds,
        "retrained": trained_from is None,
        "trained_from": trained_from,
        "reused": manifest is None,
        "add_nodes": len(built.nodes),
        "driver_peak_rss": peak_rss(),
    }


def run_compact(config: PipelineConfig) -> dict[str, Any]:
    """Merge the published version's segments into one and drop its tombstoned rows: a new version of the same
    passages on the same quantizer (codes copied, nothing re-encoded or retrained)."""
    storage = Storage(config.storage.root, config.storage.options)
    version = published_version(storage)
    manifest = read_index_manifest(storage, version)
    return run_build_index(
        config.model_copy(
            update={
                "index": config.index.model_copy(
                    update={"snapshot": manifest.snapshot, "fingerprint": manifest.fingerprint, "compact": "always"}
                )
            }
        )
    )


def _start_lexical(
    storage: Storage, links: list[Link], start: int | None, previous: IndexManifest | None, config: IndexConfig
) -> ray.ObjectRef | None:
    """With `index.segment_vectors` (a distributed build), the BM25 index is built by a Ray task that runs while
    the dense index trains and adds; None when it is built in this process after the dense index, or not at all."""
    if not (config.lexical and config.segment_vectors):
        return None
    connect()
    task = ray.remote(build_lexical_task).options(num_cpus=config.add_cpus)
    return task.remote(storage.root_url, storage.options, links, start, previous)


@contextlib.contextmanager
def _cancelled_on_error(task: ray.ObjectRef | None):
    """A build that fails (its recall gate, say) stops its BM25 task rather than leave it running."""
    try:
        yield
    except BaseException:
        if task is not None:
            ray.cancel(task)
        raise


def _build(
    storage: Storage,
    mode: str,
    links: list[Link],
    start: int,
    previous: tuple[str, IndexManifest] | None,
    config: IndexConfig,
    plan: IndexPlan,
    work_dir: str,
    timer: PhaseTimer,
) -> tuple[Built, str | None, str]:
    """A delta segment while the new rows fit the published quantizer; else everything, on the published quantizer
    while its recall holds (no k-means), else on a newly trained one. Returns the build, the version whose
    quantizer it used (None: trained now) and the mode it ran."""
    if mode == "delta":
        version, manifest = previous
        built = build_delta(storage, manifest, links[start:], config, work_dir, timer)
        if not drifted(built.reference_distortion, built.distortion, config.max_drift):
            return built, manifest.trained_from or version, "delta"
        log.info(
            "the version's quantization error %s would be over %s's reference %s by more than index.max_drift "
            "%.2f: a full build",
            built.distortion,
            version,
            built.reference_distortion,
            config.max_drift,
        )
    live = LiveEmbeddings(storage, links)
    full = build_distributed if config.segment_vectors else build_full
    if previous is not None:
        version, manifest = previous
        path = fetch_verified(storage, [files_of(manifest)[manifest.quantizer]], os.path.join(work_dir, "published"))[
            0
        ][manifest.quantizer]
        built = full(live, config, plan, work_dir, timer, faiss.read_index(path))
        if built.gated_recall >= config.min_recall:
            log.info("reused the quantizer trained for %s (recall@100 %.4f)", version, built.gated_recall)
            return built, manifest.trained_from or version, "full"
        log.info(
            "the quantizer of %s gives recall@100 %.4f on the new vectors, below %.2f: retraining",
            version,
            built.recall[100],
            config.min_recall,
        )
    return full(live, config, plan, work_dir, timer), None, "full"
