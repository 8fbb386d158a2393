"""Waiting for a condition, bounded: what the tests and benchmarks do while a cluster, an app or a job gets there."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(condition: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "the condition") -> T:
    """`condition()` again every `interval` seconds until it returns something true; that value. An exception it
    raises counts as not yet (a server still starting). AssertionError naming `what` after `timeout` seconds."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not there yet
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} did not hold within {timeout:.0f}s" + (f" (last error: {last!r})" if last else "")
            )
        time.sleep(interval)
