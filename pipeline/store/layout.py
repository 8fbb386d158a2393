"""The storage layout under `storage.root`, in one place: where each stage's directories live and the `LATEST`
pointers (`passages/LATEST`, `indexes/LATEST`), which are moved only after the manifest they point at exists.

    passages/<snapshot>/                    passage shards, _manifest.json (and _tombstones.npy for a delta)
    embeddings/<snapshot>/<fingerprint>/    embedding shards, _progress.json, _manifest.json
    indexes/quantizers/, indexes/segments/  shared, content-addressed
    indexes/<version>/manifest.json         an index version (and its tombstones.npy)
    nightly/<snapshot>.json                 what a night diffs against
    nightly/history/<when>-<kind>-<id>.json one record per night, build or compaction (pipeline.ops.history)
    nightly/report.html                     `jobs.report`'s default output when storage.root is local
"""

from __future__ import annotations

import posixpath

from pipeline.errors import PipelineError
from pipeline.store.manifests import IndexManifest
from pipeline.store.storage import Storage

PASSAGES, EMBEDDINGS, INDEXES = "passages", "embeddings", "indexes"
INDEX_MANIFEST = "manifest.json"


def snapshot_dir(snapshot: str) -> str:
    return posixpath.join(PASSAGES, snapshot)


def embeddings_dir(snapshot: str, fingerprint: str) -> str:
    return posixpath.join(EMBEDDINGS, snapshot, fingerprint)


def version_dir(version: str) -> str:
    return posixpath.join(INDEXES, version)


def nightly_record(snapshot: str) -> str:
    return posixpath.join("nightly", f"{snapshot}.json")


HISTORY = posixpath.join("nightly", "history")  # one object per record: object stores have no append


def history_record(name: str) -> str:
    return posixpath.join(HISTORY, name)


def history_report() -> str:
    return posixpath.join("nightly", "report.html")


def read_latest(storage: Storage, area: str) -> str | None:
    """The name `<area>/LATEST` points at, or None before the first publication."""
    try:
        return storage.read_bytes(posixpath.join(area, "LATEST")).decode().strip()
    except FileNotFoundError:
        return None


def point_latest(storage: Storage, area: str, name: str) -> None:
    """Move `<area>/LATEST` (one object written whole): only after what it names is published."""
    storage.write_bytes(posixpath.join(area, "LATEST"), f"{name}\n".encode())


def latest_snapshot(storage: Storage) -> str:
    snapshot = read_latest(storage, PASSAGES)
    if snapshot is None:
        raise PipelineError(f"no passage snapshot under {storage.url(PASSAGES)}: run jobs.ingest first")
    return snapshot


def published_version(storage: Storage, version: str | None = None) -> str:
    """`version`, or the one `indexes/LATEST` names."""
    version = version or read_latest(storage, INDEXES)
    if version is None:
        raise PipelineError(f"no published index under {storage.url(INDEXES)}: run jobs.build_index")
    return version


def read_index_manifest(storage: Storage, version: str) -> IndexManifest:
    manifest = storage.read_manifest(version_dir(version), IndexManifest, name=INDEX_MANIFEST)
    if manifest is None:
        raise PipelineError(f"index version {version!r} is not published ({storage.url(INDEXES, version)})")
    return manifest


def published_index(storage: Storage) -> IndexManifest | None:
    """The manifest of the version `indexes/LATEST` names, or None when nothing is published yet."""
    version = read_latest(storage, INDEXES)
    return read_index_manifest(storage, version) if version else None
