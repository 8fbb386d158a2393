"""Builds in one process. full: every live row of the chain into one segment, on the published quantizer while its
recall holds, else on a newly trained one (sample → train → add shard by shard, writing the docstore in the same
pass and accumulating the exact top-k of held-out queries → measure). delta: one new segment for the rows the
later snapshots add, on the published quantizer, with tombstones for the rows they delete or replace; work and
bytes follow the change. `Built` is what either hands to the gate, compaction and publication."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa
from faiss.contrib.exhaustive_search import knn_ground_truth
from tqdm import tqdm

from pipeline.config import IndexConfig
from pipeline.errors import InputError
from pipeline.index.plan import RECALL_K, IndexPlan, sample_positions
from pipeline.index.quality import blended, distortion, exact_ids, measure_recall, measure_refined
from pipeline.index.train import assigning_on_gpus, split_and_train
from pipeline.models.tokens import ReaderTokenizer
from pipeline.runtime.telemetry import PhaseTimer
from pipeline.store.cache import fetch_verified
from pipeline.store.manifests import FileEntry, IndexManifest
from pipeline.store.segments import (
    KEYS_FILE,
    LocalSegment,
    SegmentRef,
    SegmentWriter,
    Sq8,
    faiss_ids,
    files_of,
    open_refine,
    segments_of,
)
from pipeline.store.snapshots import Link, LiveEmbeddings, read_npy_file
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)


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
    sq8: str | FileEntry | None = None  # the kept vectors' 8-bit quantizer: a local path or the published entry

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
) -> tuple[faiss.Index, str, np.ndarray, Sq8 | None]:
    """Train in this process (unless given a trained index); returns the trained, empty index, its file in the
    work dir, the held-out queries and the kept vectors' sq8 quantizer (with `index.refine_codes: sq8`)."""
    with timer("train"):
        index, queries, sq8 = split_and_train(
            parts, trained, config.factory, plan.train_size, config.seed, wants_sq8(config)
        )
    return index, save_quantizer(index, work_dir), queries, sq8


def wants_sq8(config: IndexConfig) -> bool:
    return config.keep_vectors and config.refine_codes == "sq8"


def sq8_file(sq8: Sq8 | None, work_dir: str) -> str | None:
    return sq8.save(os.path.join(work_dir, "quantizer.sq8.npy")) if sq8 is not None else None


def save_quantizer(index: faiss.Index, work_dir: str) -> str:
    quantizer = os.path.join(work_dir, "quantizer.faiss")
    faiss.write_index(index, quantizer)
    return quantizer


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


def build_full(
    live: LiveEmbeddings,
    config: IndexConfig,
    plan: IndexPlan,
    work_dir: str,
    timer: PhaseTimer,
    trained: faiss.Index | None = None,
    tokenizer: ReaderTokenizer | None = None,
) -> Built:
    """Train (unless given an already trained, empty index), add every live vector into one segment (with the
    `tokenizer`'s token ids of its passages) and measure recall on held-out corpus vectors against exact search."""
    with timer("sample"):
        positions = sample_positions(live.stored_rows, plan.train_size + plan.queries, config.seed)
        parts = []
        for shard, picks in enumerate(positions):
            if len(picks):
                _, vectors, keep = live.read(shard)
                parts.append(vectors[picks][keep[picks]])
    index, quantizer, queries, sq8 = _train(parts, trained, config, plan, work_dir, timer)
    writer = SegmentWriter(index, 1, work_dir, config.keep_vectors, tokenizer, sq8)
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
            {segment.seq: open_refine(segment.paths, segment.rows, plan.dim, f"segment {segment.seq}", sq8)}
            if config.refine_k
            else {}
        )
        refined = measure_refined(writer.index, queries, exact, config, stored)
        error = distortion(writer.index, queries)
    return Built(
        quantizer,
        [segment],
        np.empty(0, np.int64),
        recall,
        refined,
        writer.rows,
        error,
        error,
        sq8=sq8_file(sq8, work_dir),
    )


def build_delta(
    storage: Storage,
    previous: IndexManifest,
    deltas: list[Link],
    config: IndexConfig,
    work_dir: str,
    timer: PhaseTimer,
    tokenizer: ReaderTokenizer | None = None,
) -> Built:
    """One new segment for the rows the deltas add, on the published version's quantizer, and tombstones for the
    published rows they delete or replace. Recall is carried from the published version; the new rows'
    quantization error is measured for the drift gate."""
    files = files_of(previous)
    cache = os.path.join(work_dir, "published")
    quantizer_entry = files[previous.quantizer]
    paths, _ = fetch_verified(storage, [quantizer_entry], cache)
    quantizer = faiss.read_index(paths[previous.quantizer])
    sq8 = None
    if previous.sq8:  # the new segment's kept vectors coded as the version's others
        sq8_path = fetch_verified(storage, [files[previous.sq8]], cache)[0][previous.sq8]
        sq8 = Sq8.read(sq8_path, quantizer.d, previous.sq8)
    segments = segments_of(previous)
    seq = max((s.seq for s in segments), default=0) + 1
    writer = SegmentWriter(quantizer, seq, work_dir, config.keep_vectors, tokenizer, sq8)
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
    return Built(
        quantizer_entry,
        [*segments, *new],
        dead_ids,
        recall,
        refined,
        writer.rows,
        reference,
        error,
        sq8=files[previous.sq8] if previous.sq8 else None,
    )
