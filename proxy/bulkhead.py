"""The bulkhead (SPEC §5): at most `max_concurrent` holders of a route's slots at once, up to
`max_queue` more waiting in arrival order for at most `queue_timeout` seconds, the rest
refused at once with `BulkheadFull`.

    async with bulkhead.slot():
        ...   # held until the last byte has been relayed

A freed slot is handed straight to the oldest waiter, so `in_flight` never drops while
someone is queued and a newcomer cannot overtake the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from proxy.errors import BulkheadFull

__all__ = ["Bulkhead", "Cancellable", "Timer"]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


Timer = Callable[[float, Callable[[], None]], Cancellable]
"""Calls the callback after `delay` seconds unless cancelled: `loop.call_later` by default."""


def _call_later(delay: float, callback: Callable[[], None]) -> Cancellable:
    return asyncio.get_running_loop().call_later(delay, callback)


class Bulkhead:
    __slots__ = (
        "_max_concurrent",
        "_max_queue",
        "_queue_timeout",
        "_in_flight",
        "_waiters",
        "_on_change",
        "_timer",
        "_slot",
    )

    def __init__(
        self,
        max_concurrent: int,
        max_queue: int,
        queue_timeout: float,
        *,
        on_change: Callable[[int], None] | None = None,
        timer: Timer = _call_later,
    ) -> None:
        if max_concurrent < 1 or max_queue < 0 or queue_timeout < 0:
            raise ValueError("need max_concurrent >= 1, max_queue >= 0, queue_timeout >= 0")
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._in_flight = 0
        # True: the slot was handed over; False: the wait timed out. Made when the first
        # request has to wait: an empty deque is ~0.6 KiB, and most routes never queue.
        self._waiters: deque[asyncio.Future[bool]] | None = None
        self._on_change = on_change
        self._timer = timer
        self._slot = _Slot(self)

    def slot(self) -> _Slot:
        """`async with bulkhead.slot():` holds one slot for the block, or raises BulkheadFull."""
        return self._slot

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters) if self._waiters is not None else 0

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def queue_timeout(self) -> float:
        return self._queue_timeout

    @property
    def settings(self) -> tuple[int, int, float]:
        return (self._max_concurrent, self._max_queue, self._queue_timeout)

    async def _wait(self) -> None:
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = deque()
        if len(waiters) >= self._max_queue:
            raise self._full("the route is at capacity and its queue is full")
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        handle = self._timer(self._queue_timeout, lambda: self._expire(waiter))
        try:
            granted = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                # The slot was handed over as we were cancelled: pass it on.
                self._release()
            else:
                self._discard(waiter)
            raise
        finally:
            handle.cancel()
        if not granted:
            raise self._full(f"no slot freed up within {self._queue_timeout:g}s")

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            self._discard(waiter)
            waiter.set_result(False)

    def _discard(self, waiter: asyncio.Future[bool]) -> None:
        if self._waiters is not None:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled waiter may not have left the queue yet
                waiter.set_result(True)
                return
        self._in_flight -= 1
        if self._on_change is not None:
            self._on_change(self._in_flight)

    def _full(self, detail: str) -> BulkheadFull:
        return BulkheadFull(detail, retry_after=self._queue_timeout or 1)


class _Slot:
    """Stateless, so one instance per bulkhead serves every request."""

    __slots__ = ("_bulkhead",)

    def __init__(self, bulkhead: Bulkhead) -> None:
        self._bulkhead = bulkhead

    async def __aenter__(self) -> None:
        bulkhead = self._bulkhead
        if bulkhead._in_flight < bulkhead._max_concurrent:
            bulkhead._in_flight += 1
            if bulkhead._on_change is not None:
                bulkhead._on_change(bulkhead._in_flight)
            return
        await bulkhead._wait()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bulkhead._release()
