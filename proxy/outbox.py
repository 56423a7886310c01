"""Small writes made while the event loop runs its callbacks, sent together on its next turn.

Under load most of a loopback write's cost is not the copy but waking the process that
reads it (the kernel wakes the reader's epoll from inside our `write`: 10% of the proxy's
CPU at 64 connections, `sock_def_readable` in `perf`). A loop turn answers several
requests and sends several upstream requests; written one by one, ~100 µs apart, each
write finds its reader asleep again and pays a wake-up. Written back to back at the end
of the turn, the first wakes the reader and the others find it awake.

Busy polling (config `listen.busy_poll_us`, off by default): after a write the loop keeps
polling for that long instead of sleeping, so the answer to what was written (a backend's
response, a kept-alive client's next request) is read without the wake-up of a sleeping
process, ~30 µs per hop on the machine of bench/RESULTS.md. It spends a core on polling
while traffic is steady but sparse, and under a CPU quota (a Kubernetes limit) that time
counts: use it where a core is the proxy's own.

Only whole small messages are held (a complete small response, a request without a
streamed body): streamed bodies go straight out under flow control. Whoever writes or
closes a transport directly calls `settle()` first, so a transport's bytes always leave in
the order they were written.
"""

from __future__ import annotations

import asyncio
import time
import weakref


class Outbox:
    __slots__ = (
        "loop",
        "pending",
        "scheduled",
        "busy_poll",
        "polling",
        "last_write",
        "__weakref__",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.Transport, bytes]] = []
        self.scheduled = False
        self.busy_poll = 0.0  # seconds the loop polls after a write; 0: it may sleep at once
        self.polling = False
        self.last_write = 0.0

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        if self.busy_poll:
            self.last_write = time.perf_counter()
            if not self.polling:
                self.polling = True
                self.loop.call_soon(self._poll)
        if self.scheduled:
            self.pending.append((transport, data))
        else:
            # The turn's first write goes at once (one request at a time waits for nothing);
            # the turn's later ones wait for the next turn, to go together.
            self.scheduled = True
            self.loop.call_soon(self.flush)
            transport.write(data)

    def _poll(self) -> None:
        # A callback always ready keeps the loop from sleeping: each turn polls the
        # sockets without blocking, until `busy_poll` has passed since the last write.
        if time.perf_counter() - self.last_write < self.busy_poll:
            self.loop.call_soon(self._poll)
        else:
            self.polling = False

    def settle(self) -> None:
        """Send what is held now: a direct write or close comes next."""
        if self.pending:
            self.flush()

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for transport, data in pending:
            if transport.is_closing():
                continue  # aborted meanwhile: its connection_lost tells its owner
            try:
                transport.write(data)
            except (OSError, RuntimeError):
                transport.abort()


_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = (
    weakref.WeakKeyDictionary()
)


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The loop's outbox (one per loop: every writer on it shares the turn's batch)."""
    box = _outboxes.get(loop)
    if box is None:
        box = _outboxes[loop] = Outbox(loop)
    return box
