"""Coalescing of concurrent calls into batches without a timer (pure asyncio: no Ray).

Why not `ray.serve.batch`: it waits up to `batch_wait_timeout_s` for a batch to fill, so a lone client pays that
wait on every request for a batch that cannot fill; and its loop (Ray 2.60 `_process_batches` / `wait_for_batch`)
forms the next batch as soon as one request is queued, then holds that batch behind its concurrency semaphore while
the one in flight finishes. With a wait of 0 the batches stay tiny under load: the requests that arrive meanwhile
queue behind a batch already formed instead of joining it.

`Coalescer` batches by construction instead: a call that finds no batch in flight starts one at once, alone; calls
that arrive while one is in flight wait and all join the next (up to `max_size`, in arrival order), which starts
the moment the one in flight finishes. A batch's size is what queued during the batch before it: nothing is waited
for that has not already arrived.

One bad call never fails another: a batch the handler fails is retried one call at a time, so each call gets what
it would have got alone (its result, or its own error), unless the error is the batch's as a whole (`shared`: a
part down or too slow, which every call would meet again alone, and a retry per call would only multiply).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

log = logging.getLogger("ray.serve")

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """`await coalescer.submit(item)`: `item` handled in a batch, `handler(items) -> results` (one result per item,
    in order), with at most one batch in flight.

    Each caller gets its own result. When the handler raises for a batch of several calls, each call is handled
    again alone (concurrently), and gets that result or that error; when `shared(error)` says the error is the
    batch's as a whole, every caller gets it at once (a copy per caller where the exception can be copied), as they
    do an error for a wrong number of results. A caller cancelled while queued is dropped from its batch; one
    cancelled while its batch is in flight only stops waiting: the batch goes on for the others. The handler runs
    in the context the Coalescer was built in, not a caller's, so that no caller's context variables (Ray Serve's
    request context, whose calls are cancelled with that request) reach a batch shared with others. `max_size` 1:
    no coalescing, each `submit` calls the handler with `[item]` itself, concurrently with the others.

    `sizes`: batch size -> batches handled (for metrics; the retries alone count as batches of 1); `split`: failed
    batches retried call by call."""

    def __init__(
        self,
        handler: Callable[[list[T]], Awaitable[Sequence[R]]],
        max_size: int,
        shared: Callable[[Exception], bool] = lambda exc: False,
    ):
        self._handler = handler
        self._shared = shared
        self.max_size = max_size
        self.sizes: collections.Counter[int] = collections.Counter()
        self.split = 0
        self._queue: collections.deque[tuple[T, asyncio.Future]] = collections.deque()
        self._in_flight: asyncio.Task | None = None
        self._context = contextvars.copy_context()

    @property
    def max_size(self) -> int:
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        if int(value) != value or value < 1:
            raise ValueError(f"max_size must be a positive integer, not {value!r}")
        self._max_size = int(value)

    @property
    def in_flight(self) -> bool:
        """Whether a batch is being handled now."""
        return self._in_flight is not None

    @property
    def queued(self) -> int:
        """Calls waiting for the next batch (those cancelled meanwhile included until it forms)."""
        return len(self._queue)

    async def submit(self, item: T) -> R:
        if self._max_size == 1:
            self.sizes[1] += 1
            return _results(await self._handler([item]), 1)[0]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._in_flight is None:  # nothing in flight: this call goes at once, alone
            batch = [(item, future)]
            self._in_flight = self._context.run(loop.create_task, self._drain(batch))
            self._in_flight.add_done_callback(lambda task: self._drained(task, batch))
        else:
            self._queue.append((item, future))
        # Cancelling the caller cancels only `future`: dropped from the queue, or its result ignored.
        return await future

    async def _drain(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        """Handle `batch`, then at once each batch of what queued meanwhile, until nothing is queued."""
        try:
            while batch:
                await self._handle(batch)
                batch = []
                while self._queue and len(batch) < self._max_size:
                    entry = self._queue.popleft()
                    if not entry[1].done():  # a caller cancelled while queued
                        batch.append(entry)
        finally:
            self._in_flight = None
            if batch or self._queue:  # this task was cancelled (the loop closing): no caller is left waiting
                for _, future in [*batch, *self._queue]:
                    future.cancel()
                self._queue.clear()

    def _drained(self, task: asyncio.Task, batch: list[tuple[T, asyncio.Future]]) -> None:
        """A drain task cancelled before it ran (its `finally` never did): no caller is left waiting."""
        if self._in_flight is task:
            self._in_flight = None
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue.clear()

    async def _handle(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        futures = [future for _, future in batch]
        self.sizes[len(batch)] += 1
        try:
            answered = await self._handler([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - a caller's own fault, or the batch's
            if len(batch) > 1 and not self._shared(exc):
                await self._split(batch, exc)
            else:
                _fail(futures, exc)
            return
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        try:
            results = _results(answered, len(batch))
        except RuntimeError as exc:
            _fail(futures, exc)
            return
        for future, result in zip(futures, results):
            if not future.done():  # a caller cancelled while its batch was in flight
                future.set_result(result)

    async def _split(self, batch: list[tuple[T, asyncio.Future]], exc: Exception) -> None:
        """A failed batch's calls, each handled again alone: the others' fault is not theirs."""
        self.split += 1
        log.warning("a batch of %d calls failed (%s: %s): handling each alone", len(batch), type(exc).__name__, exc)
        await asyncio.gather(*(self._alone(item, future) for item, future in batch if not future.done()))

    async def _alone(self, item: T, future: asyncio.Future) -> None:
        self.sizes[1] += 1
        try:
            result = _results(await self._handler([item]), 1)[0]
        except Exception as exc:  # noqa: BLE001 - this call's own error
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)


def _fail(futures: list[asyncio.Future], exc: Exception) -> None:
    """`exc` to every caller still waiting (a copy to each but the first)."""
    for i, future in enumerate(futures):
        if not future.done():
            future.set_exception(exc if i == 0 else _copy(exc))


def _results(results: Sequence[R], expected: int) -> list[R]:
    results = list(results)
    if len(results) != expected:
        raise RuntimeError(f"the batch handler returned {len(results)} results for {expected} items")
    return results


def _copy(exc: Exception) -> Exception:
    """`exc` for one more caller: a copy of the same type, arguments, attributes, cause and traceback (so that one
    caller's re-raise does not grow the traceback the others see), or `exc` itself where it cannot be copied."""
    cls = type(exc)
    try:
        copied = cls.__new__(cls, *exc.args)
        if type(copied) is not cls:
            return exc
        copied.args = exc.args
        copied.__dict__.update(exc.__dict__)
    except Exception:  # noqa: BLE001 - an exception type that cannot be made this way: share it
        return exc
    copied.__cause__, copied.__context__ = exc.__cause__, exc.__context__
    copied.__suppress_context__ = exc.__suppress_context__
    return copied.with_traceback(exc.__traceback__)
