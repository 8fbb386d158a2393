"""The build on the cluster (`index.segment_vectors`): one Ray task per group of embedding shards reads them, adds
their vectors to the shared trained quantizer as one segment, uploads that segment itself and returns only its
manifest entries and the held-out queries' top-k over its rows. Sampling and training are tasks too (training on
a GPU with `index.train_gpus`), and the BM25 index is built by a task of its own meanwhile. The driver keeps what
does not grow with the corpus: the plan, the trained index, the queries and their merged top-k.

Groups are consecutive shards and the sample is drawn at the same positions as a one-process build, so a
distributed build trains on the same vectors, gives the same codes and measures the same recall: IVF search probes
the same lists of every segment (one coarse quantizer), so the merged per-segment top-k is the whole index's top-k.
No torch here: a worker imports faiss, numpy and pyarrow only."""

from __future__ import annotations

import contextlib
import logging
import posixpath
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import ray
from faiss.contrib.exhaustive_search import knn_ground_truth
from tqdm import tqdm

from pipeline.config import IndexConfig
from pipeline.index.build import Built, read_and_match, save_quantizer, sq8_file, wants_sq8
from pipeline.index.plan import RECALL_K, IndexPlan, plan_groups, sample_positions
from pipeline.index.quality import distortion, exact_ids, merge_topk, recall_at, refine_merged
from pipeline.index.train import assigning_on_gpus, node_id, train_sample
from pipeline.models.tokens import ReaderTokenizer
from pipeline.runtime.raycluster import connect, get, use_assigned_cpus
from pipeline.runtime.telemetry import PhaseTimer, peak_rss, reset_peak_rss
from pipeline.store.lexical import build_lexical_task
from pipeline.store.manifests import FileEntry, IndexManifest, SegmentEntry
from pipeline.store.segments import SegmentRef, SegmentWriter, Sq8, exact_scores, open_refine, upload_once
from pipeline.store.snapshots import Link, LiveEmbeddings
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddSettings:
    nprobe: int
    k: int  # the held-out queries' top-k measured (recall@k)
    refine_k: int  # candidates re-scored exactly (0: off)
    keep_vectors: bool
    tokenizer: str | None = None  # the reader model whose token ids the segment stores


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
    sq8: np.ndarray | None = None,
) -> AddedSegment:
    """Add the live vectors of `shards` to the serialized trained quantizer as segment `seq` (docstore written on
    the same pass), upload it (content-addressed: a retried task finds its objects there), and search it."""
    started = time.perf_counter()
    reset_peak_rss()  # a reused worker: this task's own peak
    use_assigned_cpus()  # and its own threads
    storage = Storage(root, options)
    live = LiveEmbeddings(storage, links)
    with tempfile.TemporaryDirectory(prefix="add-") as work_dir:
        tokenizer = ReaderTokenizer(settings.tokenizer) if settings.tokenizer else None
        refine = Sq8(sq8) if sq8 is not None else None
        index = faiss.deserialize_index(quantizer)
        writer = SegmentWriter(index, seq, work_dir, settings.keep_vectors, tokenizer, refine)

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
            stored = {seq: open_refine(local.paths, local.rows, writer.index.d, f"segment {seq}", refine)}
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


def build_distributed(
    live: LiveEmbeddings,
    config: IndexConfig,
    plan: IndexPlan,
    work_dir: str,
    timer: PhaseTimer,
    trained: faiss.Index | None = None,
    tokenizer: ReaderTokenizer | None = None,
) -> Built:
    """`build_full` spread over the Ray cluster: sampling and adding run as tasks, one per group of at most
    `index.segment_vectors` rows, each writing its own segment to storage (`add_group`). The driver
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
        with_sq8 = wants_sq8(config)
        [fit] = get([trainer.remote(config.factory, plan.train_size, config.seed, with_sq8, reused, *parts)])
        del parts
    log.info("trained on node %s with %d GPU(s), %d threads in %.1fs", fit.node, fit.gpus, fit.threads, fit.seconds)
    index, queries = faiss.deserialize_index(fit.index), fit.queries
    quantizer = save_quantizer(index, work_dir)
    k = min(max(RECALL_K), plan.vectors)
    settings = AddSettings(config.nprobe, k, config.refine_k, config.keep_vectors, tokenizer and tokenizer.model)
    serialized, held_out = ray.put(fit.index), ray.put(queries)
    adder = ray.remote(add_group).options(**resources)
    with (
        timer("add"),
        tqdm(total=plan.vectors, desc="add", unit=" vectors", unit_scale=True, mininterval=2) as bar,
    ):
        pending = [
            adder.remote(root, options, links, group, seq, serialized, held_out, settings, fit.sq8)
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
        sq8=sq8_file(Sq8(fit.sq8) if fit.sq8 is not None else None, work_dir),
    )


def start_lexical(
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
def cancelled_on_error(task: ray.ObjectRef | None):
    """A build that fails (its recall gate, say) stops its BM25 task rather than leave it running."""
    try:
        yield
    except BaseException:
        if task is not None:
            ray.cancel(task)
        raise
