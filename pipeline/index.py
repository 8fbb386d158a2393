"""Build stage (the merge job): embedding shards → FAISS IVF-PQ index + docstore, measured, published atomically.

Phases, each timed: plan (factory, training size, memory estimate: refuse before any work when it cannot fit) →
sample (uniform over all shards: psgs_w100 is ordered by article, so the first N are one topic) → train (clustering
on GPU when faiss sees one) → add (shard by shard, so peak memory is the codes plus one shard; the docstore is
written in the same pass, and the exact top-k of the held-out queries is accumulated for the recall gate) →
measure recall@k vs exact at the stored nprobe → refuse below `index.min_recall` → upload → manifest → LATEST.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.config import IndexConfig, PipelineConfig
from pipeline.embeddings import embedding_matrix, latest_snapshot, read_passage_shard, read_shard
from pipeline.encoder import EncoderSettings
from pipeline.errors import InputError, PipelineError
from pipeline.ingest import snapshot_dir
from pipeline.storage import FileEntry, Manifest, Storage, sha256_file

log = logging.getLogger(__name__)

INDEX_FILE, DOCSTORE_FILE, INDEX_MANIFEST = "index.faiss", "docstore.arrow", "manifest.json"
DOCSTORE_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
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
    """Size the build before doing it: training points (>= 39 per centroid, capped) and peak memory."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise PipelineError(f"index.factory {factory!r} is not a valid FAISS factory for dim {dim}: "
                            f"{str(exc).splitlines()[-1]}") from None
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else None
    wanted = 39 * max(nlist or 1, 256)
    queries = min(config.queries, max(1, vectors // 10))
    train_size = min(config.train_size, wanted, vectors - queries)
    code_bytes = int(ivf.code_size) + 8 if ivf is not None else int(index.sa_code_size())
    memory = (
        vectors * code_bytes  # the codes (and ids) of every vector
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


# -- reading --------------------------------------------------------------------------------------------------------
class EmbeddingShards:
    """The shards an encode manifest lists, read one at a time and verified."""

    def __init__(self, storage: Storage, directory: str, manifest: Manifest):
        self.storage, self.directory, self.manifest = storage, directory, manifest

    @property
    def rows(self) -> list[int]:
        return [entry.rows or 0 for entry in self.manifest.files]

    def read(self, entry: FileEntry) -> tuple[list[str], np.ndarray]:
        table = read_shard(self.storage, self.directory, entry)
        return table.column("id").to_pylist(), np.ascontiguousarray(embedding_matrix(table), dtype=np.float32)

    def __iter__(self) -> Iterator[tuple[FileEntry, list[str], np.ndarray]]:
        for entry in self.manifest.files:
            ids, vectors = self.read(entry)
            yield entry, ids, vectors


def find_embeddings(storage: Storage, config: IndexConfig) -> tuple[str, str, Manifest]:
    """(snapshot, embeddings directory, its manifest): the configured one, else the newest for the snapshot."""
    snapshot = config.snapshot or latest_snapshot(storage)
    base = posixpath.join("embeddings", snapshot)
    candidates = [config.fingerprint] if config.fingerprint else storage.list_names(base)
    published = [(m, name) for name in candidates
                 if (m := storage.read_manifest(posixpath.join(base, name))) is not None]
    if not published:
        raise PipelineError(f"no published embeddings under {storage.url(base)}"
                            f"{'/' + config.fingerprint if config.fingerprint else ''}: run jobs.encode first")
    manifest, name = max(published, key=lambda item: item[0].created_at)
    return snapshot, posixpath.join(base, name), manifest


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


def recall_at(ann: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over the queries."""
    k = min(k, exact.shape[1])
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(ann, exact)]
    return float(np.mean(hits)) / k


@dataclass
class BuiltIndex:
    index_path: str
    docstore_path: str
    recall: dict[int, float]


def build(shards: EmbeddingShards, storage: Storage, passages: Manifest, snapshot: str, config: IndexConfig,
          plan: IndexPlan, work_dir: str, timer: PhaseTimer, trained: faiss.Index | None = None) -> BuiltIndex:
    """Train (unless given an already trained, empty index), add, write the docstore and measure recall:
    everything before publication."""
    index = trained if trained is not None else faiss.index_factory(plan.dim, config.factory,
                                                                    faiss.METRIC_INNER_PRODUCT)
    with timer("sample"):
        positions = sample_positions(shards.rows, plan.train_size + plan.queries, config.seed)
        sample = np.concatenate([shards.read(e)[1][p] for e, p in zip(shards.manifest.files, positions) if len(p)])
        order = np.random.default_rng(config.seed + 1).permutation(len(sample))
        train, queries = sample[order[: plan.train_size]], sample[order[plan.train_size:]]
    k = min(max(RECALL_K), plan.vectors)
    exact = faiss.ResultHeap(len(queries), k, keep_max=True)
    docstore_path = os.path.join(work_dir, DOCSTORE_FILE)
    passage_entries = {entry.name: entry for entry in passages.files}
    passage_dir = snapshot_dir(snapshot)
    if trained is None:
        with timer("train"), training_on_gpus(index):
            index.train(train)
    del train
    with assigning_on_gpus(index):
        with timer("add"), pa.OSFile(docstore_path, "wb") as sink, pa.ipc.new_file(sink, DOCSTORE_SCHEMA) as out, \
                tqdm(total=plan.vectors, desc="add", unit=" vectors", unit_scale=True, mininterval=2) as bar:
            for entry, ids, vectors in shards:
                table = read_passage_shard(storage, passage_dir, passage_entries[entry.name])
                if table.column("id").to_pylist() != ids:
                    raise InputError(shards.storage.url(shards.directory, entry.name), None,
                                     "embedding ids do not match the passage shard of the same name")
                out.write_table(table.select(["id", "title", "text"]))
                distances, labels = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
                exact.add_result(distances, np.where(labels >= 0, labels + index.ntotal, -1))
                index.add(vectors)
                bar.update(len(ids))
    exact.finalize()
    with timer("measure"):
        if plan.nlist:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", config.nprobe)
        _, ann = index.search(queries, k)
        recall = {r: recall_at(ann, exact.I, r) for r in RECALL_K}
    index_path = os.path.join(work_dir, INDEX_FILE)
    faiss.write_index(index, index_path)
    return BuiltIndex(index_path, docstore_path, recall)


def previous_trained(storage: Storage, config: IndexConfig, embeddings: Manifest, work_dir: str
                     ) -> tuple[faiss.Index, str] | None:
    """The published index's trained quantizer, emptied, when it was built for the same encoder, dimension and
    factory (vectors of another model live in another space); verified by sha256 before FAISS reads it."""
    try:
        version = storage.read_bytes("indexes/LATEST").decode().strip()
    except FileNotFoundError:
        return None
    directory = posixpath.join("indexes", version)
    manifest = storage.read_manifest(directory, name=INDEX_MANIFEST)
    if manifest is None or (getattr(manifest, "fingerprint", None), getattr(manifest, "factory", None),
                            getattr(manifest, "dim", None)) != (embeddings.fingerprint, config.factory, embeddings.dim):
        return None
    entry = next(e for e in manifest.files if e.name == INDEX_FILE)
    local = os.path.join(work_dir, "previous.faiss")
    storage.download(posixpath.join(directory, INDEX_FILE), local)
    if sha256_file(local) != entry.sha256:
        log.warning("published index %s fails its checksum: training a new quantizer", version)
        return None
    index = faiss.read_index(local)
    os.unlink(local)
    index.reset()  # keeps the trained coarse quantizer, PQ codebooks and any OPQ rotation
    return index, version


def index_version(snapshot: str, embeddings: Manifest, config: IndexConfig) -> str:
    """Same inputs and settings → same version, so a rerun finds its own published work."""
    digest = hashlib.sha256(json.dumps({
        "embeddings": [(e.name, e.sha256) for e in embeddings.files],
        "factory": config.factory, "nprobe": config.nprobe, "train_size": config.train_size,
        "queries": config.queries, "seed": config.seed,
    }, sort_keys=True).encode()).hexdigest()
    return f"{snapshot}-{digest[:10]}"


def publish(storage: Storage, version: str, built: BuiltIndex, lineage: dict[str, Any]) -> Manifest | None:
    """Upload both files, then the manifest (sha256 of each), then LATEST: a version is complete or invisible.

    The manifest is created with a conditional write: of two runs racing to publish one version, one wins and
    the other gets None (its uploads were byte-identical overwrites: the version is a hash of the inputs)."""
    directory = posixpath.join("indexes", version)
    files = []
    for name, path in ((INDEX_FILE, built.index_path), (DOCSTORE_FILE, built.docstore_path)):
        storage.upload(path, posixpath.join(directory, name))
        files.append(FileEntry(name=name, bytes=os.path.getsize(path), sha256=sha256_file(path)))
    manifest = storage.write_manifest(directory, "index", files, name=INDEX_MANIFEST, exclusive=True,
                                      version=version, **lineage)
    if manifest is None:
        log.warning("index %s was published by another run meanwhile: not publishing it again", version)
        return None
    storage.write_bytes("indexes/LATEST", f"{version}\n".encode())
    return manifest


def run_build_index(config: PipelineConfig) -> dict[str, Any]:
    storage = Storage(config.storage.root, config.storage.options)
    snapshot, directory, embeddings = find_embeddings(storage, config.index)
    passages = storage.read_manifest(snapshot_dir(snapshot))
    if passages is None:
        raise PipelineError(f"{storage.url(snapshot_dir(snapshot))} has no manifest")
    version = index_version(snapshot, embeddings, config.index)
    summary = {"version": version, "output": storage.url("indexes", version)}
    existing = storage.read_manifest(posixpath.join("indexes", version), name=INDEX_MANIFEST)
    if existing is not None:
        log.info("index %s is already published: pointing LATEST at it", version)
        storage.write_bytes("indexes/LATEST", f"{version}\n".encode())
        return {**summary, "vectors": getattr(existing, "vectors", None), "recall_at_100": existing.recall_at_100,
                "bytes_per_vector": existing.bytes_per_vector, "retrained": getattr(existing, "retrained", None),
                "reused": True}
    shards = EmbeddingShards(storage, directory, embeddings)
    plan = plan_index(config.index.factory, int(embeddings.dim), sum(shards.rows), max(shards.rows), config.index)
    log.info("plan: %d vectors x %d, nlist %s, train on %d, %d held-out queries, ~%.2f GiB peak",
             plan.vectors, plan.dim, plan.nlist, plan.train_size, plan.queries, plan.memory_bytes / GiB)
    if plan.memory_bytes > config.index.max_memory:
        raise PipelineError(f"building {config.index.factory} over {plan.vectors} x {plan.dim} vectors needs about "
                            f"{plan.memory_bytes / GiB:.2f} GiB, over index.max_memory "
                            f"({config.index.max_memory / GiB:.2f} GiB): raise it or choose a smaller factory")
    timer = PhaseTimer()
    with tempfile.TemporaryDirectory(prefix="build-index-") as work_dir:
        built, trained_from = _build_reusing_quantizer(shards, storage, passages, snapshot, config.index, plan,
                                                       work_dir, timer, embeddings)
        recall = built.recall[100]
        log.info("recall@10 %.4f, recall@100 %.4f vs exact at nprobe %d", built.recall[10], recall,
                 config.index.nprobe)
        if recall < config.index.min_recall:
            raise PipelineError(f"recall@100 {recall:.4f} of {config.index.factory} at nprobe "
                                f"{config.index.nprobe} is below index.min_recall {config.index.min_recall}: "
                                f"version {version} not published")
        with timer("publish"):
            bytes_per_vector = round(os.path.getsize(built.index_path) / plan.vectors, 2)
            manifest = publish(storage, version, built, {
                "snapshot": snapshot, "embeddings": storage.url(directory), "fingerprint": embeddings.fingerprint,
                "encoder": embeddings.encoder, "dim": plan.dim, "factory": config.index.factory,
                "metric": "inner_product", "nprobe": config.index.nprobe, "train_size": plan.train_size,
                "vectors": plan.vectors, "queries": plan.queries, "recall_at_10": built.recall[10],
                "recall_at_100": recall,
                "bytes_per_vector": bytes_per_vector, "passages_manifest": passages.created_at,
                "seconds": timer.seconds, "trained_from": trained_from, "retrained": trained_from is None,
            })
    return {**summary, "vectors": plan.vectors, "recall_at_10": round(built.recall[10], 4),
            "recall_at_100": round(recall, 4), "bytes_per_vector": bytes_per_vector,
            "train_seconds": timer.seconds.get("train", 0.0), "add_seconds": timer.seconds["add"],
            "retrained": trained_from is None, "trained_from": trained_from, "reused": manifest is None}


def _build_reusing_quantizer(shards: EmbeddingShards, storage: Storage, passages: Manifest, snapshot: str,
                             config: IndexConfig, plan: IndexPlan, work_dir: str, timer: PhaseTimer,
                             embeddings: Manifest) -> tuple[BuiltIndex, str | None]:
    """Add the new vectors to the published index's trained quantizer while its measured recall on them stays at
    `index.min_recall` (small drift, no k-means); below that, or with nothing to reuse, train a new one."""
    previous = previous_trained(storage, config, embeddings, work_dir) if config.reuse_trained else None
    if previous is not None:
        trained, trained_from = previous
        built = build(shards, storage, passages, snapshot, config, plan, work_dir, timer, trained)
        if built.recall[100] >= config.min_recall:
            log.info("reused the quantizer trained for %s (recall@100 %.4f)", trained_from, built.recall[100])
            return built, trained_from
        log.info("the quantizer of %s gives recall@100 %.4f on the new vectors, below %.2f: retraining",
                 trained_from, built.recall[100], config.min_recall)
    return build(shards, storage, passages, snapshot, config, plan, work_dir, timer), None



# -- loading (serving) ----------------------------------------------------------------------------------------------
@dataclass
class PublishedIndex:
    """A published version, verified and loaded: FAISS index (memory-mapped where the type allows) + docstore."""

    version: str
    manifest: Manifest
    index: faiss.Index
    docstore: pa.Table  # row i = FAISS id i; memory-mapped Arrow, lookups are zero-copy

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def passages(self, rows: Sequence[int]) -> pa.Table:
        return self.docstore.take(pa.array(rows, pa.int64()))


def published_version(storage: Storage, version: str | None = None) -> str:
    if version:
        return version
    try:
        return storage.read_bytes("indexes/LATEST").decode().strip()
    except FileNotFoundError:
        raise PipelineError(f"no published index under {storage.url('indexes')}: run jobs.build_index") from None


def question_settings(storage: Storage, version: str | None, model: str, pooling: str | None) -> EncoderSettings:
    """The question side must match how the index's passages were encoded (pooling, normalization, length)."""
    version = published_version(storage, version)
    manifest = storage.read_manifest(f"indexes/{version}", name=INDEX_MANIFEST)
    encoder = dict(manifest.encoder) if manifest is not None else {}
    pooling = pooling or encoder.get("pooling", "dpr")
    return EncoderSettings(model=model, pooling=pooling, max_length=int(encoder.get("max_length", 256)),
                           normalize=bool(encoder.get("normalize", False)), dtype="auto", question=pooling == "dpr")


def load_published(storage: Storage, version: str | None, cache_dir: str) -> PublishedIndex:
    """Fetch a version into `cache_dir`, check every file's sha256 against the manifest, then open it.

    FAISS must never parse an unverified file (its reader is not safe on untrusted input), so the checksum is
    taken on the local copy that `read_index` will open.
    """
    version = published_version(storage, version)
    directory = posixpath.join("indexes", version)
    manifest = storage.read_manifest(directory, name=INDEX_MANIFEST)
    if manifest is None:
        raise PipelineError(f"index version {version!r} is not published ({storage.url(directory)})")
    local_dir = os.path.join(cache_dir, version)
    os.makedirs(local_dir, exist_ok=True)
    paths = {}
    for entry in manifest.files:
        path = os.path.join(local_dir, entry.name)
        if not os.path.exists(path) or os.path.getsize(path) != entry.bytes:
            partial = f"{path}.partial"
            storage.download(posixpath.join(directory, entry.name), partial)
            os.replace(partial, path)
        digest = sha256_file(path)
        if digest != entry.sha256:
            os.remove(path)
            raise PipelineError(f"{storage.url(directory, entry.name)}: checksum mismatch (manifest "
                                f"{entry.sha256[:12]}…, file {digest[:12]}…): refusing to load index {version}")
        paths[entry.name] = path
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(paths[INDEX_FILE], flags if manifest.factory and "IVF" in manifest.factory else 0)
    if faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(manifest.nprobe))
    docstore = pa.ipc.open_file(pa.memory_map(paths[DOCSTORE_FILE], "r")).read_all()
    if docstore.num_rows != index.ntotal:
        raise PipelineError(f"index {version}: docstore has {docstore.num_rows} rows for {index.ntotal} vectors")
    return PublishedIndex(version, manifest, index, docstore)
