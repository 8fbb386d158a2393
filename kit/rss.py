"""Process memory, through psutil: a process's resident set now, a library it maps, and the peak of each kind of
process of a local Ray while a job runs (the benchmarks' `Peaks`)."""

from __future__ import annotations

import os
import re
import threading
import time

import psutil

from kit.localray import LocalRay

MIB = 2**20


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid`, MiB."""
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def maps_library(pid: int, name: str) -> bool:
    """Whether process `pid` has a library whose path holds `name` mapped (libtorch, say)."""
    return any(name in m.path for m in psutil.Process(pid).memory_maps(grouped=True))


TITLE = re.compile(r"^ray::([A-Za-z0-9_:\-]+)")
# Not a job's processes: Ray's agents on every node, and Serve's (up for the whole run).
NOT_JOBS = (
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "ray::ServeController",
    "ray::ProxyActor",
    "ray::ServeReplica",
)


def process_kind(command: str, parent: int) -> str | None:
    """`driver` for the job this process started, `ray::<actor class or task>` for a Ray worker (its process title,
    method dropped), None for the rest (raylet, GCS, dashboard...)."""
    if parent == os.getpid() and " -m jobs." in f" {command}":
        return "driver"
    match = TITLE.match(command)
    return f"ray::{match.group(1)}" if match else None


def cluster_processes(cluster: LocalRay) -> list[tuple[int, str, int]]:
    """(pid, kind, RSS bytes) of the cluster's workers and of the job driver this process runs, in one pass."""
    table = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info"]):
        info = process.info
        if info["memory_info"] is not None:
            table[info["pid"]] = (info["ppid"] or 0, " ".join(info["cmdline"] or []), info["memory_info"].rss)
    marks = (str(cluster.temp_dir), cluster.address, f":{cluster.port} --")
    ours = {pid for pid, (_, command, _) in table.items() if any(mark in command for mark in marks)}
    ours |= {pid for pid, (parent, _, _) in table.items() if parent == os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, (parent, _, _) in table.items() if parent in ours and pid not in ours}
        ours |= more
        grew = bool(more)
    found = []
    for pid in ours - {os.getpid()}:
        parent, command, rss = table[pid]
        kind = process_kind(command, parent)
        if kind is not None:
            found.append((pid, kind, rss))
    return found


def peak_hwm(pid: int) -> int:
    """The kernel's peak RSS of `pid` (VmHWM), bytes; 0 when gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def busy_workers(cluster: LocalRay) -> set[int]:
    """Workers of the cluster holding an actor or running a task, Ray's agents and Serve's processes aside."""
    found = cluster_processes(cluster)
    return {pid for pid, kind, _ in found if kind not in ("driver", "ray::IDLE") and not kind.startswith(NOT_JOBS)}


def settled(cluster: LocalRay, timeout: float = 30) -> set[int]:
    """Wait (up to `timeout` s) for the actors of the jobs before to exit; the workers still busy then."""
    deadline = time.monotonic() + timeout
    while (left := busy_workers(cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


class Peaks:
    """The largest RSS of each process kind while the block runs, sampled every `interval` s in a thread (the
    driver's is its VmHWM, which misses nothing but its last interval); the processes in `skip` (a job before's
    actors still exiting) are left out."""

    def __init__(self, cluster: LocalRay, skip: set[int] = frozenset(), interval: float = 0.5):
        self.cluster, self.skip, self.interval = cluster, skip, interval
        self.peaks: dict[str, int] = {}
        self.pids: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid, kind, rss in cluster_processes(self.cluster):
            if kind.startswith(NOT_JOBS) or pid in self.skip:
                continue
            rss = max(rss, peak_hwm(pid)) if kind == "driver" else rss
            self.peaks[kind] = max(self.peaks.get(kind, 0), rss)
            self.pids.setdefault(kind, set()).add(pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def mib(self) -> dict[str, float]:
        return {kind: round(rss / MIB, 1) for kind, rss in sorted(self.peaks.items())}

    def processes(self) -> dict[str, int]:
        return {kind: len(pids) for kind, pids in sorted(self.pids.items())}
