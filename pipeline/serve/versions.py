"""The versions one Serve replica holds (question encoder, index shard or BM25 index), loaded when a request first
names them.

The app's version is set in one place, the ingress's `user_config` (`pipeline.serve.app`), and every request the
ingress sends names the version it wants answered. A replica that does not hold it starts loading it in the
background and answers from a version it holds (saying which, and what it holds), so nothing waits for a load and
no request fails while a version moves in: the ingress asks again for a version every part holds. A replica
holds the `keep` versions asked for last, and drops one no request has named for `idle_s` (the one asked for last
stays), so the version before is freed soon after the app has moved on; a version that fails to load is refused
(the reason is kept, and a later ask after `retry_s` tries again). Loading on request, not through each
deployment's `user_config`, is what makes the one setting reach every versioned deployment, shards and all.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from pipeline.errors import PipelineError

log = logging.getLogger("ray.serve")
T = TypeVar("T")


class VersionRefused(PipelineError):
    """A version this replica cannot load (its files, its question model or its dimension): the app keeps
    answering from the one before, and `/v1/index` says why."""


class Versions(Generic[T]):
    """Versions by name, loaded by `load(name)` on a thread of their own, the `keep` asked for last held;
    `on_change(held, dropped)` after a load or a drop, with what is held and what was just let go."""

    def __init__(
        self,
        load: Callable[[str], T],
        what: str,
        keep: int = 2,
        retry_s: float = 60.0,
        on_change: Callable[[list[T], list[T]], None] | None = None,
        idle_s: float | None = None,
    ):
        self._load, self.what, self.keep, self.retry_s, self.idle_s = load, what, keep, retry_s, idle_s
        self._on_change = on_change
        self._held: OrderedDict[str, T] = OrderedDict()  # least recently asked first
        self._asked: dict[str, float] = {}  # when each held version was last asked for
        self._loading: dict[str, Future] = {}
        self._refused: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"load-{what}")

    def preload(self, name: str) -> None:
        """Load `name` now, in this thread (a replica's start): a failure is logged and refused, not raised."""
        try:
            self._loaded(name, self._load(name))
        except Exception as exc:  # noqa: BLE001 - the replica starts anyway; requests name what they want
            self._failed(name, exc)

    @property
    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def refused(self) -> dict[str, str]:
        """Versions refused within `retry_s`, with the reason."""
        now = time.monotonic()
        with self._lock:
            return {name: why for name, (why, when) in self._refused.items() if now - when < self.retry_s}

    def pick(self, asked: str) -> tuple[str, T] | Future:
        """`asked` when held; else its load is started (unless refused lately) and the version asked for last is
        answered; with nothing held, the load to await (a refused version's failure when it was refused)."""
        with self._lock:
            self._drop_idle(asked)
            if asked in self._held:
                self._held.move_to_end(asked)
                self._asked[asked] = time.monotonic()
                return asked, self._held[asked]
            future = self._start(asked)
            if self._held:
                name = next(reversed(self._held))
                return name, self._held[name]
            return future

    async def get(self, asked: str) -> tuple[str, T]:
        """(the version answering, what it loaded): `asked` when held, else the one asked for last while `asked`
        loads; with nothing held, waits for `asked` (VersionRefused when it fails)."""
        picked = self.pick(asked)
        if not isinstance(picked, Future):
            return picked
        await asyncio.wrap_future(picked)
        return self.pick(asked)  # type: ignore[return-value]  # held now

    def _drop_idle(self, asked: str) -> None:
        """Drop held versions not asked for within `idle_s`, except `asked` and the one asked for last."""
        if self.idle_s is None or len(self._held) < 2:
            return
        now, last = time.monotonic(), next(reversed(self._held))
        idle = [n for n in self._held if n not in (asked, last) and now - self._asked.get(n, now) > self.idle_s]
        dropped = []
        for name in idle:
            dropped.append(self._held.pop(name))
            self._asked.pop(name, None)
            log.info("dropped %s %s: no request named it for %.0f s", self.what, name, self.idle_s)
        if idle and self._on_change is not None:
            self._pool.submit(self._on_change, list(self._held.values()), dropped)  # off the request path

    async def grouped(self, asked: list[str]) -> list[tuple[str, T, list[int]]]:
        """One batch's calls by the version that answers them: (version, what it loaded, the calls' positions), so
        each version's calls go through its model or index together."""
        picked = [await self.get(name) for name in asked]
        groups: dict[str, tuple[str, T, list[int]]] = {}
        for position, (used, loaded) in enumerate(picked):
            groups.setdefault(used, (used, loaded, []))[2].append(position)
        return list(groups.values())

    def _start(self, name: str) -> Future:
        if name in self._loading:
            return self._loading[name]
        refused = self._refused.get(name)
        if refused is not None and time.monotonic() - refused[1] < self.retry_s:
            done: Future = Future()
            done.set_exception(VersionRefused(f"{self.what} {name} refused: {refused[0]}"))
            return done
        log.info("loading %s %s", self.what, name)
        future = self._pool.submit(self._load_one, name)
        self._loading[name] = future
        return future

    def _load_one(self, name: str) -> None:
        try:
            loaded = self._load(name)
        except Exception as exc:
            self._failed(name, exc)
            raise VersionRefused(f"{self.what} {name} refused: {type(exc).__name__}: {exc}") from exc
        self._loaded(name, loaded)

    def _loaded(self, name: str, loaded: T) -> None:
        with self._lock:
            self._held[name] = loaded
            self._held.move_to_end(name)
            self._asked[name] = time.monotonic()
            dropped = []
            while len(self._held) > self.keep:
                oldest, loaded_before = self._held.popitem(last=False)
                self._asked.pop(oldest, None)
                dropped.append(loaded_before)
            self._loading.pop(name, None)
            self._refused.pop(name, None)
            held = list(self._held.values())
        log.info("holding %s %s (and %s)", self.what, name, [n for n in self.held if n != name])
        if self._on_change is not None:
            self._on_change(held, dropped)

    def _failed(self, name: str, exc: Exception) -> None:
        with self._lock:
            self._refused[name] = (f"{type(exc).__name__}: {exc}", time.monotonic())
            self._loading.pop(name, None)
        log.error("%s %s refused: %s", self.what, name, exc)

    def status(self) -> dict[str, object]:
        """What every answer of a versioned deployment carries, so the ingress can tell what to ask for (and say
        which part refused a version, and why)."""
        return {
            "loaded": self.held,
            "refused": {name: f"{self.what} {name}: {why}" for name, why in self.refused().items()},
        }
