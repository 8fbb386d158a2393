"""The ingress's merge over index shards and its choice of one version, without Ray (pure)."""

import asyncio

import pytest

from pipeline.segments import SegmentRef, assign_segments
from pipeline.serve.fanout import (
    PATIENCE_S,
    ShardsDisagree,
    agree,
    agreed_version,
    merge_hits,
    merged,
    started_first,
)


def test_segments_are_balanced_by_vectors_and_big_ones_stay_put():
    segments = [SegmentRef(f"s{seq}", seq, rows) for seq, rows in [(1, 500), (2, 500), (3, 400), (4, 100), (5, 90)]]
    owner = assign_segments(segments, 3)
    load = [sum(s.rows for s in segments if owner[s.seq] == shard) for shard in range(3)]
    assert sorted(load) == [500, 500, 590] and owner[1] == 0 and owner[2] == 1
    nightly = [*segments, SegmentRef("s6", 6, 30)]  # a delta segment: the others keep their shard
    assert {seq: shard for seq, shard in assign_segments(nightly, 3).items() if seq != 6} == owner
    assert set(assign_segments(segments, 1).values()) == {0}
    assert assign_segments(segments[:1], 3) == {1: 0}  # more shards than segments: the others serve nothing


def test_merge_keeps_the_k_best_ties_to_the_smaller_key():
    a = [{"id": "a", "score": 0.9, "key": 7}, {"id": "b", "score": 0.5, "key": 3}]
    b = [{"id": "c", "score": 0.9, "key": 2}, {"id": "d", "score": 0.1, "key": 1}]
    assert [h["id"] for h in merge_hits([a, b], 3)] == ["c", "a", "b"]
    assert merge_hits([[], []], 5) == []


def test_one_version_for_the_whole_response():
    same = [{"index_version": "v1", "loaded": ["v1"]}, {"index_version": "v1", "loaded": ["v1", "v0"]}]
    assert agreed_version(same) is None
    moving = [
        {"index_version": "v2", "loaded": ["v2", "v1"]},
        {"index_version": "v1", "loaded": ["v1", "v0"]},
        {"index_version": "v2", "loaded": ["v2", "v1"]},
    ]
    assert agreed_version(moving) == "v1"  # the only version every shard has
    both = [{"index_version": "v2", "loaded": ["v2", "v1"]}, {"index_version": "v1", "loaded": ["v1", "v2"]}]
    assert agreed_version(both) == "v2"  # ties: the newer name
    with pytest.raises(ShardsDisagree, match="no version in common"):
        agreed_version([{"index_version": "v3", "loaded": ["v3", "v2"]}, {"index_version": "v1", "loaded": ["v1"]}])


def _search(call, shards: int, patience_s: float = PATIENCE_S) -> tuple[str, list]:
    """Every shard asked through `agree`, as the ingress does: (the version, the merged top-5 per question)."""

    def asking(shard):
        return lambda version: call(shard, ([[0.0]], 5) if version is None else ([[0.0]], 5, version))

    found = asyncio.run(agree([asking(shard) for shard in range(shards)], patience_s))
    return found[0]["index_version"], merged(found, 5)


def test_shards_mid_swap_are_asked_again_for_the_version_they_share():
    """Shard 1 has moved to v2; the first answers disagree, so every shard is asked for v1 explicitly."""
    versions = {0: ("v1", ["v1"]), 1: ("v2", ["v2", "v1"])}
    calls = []

    async def call(shard, request):
        calls.append((shard, request[2] if len(request) > 2 else None))
        used, loaded = versions[shard]
        used = request[2] if len(request) > 2 and request[2] in loaded else used
        hits = [{"id": f"{used}-{shard}", "score": 1.0 - shard / 10, "key": shard}]
        return {"index_version": used, "loaded": loaded, "results": [hits]}

    version, results = _search(call, 2)
    assert version == "v1"
    assert [h["id"] for h in results[0]] == ["v1-0", "v1-1"]
    assert calls == [(0, None), (1, None), (0, "v1"), (1, "v1")]


def test_shards_replaced_rather_than_reconfigured_are_asked_until_they_agree():
    """Shard 0's new replica has only v2 while shard 1 still has only v1: no common version, so the search waits
    for the replacement to reach shard 1 and answers from v2, never from both."""
    state = {"calls": 0}

    async def call(shard, request):
        state["calls"] += 1
        moved = shard == 0 or state["calls"] > 6
        version = "v2" if moved else "v1"
        return {"index_version": version, "loaded": [version], "results": [[{"score": 1.0, "key": shard}]]}

    version, _ = _search(call, 2)
    assert version == "v2" and state["calls"] > 6

    async def stuck(shard, request):  # never converges: a 503 after the patience, not a mixed answer
        version = "v2" if shard == 0 else "v1"
        return {"index_version": version, "loaded": [version], "results": [[{"score": 1.0, "key": shard}]]}

    with pytest.raises(ShardsDisagree, match="no version in common"):
        _search(stuck, 2, 0.3)


def test_a_search_sent_before_encoding_is_the_first_answer_and_a_version_is_asked_again():
    """BM25 is asked while the questions are encoded: `agree` takes that answer first; when the dense shard has
    moved on, BM25 is asked again for the version they share."""
    asked = []

    async def lexical(version):
        asked.append(version)
        used = version or "v1"
        return {"index_version": used, "loaded": ["v1", "v2"], "results": [[]]}

    async def shard(version):
        return {"index_version": version or "v2", "loaded": ["v2", "v1"], "results": [[]]}

    async def search():
        early = asyncio.ensure_future(lexical(None))
        await asyncio.sleep(0)  # the encoder's turn: the BM25 search is already under way
        assert asked == [None]
        return await agree([shard, started_first(early, lexical)])

    found = asyncio.run(search())
    assert [f["index_version"] for f in found] == ["v2", "v2"]
    assert asked == [None, "v2"]  # the early search, then the shared version: never a third call for None
