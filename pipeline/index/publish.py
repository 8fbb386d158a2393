"""Publication and version identity: a version's name is a hash of its inputs and settings (so a rerun finds its
own published work), what is new is uploaded, the manifest is created with a conditional write (of two runs racing
to publish one version exactly one does), then `indexes/LATEST` moves. Also which published version a build can
add to (`compatible_previous`)."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.config import IndexConfig
from pipeline.errors import PipelineError
from pipeline.index.build import Built
from pipeline.primitives import BuildSummary
from pipeline.store.layout import INDEX_MANIFEST, INDEXES, latest_snapshot, point_latest, read_latest, version_dir
from pipeline.store.manifests import EmbeddingManifest, FileEntry, IndexManifest, SegmentEntry
from pipeline.store.segments import SEGMENT_FILES, TOMBSTONES_FILE, LocalSegment, footprint, segments_of, upload_once
from pipeline.store.snapshots import Link, npy_bytes
from pipeline.store.storage import Storage, sha256_file

log = logging.getLogger(__name__)


def publish(
    storage: Storage,
    version: str,
    built: Built,
    previous_files: dict[str, FileEntry],
    lexical: dict[str, FileEntry] | None,
    lineage: dict[str, Any],
) -> tuple[IndexManifest | None, int]:
    """Upload what is new (segments and quantizer are content-addressed: what exists is not written again), the
    tombstones, then the manifest (sha256 of every file the version needs), then LATEST: a version is complete or
    invisible. The manifest is created with a conditional write: of two runs racing to publish one version, one
    wins and the other gets None. Returns (manifest, bytes written)."""
    quantizer, written = shared_file(storage, built.quantizer, ".faiss")
    entries = [quantizer]
    sq8 = None
    if built.sq8 is not None:
        sq8, size = shared_file(storage, built.sq8, ".sq8.npy")
        entries.append(sq8)
        written += size
    segments = []
    for segment in built.segments:
        if isinstance(segment, LocalSegment):
            name = segment.name
            for file, path in sorted(segment.paths.items()):
                entry, size = upload_once(storage, path, posixpath.join(name, file))
                entries.append(entry)
                written += size
            segments.append(SegmentEntry(name=name, seq=segment.seq, rows=segment.rows))
        else:
            # (its vectors and token ids when it has them)
            entries += [previous_files[segment.file(n)] for n in SEGMENT_FILES if segment.file(n) in previous_files]
            segments.append(SegmentEntry(name=segment.name, seq=segment.seq, rows=segment.rows))
    tombstones = None
    if len(built.dead):
        tombstones = posixpath.join(version, TOMBSTONES_FILE)
        data = npy_bytes(np.sort(built.dead).astype(np.int64))
        entries.append(
            FileEntry(
                name=tombstones,
                bytes=len(data),
                sha256=storage.write_bytes(posixpath.join("indexes", tombstones), data),
            )
        )
        written += len(data)
    entries += list({e.name: e for e in (lexical or {}).values()}.values())  # uploaded by build_lexical, by content
    manifest = storage.write_manifest(
        posixpath.join("indexes", version),
        IndexManifest(
            files=entries,
            version=version,
            quantizer=quantizer.name,
            segments=segments,
            tombstones=tombstones,
            sq8=sq8.name if sq8 is not None else None,
            lexical={name: entry.name for name, entry in lexical.items()} if lexical is not None else None,
            **lineage,
        ),
        name=INDEX_MANIFEST,
        exclusive=True,
    )
    if manifest is None:
        log.warning("index %s was published by another run meanwhile: not publishing it again", version)
        return None, written
    point_latest(storage, INDEXES, version)
    return manifest, written


def shared_file(storage: Storage, built: str | FileEntry, suffix: str) -> tuple[FileEntry, int]:
    """A file versions share (the quantizer, its sq8 ranges): uploaded under `quantizers/<sha16><suffix>` when this
    run trained it (a local path), else the published entry it reused; (its entry, bytes written)."""
    if isinstance(built, FileEntry):
        return built, 0
    return upload_once(storage, built, f"quantizers/{sha256_file(built)[:16]}{suffix}")


def find_embeddings(storage: Storage, config: IndexConfig) -> tuple[str, str]:
    """(snapshot, fingerprint): the configured ones, else the newest published encode of the snapshot."""
    snapshot = config.snapshot or latest_snapshot(storage)
    base = posixpath.join("embeddings", snapshot)
    candidates = [config.fingerprint] if config.fingerprint else storage.list_names(base)
    published = [
        (m, name)
        for name in candidates
        if (m := storage.read_manifest(posixpath.join(base, name), EmbeddingManifest)) is not None
    ]
    if not published:
        raise PipelineError(
            f"no published embeddings under {storage.url(base)}"
            f"{'/' + config.fingerprint if config.fingerprint else ''}: run jobs.encode first"
        )
    return snapshot, max(published, key=lambda item: item[0].created_at)[1]


def settings_digest(config: IndexConfig) -> str:
    """What, besides the vectors, decides a version's content."""
    return hashlib.sha256(
        json.dumps(
            {
                "factory": config.factory,
                "nprobe": config.nprobe,
                "train_size": config.train_size,
                "queries": config.queries,
                "seed": config.seed,
                "keep_vectors": config.keep_vectors,
                "refine_k": config.refine_k,
                # (only when sq8: versions built before it keep their names and their deltas)
                **({"refine_codes": config.refine_codes} if config.refine_codes != "fp16" else {}),
                "lexical": config.lexical,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]


def index_version(
    snapshot: str,
    links: Sequence[Link],
    config: IndexConfig,
    on: str | None = None,
    question_model: str | None = None,
    tokenizer: str | None = None,
) -> str:
    """Same inputs and settings → same version, so a rerun finds its own published work; the question encoder the
    version pairs with and the reader tokenizer its token ids are for are part of it (versions without them keep
    their names)."""
    paired = {"question_model": question_model} if question_model else {}
    paired |= {"tokenizer": tokenizer} if tokenizer else {}
    digest = hashlib.sha256(
        json.dumps(
            {
                **paired,
                "embeddings": [(link.snapshot, [(e.name, e.sha256) for e in link.embeddings.files]) for link in links],
                "tombstones": [link.tombstones.tobytes().hex()[:64] + str(len(link.tombstones)) for link in links],
                "settings": settings_digest(config),
                "on": on,
                "compact": config.compact,
                "segment_vectors": config.segment_vectors,  # how the rows are cut into segments (and so shards)
                "max_segments": config.max_segments,
                "max_tombstone_fraction": config.max_tombstone_fraction,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    return f"{snapshot}-{digest[:10]}"


def compatible_previous(
    storage: Storage, config: IndexConfig, embeddings: EmbeddingManifest
) -> tuple[str, IndexManifest] | None:
    """The published version, when it was built for the same encoder, dimension and factory (vectors of another
    model live in another space) in the segmented format."""
    if not config.reuse_trained:
        return None
    version = read_latest(storage, INDEXES)
    if version is None:
        return None
    try:
        manifest = storage.read_manifest(version_dir(version), IndexManifest, name=INDEX_MANIFEST)
    except PipelineError as exc:  # e.g. a version of an older format: build anew rather than on it
        log.warning("not building on the published version %s: %s", version, exc)
        return None
    if manifest is None or (manifest.fingerprint, manifest.factory, manifest.dim) != (
        embeddings.fingerprint,
        config.factory,
        embeddings.dim,
    ):
        return None
    return version, manifest


def reused_summary(storage: Storage, version: str, manifest: IndexManifest) -> BuildSummary:
    """The summary of a version published earlier (by this run's inputs, or one that already indexes them)."""
    point_latest(storage, INDEXES, version)
    seconds = dict(manifest.seconds or {})
    recorded = ("vectors", "distortion", "bytes_per_vector", "retrained", "trained_from")
    recall = ("recall_at_10", "recall_at_100", "refined_recall_at_10", "refined_recall_at_100")
    return BuildSummary(
        **{field: getattr(manifest, field) for field in recorded + recall},
        version=version,
        output=storage.url("indexes", version),
        mode="current",
        segments=len(segments_of(manifest)),
        tombstones=None,
        added=0,
        bytes_written=0,
        train_seconds=seconds.get("train", 0.0),
        add_seconds=seconds.get("add", 0.0),
        phase_seconds=seconds,
        reused=True,
        bytes_per_passage=footprint(manifest),
    )
