"""The versions a Serve replica holds, without Ray: loads on a thread of their own, answers never wait for a load
once something is held, the last two asked for are kept, and a version that fails is refused with its reason."""

import asyncio
import threading
import time

import pytest

from pipeline.serve.versions import VersionRefused, Versions


class Loader:
    """Loads `name` → f"loaded {name}"; a name in `gate` waits for its event; a name in `broken` fails."""

    def __init__(self):
        self.gate: dict[str, threading.Event] = {}
        self.broken: set[str] = set()
        self.calls: list[str] = []

    def __call__(self, name: str) -> str:
        self.calls.append(name)
        if name in self.gate:
            assert self.gate[name].wait(10)
        if name in self.broken:
            raise OSError(f"{name}: model files missing")
        return f"loaded {name}"


def _settle(versions: Versions, name: str) -> None:
    """Until `name` is held or refused and its load's `on_change` has run (after the lock, on the load thread)."""
    deadline = time.monotonic() + 10
    while name not in versions.held and name not in versions.refused() and time.monotonic() < deadline:
        time.sleep(0.01)
    versions._pool.submit(lambda: None).result(10)  # the one load thread: what it was running has finished


def _recording(freed: list, dropped: list):
    """An `on_change` that keeps each call's held list and every version let go."""

    def on_change(held: list, gone: list) -> None:
        freed.append(held)
        dropped.extend(gone)

    return on_change


def test_a_new_version_loads_beside_and_answers_come_from_a_held_one_meanwhile():
    load, freed, dropped = Loader(), [], []
    versions = Versions(load, "index", keep=2, on_change=_recording(freed, dropped))
    versions.preload("v1")
    load.gate["v2"] = threading.Event()
    assert asyncio.run(versions.get("v2")) == ("v1", "loaded v1")  # v2 loading: v1 answers, nothing waits
    assert asyncio.run(versions.get("v2")) == ("v1", "loaded v1")
    assert load.calls == ["v1", "v2"]  # one load of v2, however often it is asked for
    load.gate["v2"].set()
    _settle(versions, "v2")
    assert asyncio.run(versions.get("v2")) == ("v2", "loaded v2")
    assert asyncio.run(versions.get("v1")) == ("v1", "loaded v1")  # the one before is still held
    assert versions.status() == {"loaded": ["v2", "v1"], "refused": {}}
    asyncio.run(versions.get("v3"))
    _settle(versions, "v3")
    assert versions.held == ["v1", "v3"]  # v2 was asked for least recently: dropped
    assert freed[-1] == ["loaded v1", "loaded v3"] and dropped == ["loaded v2"]


def test_with_nothing_held_the_first_ask_waits_for_its_load():
    versions = Versions(Loader(), "question encoder of")
    assert asyncio.run(versions.get("v1")) == ("v1", "loaded v1")


def test_a_version_that_fails_to_load_is_refused_with_its_reason_and_retried_later():
    load = Loader()
    load.broken.add("bad")
    versions = Versions(load, "question encoder of", retry_s=0.3)
    versions.preload("v1")
    assert asyncio.run(versions.get("bad")) == ("v1", "loaded v1")
    _settle(versions, "bad")
    assert versions.refused() == {"bad": "OSError: bad: model files missing"}
    asyncio.run(versions.get("bad"))
    assert load.calls == ["v1", "bad"]  # refused: not loaded again at once
    time.sleep(0.35)
    load.broken.clear()
    asyncio.run(versions.get("bad"))
    _settle(versions, "bad")
    assert load.calls == ["v1", "bad", "bad"] and "bad" in versions.held and versions.refused() == {}


def test_nothing_held_and_the_version_refused_raises_naming_it():
    load = Loader()
    load.broken.add("bad")
    versions = Versions(load, "question encoder of")
    versions.preload("bad")  # a replica's start: logged and refused, not raised
    with pytest.raises(VersionRefused, match="question encoder of bad refused: OSError"):
        asyncio.run(versions.get("bad"))


def test_a_version_no_request_names_for_idle_s_is_dropped_but_never_the_last_one():
    freed, dropped = [], []
    versions = Versions(
        Loader(),
        "question encoder of",
        idle_s=0.2,
        on_change=lambda held, gone: (freed.append(held), dropped.extend(gone)),
    )
    versions.preload("v1")
    versions.preload("v2")
    assert versions.held == ["v1", "v2"]
    time.sleep(0.3)
    assert asyncio.run(versions.get("v2")) == ("v2", "loaded v2")
    assert versions.held == ["v2"]  # v1 idle: dropped
    deadline = time.monotonic() + 5
    while not freed or freed[-1] != ["loaded v2"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert dropped == ["loaded v1"]
    time.sleep(0.3)
    assert asyncio.run(versions.get("v2")) == ("v2", "loaded v2") and versions.held == ["v2"]


def test_a_versioned_deployment_takes_no_version_of_its_own():
    """Configs of older releases carried `index_version: null` on the Retriever and Lexical: still deployable; a
    version named there would silently not pin, so it is refused, pointing at the QAService."""
    from pipeline.serve.deployments import _Versioned

    part = _Versioned()
    part.reconfigure({"index_version": None})
    with pytest.raises(ValueError, match="set in one place, the QAService's user_config"):
        part.reconfigure({"index_version": "2026-12-04-abc"})
