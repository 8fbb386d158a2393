"""What the build measures before it publishes: recall@k of the IVF-PQ (and refined) search against exact search on
held-out corpus vectors, the relative quantization error a delta gate watches (`distortion`, `blended`,
`drifted`), and the merges of per-segment top-k lists (FAISS ids, ties to the smaller one) that make a segmented
version's figures equal one index's."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

from pipeline.config import IndexConfig
from pipeline.index.plan import RECALL_K
from pipeline.store.segments import best_by_score, faiss_ids, rescore

log = logging.getLogger(__name__)


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


def exact_ids(scores: np.ndarray, rows: np.ndarray, seq: int, count: int) -> np.ndarray:
    """knn_ground_truth's row positions as the segment's FAISS ids; -1 where a query got no row."""
    found = np.isfinite(scores) & (rows >= 0)
    if not count:
        return np.full(rows.shape, -1, np.int64)
    return np.where(found, faiss_ids(seq, 0, count)[np.where(found, rows, 0)], -1)
