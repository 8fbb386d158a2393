"""The typed items that cross modules: a search hit, the calls the Serve ingress makes of its versioned
deployments, the kinds of build, and job summaries read by other jobs. A leaf: it imports no pipeline module.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict

# One passage found for a question: id, title, text, score (and `key`, its FAISS id, inside the app).
Hit = dict[str, Any]

# How an index version was made: one new segment on the published quantizer, every live row, or nothing to do.
BuildMode = Literal["full", "delta", "current"]

# What a history record (pipeline.ops.history) was written by: a nightly run, `jobs.build_index`, `jobs.compact`.
RunKind = Literal["night", "build", "compact", "gc"]

# The QA app's ingress deployment (`pipeline.serve.app.QAService`), whose user_config sets the whole app's version.
INGRESS = "QAService"


class EncodeCall(NamedTuple):
    """Questions for the question encoder, and the version whose question encoder should answer."""

    questions: list[str]
    version: str


class ShardSearch(NamedTuple):
    """Question vectors for an index shard: the k best of `version`, when the shard holds it."""

    vectors: np.ndarray
    k: int
    version: str


class LexicalSearch(NamedTuple):
    """Questions for the BM25 index: the k best of `version`, when it is held."""

    questions: list[str]
    k: int
    version: str


class _Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChangeCounts(_Summary):
    """A snapshot against the one before it (passage ids and content hashes): None on a first snapshot."""

    new: int | None = None
    changed: int | None = None
    deleted: int | None = None
    unchanged: int | None = None


class IngestSummary(ChangeCounts):
    """What `jobs.ingest` reports, and what the nightly reads of it."""

    rows: int  # live passages of the snapshot
    written_rows: int
    shards: int
    snapshot: str
    base: str | None
    reused: bool  # the snapshot was ingested before from the same source
    bad_rows: int
    quarantine: list[dict[str, Any]]
    output: str


class EncodeSummary(ChangeCounts):
    """What `jobs.encode` reports, and what the nightly reads of it."""

    rows: int  # passages encoded by this run
    reused: int  # live passages whose vectors were there already
    shards: int
    encoded_shards: int
    retried_shards: int
    quarantine: list[dict[str, Any]]
    dim: int
    device: str
    passages_per_s: float
    fingerprint: str
    previous_snapshot: str | None
    output: str
    snapshots_encoded: list[str]


class BuildSummary(BaseModel):
    """What `jobs.build_index` (and `jobs.compact`) reports, and what the nightly reads of it."""

    model_config = ConfigDict(extra="forbid")

    version: str
    output: str
    vectors: int
    mode: BuildMode
    segments: int
    tombstones: int | None
    added: int
    recall_at_10: float
    recall_at_100: float
    refined_recall_at_10: float | None = None
    refined_recall_at_100: float | None = None
    distortion: float | None
    bytes_per_vector: float
    bytes_per_passage: dict[str, float] | None = None  # what a replica stores, by kind (segments.footprint)
    bytes_written: int
    train_seconds: float
    add_seconds: float
    phase_seconds: dict[str, float]
    retrained: bool
    trained_from: str | None
    reused: bool  # published before (by this run's inputs, or one that already indexes them)
    add_nodes: int = 0
    driver_peak_rss: int | None = None
