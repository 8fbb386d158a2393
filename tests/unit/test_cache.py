"""The node cache (`pipeline.store.cache`) as several processes on one node use it: leases held with flock, released by
the kernel when a holder is SIGKILLed; eviction of what no live process holds, and only that; concurrent fetches of
one file; a budget that evicts the least recently used versions nobody holds and refuses a version that cannot fit.
The eviction plan itself is pure and checked on its own."""

import hashlib
import multiprocessing
import os
import signal
import time

import pytest

from pipeline.errors import PipelineError
from pipeline.store.cache import CacheState, NodeCache, plan_eviction
from pipeline.store.manifests import FileEntry
from pipeline.store.storage import Storage


def test_without_a_budget_every_file_no_held_version_lists_goes():
    state = CacheState(
        files={"q": 10, "a1": 5, "a2": 5, "b1": 7, "orphan": 3},
        held={"v2"},
        versions={"v1": {"q", "a1", "a2"}, "v2": {"q", "b1"}},
    )
    doomed, gone = plan_eviction(state, None)
    assert doomed == ["a1", "a2", "orphan"] and gone == ["v1"]


def test_with_a_budget_versions_nobody_holds_go_least_recently_used_first_and_only_as_needed():
    state = CacheState(
        files={"q": 10, "old": 20, "mid": 20, "new": 20, "held": 20, "orphan": 1},
        held={"v4"},
        versions={"v1": {"q", "old"}, "v2": {"q", "mid"}, "v3": {"q", "new"}, "v4": {"q", "held"}},  # LRU first
    )
    assert plan_eviction(state, 100) == (["orphan"], [])  # 91 bytes fit: only what no version lists goes
    assert plan_eviction(state, 100, need=20) == (["orphan", "old"], ["v1"])
    assert plan_eviction(state, 100, need=40) == (["orphan", "old", "mid"], ["v1", "v2"])
    doomed, gone = plan_eviction(state, 10, need=5)  # cannot fit: everything unheld goes, the held stays
    assert set(doomed) == {"orphan", "old", "mid", "new"} and gone == ["v1", "v2", "v3"] and "q" not in doomed


def _store(tmp_path, versions: dict[str, dict[str, bytes]]) -> tuple[Storage, dict[str, list[FileEntry]]]:
    """A local store holding each version's objects under indexes/; version -> its entries."""
    storage, listed = Storage(str(tmp_path / "store")), {}
    for version, objects in versions.items():
        listed[version] = []
        for name, data in objects.items():
            storage.write_bytes(f"indexes/{name}", data)
            listed[version].append(FileEntry(name=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return storage, listed


def _hold(cache_dir: str, version: str, entries: list[FileEntry], root: str, ready, release) -> None:
    """A replica in another process: lease and fetch `version`, say so, hold it until told (or killed)."""
    cache = NodeCache(cache_dir)
    lease = cache.lease(version, entries)
    cache.fetch(Storage(root), entries, version)
    ready.set()
    release.wait(60)
    cache.release(lease)


def _holder(cache_dir, version, entries, root):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    process = context.Process(target=_hold, args=(cache_dir, version, entries, root, ready, release))
    process.start()
    assert ready.wait(60), "the holder did not fetch its version"
    return process, release


VERSIONS = {
    "v1": {"quantizers/q.faiss": b"Q" * 100, "segments/1/ivf.bin": b"one" * 50},
    "v2": {"quantizers/q.faiss": b"Q" * 100, "segments/2/ivf.bin": b"two" * 50, "v2/tombstones.npy": b"t"},
}


def test_a_version_another_live_process_holds_is_kept_and_its_files_go_once_that_process_is_killed(tmp_path):
    storage, listed = _store(tmp_path, VERSIONS)
    cache_dir = str(tmp_path / "cache")
    holder, _ = _holder(cache_dir, "v1", listed["v1"], storage.root_url)
    try:
        here = NodeCache(cache_dir)
        mine = here.lease("v2", listed["v2"])
        here.fetch(storage, listed["v2"], "v2")
        assert here.evict() == [] and here.held() == {"v1", "v2"}  # v1 is the other process's: kept
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup step: the kernel drops its lock
        holder.join(10)
        assert here.evict() == ["segments/1/ivf.bin"]  # v1's own file; the quantizer is v2's too
        assert here.held() == {"v2"} and not (tmp_path / "cache" / ".node" / "leases" / "v1").exists()
        assert all(os.path.exists(here.path(e.name)) for e in listed["v2"])
        here.release(mine)
        assert set(here.evict()) == {e.name for e in listed["v2"]}
    finally:
        holder.kill()


def test_a_version_released_by_its_holder_goes_with_the_next_eviction(tmp_path):
    storage, listed = _store(tmp_path, VERSIONS)
    cache_dir = str(tmp_path / "cache")
    holder, release = _holder(cache_dir, "v1", listed["v1"], storage.root_url)
    cache = NodeCache(cache_dir)
    assert cache.evict() == [] and cache.held() == {"v1"}
    release.set()
    holder.join(30)
    assert sorted(cache.evict()) == ["quantizers/q.faiss", "segments/1/ivf.bin"] and cache.held() == set()


def _fetch(cache_dir: str, root: str, entries: list[FileEntry], start, out) -> None:
    cache = NodeCache(cache_dir)
    lease = cache.lease("v1", entries)
    start.wait(30)
    try:
        paths, _ = cache.fetch(Storage(root), entries, "v1")
        out.put({name: open(path, "rb").read() == VERSIONS["v1"][name] for name, path in paths.items()})
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(repr(exc))
    cache.release(lease)


def test_replicas_fetching_the_same_files_at_once_all_get_them_whole(tmp_path):
    storage, listed = _store(tmp_path, VERSIONS)
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    args = (str(tmp_path / "cache"), storage.root_url, listed["v1"], start, out)
    processes = [context.Process(target=_fetch, args=args) for _ in range(4)]
    for process in processes:
        process.start()
    time.sleep(1)
    start.set()
    results = [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
    assert results == [{"quantizers/q.faiss": True, "segments/1/ivf.bin": True}] * 4
    assert not [name for _, _, names in os.walk(tmp_path / "cache") for name in names if name.endswith(".partial")]


def test_a_budget_keeps_unheld_versions_until_room_is_needed_and_refuses_what_cannot_fit(tmp_path):
    storage, listed = _store(tmp_path, {**VERSIONS, "v3": {"segments/3/ivf.bin": b"3" * 200}})
    cache = NodeCache(str(tmp_path / "cache"), max_bytes=460)
    v1 = cache.lease("v1", listed["v1"])
    cache.fetch(storage, listed["v1"], "v1")
    cache.release(v1)
    time.sleep(0.01)
    v2 = cache.lease("v2", listed["v2"])
    cache.fetch(storage, listed["v2"], "v2")
    assert cache.evict() == []  # 401 bytes within 460: v1, held by nobody, stays for a rollback
    v3 = cache.lease("v3", listed["v3"])
    cache.fetch(storage, listed["v3"], "v3")  # 200 more: v1's own file goes (the quantizer is v2's too)
    assert not os.path.exists(cache.path("segments/1/ivf.bin")) and os.path.exists(cache.path("segments/2/ivf.bin"))
    cache.release(v3)
    storage_big, listed_big = _store(tmp_path / "big", {"big": {"segments/9/ivf.bin": b"9" * 500}})
    big = cache.lease("big", listed_big["big"])
    with pytest.raises(PipelineError, match=r"index big needs 500 more bytes .* over serve.cache_max_bytes=460"):
        cache.fetch(storage_big, listed_big["big"], "big")
    cache.release(big)
    assert os.path.exists(cache.path("segments/2/ivf.bin"))  # the held version was never touched
    cache.release(v2)


def test_files_are_fetched_and_verified_several_at_a_time_and_a_bad_one_is_named_and_removed(tmp_path):
    """fetch_verified hashes VERIFY_THREADS files at once: every good file is there whole, each checked; one whose
    bytes differ from its manifest entry is refused by name and deleted, whatever thread checked it."""
    from pipeline.store.cache import fetch_verified

    objects = {f"seg-{i:02d}/ivf.bin": os.urandom(50_000 + i) for i in range(12)}
    storage, listed = _store(tmp_path, {"v1": objects})
    entries = listed["v1"] + listed["v1"][:2]  # a file listed twice is fetched once
    paths, fetched = fetch_verified(storage, entries, str(tmp_path / "cache"))
    assert fetched == sum(map(len, objects.values()))
    assert {name: open(path, "rb").read() for name, path in paths.items()} == objects
    assert fetch_verified(storage, entries, str(tmp_path / "cache"))[1] == 0  # there already: hashed, not fetched
    bad = listed["v1"][7]
    with open(paths[bad.name], "r+b") as handle:  # the cached copy changed on disk, same size
        handle.write(b"\0" * 16)
    with pytest.raises(PipelineError, match=r"seg-07/ivf.bin: checksum mismatch"):
        fetch_verified(storage, entries, str(tmp_path / "cache"))
    assert not os.path.exists(paths[bad.name]) and all(os.path.exists(p) for n, p in paths.items() if n != bad.name)
