"""Retention: what of the store no retained index version needs, deleted (`jobs.gc`, and the nightly after it
publishes), so that months of nights keep the store at about `retain.versions` versions' worth.

Kept: the newest `retain.versions` index versions, the version `indexes/LATEST` names, the versions in
`retain.pinned`, and every version a running app holds or is set to (asked at `nightly.serve_address` when set); for
each, its manifest and every object it lists (quantizer, segments, tombstones, BM25 files), its passage snapshot
chain and that chain's embedding shards under its encoder's fingerprint. The chain of `passages/LATEST` is kept too
(the next night diffs against it). Everything else under `indexes/`, `passages/` and `embeddings/` goes, and the
night records (`nightly/<snapshot>.json`) of snapshots that go, except any object younger than `retain.min_age_h`:
a night in flight writes its files before its manifest, and a young object may be one of them. The history,
evaluations and `LATEST` pointers are never touched.

Deleted in an order that keeps every reader whole: the manifests of the versions that go first (a version without
its manifest is not published, so nothing starts loading it), then the objects only they listed, then passage
snapshots (their manifests first) and embedding shards. `plan_gc` is pure; `collect` and `run_gc` do the I/O.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PipelineConfig, RetainConfig
from pipeline.ops import history
from pipeline.ops.client import AppClient
from pipeline.store.layout import EMBEDDINGS, INDEX_MANIFEST, INDEXES, PASSAGES, read_latest
from pipeline.store.manifests import IndexManifest, PassageManifest
from pipeline.store.storage import MANIFEST_NAME, Storage, StoredObject

log = logging.getLogger(__name__)

AREAS = (INDEXES, PASSAGES, EMBEDDINGS, "nightly")
SHARED = ("quantizers", "segments", "lexical")  # indexes/ folders of objects that versions share


@dataclass(frozen=True)
class VersionFacts:
    """What retention needs of one index version."""

    name: str
    created_at: float  # epoch seconds
    files: frozenset[str]  # object names under indexes/
    snapshot: str
    fingerprint: str


@dataclass
class StoreView:
    """The store as retention sees it: every object under its areas, the versions, the snapshot chains."""

    objects: list[StoredObject]
    versions: dict[str, VersionFacts]
    chains: dict[str, list[str]]  # snapshot -> its chain, full base first (only snapshots with a manifest)
    latest_version: str | None
    latest_snapshot: str | None


@dataclass
class GcPlan:
    keep: list[str]  # index versions kept, newest first
    drop: list[str]  # index versions that go
    delete: list[str] = field(default_factory=list)  # objects, in the order to delete them
    delete_bytes: int = 0
    young: int = 0  # objects nothing keeps that are younger than retain.min_age_h (kept)
    store_bytes: int = 0  # the store's bytes (these areas) before
    why: dict[str, str] = field(default_factory=dict)  # kept version -> why


def plan_gc(view: StoreView, retain: RetainConfig, held: Iterable[str], now: float) -> GcPlan:
    """What to keep and what to delete (pure)."""
    newest = sorted(view.versions.values(), key=lambda v: (v.created_at, v.name), reverse=True)
    why: dict[str, str] = {}
    for facts in newest[: retain.versions]:
        why.setdefault(facts.name, f"one of the newest {retain.versions}")
    reasons = [(view.latest_version, "indexes/LATEST"), *((v, "retain.pinned") for v in retain.pinned)]
    reasons += [(v, "held by the app") for v in held]
    for name, reason in reasons:
        if name and name in view.versions:
            why.setdefault(name, reason)
    young = now - retain.min_age_h * 3600
    for facts in newest:  # a version published within min_age_h stays with everything it lists
        if facts.created_at > young:
            why.setdefault(facts.name, f"younger than retain.min_age_h={retain.min_age_h:g}")
    kept = [facts for facts in newest if facts.name in why]
    wanted_index = {f"{INDEXES}/{name}" for facts in kept for name in facts.files}
    wanted_index |= {f"{INDEXES}/{facts.name}/{INDEX_MANIFEST}" for facts in kept}
    embeddings = {(s, facts.fingerprint) for facts in kept for s in view.chains.get(facts.snapshot, [facts.snapshot])}
    snapshots = {s for s, _ in embeddings}
    if view.latest_snapshot:
        latest_chain = view.chains.get(view.latest_snapshot, [view.latest_snapshot])
        snapshots |= set(latest_chain)
        embeddings |= {(s, fp) for s in latest_chain for fp in {facts.fingerprint for facts in kept}}
    plan = GcPlan(
        keep=[facts.name for facts in kept],
        drop=[facts.name for facts in newest if facts.name not in why],
        why=why,
        store_bytes=sum(o.bytes for o in view.objects),
    )
    doomed = [o for o in view.objects if not _kept(o.rel, wanted_index, snapshots, embeddings)]
    plan.young = sum(o.modified > young for o in doomed)
    doomed = [o for o in doomed if o.modified <= young]
    dropped = set(plan.drop)
    doomed.sort(key=lambda o: (_order(o.rel, dropped), o.rel))
    plan.delete = [o.rel for o in doomed]
    plan.delete_bytes = sum(o.bytes for o in doomed)
    return plan


def _kept(rel: str, index: set[str], snapshots: set[str], embeddings: set[tuple[str, str]]) -> bool:
    parts = rel.split("/")
    area = parts[0]
    if len(parts) == 2 and parts[1] == "LATEST":
        return True
    if area == INDEXES:
        return rel in index
    if area == PASSAGES:
        return parts[1] in snapshots
    if area == EMBEDDINGS:
        return len(parts) > 2 and (parts[1], parts[2]) in embeddings
    # nightly/<snapshot>.json: what a night diffs against; the history and the report are not retention's
    return not (len(parts) == 2 and parts[1].endswith(".json")) or parts[1][: -len(".json")] in snapshots


def _order(rel: str, dropped: set[str]) -> int:
    """Manifests of the versions that go, then their other objects, then shared index objects, then passage
    manifests, then the rest (a published directory loses its manifest before what it lists)."""
    parts = rel.split("/")
    if parts[0] == INDEXES:
        if parts[1] in dropped and parts[-1] == INDEX_MANIFEST:
            return 0
        return 1 if parts[1] not in SHARED else 2
    if parts[0] == PASSAGES and parts[-1] == MANIFEST_NAME:
        return 3
    return 4


# -- the I/O -------------------------------------------------------------------------------------------------------
def collect(storage: Storage) -> StoreView:
    """Every object under the retention areas, every published version's facts and every snapshot's chain."""
    objects = [o for area in AREAS for o in storage.inventory(area)]
    names = {o.rel for o in objects}
    versions = {}
    for rel in sorted(names):
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == INDEXES and parts[2] == INDEX_MANIFEST and parts[1] not in SHARED:
            manifest = storage.read_manifest(posixpath.dirname(rel), IndexManifest, name=INDEX_MANIFEST)
            if manifest is not None:
                versions[manifest.version] = VersionFacts(
                    manifest.version,
                    _epoch(manifest.created_at),
                    frozenset(entry.name for entry in manifest.files),
                    manifest.snapshot,
                    manifest.fingerprint,
                )
    bases = {}
    for rel in sorted(names):
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == PASSAGES and parts[2] == MANIFEST_NAME:
            manifest = storage.read_manifest(posixpath.dirname(rel), PassageManifest)
            if manifest is not None:
                bases[parts[1]] = manifest.base
    return StoreView(
        objects,
        versions,
        {snapshot: _chain(snapshot, bases) for snapshot in bases},
        read_latest(storage, INDEXES),
        read_latest(storage, PASSAGES),
    )


def _chain(snapshot: str, bases: dict[str, str | None]) -> list[str]:
    chain, seen = [snapshot], {snapshot}
    while bases.get(chain[0]) and bases[chain[0]] not in seen:
        chain.insert(0, bases[chain[0]])
        seen.add(chain[0])
    return chain


def _epoch(iso: str) -> float:
    stamp = dt.datetime.fromisoformat(iso)
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).timestamp()


def run_gc(config: PipelineConfig, dry_run: bool = False) -> dict[str, Any]:
    """Plan and (unless `dry_run`) delete; the summary says what went, what stays and why."""
    storage = Storage(config.storage.root, config.storage.options)
    started = time.monotonic()
    held = AppClient.of(config).held()
    plan = plan_gc(collect(storage), config.retain, held, time.time())
    if not dry_run:
        storage.delete_many(plan.delete)
    summary = {
        "dry_run": dry_run,
        "kept_versions": plan.keep,
        "why": plan.why,
        "dropped_versions": plan.drop,
        "deleted_objects": len(plan.delete),
        "deleted_bytes": plan.delete_bytes,
        "young_objects_kept": plan.young,
        "store_bytes_before": plan.store_bytes,
        "store_bytes_after": plan.store_bytes - (0 if dry_run else plan.delete_bytes),
        "held_by_app": sorted(held),
        "gc_seconds": round(time.monotonic() - started, 3),
    }
    if dry_run:
        summary["would_delete"] = plan.delete
    log.info(
        "retention: %s %d objects (%d bytes) of versions %s; keeping %s",
        "would delete" if dry_run else "deleted",
        len(plan.delete),
        plan.delete_bytes,
        plan.drop,
        plan.keep,
    )
    return summary


def recorded_gc(config: PipelineConfig, dry_run: bool = False) -> dict[str, Any]:
    """`jobs.gc`: `run_gc`, recorded in the history (a dry run, which deletes nothing, is not)."""
    storage = Storage(config.storage.root, config.storage.options)
    started, clock = history.utcnow(), time.perf_counter()
    try:
        summary = run_gc(config, dry_run)
    except Exception as exc:
        if not dry_run:
            record = functools.partial(history.gc_entry, config, started, time.perf_counter() - clock, None, exc)
            history.record_quietly(storage, record)
        raise
    if not dry_run:
        record = functools.partial(history.gc_entry, config, started, time.perf_counter() - clock, summary)
        summary["history"] = history.record_quietly(storage, record)
    return summary


def retain_after_night(config: PipelineConfig) -> history.Retention:
    """The nightly's last step: `run_gc`, whose failure is logged and recorded, never the night's."""
    try:
        return history.retention_of(run_gc(config))
    except Exception as exc:  # noqa: BLE001 - the night has published: retention waits for the next one
        log.warning("the retention step failed (the night stands): %s: %s", type(exc).__name__, exc)
        return history.retention_of(None, exc, config)
