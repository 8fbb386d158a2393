"""The ingress's side of a sharded index (`serve.shards`): every search goes to each Retriever shard at once (and
to the BM25 deployment for sparse and hybrid searches), the per-question top-k lists are merged, and one index
version answers the whole response.

Shards move to a new version one after another (each loads it beside the current one). Each answers with the
version it used and the versions it has loaded (its current and the one before); when they disagree, the ingress
asks every shard again for the version that all of them have, so a response never mixes versions and no request
fails because a swap is under way. Replicas replaced rather than reconfigured (`serve.run` rolls new ones in) have
only the new version: the ingress asks again until every shard answers from one version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pipeline.errors import PipelineError

Hit = dict[str, Any]
PATIENCE_S = 30.0  # how long a search waits for shards to agree (a rolling replacement of replicas, say)


class ShardsDisagree(PipelineError):
    """The shards have no index version in common (a second swap overtook the first): answered with a 503."""


class ShardUnavailable(PipelineError):
    """An index shard did not answer in time (all its replicas down, or overloaded): a 503 naming it, never a
    partial answer presented as whole."""


def retriever_names(shards: int) -> list[str]:
    """The Serve deployment names of the index shards (the nightly sets each one's `user_config`)."""
    return ["Retriever"] if shards == 1 else [f"Retriever{shard}" for shard in range(shards)]


def merge_hits(per_shard: Sequence[list[Hit]], k: int) -> list[Hit]:
    """One question's hits from every shard: the k best, ties to the smaller FAISS id (pure)."""
    return sorted((hit for hits in per_shard for hit in hits), key=lambda hit: (-hit["score"], hit["key"]))[:k]


def agreed_version(found: Sequence[dict[str, Any]]) -> str | None:
    """None when every shard answered from the same version; else the version to ask all of them for: the one
    loaded on every shard that most shards answered from (pure)."""
    used = [f["index_version"] for f in found]
    if len(set(used)) == 1:
        return None
    common = set(found[0]["loaded"]).intersection(*(f["loaded"] for f in found[1:]))
    if not common:
        raise ShardsDisagree(f"index shards have no version in common (they answered from {sorted(set(used))})")
    return max(common, key=lambda version: (used.count(version), version))


async def agree(
    calls: Sequence[Callable[[str | None], Awaitable[dict[str, Any]]]], patience_s: float = PATIENCE_S
) -> list[dict[str, Any]]:
    """Ask every source at once (`call(version)`, None = its current version: the index shards, and the BM25
    index for sparse and hybrid searches) until they all answer from one version; their answers. A source asked
    for a version it lacks answers from its current one; they are asked again until they agree (`patience_s`)."""
    deadline = time.monotonic() + patience_s
    version: str | None = None
    while True:
        found = await asyncio.gather(*(call(version) for call in calls))
        try:
            version = agreed_version(found)
        except ShardsDisagree:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # replicas are being replaced: the new ones have only the new version
            version = None
            continue
        if version is None:
            return list(found)
        if time.monotonic() > deadline:
            raise ShardsDisagree(f"index shards did not all answer from {version} within {patience_s:.0f}s")


def started_first(started: Awaitable[dict[str, Any]], call: Callable[[str | None], Awaitable[dict[str, Any]]]):
    """`call` for `agree`, whose first ask for the current version is `started`: a search already sent (BM25,
    while the question encoder ran); every later ask, or one naming a version, calls again."""
    first = [started]

    def ask(version: str | None) -> Awaitable[dict[str, Any]]:
        return first.pop() if version is None and first else call(version)

    return ask


def merged(found: Sequence[dict[str, Any]], k: int) -> list[list[Hit]]:
    """Each question's k best hits over the shards' answers (pure)."""
    return [merge_hits([f["results"][q] for f in found], k) for q in range(len(found[0]["results"]))]
