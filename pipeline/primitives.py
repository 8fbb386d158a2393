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
    bytes_written: int
    train_seconds: float
    add_seconds: float
    phase_seconds: dict[str, float]
    retrained: bool
    trained_from: str | None
    reused: bool  # published before (by this run's inputs, or one that already indexes them)
    add_nodes: int = 0
    driver_peak_rss: int | None = None
