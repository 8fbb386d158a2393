"""The contracts between stages: one typed manifest per kind of published directory, validated on read.

A manifest is written after every object it lists and names each with its size and sha256; a reader trusts
nothing else. Fields are closed (`extra="forbid"`): a misspelt or unknown field is an error naming the file, never
a silent None.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FileEntry(Contract):
    """One object a manifest vouches for."""

    name: str
    bytes: int
    sha256: str
    rows: int | None = None
    source: str | None = None  # passage shard: the input file its rows came from
    source_sha256: str | None = None  # embedding shard: sha256 of the passage shard it encodes
    encoded: int | None = None  # embedding shard: rows that went through the model (the others were carried)


class Manifest(Contract):
    """What every manifest has: its kind, when it was written, and the objects it lists."""

    kind: str
    created_at: str = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    files: list[FileEntry]
    rows: int | None = None

    def model_post_init(self, context: Any) -> None:
        if self.rows is None and any(f.rows is not None for f in self.files):
            self.rows = sum(f.rows or 0 for f in self.files)


class PassageManifest(Manifest):
    """`passages/<snapshot>/_manifest.json`: a full snapshot, or a delta on `base` (its new and changed rows, and
    the keys of the ids it removes in `tombstones`)."""

    kind: Literal["passages"] = "passages"
    snapshot: str
    source: dict[str, Any]  # the input, its files (size, ETag or mtime) and the base the diff was made against
    content_hash: str
    schema_: dict[str, str] = Field(alias="schema")
    quarantine: list[dict[str, Any]] = []
    base: str | None = None
    depth: int = 0  # deltas since the last full snapshot
    live_rows: int
    tombstones: FileEntry | None = None
    diff: dict[str, int] | None = None  # new, changed, deleted, unchanged (deltas)


class EmbeddingManifest(Manifest):
    """`embeddings/<snapshot>/<fingerprint>/_manifest.json`: one shard per passage shard, same names."""

    kind: Literal["embeddings"] = "embeddings"
    snapshot: str
    fingerprint: str
    dim: int
    encoder: dict[str, Any]  # the EncoderSettings and the compute dtype
    base: str | None = None
    embedding_dtype: str
    passages_manifest: str  # created_at of the passage manifest encoded
    carried_from: str | None = None
    quarantine: list[dict[str, Any]] = []


class SegmentEntry(Contract):
    name: str  # segments/<seq>-<hash16>
    seq: int
    rows: int


class IndexManifest(Manifest):
    """`indexes/<version>/manifest.json`: a quantizer, segments and tombstones, with the version's lineage."""

    kind: Literal["index"] = "index"
    version: str
    quantizer: str
    segments: list[SegmentEntry]
    tombstones: str | None = None
    lexical: dict[str, str] | None = None  # the BM25 index: tantivy file name → object name (listed in files)
    # 2: the BM25 index holds only passage keys (text read from the docstores); 1: it stores id, title and text too
    lexical_format: Literal[1, 2] = 1
    tokenizer: dict[str, str] | None = None  # the reader tokenizer (model, fingerprint) of the segments' token ids
    snapshot: str
    embeddings: str
    fingerprint: str
    encoder: dict[str, Any]
    dim: int
    factory: str
    metric: str
    nprobe: int
    settings: str
    train_size: int
    vectors: int
    queries: int
    recall_at_10: float
    recall_at_100: float
    refine_k: int = 0  # IVF-PQ candidates re-scored exactly (0: searched without refine)
    sq8: str | None = None  # the 8-bit quantizer of segments' kept vectors (vectors_sq8.npy), listed in files
    refined_recall_at_10: float | None = None  # the recall that refine_k gives
    refined_recall_at_100: float | None = None
    reference_distortion: float | None = None
    distortion: float | None = None
    bytes_per_vector: float
    passages_manifest: str
    seconds: dict[str, float]
    trained_from: str | None = None
    retrained: bool
    built_on: str | None = None
    mode: Literal["full", "delta"]
