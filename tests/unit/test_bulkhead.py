from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from proxy.bulkhead import Bulkhead
from proxy.errors import BulkheadFull, Unavailable


class FakeTimer:
    """Stands in for loop.call_later: the test fires the timeouts it wants."""

    def __init__(self) -> None:
        self.pending: list[FakeTimer.Handle] = []

    class Handle:
        def __init__(self, delay: float, callback: Callable[[], None]) -> None:
            self.delay = delay
            self.callback = callback
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def __call__(self, delay: float, callback: Callable[[], None]) -> FakeTimer.Handle:
        handle = FakeTimer.Handle(delay, callback)
        self.pending.append(handle)
        return handle

    def fire_all(self) -> None:
        for handle in self.pending:
            if not handle.cancelled:
                handle.callback()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def hold(bulkhead: Bulkhead, release: asyncio.Event, log: list[int], n: int) -> None:
    async with bulkhead.slot():
        log.append(n)
        await release.wait()


async def test_holders_up_to_the_limit_go_at_once() -> None:
    bulkhead = Bulkhead(2, 5, 1.0)
    release = asyncio.Event()
    log: list[int] = []
    tasks = [asyncio.create_task(hold(bulkhead, release, log, n)) for n in range(3)]
    await settle()
    assert log == [0, 1]
    assert (bulkhead.in_flight, bulkhead.queued) == (2, 1)
    release.set()
    await asyncio.gather(*tasks)
    assert log == [0, 1, 2]
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


async def test_uncontended_slot_does_not_suspend() -> None:
    bulkhead = Bulkhead(1, 0, 1.0)
    cm = bulkhead.slot()
    coro = cm.__aenter__()
    with pytest.raises(StopIteration):
        coro.send(None)  # finished on the first step: no await inside
    assert bulkhead.in_flight == 1
    await cm.__aexit__(None, None, None)
    assert bulkhead.in_flight == 0


async def test_waiters_get_slots_in_arrival_order() -> None:
    bulkhead = Bulkhead(1, 10, 1.0)
    order: list[int] = []
    cm = bulkhead.slot()
    await cm.__aenter__()

    async def wait(n: int) -> None:
        async with bulkhead.slot():
            order.append(n)
            await asyncio.sleep(0)

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(wait(n)))
        await settle()
    assert bulkhead.queued == 5
    await cm.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_newcomer_does_not_overtake_the_queue() -> None:
    bulkhead = Bulkhead(1, 10, 1.0)
    order: list[str] = []
    cm = bulkhead.slot()
    await cm.__aenter__()

    async def wait(name: str) -> None:
        async with bulkhead.slot():
            order.append(name)

    queued = asyncio.create_task(wait("queued"))
    await settle()
    await cm.__aexit__(None, None, None)  # handed to "queued", which has not run yet
    newcomer = asyncio.create_task(wait("newcomer"))
    await asyncio.gather(queued, newcomer)
    assert order == ["queued", "newcomer"]


async def test_full_queue_refuses_at_once() -> None:
    timer = FakeTimer()
    bulkhead = Bulkhead(1, 2, 1.5, timer=timer)
    cm = bulkhead.slot()
    await cm.__aenter__()
    waiters = [asyncio.create_task(cm.__aenter__()) for _ in range(2)]
    await settle()
    assert bulkhead.queued == 2
    with pytest.raises(BulkheadFull) as caught:
        await bulkhead.slot().__aenter__()
    assert caught.value.retry_after == 1.5
    assert caught.value.status == 503
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_zero_queue_refuses_at_once() -> None:
    bulkhead = Bulkhead(1, 0, 1.0)
    async with bulkhead.slot():
        with pytest.raises(Unavailable):
            async with bulkhead.slot():
                pass  # pragma: no cover
    assert bulkhead.in_flight == 0


async def test_queue_timeout_refuses_the_waiter() -> None:
    timer = FakeTimer()
    bulkhead = Bulkhead(1, 5, 0.5, timer=timer)
    cm = bulkhead.slot()
    await cm.__aenter__()
    waiter = asyncio.create_task(bulkhead.slot().__aenter__())
    await settle()
    assert [h.delay for h in timer.pending] == [0.5]
    timer.fire_all()
    with pytest.raises(BulkheadFull) as caught:
        await waiter
    assert caught.value.retry_after == 0.5
    assert (bulkhead.in_flight, bulkhead.queued) == (1, 0)
    await cm.__aexit__(None, None, None)
    assert bulkhead.in_flight == 0


async def test_queue_timeout_with_the_real_loop_timer() -> None:
    bulkhead = Bulkhead(1, 5, 0.02)
    async with bulkhead.slot():
        with pytest.raises(BulkheadFull):
            await asyncio.wait_for(bulkhead.slot().__aenter__(), 2.0)
        assert bulkhead.queued == 0
    assert bulkhead.in_flight == 0


async def test_granted_waiter_cancels_its_timer() -> None:
    timer = FakeTimer()
    bulkhead = Bulkhead(1, 5, 1.0, timer=timer)
    cm = bulkhead.slot()
    await cm.__aenter__()
    waiter = asyncio.create_task(cm.__aenter__())
    await settle()
    await cm.__aexit__(None, None, None)
    await waiter
    assert timer.pending[0].cancelled
    assert bulkhead.in_flight == 1


async def test_slot_released_when_the_block_raises() -> None:
    bulkhead = Bulkhead(1, 0, 1.0)
    with pytest.raises(RuntimeError):
        async with bulkhead.slot():
            raise RuntimeError("boom")
    assert bulkhead.in_flight == 0
    async with bulkhead.slot():
        assert bulkhead.in_flight == 1


async def test_cancelled_waiter_leaves_the_queue() -> None:
    bulkhead = Bulkhead(1, 5, 1.0)
    cm = bulkhead.slot()
    await cm.__aenter__()
    waiter = asyncio.create_task(cm.__aenter__())
    await settle()
    assert bulkhead.queued == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert (bulkhead.in_flight, bulkhead.queued) == (1, 0)
    await cm.__aexit__(None, None, None)
    assert bulkhead.in_flight == 0


async def test_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    bulkhead = Bulkhead(1, 5, 1.0)
    cm = bulkhead.slot()
    await cm.__aenter__()
    first = asyncio.create_task(cm.__aenter__())
    second = asyncio.create_task(cm.__aenter__())
    await settle()
    await cm.__aexit__(None, None, None)  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it could run
    await asyncio.gather(first, return_exceptions=True)
    await second
    assert first.cancelled()
    assert (bulkhead.in_flight, bulkhead.queued) == (1, 0)
    await cm.__aexit__(None, None, None)
    assert bulkhead.in_flight == 0


async def test_slot_handed_to_the_last_waiter_cancelled_at_that_moment_is_freed() -> None:
    bulkhead = Bulkhead(1, 5, 1.0)
    cm = bulkhead.slot()
    await cm.__aenter__()
    waiter = asyncio.create_task(cm.__aenter__())
    await settle()
    await cm.__aexit__(None, None, None)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


async def test_release_skips_a_cancelled_waiter_still_in_the_queue() -> None:
    bulkhead = Bulkhead(1, 5, 1.0)
    cm = bulkhead.slot()
    await cm.__aenter__()
    first = asyncio.create_task(cm.__aenter__())
    second = asyncio.create_task(cm.__aenter__())
    await settle()
    first.cancel()  # its future is cancelled; it leaves the queue only when it runs
    await cm.__aexit__(None, None, None)
    await asyncio.gather(first, return_exceptions=True)
    await second
    assert (bulkhead.in_flight, bulkhead.queued) == (1, 0)


async def test_on_change_reports_in_flight() -> None:
    seen: list[int] = []
    bulkhead = Bulkhead(2, 0, 1.0, on_change=seen.append)
    async with bulkhead.slot():
        async with bulkhead.slot():
            pass
    assert seen == [1, 2, 1, 0]


async def test_settings_and_limits_are_read_only() -> None:
    bulkhead = Bulkhead(3, 4, 0.5)
    assert bulkhead.settings == (3, 4, 0.5)
    assert (bulkhead.max_concurrent, bulkhead.max_queue, bulkhead.queue_timeout) == (3, 4, 0.5)
    with pytest.raises(AttributeError):
        bulkhead.in_flight = 1  # type: ignore[misc]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Bulkhead(0, 1, 1.0)
    with pytest.raises(ValueError):
        Bulkhead(1, -1, 1.0)


async def test_hundreds_of_tasks_never_exceed_the_limit() -> None:
    bulkhead = Bulkhead(7, 1000, 10.0)
    active = 0
    peak = 0

    async def work(n: int) -> int:
        nonlocal active, peak
        async with bulkhead.slot():
            active += 1
            peak = max(peak, active)
            assert bulkhead.in_flight <= 7
            for _ in range(n % 4):
                await asyncio.sleep(0)
            active -= 1
        return n

    results = await asyncio.gather(*(work(n) for n in range(500)))
    assert results == list(range(500))
    assert peak == 7
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


async def test_overflow_under_gather_is_refused_and_the_rest_served() -> None:
    bulkhead = Bulkhead(5, 10, 10.0)
    gate = asyncio.Event()

    async def work() -> None:
        async with bulkhead.slot():
            await gate.wait()

    tasks = [asyncio.create_task(work()) for _ in range(30)]
    await settle()
    assert (bulkhead.in_flight, bulkhead.queued) == (5, 10)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, BulkheadFull) for r in results) == 15
    assert results.count(None) == 15
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


async def test_a_queue_is_made_only_when_someone_waits() -> None:
    # 1,000 routes that never queue hold no deque each (~0.6 KiB apiece).
    bulkhead = Bulkhead(1, 0, 1.0)
    assert bulkhead._waiters is None and bulkhead.queued == 0
    async with bulkhead.slot():
        assert bulkhead._waiters is None
        with pytest.raises(BulkheadFull):  # max_queue 0: refused, with an (empty) queue
            async with bulkhead.slot():
                pass
    assert bulkhead.queued == 0 and bulkhead.in_flight == 0
