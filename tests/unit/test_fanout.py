"""The ingress's merge over index shards and its choice of one version, without Ray (pure)."""

import asyncio
import time

import pytest

from pipeline.serve.fanout import (
    PATIENCE_S,
    ShardsDisagree,
    agree,
    merge_hits,
    merged,
    next_version,
    refusal,
    searches,
    started_first,
)
from pipeline.store.segments import SegmentRef, assign_segments


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


def test_each_request_is_searched_at_its_own_depth_whatever_its_batch_asks():
    requests = [(["a"], 5, "dense"), (["b", "c"], 5, "hybrid"), (["d"], 5, "sparse"), (["e"], 120, "hybrid")]
    requests += [(["f"], 5, "dense")]
    # dense k=5: a, f; hybrid: at least the fusion's depth (100), or its own k past it; sparse k=5: d
    assert searches(requests, hybrid_depth=100) == {5: ([0, 5], [3]), 100: ([1, 2], [1, 2]), 120: ([4], [4])}
    assert searches([(["a"], 5, "sparse")], hybrid_depth=100) == {5: ([], [0])}
    assert searches([], hybrid_depth=100) == {}


def _part(used: str, loaded: list[str], refused: dict[str, str] | None = None, **fields) -> dict:
    return {"index_version": used, "loaded": loaded, "refused": refused or {}, **fields}


def test_answers_are_used_only_from_the_version_set_or_the_one_answered_before():
    assert next_version([_part("v2", ["v2"]), _part("v2", ["v2", "v1"])], "v2", "v1") is None
    assert next_version([_part("v1", ["v1"]), _part("v1", ["v2", "v1"])], "v2", "v1") is None  # v2 still loading
    # one part has v2, another not yet: every part is asked for v1, which all hold
    assert next_version([_part("v2", ["v1", "v2"]), _part("v1", ["v1"])], "v2", "v1") == "v1"
    # all hold v2 now, but one answered from v1 (asked before it held v2): all are asked for v2
    assert next_version([_part("v2", ["v1", "v2"]), _part("v1", ["v1", "v2"])], "v2", "v1") == "v2"
    # a version neither set nor answered before is never used, even when every part agrees on it
    with pytest.raises(ShardsDisagree, match="none holds v2 everywhere yet"):
        next_version([_part("v0", ["v0"]), _part("v0", ["v0"])], "v2", None)
    # refused by a part: not asked for again; the one answered before serves
    refused = [_part("v1", ["v1"], {"v2": "OSError: no model"}), _part("v2", ["v1", "v2"])]
    assert refusal(refused, "v2") == "OSError: no model"
    assert next_version(refused, "v2", "v1") == "v1"
    with pytest.raises(ShardsDisagree, match="v2 was refused") as raised:
        next_version(refused, "v2", None)
    assert raised.value.refused == "OSError: no model"


def _search(call, shards: int, want: str, fallback: str | None = None, patience_s: float = PATIENCE_S):
    """Every shard asked through `agree`, as the ingress does: (the version, the merged top-5 per question)."""

    async def ask(version):
        return list(await asyncio.gather(*(call(shard, ([[0.0]], 5, version)) for shard in range(shards))))

    found = asyncio.run(agree(ask, want, fallback, patience_s))
    return found[0]["index_version"], merged(found, 5)


def test_shards_mid_swap_are_asked_again_for_the_version_they_share():
    """Shard 1 holds v2 (the version set) while shard 0 is still loading it: their first answers differ, so both
    are asked for v1, the version answered before, which both hold."""
    versions = {0: ["v1"], 1: ["v2", "v1"]}
    calls = []

    async def call(shard, request):
        calls.append((shard, request[2]))
        used = request[2] if request[2] in versions[shard] else versions[shard][0]
        hits = [{"id": f"{used}-{shard}", "score": 1.0 - shard / 10, "key": shard}]
        return _part(used, versions[shard], results=[hits])

    version, results = _search(call, 2, "v2", "v1")
    assert version == "v1"
    assert [h["id"] for h in results[0]] == ["v1-0", "v1-1"]
    assert calls == [(0, "v2"), (1, "v2"), (0, "v1"), (1, "v1")]


def test_a_version_loading_everywhere_is_waited_for_and_a_stuck_one_is_a_503():
    """No version may be answered from until the parts hold the one set (a first start): the search waits for the
    load, and answers from it, never from another version."""
    state = {"calls": 0}

    async def call(shard, request):
        state["calls"] += 1
        held = ["v2"] if shard == 0 or state["calls"] > 6 else ["v1"]
        return _part(held[0], held, results=[[{"score": 1.0, "key": shard}]])

    version, _ = _search(call, 2, "v2")
    assert version == "v2" and state["calls"] > 6

    async def stuck(shard, request):  # never converges: a 503 after the patience, not a mixed answer
        held = ["v2"] if shard == 0 else ["v1"]
        return _part(held[0], held, results=[[{"score": 1.0, "key": shard}]])

    with pytest.raises(ShardsDisagree, match="none holds v2 everywhere yet"):
        _search(stuck, 2, "v2", None, 0.3)


def test_a_refused_version_fails_at_once_without_a_version_to_fall_back_on():
    async def refusing(shard, request):
        return _part("v1", ["v1"], {"v2": "no model"}, results=[[]])

    started = time.monotonic()
    with pytest.raises(ShardsDisagree, match="refused"):
        _search(refusing, 2, "v2", None, 5)
    assert time.monotonic() - started < 1
    assert _search(refusing, 2, "v2", "v1")[0] == "v1"


def test_a_search_sent_before_encoding_is_the_first_answer_and_a_version_is_asked_again():
    """BM25 is asked for the version set while the questions are encoded: `agree` takes that answer first; when the
    encoder answers from the version before (still loading the new one), BM25 is asked for that one."""
    asked = []

    async def lexical(version):
        asked.append(version)
        return _part(version, ["v1", "v2"], results=[[]])

    async def search():
        early = asyncio.ensure_future(lexical("v2"))
        await asyncio.sleep(0)  # the encoder's turn: the BM25 search is already under way
        assert asked == ["v2"]
        bm25 = started_first(early, "v2", lexical)

        async def ask(version):
            encoded = _part("v1", ["v1"])  # the encoder holds only v1 yet
            return [encoded, await bm25(encoded["index_version"])]

        return await agree(ask, "v2", "v1")

    found = asyncio.run(search())
    assert [f["index_version"] for f in found] == ["v1", "v1"]
    assert asked == ["v2", "v1"]
