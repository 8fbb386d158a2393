"""The encode stage's plans, pure: which passage shards still need encoding (`plan_shards`: a finished shard is
reused only if it came from the same passage bytes) and which rows' vectors can be carried over from the
previous snapshot's embeddings by id and content hash (`plan_carry_over`), from 16 bytes of keys a row."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.store.keys import content_keys, keys_of
from pipeline.store.manifests import FileEntry

log = logging.getLogger(__name__)


def plan_shards(passage_files: list[FileEntry], done: dict[str, FileEntry]) -> tuple[list[FileEntry], list[FileEntry]]:
    """(to encode, reusable): a finished embedding shard is reused only if it came from the same passage bytes."""
    todo, reused = [], []
    for entry in passage_files:
        previous = done.get(entry.name)
        if previous is not None and previous.source_sha256 == entry.sha256:
            reused.append(previous)
        else:
            todo.append(entry)
    return todo, reused


@dataclass(frozen=True)
class ShardKeys:
    """A shard's rows as 64-bit hashes of the id and of the content hash: 16 bytes a row for planning."""

    ids: np.ndarray  # uint64
    contents: np.ndarray  # uint64


def shard_keys(ids: list[str], content_hashes: list[str]) -> ShardKeys:
    return ShardKeys(keys_of(ids), content_keys(content_hashes))


@dataclass
class CarryPlan:
    """Which previous embedding shards hold each new shard's unchanged passages, and the diff in counts."""

    sources: list[list[int]]  # per new shard: indices of the previous shards to carry vectors from
    unchanged: int
    new: int
    changed: int
    deleted: int


def plan_carry_over(new: list[ShardKeys], previous: list[ShardKeys]) -> CarryPlan:
    """Diff two snapshots by id and content hash without reading a vector (pure; the actors verify the real ids
    and hashes when they copy, so a 64-bit hash collision can only cost a re-encode, never a wrong vector)."""
    if not sum(len(k.ids) for k in previous):
        return CarryPlan([[] for _ in new], 0, sum(len(k.ids) for k in new), 0, 0)
    old_ids = np.concatenate([k.ids for k in previous])
    old_contents = np.concatenate([k.contents for k in previous])
    old_shard = np.repeat(np.arange(len(previous)), [len(k.ids) for k in previous])
    order = np.argsort(old_ids, kind="stable")
    sorted_ids = old_ids[order]
    sources, unchanged, added, changed = [], 0, 0, 0
    for keys in new:
        at = np.minimum(np.searchsorted(sorted_ids, keys.ids), len(sorted_ids) - 1)
        found = sorted_ids[at] == keys.ids
        same = found & (old_contents[order[at]] == keys.contents)
        sources.append(sorted(set(old_shard[order[at[same]]].tolist())))
        unchanged += int(same.sum())
        added += int((~found).sum())
        changed += int((found & ~same).sum())
    new_ids = np.concatenate([k.ids for k in new]) if new else np.empty(0, np.uint64)
    deleted = int((~np.isin(old_ids, new_ids)).sum())
    return CarryPlan(sources, unchanged, added, changed, deleted)


@dataclass(frozen=True)
class Carry:
    """Where an encoder actor finds the previous vectors of a shard's unchanged passages: (directory, shard)."""

    sources: list[tuple[str, FileEntry]]
