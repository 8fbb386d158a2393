"""Process memory, through psutil: a process's resident set now, and this process's peak."""

from __future__ import annotations

import psutil


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid`, MiB."""
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def maps_library(pid: int, name: str) -> bool:
    """Whether process `pid` has a library whose path holds `name` mapped (libtorch, say)."""
    return any(name in m.path for m in psutil.Process(pid).memory_maps(grouped=True))
