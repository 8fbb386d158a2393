"""Training the quantizer (OPQ, coarse centroids, PQ codebooks) on a sample, and assigning vectors to lists, on the
GPUs when faiss sees any. Used by the one-process build and by the Ray tasks alike; no torch."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import ray

from pipeline.errors import PipelineError
from pipeline.runtime.raycluster import use_assigned_cpus
from pipeline.store.segments import Sq8, ivf_of

log = logging.getLogger(__name__)


def node_id() -> str:
    """The Ray node this runs on (the host name outside Ray)."""

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else os.uname().nodename


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
    parts: Sequence[np.ndarray],
    trained: faiss.Index | None,
    factory: str,
    train_size: int,
    seed: int,
    sq8: bool = False,
) -> tuple[faiss.Index, np.ndarray, Sq8 | None]:
    """Split the sample (drawn in shard order) into training vectors and held-out queries, and train a new index
    unless given a trained one: (the trained, empty index, the queries, and with `sq8` the kept vectors' 8-bit
    quantizer trained on the same vectors: a second or so, so trained anew even on a reused index)."""
    sample = np.concatenate(parts)
    order = np.random.default_rng(seed + 1).permutation(len(sample))
    train, queries = sample[order[:train_size]], sample[order[train_size:]]
    refine = Sq8.train(train) if sq8 else None
    if trained is not None:
        return trained, queries, refine
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(ivf_of(index))  # a factory that cannot be segmented is refused before the k-means
    # index_factory turns on polysemous training for PQ codes (about 1 s per sub-quantizer: 52 s of a 600-vector
    # IVF4,PQ32x8 build); it only permutes the codes for Hamming-filtered search, which is never used here.
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    with training_on_gpus(index):
        try:
            index.train(train)
        except RuntimeError as exc:  # faiss's own check, e.g. fewer training points than a codebook's centroids
            why = str(exc).rsplit("failed: ", 1)[-1].strip().splitlines()[0]
            raise PipelineError(
                f"training {factory} on {len(train)} vectors of {sample.shape[1]} dims failed: {why}; lower the "
                "lists or the codebook bits of index.factory, or give it more vectors (index.train_size)"
            ) from None
    return index, queries, refine


@dataclass
class TrainedIndex:
    """What the training task sends back: the trained, empty index (faiss.serialize_index bytes), the held-out
    queries and the sq8 quantizer's ranges, a size set by the settings (centroids, codebooks, `index.queries`), not
    by the corpus."""

    index: np.ndarray
    queries: np.ndarray
    sq8: np.ndarray | None
    node: str
    gpus: int  # the GPUs its k-means ran on
    threads: int  # and the CPU threads (`index.train_cpus`)
    seconds: float


def train_sample(
    factory: str, train_size: int, seed: int, sq8: bool, trained: np.ndarray | None, *parts: np.ndarray | None
) -> TrainedIndex:
    """The distributed build's training, as a task with `index.train_cpus` / `train_gpus`: the sample parts come
    from the sampling tasks through the object store, so the driver never holds the training sample."""
    started = time.perf_counter()
    threads = use_assigned_cpus()
    index, queries, refine = split_and_train(
        [p for p in parts if p is not None],
        faiss.deserialize_index(trained) if trained is not None else None,
        factory,
        train_size,
        seed,
        sq8,
    )
    return TrainedIndex(
        index=faiss.serialize_index(index),
        queries=queries,
        sq8=refine.trained if refine is not None else None,
        node=node_id(),
        gpus=faiss.get_num_gpus() if trained is None else 0,
        threads=threads,
        seconds=round(time.perf_counter() - started, 3),
    )


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
