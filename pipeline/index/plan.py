"""The build stage's plans, pure (no I/O): how big the training sample and the held-out queries are and what the
build will hold in memory (`plan_index`, refused before any work when it cannot fit), where the sample is drawn
(`sample_positions`, uniform over all shards: psgs_w100 is ordered by article), which kind of build a night needs
(`plan_build`), which segments to compact (`plan_compaction`) and how shards group into segments (`plan_groups`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from pipeline.config import IndexConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


RECALL_K = (10, 100)


GiB = 2**30


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
