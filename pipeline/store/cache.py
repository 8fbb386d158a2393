"""A node's cache of verified index files, shared by every process on the node that serves or reads index versions:
each index shard, the BM25 deployment, the replicas of an app being replaced, an evaluation.

Whoever holds or loads a version leases it first: an empty file under `.node/leases/<version>/`, created and locked
(`flock`) before the first file is fetched, and released when the version is dropped. The kernel drops a lock when
its process dies, SIGKILL included, so a lease never outlives its holder: one that another process can lock is
stale, and is removed. Files are removed only under the cache's exclusive lock and only when no live lease's version
lists them; leases are taken under its shared lock, so a lease taken while an eviction runs waits for it to end,
then fetches whatever it removed. Every file is checked against its sha256 before anything parses it.

    <object name>                  a verified copy of `indexes/<object name>` (content-addressed: never rewritten)
    <object name>.<pid>.partial    a download in progress (each process its own; moved into place whole)
    .node/leases/<version>/<id>    a lease, locked by its holder
    .node/versions/<version>.json  the files of each version leased here; its mtime, when it was last leased or
                                   released, orders the versions nobody holds for eviction (least recently used first)
    .node/lock                     shared to lease, exclusive to evict
    lexical-views/<version>/       links through which tantivy opens a version's BM25 files

Without a budget (`max_bytes` None) a file goes as soon as no held version lists it. With one, files of versions
nobody holds stay (a rollback finds them) until room is needed, least recently used version first; a version whose
files do not fit beside the versions held is refused, naming the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.store.manifests import FileEntry
from pipeline.store.storage import Storage, sha256_file

log = logging.getLogger(__name__)

NODE = ".node"
VIEWS = "lexical-views"
PARTIAL = ".partial"
VERIFY_THREADS = min(8, os.cpu_count() or 1)


def fetch_verified(storage: Storage, entries: Sequence[FileEntry], directory: str) -> tuple[dict[str, str], int]:
    """Local copies of objects under `indexes/` in `directory`, each checked against its sha256 before anything
    parses it. Objects already there (content-addressed names) are not downloaded again; processes fetching the same
    object at once each download to a file of their own and move it into place whole. Files are fetched and hashed
    `VERIFY_THREADS` at a time (hashlib and downloads release the GIL): a replica's start with a full node cache is
    mostly hashing, 8 GB at 5M passages. (paths, bytes fetched)"""

    def one(entry: FileEntry) -> tuple[str, int]:
        path, fetched = os.path.join(directory, *entry.name.split("/")), 0
        if not os.path.exists(path) or os.path.getsize(path) != entry.bytes:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.{os.getpid()}{PARTIAL}"
            storage.download(posixpath.join("indexes", entry.name), partial)
            os.replace(partial, path)
            fetched = entry.bytes
        digest = sha256_file(path)
        if digest != entry.sha256:
            os.remove(path)
            raise PipelineError(
                f"{storage.url('indexes', entry.name)}: checksum mismatch (manifest "
                f"{entry.sha256[:12]}…, file {digest[:12]}…)"
            )
        return path, fetched

    unique = list({entry.name: entry for entry in entries}.values())  # one download a file, even if listed twice
    if len(unique) <= 1:
        done = [one(entry) for entry in unique]
    else:
        with ThreadPoolExecutor(min(VERIFY_THREADS, len(unique)), thread_name_prefix="verify") as pool:
            done = list(pool.map(one, unique))  # the first failure in the entries' order is raised
    return {entry.name: path for entry, (path, _) in zip(unique, done)}, sum(fetched for _, fetched in done)


class Lease:
    """A version held (or being loaded) by this process: a file locked for as long as it is held."""

    def __init__(self, version: str, path: str, handle):
        self.version, self.path, self._handle = version, path, handle

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Give the version up: the lease file goes, and with it (once nobody else holds it) its files."""
        if self._handle is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._handle.fileno()).st_ino:
                os.remove(self.path)
        self._handle.close()
        self._handle = None

    def __del__(self) -> None:  # the lock goes with the file handle; the stale file with the next eviction
        if self._handle is not None:
            self._handle.close()


@dataclass
class CacheState:
    """What an eviction sees: the cache's files by size, the versions held by a live process, and every version
    recorded here with its files, least recently used first."""

    files: dict[str, int]  # object name -> bytes
    held: set[str]
    versions: dict[str, set[str]]  # version -> object names, least recently used first

    def wanted(self, keep: set[str]) -> set[str]:
        return {name for version in keep for name in self.versions.get(version, ())}


def plan_eviction(state: CacheState, max_bytes: int | None, need: int = 0) -> tuple[list[str], list[str]]:
    """(the object names to delete, the unheld versions whose files go), pure. Without a budget: every file no held
    version lists. With one: files no version lists first, then the files of versions nobody holds, least recently
    used first, until `need` more bytes fit within `max_bytes` (as many as can)."""
    protected = state.wanted(state.held)
    unlisted = [name for name in state.files if name not in state.wanted(set(state.versions))]
    unheld = [version for version in state.versions if version not in state.held]
    if max_bytes is None:
        return sorted(name for name in state.files if name not in protected), unheld
    doomed, gone = list(unlisted), []
    total = sum(state.files.values()) - sum(state.files[name] for name in unlisted)
    kept = list(unheld)
    while kept and total + need > max_bytes:
        version = kept.pop(0)
        gone.append(version)
        still = protected | state.wanted(set(kept))
        for name in sorted(state.versions[version] - still):
            if name in state.files and name not in doomed:
                doomed.append(name)
                total -= state.files[name]
    return doomed, gone


class NodeCache:
    """The cache in `directory` as one process sees it: lease, fetch, evict."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory, self.max_bytes = directory, max_bytes
        self._node = os.path.join(directory, NODE)
        os.makedirs(os.path.join(self._node, "leases"), exist_ok=True)
        os.makedirs(os.path.join(self._node, "versions"), exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        with open(os.path.join(self._node, "lock"), "a+b") as handle:
            fcntl.flock(handle, how)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def lease(self, version: str, files: Sequence[FileEntry]) -> Lease:
        """Hold `version` (whose manifest lists `files`) here until the lease is released or this process ends: none
        of its files is removed meanwhile."""
        record = os.path.join(self._node, "versions", f"{version}.json")
        folder = os.path.join(self._node, "leases", version)
        with self._locked(fcntl.LOCK_SH):
            if not os.path.exists(record):
                listed = {entry.name: entry.bytes for entry in files}
                temporary = f"{record}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                with open(temporary, "w", encoding="utf-8") as f:
                    json.dump({"version": version, "files": listed}, f)
                os.replace(temporary, record)
            os.utime(record)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
            handle = open(path, "wb")  # noqa: SIM115 - held open for the lease's life
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return Lease(version, path, handle)

    def release(self, lease: Lease) -> None:
        """`lease.release()`, and the version's place in the eviction order moved to now."""
        lease.release()
        with contextlib.suppress(FileNotFoundError):
            os.utime(os.path.join(self._node, "versions", f"{lease.version}.json"))

    def fetch(self, storage: Storage, entries: Sequence[FileEntry], version: str) -> tuple[dict[str, str], int]:
        """`fetch_verified` into the cache, for a version this process has leased; with a budget, room is made first
        (versions nobody holds, least recently used first), and a version that cannot fit is refused."""
        missing = [e for e in entries if not os.path.exists(self.path(e.name))]
        need = sum(entry.bytes for entry in missing)
        if self.max_bytes is not None and need:
            with self._locked(fcntl.LOCK_EX):
                state = self._state()
                doomed, gone = plan_eviction(state, self.max_bytes, need)
                total = sum(state.files.values()) - sum(state.files[name] for name in doomed)
                if total + need > self.max_bytes:
                    raise PipelineError(
                        f"index {version} needs {need} more bytes in the node cache {self.directory}, which holds "
                        f"{total} bytes of versions in use ({', '.join(sorted(state.held)) or 'none'}): over "
                        f"serve.cache_max_bytes={self.max_bytes}"
                    )
                self._remove(doomed, gone, state)
        return fetch_verified(storage, entries, self.directory)

    def evict(self) -> list[str]:
        """Remove what the budget (or, without one, holding) no longer keeps; the object names removed."""
        with self._locked(fcntl.LOCK_EX):
            state = self._state()
            doomed, gone = plan_eviction(state, self.max_bytes)
            self._remove(doomed, gone, state)
        return doomed

    def path(self, name: str) -> str:
        return os.path.join(self.directory, *name.split("/"))

    def held(self) -> set[str]:
        """The versions a live process on this node holds or is loading (stale leases removed)."""
        held = set()
        leases = os.path.join(self._node, "leases")
        for version in os.listdir(leases):
            folder = os.path.join(leases, version)
            for name in os.listdir(folder):
                if _live(os.path.join(folder, name)):
                    held.add(version)
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty
        return held

    def _state(self) -> CacheState:
        records = os.path.join(self._node, "versions")
        versions = []
        for name in os.listdir(records):
            if name.endswith(".json"):
                path = os.path.join(records, name)
                with open(path, encoding="utf-8") as f:
                    versions.append((os.path.getmtime(path), name[: -len(".json")], set(json.load(f)["files"])))
        versions.sort()
        return CacheState(self._files(), self.held(), {version: files for _, version, files in versions})

    def _files(self) -> dict[str, int]:
        """Object name -> bytes of every cached object (downloads in progress of a live process aside; those of a
        dead one are removed)."""
        found = {}
        for folder, subfolders, names in os.walk(self.directory):
            if folder == self.directory:
                subfolders[:] = [d for d in subfolders if d not in (NODE, VIEWS)]
            for name in names:
                path = os.path.join(folder, name)
                if name.endswith(PARTIAL):
                    _remove_if_orphan(path)
                    continue
                relative = os.path.relpath(path, self.directory).replace(os.sep, "/")
                with contextlib.suppress(FileNotFoundError):
                    found[relative] = os.path.getsize(path)
        return found

    def _remove(self, doomed: list[str], gone: list[str], state: CacheState) -> None:
        for name in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(name))
        emptied = [v for v in state.versions if v not in state.held and not (state.versions[v] & _left(state, doomed))]
        for version in set(gone) | set(emptied) | {v for v in _views(self.directory) if v not in state.held}:
            shutil.rmtree(os.path.join(self.directory, VIEWS, version), ignore_errors=True)
        for version in emptied:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self._node, "versions", f"{version}.json"))
        if doomed:
            log.info("node cache %s: removed %d files of versions nobody holds", self.directory, len(doomed))


def _left(state: CacheState, doomed: list[str]) -> set[str]:
    return set(state.files) - set(doomed)


def _views(directory: str) -> list[str]:
    views = os.path.join(directory, VIEWS)
    return os.listdir(views) if os.path.isdir(views) else []


def _live(path: str) -> bool:
    """Whether the lease file at `path` is locked by a live process; a stale one (its process gone) is removed."""
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                os.remove(path)
        return False


def _remove_if_orphan(path: str) -> None:
    """A partial download whose process is gone (`<name>.<pid>.partial`)."""
    pid = path[: -len(PARTIAL)].rsplit(".", 1)[-1]
    if pid.isdigit() and not _process_alive(int(pid)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
