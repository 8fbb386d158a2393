"""What every stage measures about itself: phases timed (autofaiss's `Timeit`) and the process's peak memory, for
the logs and each job's summary."""

from __future__ import annotations

import contextlib
import logging
import resource
import time

log = logging.getLogger(__name__)


class PhaseTimer:
    """autofaiss-style timing of a job's phases, logged by the stage's logger (`<stage>: <phase>…` as each
    starts) and summed per phase for the summary."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.log = logger or log

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.log.info("%s…", phase)
        start = time.perf_counter()
        yield
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 3)
        self.log.info("%s: %.1fs", phase, self.seconds[phase])


def reset_peak_rss() -> None:
    """Start `peak_rss` afresh (Linux: writing 5 to clear_refs resets VmHWM), so it measures the work that follows
    and not the imports before it."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_rss() -> int:
    """This process's peak resident memory in bytes since `reset_peak_rss` (since it started elsewhere)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
