"""`pipeline.serve.batching.Coalescer`: batches formed by what arrives while one is in flight, with no timer.

The loop's clock is frozen in these tests (`run`), so a timer (a batch wait of any length) never fires: a handler
that is reached at all was reached without one. Order of events is checked by scheduling steps
(`asyncio.sleep(0)`), never by wall-clock thresholds."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from pipeline.serve.batching import Coalescer


def run(main):
    """`main()` run on a loop whose clock never moves (timers never fire; `sleep(0)` still yields). Stuck on a timer
    (or on nothing) for 10 s of real time: a failure, not a hang."""
    loop = asyncio.new_event_loop()
    loop.time = lambda: 0.0
    task = loop.create_task(main())
    watchdog = threading.Timer(10, loop.call_soon_threadsafe, (task.cancel,))
    watchdog.start()
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        raise AssertionError("stuck: waiting on a timer, which never fires here, or on nothing") from None
    finally:
        watchdog.cancel()
        loop.close()


async def steps(n: int = 5) -> None:
    """Let other tasks run `n` scheduling steps; no time passes."""
    for _ in range(n):
        await asyncio.sleep(0)


class Handler:
    """Records each batch; a batch waits on its own gate until the test opens it (`finish`)."""

    def __init__(self, gated: bool = True):
        self.batches: list[list] = []
        self.gates: list[asyncio.Event] = []
        self.gated = gated
        self.running = 0
        self.most_running = 0
        self.error: Exception | None = None
        self.wrong_count = False
        self.cancelled: list[list] = []

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gated:
                await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(list(items))
            raise
        finally:
            self.running -= 1
        if self.error is not None:
            raise self.error
        return [f"r{item}" for item in items] + (["extra"] if self.wrong_count else [])

    def finish(self, batch: int) -> None:
        self.gates[batch].set()


def test_a_lone_request_starts_at_once_alone():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32)
        call = asyncio.ensure_future(coalescer.submit(1))
        await steps(3)  # the call's task, then the batch's: nothing waited for
        assert handler.batches == [[1]]
        assert coalescer.in_flight
        handler.finish(0)
        assert await call == "r1"
        assert not coalescer.in_flight and coalescer.sizes == {1: 1}
        # Idle again: the next lone request also goes at once.
        call = asyncio.ensure_future(coalescer.submit(2))
        await steps(3)
        assert handler.batches == [[1], [2]]
        handler.finish(1)
        assert await call == "r2"

    run(main)


def test_requests_arriving_while_a_batch_is_in_flight_join_the_next_in_order():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32)
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        later = []
        for item in range(1, 6):
            later.append(asyncio.ensure_future(coalescer.submit(item)))
            await steps(1)
        await steps()
        assert handler.batches == [[0]]  # no second batch while the first is in flight
        assert coalescer.queued == 5
        handler.finish(0)
        await steps()
        assert handler.batches == [[0], [1, 2, 3, 4, 5]]  # started as the first finished, in arrival order
        assert first.done() and await first == "r0"
        assert not any(call.done() for call in later)
        handler.finish(1)
        assert await asyncio.gather(*later) == ["r1", "r2", "r3", "r4", "r5"]
        assert coalescer.sizes == {1: 1, 5: 1}

    run(main)


def test_requests_submitted_in_the_same_step_as_a_lone_one_go_next():
    """The request that finds nothing in flight goes alone; one arriving just after it waits for the next batch."""

    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32)
        calls = [asyncio.ensure_future(coalescer.submit(item)) for item in range(3)]
        await steps()
        assert handler.batches == [[0]]
        handler.finish(0)
        await steps()
        assert handler.batches == [[0], [1, 2]]
        handler.finish(1)
        assert await asyncio.gather(*calls) == ["r0", "r1", "r2"]

    run(main)


def test_max_size_caps_a_batch_and_the_overflow_goes_to_the_following_one():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=3)
        calls = [asyncio.ensure_future(coalescer.submit(0))]
        await steps()
        calls += [asyncio.ensure_future(coalescer.submit(item)) for item in range(1, 8)]
        await steps()
        for batch in range(3):
            handler.finish(batch)
            await steps()
        assert handler.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]
        handler.finish(3)
        assert await asyncio.gather(*calls) == [f"r{item}" for item in range(8)]
        assert coalescer.sizes == {1: 2, 3: 2}
        assert handler.most_running == 1  # one batch in flight at a time

    run(main)


def test_max_size_can_change_between_batches():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=2)
        calls = [asyncio.ensure_future(coalescer.submit(0))]
        await steps()
        calls += [asyncio.ensure_future(coalescer.submit(item)) for item in range(1, 5)]
        await steps()
        coalescer.max_size = 4
        handler.finish(0)
        await steps()
        assert handler.batches == [[0], [1, 2, 3, 4]]
        handler.finish(1)
        await asyncio.gather(*calls)
        with pytest.raises(ValueError, match="positive integer"):
            coalescer.max_size = 0

    run(main)


def test_an_error_the_batch_shares_goes_to_every_caller_of_its_batch_only():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32, shared=lambda exc: isinstance(exc, LookupError))
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        failing = [asyncio.ensure_future(coalescer.submit(item)) for item in (1, 2, 3)]
        await steps()
        handler.finish(0)
        await steps()
        handler.error = LookupError("shard 0 is down")
        handler.finish(1)
        raised = await asyncio.gather(*failing, return_exceptions=True)
        assert await first == "r0"
        assert [type(exc) for exc in raised] == [LookupError] * 3
        assert [str(exc) for exc in raised] == ["shard 0 is down"] * 3
        assert len({id(exc) for exc in raised}) == 3  # each caller its own: one's traceback is not another's
        assert handler.batches == [[0], [1, 2, 3]] and coalescer.split == 0  # not retried: every call would meet it
        # The coalescer goes on after a failed batch.
        handler.error = None
        after = asyncio.ensure_future(coalescer.submit(9))
        await steps()
        handler.finish(2)
        assert await after == "r9"

    run(main)


def test_an_error_with_attributes_keeps_its_type_and_attributes_for_each_caller():
    class Refused(Exception):
        def __init__(self, status: int, message: str):
            super().__init__(message)
            self.status = status

    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32, shared=lambda exc: True)
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        calls = [asyncio.ensure_future(coalescer.submit(item)) for item in (1, 2)]
        await steps()
        handler.finish(0)
        await first
        await steps()
        try:
            raise KeyError("cause")
        except KeyError as cause:
            try:
                raise Refused(503, "no version to answer from") from cause
            except Refused as exc:
                handler.error = exc
        handler.finish(1)
        raised = await asyncio.gather(*calls, return_exceptions=True)
        for exc in raised:
            assert type(exc) is Refused and exc.status == 503 and str(exc) == "no version to answer from"
            assert isinstance(exc.__cause__, KeyError)

    run(main)


class Poisoned:
    """A handler that fails any batch holding a poisoned item (a question no tokenizer takes, say), and answers the
    others by their own value alone (`r<item>`)."""

    def __init__(self, poisoned: set, gated: int | None = None):
        self.poisoned, self.batches, self.gated = poisoned, [], gated  # gated: the batch (by number) that waits
        self.gate = asyncio.Event()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        if len(self.batches) - 1 == self.gated:
            await self.gate.wait()
        bad = [item for item in items if item in self.poisoned]
        if bad:
            raise ValueError(f"cannot take item {bad[0]}")
        return [f"r{item}" for item in items]


def test_one_bad_call_fails_alone_and_the_others_get_what_they_get_alone():
    async def main():
        handler = Poisoned({3, 5}, gated=0)
        coalescer = Coalescer(handler, max_size=32)
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        calls = [asyncio.ensure_future(coalescer.submit(item)) for item in range(1, 7)]
        await steps()
        handler.gate.set()
        got = await asyncio.gather(*calls, return_exceptions=True)
        assert await first == "r0"
        assert got[:2] + got[3:4] + got[5:] == ["r1", "r2", "r4", "r6"]
        assert [str(got[2]), str(got[4])] == ["cannot take item 3", "cannot take item 5"]  # each its own error
        assert handler.batches[:2] == [[0], [1, 2, 3, 4, 5, 6]]
        assert sorted(handler.batches[2:]) == [[1], [2], [3], [4], [5], [6]]  # each retried alone, once
        assert coalescer.split == 1 and coalescer.sizes == {1: 7, 6: 1}
        assert await coalescer.submit(7) == "r7"  # and it goes on

    run(main)


def test_a_caller_cancelled_while_its_failed_batch_is_split_is_not_retried():
    async def main():
        handler = Poisoned({2}, gated=1)
        coalescer = Coalescer(handler, max_size=32)
        first = asyncio.ensure_future(coalescer.submit(0))
        calls = [asyncio.ensure_future(coalescer.submit(item)) for item in (1, 2, 3)]  # the next batch
        await steps()
        assert handler.batches == [[0], [1, 2, 3]]  # in flight, at the gate
        calls[2].cancel()
        await steps()
        handler.gate.set()
        got = await asyncio.gather(*calls, return_exceptions=True)
        assert got[0] == "r1" and isinstance(got[1], ValueError) and isinstance(got[2], asyncio.CancelledError)
        assert await first == "r0"
        assert handler.batches[2:] == [[1], [2]]  # the cancelled caller's call is not handled again

    run(main)


def test_a_wrong_number_of_results_is_an_error_to_each_caller():
    async def main():
        handler = Handler(gated=False)
        handler.wrong_count = True
        coalescer = Coalescer(handler, max_size=32)
        calls = [asyncio.ensure_future(coalescer.submit(item)) for item in range(3)]
        raised = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(exc, RuntimeError) and "results for" in str(exc) for exc in raised)
        assert handler.batches == [[0], [1, 2]]

        lone = Coalescer(handler, max_size=1)
        with pytest.raises(RuntimeError, match="2 results for 1 items"):
            await lone.submit(5)

    run(main)


def test_a_caller_cancelled_while_queued_is_dropped_from_its_batch():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=2)
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        queued = [asyncio.ensure_future(coalescer.submit(item)) for item in (1, 2, 3)]
        await steps()
        queued[0].cancel()
        await steps()
        assert queued[0].cancelled()
        handler.finish(0)
        await steps()
        assert handler.batches == [[0], [2, 3]]  # 1 dropped; its place taken within max_size
        handler.finish(1)
        assert await first == "r0"
        assert await asyncio.gather(*queued[1:]) == ["r2", "r3"]

    run(main)


def test_a_batch_whose_callers_were_all_cancelled_is_not_run():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32)
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        queued = [asyncio.ensure_future(coalescer.submit(item)) for item in (1, 2)]
        await steps()
        for call in queued:
            call.cancel()
        await steps()
        handler.finish(0)
        assert await first == "r0"
        await steps()
        assert handler.batches == [[0]] and not coalescer.in_flight and coalescer.queued == 0

    run(main)


def test_a_caller_cancelled_while_its_batch_is_in_flight_does_not_cancel_the_batch():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32)
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        calls = [asyncio.ensure_future(coalescer.submit(item)) for item in (1, 2, 3)]
        await steps()
        handler.finish(0)
        await steps()
        assert handler.batches == [[0], [1, 2, 3]]
        calls[1].cancel()  # its batch is in flight
        await steps()
        assert calls[1].cancelled() and handler.cancelled == []
        handler.finish(1)
        assert await first == "r0"
        assert [await calls[0], await calls[2]] == ["r1", "r3"]
        # The lone caller's own batch too: cancelling it leaves the batch running, so that what joins next waits.
        lone = asyncio.ensure_future(coalescer.submit(7))
        await steps()
        lone.cancel()
        await steps()
        assert handler.cancelled == [] and coalescer.in_flight
        handler.finish(2)
        await steps()
        assert not coalescer.in_flight

    run(main)


def test_the_handler_does_not_run_in_a_callers_context():
    """A caller's context variables (Ray Serve's request context: its calls are cancelled with its request) must not
    reach a batch shared with others: the handler runs in the context the coalescer was built in."""
    request = contextvars.ContextVar("request", default=None)
    seen = []

    async def handler(items):
        seen.append(request.get())
        return items

    async def caller(item):
        request.set(f"request {item}")
        return await coalescer.submit(item)

    coalescer = Coalescer(handler, max_size=32)

    async def main():
        assert await asyncio.gather(caller(1), caller(2)) == [1, 2]

    run(main)
    assert seen == [None, None]


def test_max_size_1_calls_the_handler_with_each_item_concurrently():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=1)
        calls = [asyncio.ensure_future(coalescer.submit(item)) for item in range(4)]
        await steps()
        assert handler.batches == [[0], [1], [2], [3]]
        assert handler.running == 4 and not coalescer.in_flight and coalescer.queued == 0
        for batch in (2, 0, 3, 1):
            handler.finish(batch)
        assert await asyncio.gather(*calls) == ["r0", "r1", "r2", "r3"]
        assert coalescer.sizes == {1: 4}

    run(main)


def test_max_size_1_errors_and_cancellation_are_the_callers_own():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=1)
        cancelled, failing = (asyncio.ensure_future(coalescer.submit(item)) for item in range(2))
        await steps()
        cancelled.cancel()
        await steps()
        assert handler.cancelled == [[0]]  # called directly: its call is its own
        handler.error = ValueError("bad")
        handler.finish(1)
        with pytest.raises(ValueError, match="bad"):
            await failing

    run(main)


def test_the_batch_task_cancelled_leaves_no_caller_waiting():
    async def main():
        handler = Handler()
        coalescer = Coalescer(handler, max_size=32)
        first = asyncio.ensure_future(coalescer.submit(0))
        await steps()
        queued = asyncio.ensure_future(coalescer.submit(1))
        await steps()
        coalescer._in_flight.cancel()  # as the loop closing does
        await steps()
        assert first.cancelled() and queued.cancelled() and not coalescer.in_flight
        # Cancelled before it ever ran.
        again = asyncio.ensure_future(coalescer.submit(2))
        await steps(1)
        coalescer._in_flight.cancel()
        await steps()
        assert again.cancelled() and not coalescer.in_flight

    run(main)
