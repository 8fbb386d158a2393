"""The ingress's side of one version per response: every part of the app that depends on the version (the question
encoder, each Retriever shard, the BM25 index) is asked for the version the app is set to, and the answers are
used only when all of them come from one version. The question encoder is asked first; the index parts are asked
for the version the encoder answered from, so question vectors always meet the index they were made for.

A part that does not hold the version asked for starts loading it and answers from the one it was asked for last
(`pipeline.serve.versions`), saying what it holds. While a new version moves in, answers may come from two
versions: the ingress then asks every part for the newest version they all hold, the one set or else the one it
answered from before, so no request fails and none mixes versions. Shards' hits are merged per question.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pipeline.errors import PipelineError
from pipeline.primitives import Hit

PATIENCE_S = 30.0  # how long a request waits for the parts to hold a version it may answer from


class ShardsDisagree(PipelineError):
    """The parts of the app hold no version a request may answer from (the one set, or the one answered before)
    within the patience: a 503 naming what each part answered from and why a version was refused."""

    def __init__(self, message: str, refused: str | None = None):
        super().__init__(message)
        self.refused = refused  # why a part refused the version set, when one did


class ShardUnavailable(PipelineError):
    """An index shard did not answer in time (all its replicas down, or overloaded): a 503 naming it, never a
    partial answer presented as whole."""


def retriever_names(shards: int) -> list[str]:
    """The Serve deployment names of the index shards."""
    return ["Retriever"] if shards == 1 else [f"Retriever{shard}" for shard in range(shards)]


def merge_hits(per_shard: Sequence[list[Hit]], k: int) -> list[Hit]:
    """One question's hits from every shard: the k best, ties to the smaller FAISS id (pure)."""
    return sorted((hit for hits in per_shard for hit in hits), key=lambda hit: (-hit["score"], hit["key"]))[:k]


def depth_of(k: int, mode: str, hybrid_depth: int) -> int:
    """How deep a request's rankings are searched: its k, and for hybrid at least the fusion's depth (pure)."""
    return max(k, hybrid_depth) if mode == "hybrid" else k


def searches(
    requests: Sequence[tuple[list[str], int, str]], hybrid_depth: int
) -> dict[int, tuple[list[int], list[int]]]:
    """One batch's searches: depth -> (the questions searched densely at that depth, those searched by BM25), as
    positions in the batch's questions, request after request (pure). Each request is searched at its own depth,
    whatever else its batch asks: a top-k is not the head of a deeper top-k where scores tie at its end (an index
    keeps the tied hits it met first), nor is a fusion of deeper rankings the same fusion, so a request answers in a
    batch exactly as alone."""
    groups: dict[int, tuple[list[int], list[int]]] = {}
    position = 0
    for asked, k, mode in requests:
        dense, sparse = groups.setdefault(depth_of(k, mode, hybrid_depth), ([], []))
        at = range(position, position + len(asked))
        dense.extend(at if mode != "sparse" else ())
        sparse.extend(at if mode != "dense" else ())
        position += len(asked)
    return groups


def refusal(found: Sequence[dict[str, Any]], version: str | None) -> str | None:
    """Why a part refused `version`, when one did (pure)."""
    return next((f["refused"][version] for f in found if version in f.get("refused", {})), None)


def next_version(found: Sequence[dict[str, Any]], want: str, fallback: str | None) -> str | None:
    """None when the answers may be used: all from one version, the one set or the one answered before. Else the
    version to ask every part for: `want` when every part holds it and none refused it, else `fallback` when every
    part holds it. ShardsDisagree when neither is held everywhere yet, or `want` was refused with no fallback
    (pure)."""
    used = {f["index_version"] for f in found}
    if len(used) == 1 and used <= {want, fallback}:
        return None
    refused = refusal(found, want)
    for candidate in ([] if refused else [want]) + ([fallback] if fallback else []):
        if all(candidate in f["loaded"] for f in found):
            return candidate
    if refused:
        raise ShardsDisagree(
            f"index version {want} was refused ({refused}) and no other version is held everywhere", refused
        )
    raise ShardsDisagree(
        f"the app's parts answered from {sorted(used)}; none holds {want} everywhere yet"
        + (f" nor {fallback}" if fallback else "")
    )


async def agree(
    ask: Callable[[str], Awaitable[list[dict[str, Any]]]],
    want: str,
    fallback: str | None = None,
    patience_s: float = PATIENCE_S,
) -> list[dict[str, Any]]:
    """`ask(version)` every part, again until the answers come from one version they may (`next_version`); a
    version still loading is waited for up to `patience_s`, a refused one is not."""
    deadline = time.monotonic() + patience_s
    version = want
    while True:
        found = await ask(version)
        try:
            chosen = next_version(found, want, fallback)
        except ShardsDisagree:
            if refusal(found, want) and not fallback or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # a version loading on some part: it answers from it once held
            continue
        if chosen is None:
            return list(found)
        if time.monotonic() > deadline:
            raise ShardsDisagree(f"the app's parts did not all answer from {chosen} within {patience_s:.0f}s")
        version = chosen


def started_first(
    started: Awaitable[dict[str, Any]], version: str, call: Callable[[str], Awaitable[dict[str, Any]]]
) -> Callable[[str], Awaitable[dict[str, Any]]]:
    """`call(asked)`, except that the first ask for `version` is `started`: a search already sent (BM25, while the
    question encoder ran)."""
    first = [started]

    def ask(asked: str) -> Awaitable[dict[str, Any]]:
        return first.pop() if asked == version and first else call(asked)

    return ask


def merged(found: Sequence[dict[str, Any]], k: int) -> list[list[Hit]]:
    """Each question's k best hits over the shards' answers (pure)."""
    return [merge_hits([f["results"][q] for f in found], k) for q in range(len(found[0]["results"]))]
