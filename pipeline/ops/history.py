"""The operating history: one typed record per night, and per `jobs.build_index` or `jobs.compact` run that
publishes a version (or fails), so that `jobs.report` can show how the nights go over weeks.

Each record is its own object, `nightly/history/<when>-<kind>-<id>.json`, created with `Storage.create_exclusive`
(a hard link locally, `If-None-Match: *` on S3) and never rewritten. Object stores have no append, and a
read-modify-write of one `history.jsonl` would need a conditional overwrite (`If-Match` on the ETag) that
`Storage` does not offer: without it a compaction finishing while a night finishes would drop one of the two
records. One object per record cannot lose or tear a record; the reader lists the prefix (names sort by time) and
reads the last N. A record holds no configuration: no storage option, URL credential or key can reach it, and an
error message is redacted (URL user info, the credentials in the environment) before it is written.

Recording never fails a run: a record that cannot be written is logged as a warning.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.primitives import BuildMode, BuildSummary, EncodeSummary, IngestSummary, RunKind
from pipeline.runtime.telemetry import PhaseTimer
from pipeline.store.layout import HISTORY, embeddings_dir, history_record, read_index_manifest, snapshot_dir
from pipeline.store.manifests import EmbeddingManifest, IndexManifest, PassageManifest
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
# Environment variables whose values must never be written, whatever message they turn up in.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
)


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rows(_Closed):
    """Passages and vectors a run dealt with (None: not known, e.g. the stage did not run)."""

    live: int | None = None  # live passages of the snapshot (a night) or live vectors of the version (a build)
    new: int | None = None
    changed: int | None = None
    deleted: int | None = None
    encoded: int | None = None  # passages the encoder ran on (the others' vectors were carried over)
    added: int | None = None  # rows the index build added


class BytesWritten(_Closed):
    """Bytes the run wrote to storage, by area (0: it wrote nothing there)."""

    passages: int = 0  # the snapshot's shards and tombstones, unless ingest reused it
    embeddings: int = 0  # the embedding shards of the snapshots it encoded (all of them on a resumed run)
    index: int = 0  # segments, tombstones, BM25 files, the quantizer when trained, the manifest

    @property
    def total(self) -> int:
        return self.passages + self.embeddings + self.index


class Retention(_Closed):
    """What a retention step did (`pipeline.ops.retention`): a night's last step, or `jobs.gc`."""

    kept_versions: list[str] = []
    dropped_versions: list[str] = []
    deleted_objects: int = 0
    deleted_bytes: int = 0
    store_bytes: int  # the store's bytes (passages, embeddings, indexes, nightly) after the step
    error: str | None = None  # the step failed (the night it followed stands)


class HistoryRecord(_Closed):
    """One run: a night (ingest → encode → build → serve), a build or a compaction."""

    format: Literal[1] = 1
    when: dt.datetime  # when the run started (UTC)
    kind: RunKind
    status: Literal["ok", "failed"]
    error: str | None = None  # failed: the message (redacted, at most MAX_ERROR_CHARS)
    failed_stage: str | None = None  # failed: the stage running (plan, ingest, encode, build_index, serve)
    seconds: float  # wall clock of the whole run
    snapshot: str | None = None
    previous_snapshot: str | None = None  # a night: the snapshot it diffed against
    version: str | None = None  # the index version built, or found published
    mode: BuildMode | None = None  # full, delta, current (nothing to build)
    published: bool | None = None  # False: the version was published before (a rerun)
    compacted: bool = False  # the build merged segments (jobs.compact, or a night past the limits)
    retrained: bool | None = None
    rows: Rows = Rows()
    stage_seconds: dict[str, float] = {}  # ingest, encode, build_index, serve (the moving of the Serve app)
    build_seconds: dict[str, float] = {}  # the build's phases: sample, train, add, measure, compact, lexical, ...
    bytes_written: BytesWritten = BytesWritten()
    segments: int | None = None
    tombstones: int | None = None  # dead rows the version's segments still hold
    tombstone_fraction: float | None = None  # tombstones / stored rows
    distortion: float | None = None  # relative quantization error of the version
    reference_distortion: float | None = None  # the error recorded with the last measured recall (manifest)
    max_drift: float | None = None  # index.max_drift: a delta stands while distortion <= reference x (1 + it)
    recall_at_100: float | None = None  # measured by this run (full builds) only
    refined_recall_at_100: float | None = None
    bytes_per_passage: dict[str, float] | None = None  # what a replica stores, by kind (BuildSummary)
    serve_moved: bool | None = None  # None: no Serve app to move (nightly.serve_address unset)
    serve_seconds: float | None = None
    retention: Retention | None = None  # the retention step's outcome (a night with retain.after_night, a gc)

    @property
    def drift_limit(self) -> float | None:
        if self.reference_distortion is None or self.max_drift is None:
            return None
        return self.reference_distortion * (1 + self.max_drift)

    @property
    def full_build(self) -> bool:
        """A version built in full by this run (every live row, recall measured)."""
        return self.mode == "full" and self.published is not False and self.status == "ok"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- writing and reading -------------------------------------------------------------------------------------------
def record_name(record: HistoryRecord) -> str:
    """`<when>-<kind>-<id>.json`: names sort by start time; the random id keeps two runs apart."""
    when = record.when.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{when}-{record.kind}-{uuid.uuid4().hex[:8]}.json"


def append(storage: Storage, record: HistoryRecord) -> str:
    """Write `record` as a new object (never over another); returns its path under storage.root."""
    data = (record.model_dump_json(indent=1) + "\n").encode()
    for _ in range(5):
        rel = history_record(record_name(record))
        if storage.create_exclusive(rel, data):
            return rel
    raise PipelineError(f"{storage.url(HISTORY)}: could not find a free name for a history record")


def record_quietly(storage: Storage | None, make: Callable[[], HistoryRecord]) -> str | None:
    """Build and append a record; a failure is logged, never raised (the run's outcome stands)."""
    try:
        if storage is None:
            raise PipelineError("no storage to write to")
        rel = append(storage, make())
        log.info("recorded in the history: %s", storage.url(rel))
        return rel
    except Exception as exc:  # noqa: BLE001 - the history must not fail a night
        log.warning("could not record this run in the history: %s: %s", type(exc).__name__, exc)
        return None


def read_history(storage: Storage, last: int | None = None) -> tuple[list[HistoryRecord], list[str]]:
    """The last `last` records (all with None), oldest first, and what was skipped (name: why): an object that
    is not a valid record is reported, not fatal."""
    names = [n for n in storage.list_names(HISTORY) if n.endswith(".json")]
    if last is not None:
        names = names[-last:] if last > 0 else []
    records, skipped = [], []
    for name in names:
        try:
            records.append(HistoryRecord.model_validate_json(storage.read_bytes(history_record(name))))
        except (ValidationError, ValueError, FileNotFoundError, PipelineError) as exc:
            reason = str(exc).splitlines()[0][:200]
            log.warning("skipping history record %s: %s", name, reason)
            skipped.append(f"{name}: {reason}")
    records.sort(key=lambda r: r.when)
    return records, skipped


# -- what a record must not hold -----------------------------------------------------------------------------------
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def redact(text: str, config: PipelineConfig | None = None) -> str:
    """The message without URL user info (`s3://key:secret@...`), the credentials of the environment or the
    Serve API key, cut to MAX_ERROR_CHARS."""
    secrets = [os.environ.get(name) for name in SECRET_ENV]
    if config is not None and config.serve.api_key_env:
        secrets.append(os.environ.get(config.serve.api_key_env))
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def error_message(exc: BaseException, config: PipelineConfig | None = None) -> str:
    """As the job's summary says it: a pipeline error's message, else the exception's type and message."""
    message = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
    return redact(message, config)


# -- what a version says about itself ------------------------------------------------------------------------------
def _version_fields(storage: Storage, config: PipelineConfig, built: BuildSummary) -> dict[str, Any]:
    """Segments, tombstones, distortion and its reference, recall (when this run measured it) and bytes per
    passage of the version a build published or found; the stored rows come from its manifest."""
    manifest: IndexManifest | None = None
    with contextlib.suppress(PipelineError, FileNotFoundError, OSError):
        manifest = read_index_manifest(storage, built.version)
    stored = sum(s.rows for s in manifest.segments) if manifest is not None else None
    tombstones = stored - manifest.vectors if manifest is not None else built.tombstones
    if stored is None and built.tombstones is not None:
        stored = built.vectors + built.tombstones
    measured = built.mode == "full" and not built.reused
    return {
        "snapshot": manifest.snapshot if manifest is not None else None,
        "version": built.version,
        "mode": built.mode,
        "published": not built.reused,
        "compacted": not built.reused and "compact" in built.phase_seconds,
        "retrained": built.retrained if not built.reused else False,
        "build_seconds": dict(built.phase_seconds) if not built.reused else {},
        "segments": built.segments,
        "tombstones": tombstones,
        "tombstone_fraction": round(tombstones / stored, 6) if tombstones is not None and stored else None,
        "distortion": built.distortion,
        "reference_distortion": manifest.reference_distortion if manifest is not None else None,
        "max_drift": config.index.max_drift,
        "recall_at_100": built.recall_at_100 if measured else None,
        "refined_recall_at_100": built.refined_recall_at_100 if measured else None,
        "bytes_per_passage": built.bytes_per_passage,
    }


# -- a night ---------------------------------------------------------------------------------------------------------
@dataclass
class NightRun:
    """What a night has done so far, filled in stage by stage, so that a failed night is recorded too."""

    timer: PhaseTimer
    started: dt.datetime = field(default_factory=utcnow)
    clock: float = field(default_factory=time.perf_counter)
    current: str | None = "plan"  # the stage running (None once the night is done)
    stage_clock: float = field(default_factory=time.perf_counter)
    plan: dict[str, Any] | None = None  # nightly/<snapshot>.json: what it diffs against
    ingested: IngestSummary | None = None
    encoded: EncodeSummary | None = None
    built: BuildSummary | None = None
    served: dict[str, Any] | None = None
    retention: Retention | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """A timed stage (the timer's phase); while it runs, it is the one a failure is charged to."""
        self.current, self.stage_clock = name, time.perf_counter()
        with self.timer(name):
            yield
        self.current = None


def _night_bytes(storage: Storage, night: NightRun) -> BytesWritten:
    passages = embeddings = 0
    ingested, encoded = night.ingested, night.encoded
    if ingested is not None and not ingested.reused:
        manifest = storage.read_manifest(snapshot_dir(ingested.snapshot), PassageManifest)
        if manifest is not None:
            passages = sum(e.bytes for e in manifest.files) + (manifest.tombstones.bytes if manifest.tombstones else 0)
    if encoded is not None and encoded.encoded_shards:
        for snapshot in encoded.snapshots_encoded:
            manifest = storage.read_manifest(embeddings_dir(snapshot, encoded.fingerprint), EmbeddingManifest)
            embeddings += sum(e.bytes for e in manifest.files) if manifest is not None else 0
    index = night.built.bytes_written if night.built is not None else 0
    return BytesWritten(passages=passages, embeddings=embeddings, index=index)


def night_entry(
    storage: Storage, config: PipelineConfig, night: NightRun, error: BaseException | None = None
) -> HistoryRecord:
    """The record of a night, finished or failed at `night.current`."""
    stage_seconds = dict(night.timer.seconds)
    if error is not None and night.current and night.current != "plan":
        stage_seconds[night.current] = round(time.perf_counter() - night.stage_clock, 3)
    ingested, encoded, built = night.ingested, night.encoded, night.built
    counts = encoded or ingested  # the encoder's diff, else what ingest saw
    rows = Rows(
        live=ingested.rows if ingested else None,
        new=(encoded.rows if encoded.new is None else encoded.new) if encoded else (ingested.new if ingested else None),
        changed=(counts.changed or 0) if counts else None,
        deleted=(counts.deleted or 0) if counts else None,
        encoded=encoded.rows if encoded else None,
        added=built.added if built else None,
    )
    serving = config.nightly.serve_address is not None
    fields = _version_fields(storage, config, built) if built is not None else {}
    return HistoryRecord(
        when=night.started,
        kind="night",
        status="ok" if error is None else "failed",
        error=error_message(error, config) if error is not None else None,
        failed_stage=night.current if error is not None else None,
        seconds=round(time.perf_counter() - night.clock, 3),
        previous_snapshot=(night.plan or {}).get("previous_snapshot"),
        rows=rows,
        stage_seconds=stage_seconds,
        bytes_written=_night_bytes(storage, night),
        serve_moved=(night.served is not None) if serving and built is not None else None,
        serve_seconds=stage_seconds.get("serve") if serving else None,
        retention=night.retention,
        **{**fields, "snapshot": config.ingest.snapshot},
    )


# -- a build or a compaction ---------------------------------------------------------------------------------------
def build_entry(
    storage: Storage,
    config: PipelineConfig,
    kind: RunKind,
    started: dt.datetime,
    seconds: float,
    built: BuildSummary | None,
    error: BaseException | None = None,
) -> HistoryRecord:
    fields = _version_fields(storage, config, built) if built is not None else {}
    if not fields.get("snapshot"):
        fields["snapshot"] = config.index.snapshot
    return HistoryRecord(
        when=started,
        kind=kind,
        status="ok" if error is None else "failed",
        error=error_message(error, config) if error is not None else None,
        failed_stage="build_index" if error is not None else None,
        seconds=round(seconds, 3),
        rows=Rows(live=built.vectors, added=built.added) if built else Rows(),
        stage_seconds={"build_index": round(seconds, 3)},
        bytes_written=BytesWritten(index=built.bytes_written if built else 0),
        **fields,
    )


def retention_of(summary: dict[str, Any] | None, error: BaseException | None = None, config=None) -> Retention:
    """A retention step's record from `pipeline.ops.retention.run_gc`'s summary, or its failure."""
    if summary is None:
        return Retention(store_bytes=0, error=error_message(error, config) if error is not None else None)
    return Retention(
        kept_versions=summary["kept_versions"],
        dropped_versions=summary["dropped_versions"],
        deleted_objects=summary["deleted_objects"],
        deleted_bytes=summary["deleted_bytes"],
        store_bytes=summary["store_bytes_after"],
    )


def gc_entry(
    config: PipelineConfig,
    started: dt.datetime,
    seconds: float,
    summary: dict[str, Any] | None,
    error: BaseException | None = None,
) -> HistoryRecord:
    """The record of a `jobs.gc` run."""
    return HistoryRecord(
        when=started,
        kind="gc",
        status="ok" if error is None else "failed",
        error=error_message(error, config) if error is not None else None,
        failed_stage="retain" if error is not None else None,
        seconds=round(seconds, 3),
        stage_seconds={"retain": round(seconds, 3)},
        retention=retention_of(summary, error, config),
    )


def recorded(
    kind: RunKind, body: Callable[[PipelineConfig], BuildSummary]
) -> Callable[[PipelineConfig], BuildSummary | dict[str, Any]]:
    """`body` (run_build_index, run_compact) with its run recorded when it publishes a version or fails; a run
    that finds its version published already is not recorded. The summary then names the record (`history`)."""

    def run(config: PipelineConfig) -> BuildSummary | dict[str, Any]:
        started, clock = utcnow(), time.perf_counter()
        try:
            built = body(config)
        except Exception as exc:
            storage = _storage_or_none(config)
            seconds = time.perf_counter() - clock
            record_quietly(storage, functools.partial(build_entry, storage, config, kind, started, seconds, None, exc))
            raise
        if built.reused:
            return built
        storage = _storage_or_none(config)
        name = record_quietly(
            storage, lambda: build_entry(storage, config, kind, started, time.perf_counter() - clock, built)
        )
        return {**built.model_dump(mode="json"), "history": name}

    return run


def _storage_or_none(config: PipelineConfig) -> Storage | None:
    try:
        return Storage(config.storage.root, config.storage.options)
    except Exception as exc:  # noqa: BLE001 - reported by record_quietly's caller as "no storage"
        log.warning("no storage for the history record: %s", exc)
        return None
