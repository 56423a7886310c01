"""The loop's outbox (proxy.outbox): a turn's first write goes at once, its later ones
together on the next turn, and nothing ever overtakes what was written before it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.outbox import Outbox, outbox


class FakeTransport(asyncio.Transport):
    def __init__(self, log: list[tuple[str, bytes]], name: str, fail: bool = False) -> None:
        super().__init__()
        self.log = log
        self.name = name
        self.fail = fail
        self.closing = False
        self.aborted = False

    def write(self, data: Any) -> None:
        if self.fail:
            raise RuntimeError("the handler is closed")
        self.log.append((self.name, bytes(data)))

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = self.closing = True


async def next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_the_first_write_of_a_turn_goes_at_once_the_others_on_the_next_turn() -> None:
    log: list[tuple[str, bytes]] = []
    box = Outbox(asyncio.get_running_loop())
    a, b = FakeTransport(log, "a"), FakeTransport(log, "b")
    box.write(a, b"1")
    assert log == [("a", b"1")]
    box.write(b, b"2")
    box.write(a, b"3")
    assert log == [("a", b"1")]  # held
    await next_turn()
    assert log == [("a", b"1"), ("b", b"2"), ("a", b"3")]
    box.write(b, b"4")  # a new turn: at once again
    assert log[-1] == ("b", b"4")


async def test_settle_sends_what_is_held_before_a_direct_write() -> None:
    log: list[tuple[str, bytes]] = []
    box = Outbox(asyncio.get_running_loop())
    t = FakeTransport(log, "t")
    box.write(t, b"first")
    box.write(t, b"second")
    box.settle()
    t.write(b"third")
    assert [data for _, data in log] == [b"first", b"second", b"third"]
    await next_turn()
    assert len(log) == 3  # the scheduled flush finds nothing left to send


async def test_a_transport_closed_meanwhile_is_skipped_and_a_failing_one_aborted() -> None:
    log: list[tuple[str, bytes]] = []
    box = Outbox(asyncio.get_running_loop())
    first, closed, failing, fine = (FakeTransport(log, n) for n in ("1", "c", "f", "ok"))
    box.write(first, b"x")
    box.write(closed, b"lost")
    box.write(failing, b"boom")
    box.write(fine, b"y")
    closed.closing = True
    failing.fail = True
    await next_turn()
    assert log == [("1", b"x"), ("ok", b"y")]
    assert failing.aborted and not closed.aborted


async def test_one_outbox_per_loop() -> None:
    loop = asyncio.get_running_loop()
    assert outbox(loop) is outbox(loop)


async def test_busy_poll_keeps_the_loop_polling_after_a_write_then_lets_it_sleep() -> None:
    loop = asyncio.get_running_loop()
    box = Outbox(loop)
    t = FakeTransport([], "t")

    async def cpu_while_waiting(seconds: float) -> float:
        began = time.process_time()
        await asyncio.sleep(seconds)
        return time.process_time() - began

    box.write(t, b"x")  # busy_poll off: the loop may sleep at once
    assert not box.polling
    assert await cpu_while_waiting(0.1) < 0.03

    box.busy_poll = 0.1
    box.write(t, b"y")
    assert box.polling
    spent = await cpu_while_waiting(0.3)  # 0.1 s of polling, then sleep
    assert not box.polling
    assert spent > 0.04  # it polled (on a loaded machine, not all of the 0.1 s is ours)
    assert await cpu_while_waiting(0.1) < 0.03  # and once over, it sleeps again
