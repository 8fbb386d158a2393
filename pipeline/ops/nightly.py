"""Nightly re-index: ingest the new snapshot as a delta on the previous one (only new and changed rows, tombstones
for the rest) → encode its rows → add one segment to the published index (on its trained quantizer while recall
holds; merged past the compaction limits) → publish → point the running Serve app at the new version, whose
replicas fetch only the segments they lack, and check it answers. Work and bytes follow the change, not the
corpus; a full snapshot is written on the first night, on request and every `nightly.max_chain` nights.

Every step is idempotent on its own (deterministic names, manifests written last, an index version that is a hash
of its inputs), so rerunning the same night after a crash resumes where it stopped. The previous snapshot is
fixed in `nightly/<snapshot>.json` by the first run, so a rerun diffs against the same one; and an index version's
manifest is created with a conditional write, so two runs of one night cannot both publish.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.encode.job import run_encode
from pipeline.index.job import run_build_index
from pipeline.ingest.job import run_ingest
from pipeline.ops import history
from pipeline.ops.client import AppClient
from pipeline.ops.history import NightRun
from pipeline.ops.retention import retain_after_night
from pipeline.runtime.telemetry import PhaseTimer
from pipeline.store.layout import nightly_record, published_index, snapshot_dir
from pipeline.store.manifests import IndexManifest, PassageManifest
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)


def delta_base(
    storage: Storage, config: PipelineConfig, previous: str | None, published: IndexManifest | None
) -> str | None:
    """The snapshot tonight's is written as a delta on, or None for a full one: on request (`nightly.full`), on
    the first night, once `nightly.max_chain` deltas are stacked, and when the encoder settings changed (no vector
    of the previous snapshot can be reused then)."""
    if config.nightly.full or previous is None:
        return None
    base = storage.read_manifest(snapshot_dir(previous), PassageManifest)
    if base is None or base.depth + 1 > config.nightly.max_chain:
        return None
    encoder = published.encoder if published is not None else None
    wanted = {
        "model": config.encode.model,
        "pooling": config.encode.pooling,
        "max_length": config.encode.max_length,
        "normalize": config.encode.normalize,
    }
    if encoder is not None and {key: encoder.get(key) for key in wanted} != wanted:
        log.info("the encoder settings changed since the published index: writing a full snapshot")
        return None
    return previous


def night_record(storage: Storage, config: PipelineConfig) -> dict[str, Any]:
    """The first run of a night records what it diffs against and whether it writes a delta; reruns read it."""
    snapshot = config.ingest.snapshot
    rel = nightly_record(snapshot)
    published = published_index(storage)  # read once: what tonight diffs against and was encoded with
    previous = published.snapshot if published is not None and published.snapshot != snapshot else None
    record = {
        "snapshot": snapshot,
        "previous_snapshot": previous,
        "base": delta_base(storage, config, previous, published),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if not storage.create_exclusive(rel, json.dumps(record, indent=1).encode()):
        record = storage.read_json(rel)
        log.info("resuming the run of %s (diffing against %s)", snapshot, record["previous_snapshot"])
    return record


def run_nightly(config: PipelineConfig) -> dict[str, Any]:
    """One night, recorded in the history (`pipeline.ops.history`) whether it ends well or fails."""
    storage = Storage(config.storage.root, config.storage.options)
    night = NightRun(PhaseTimer(log))
    try:
        summary = _run_night(storage, config, night)
    except Exception as exc:
        history.record_quietly(storage, functools.partial(history.night_entry, storage, config, night, exc))
        raise
    summary["history"] = history.record_quietly(storage, functools.partial(history.night_entry, storage, config, night))
    return summary


def _run_night(storage: Storage, config: PipelineConfig, night: NightRun) -> dict[str, Any]:
    snapshot = config.ingest.snapshot
    record = night.plan = night_record(storage, config)
    with night.stage("ingest"):
        ingested = night.ingested = run_ingest(
            config.model_copy(update={"ingest": config.ingest.model_copy(update={"base": record.get("base")})})
        )
    encode_config = config.model_copy(
        update={
            "encode": config.encode.model_copy(
                update={
                    "snapshot": snapshot,
                    "previous_snapshot": record["previous_snapshot"],
                    "carry_over": record["previous_snapshot"] is not None,
                }
            )
        }
    )
    with night.stage("encode"):
        encoded = night.encoded = run_encode(encode_config)
    index_config = config.model_copy(
        update={"index": config.index.model_copy(update={"snapshot": snapshot, "fingerprint": encoded.fingerprint})}
    )
    with night.stage("build_index"):
        built = night.built = run_build_index(index_config)
    served = None
    if config.nightly.serve_address:
        with night.stage("serve"):
            served = night.served = AppClient.of(config).move_to(built.version, config.nightly.serve_timeout_s)
    if config.retain.after_night:  # once the app holds tonight's version: what no retained version needs goes
        with night.stage("retain"):
            night.retention = retain_after_night(config)
    return {
        "snapshot": snapshot,
        "previous_snapshot": record["previous_snapshot"],
        "base": record.get("base"),
        "passages": ingested.rows,
        "new": encoded.rows if encoded.new is None else encoded.new,  # a first night: every passage is new
        "changed": encoded.changed or 0,
        "deleted": encoded.deleted or 0,
        "reused": encoded.reused,
        "encoded": encoded.rows,
        "retrained": built.retrained,
        "version": built.version,
        "index_build": built.mode,
        "segments": built.segments,
        "published": not built.reused,
        "vectors": built.vectors,
        "recall_at_100": built.recall_at_100,
        "distortion": built.distortion,
        "served": served,
        "retention": night.retention.model_dump() if night.retention is not None else None,
        "phase_seconds": night.timer.seconds,
        "output": built.output,
    }
