"""Shared breaker state (SPEC §5 `breaker.storage`) against a real redis-server: two stores
stand for two instances of the proxy sharing one Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Ticket
from proxy.breaker_store import KEY_PREFIX, BreakerStores, SharedBreakerStore
from proxy.config import Config
from proxy.forward import close_all
from proxy.metrics import Metrics
from proxy.runtime import build

KEY = "orders/orders"
WAIT = 10.0  # bound on any wait; the assertions on timing are much tighter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process of our own on 127.0.0.1, without persistence. It can be
    killed, paused (a hung Redis) and started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            pytest.fail("redis-server is missing: `make system-deps` installs it")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        log = (self.workdir / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + WAIT
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on :{self.port} did not start")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.paused = False

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Instance:
    """One proxy instance as far as breakers go: a store, its breakers and what they saw."""

    def __init__(self, url: str, name: str) -> None:
        self.ups: list[bool] = []
        self.store = SharedBreakerStore(url, on_up=self.ups.append, origin=name)
        self.clock = FakeClock()
        self.changes: list[tuple[str, str, str]] = []

    def breaker(self, key: str = KEY, *, failures: int = 2, reset: float = 30.0) -> Breaker:
        storage = self.store.storage(key)
        breaker = Breaker(
            name=key,
            failure_threshold=failures,
            reset_timeout=reset,
            success_threshold=1,
            clock=self.clock,
            on_state_change=lambda *change: self.changes.append(change),
            storage=storage,
        )
        storage.attach(breaker)
        return breaker


@pytest.fixture()
async def two(redis_server: RedisServer) -> AsyncIterator[tuple[Instance, Instance]]:
    a, b = Instance(redis_server.url, "a"), Instance(redis_server.url, "b")
    yield a, b
    await a.store.close()
    await b.store.close()


async def start(*instances: Instance) -> None:
    for i in instances:
        i.store.start()
    await eventually(lambda: all(i.store.up for i in instances))


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> float:
    """Seconds until `predicate` held; fails after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"still false after {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def acquire(breaker: Breaker) -> Ticket:
    ticket = breaker.try_acquire()
    assert ticket is not None
    return ticket


def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_failure(acquire(breaker))


async def stored(url: str, key: str = KEY) -> dict[str, str]:
    client = Redis.from_url(url, decode_responses=True, socket_timeout=2)
    try:
        found = await client.hgetall(KEY_PREFIX + key)
        return {str(k): str(v) for k, v in found.items()}
    finally:
        await client.aclose()


async def test_an_opening_reaches_the_other_instance_within_a_second(
    two: tuple[Instance, Instance], redis_server: RedisServer
) -> None:
    a, b = two
    ba, bb = a.breaker(), b.breaker()
    await start(a, b)
    fail(ba, 2)
    assert ba.state == OPEN
    seen = await eventually(lambda: bb.state == OPEN)
    assert seen < 1.0
    assert bb.try_acquire() is None
    assert 29.0 < bb.retry_after() <= 30.0  # the reset timeout runs from a's opening
    assert b.changes == [(KEY, CLOSED, OPEN)]  # b's listener (metrics, log) was told
    assert (await stored(redis_server.url))["state"] == OPEN


async def test_failure_counts_stay_per_instance(two: tuple[Instance, Instance]) -> None:
    a, b = two
    ba, bb = a.breaker(failures=2), b.breaker(failures=2)
    await start(a, b)
    fail(ba)
    fail(bb)
    await asyncio.sleep(0.8)  # several polls
    assert ba.state == bb.state == CLOSED


async def test_the_half_open_trial_is_per_instance_and_a_closing_is_shared(
    two: tuple[Instance, Instance], redis_server: RedisServer
) -> None:
    a, b = two
    ba, bb = a.breaker(), b.breaker()
    await start(a, b)
    fail(ba, 2)
    await eventually(lambda: bb.state == OPEN)
    a.clock.now += 30
    b.clock.now += 30
    trial_a = acquire(ba)
    assert ba.state == HALF_OPEN and ba.try_acquire() is None
    await asyncio.sleep(0.6)
    assert bb.state == OPEN  # a's half-open is not shared
    assert (await stored(redis_server.url))["state"] == OPEN
    trial_b = acquire(bb)  # b's own single trial
    assert bb.try_acquire() is None
    ba.record_success(trial_a)
    assert ba.state == CLOSED
    assert await eventually(lambda: bb.state == CLOSED) < 1.0
    bb.record_failure(trial_b)  # a verdict from before the closing: ignored
    assert bb.state == CLOSED


async def test_a_failed_trial_reopens_everywhere(two: tuple[Instance, Instance]) -> None:
    a, b = two
    ba, bb = a.breaker(), b.breaker()
    await start(a, b)
    fail(ba, 2)
    await eventually(lambda: bb.state == OPEN)
    a.clock.now += 30
    b.clock.now += 30
    trial_b = acquire(bb)
    assert bb.state == HALF_OPEN
    fail(ba)  # a's trial fails: opened again, from now
    assert ba.state == OPEN
    await eventually(lambda: bb.state == OPEN)
    assert bb.retry_after() > 29.0
    bb.record_success(trial_b)  # b's trial was cut short by the reopening
    assert bb.state == OPEN


async def test_an_instance_that_starts_later_takes_the_shared_state(
    two: tuple[Instance, Instance],
) -> None:
    a, b = two
    ba = a.breaker()
    await start(a)
    fail(ba, 2)
    while (await stored(a.store.url)).get("state") != OPEN:
        await asyncio.sleep(0.02)
    bb = b.breaker()
    assert bb.state == CLOSED
    await start(b)
    await eventually(lambda: bb.state == OPEN)


async def test_redis_killed_each_instance_goes_on_alone(
    two: tuple[Instance, Instance], redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = two
    ba, bb = a.breaker(), b.breaker()
    await start(a, b)
    caplog.set_level(logging.INFO, "strangler.breaker")
    lag = LoopLag()
    with lag:
        redis_server.kill()
        t0 = time.monotonic()
        fail(ba, 2)
        assert time.monotonic() - t0 < 0.05  # never waits on Redis
        assert ba.state == OPEN and ba.try_acquire() is None
        await eventually(lambda: a.store.up is False and b.store.up is False, timeout=5)
        await asyncio.sleep(1.5)  # several reconnection attempts
    assert bb.state == CLOSED and bb.try_acquire() is not None
    assert a.ups == b.ups == [True, False]
    downs = [r for r in caplog.records if r.getMessage().startswith("breaker storage down")]
    assert len(downs) == 2  # once per instance
    assert lag.worst < 1.0


async def test_redis_back_the_most_recent_transition_wins(
    two: tuple[Instance, Instance], redis_server: RedisServer
) -> None:
    a, b = two
    a1, b1 = a.breaker("r/one"), b.breaker("r/one")
    a2, b2 = a.breaker("r/two"), b.breaker("r/two")
    await start(a, b)
    fail(a1, 2)
    fail(a2, 2)
    await eventually(lambda: b1.state == OPEN and b2.state == OPEN)
    redis_server.kill()
    await eventually(lambda: a.store.up is False and b.store.up is False, timeout=5)
    for clock in (a.clock, b.clock):
        clock.now += 30
    a1.record_success(acquire(a1))  # r/one: a closes it, b does nothing more
    a2.record_success(acquire(a2))  # r/two: a closes it, then b's trial fails
    await asyncio.sleep(0.01)
    b2.record_failure(acquire(b2))
    assert (a1.state, b1.state, a2.state, b2.state) == (CLOSED, OPEN, CLOSED, OPEN)
    redis_server.start()  # empty, on the same port
    await eventually(lambda: bool(a.store.up and b.store.up))
    await eventually(lambda: b1.state == CLOSED and a2.state == OPEN, timeout=3)
    assert (a1.state, b2.state) == (CLOSED, OPEN)
    assert (await stored(redis_server.url, "r/one"))["state"] == CLOSED
    assert (await stored(redis_server.url, "r/two"))["state"] == OPEN
    assert a.ups == b.ups == [True, False, True]


async def test_a_hung_redis_is_down_and_its_return_resyncs(
    two: tuple[Instance, Instance], redis_server: RedisServer
) -> None:
    a, b = two
    ba, bb = a.breaker(), b.breaker()
    await start(a, b)
    lag = LoopLag()
    with lag:
        redis_server.pause()
        t0 = time.monotonic()
        fail(ba, 2)
        assert time.monotonic() - t0 < 0.05  # never waits on Redis
        await eventually(lambda: a.store.up is False and b.store.up is False, timeout=5)
        await asyncio.sleep(1.5)  # hung for a while
        assert bb.state == CLOSED
    assert lag.worst < 1.0  # the loop never waited for Redis to wake up
    redis_server.resume()
    await eventually(lambda: bool(a.store.up and b.store.up))
    await eventually(lambda: bb.state == OPEN, timeout=3)


async def test_a_store_that_is_not_started_never_touches_redis(
    redis_server: RedisServer,
) -> None:
    ups: list[bool] = []
    stores = BreakerStores(on_up=ups.append)
    store = stores.get(redis_server.url)
    assert stores.get(redis_server.url) is store
    storage = store.storage(KEY)
    breaker = Breaker(
        name=KEY, failure_threshold=1, reset_timeout=5, success_threshold=1, storage=storage
    )
    storage.attach(breaker)
    fail(breaker)
    assert breaker.state == OPEN
    await asyncio.sleep(0.5)
    assert store.up is None and ups == []
    assert await stored(redis_server.url) == {}
    await stores.close()


def config(url: str | None, failures: int = 2) -> Config:
    breaker: dict[str, object] = {"failure_threshold": failures}
    if url is not None:
        breaker["storage"] = url
    return Config.model_validate(
        {
            "version": 1,
            "legacy": "monolith",
            "backends": {"monolith": {"url": "http://127.0.0.1:9"}},
            "defaults": {"breaker": breaker},
        }
    )


async def test_the_runtime_builds_shared_breakers_and_keeps_them_across_reloads(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics(CollectorRegistry())
    rt = build(config(redis_server.url), None, metrics)
    stores = rt.breaker_stores
    stores.start()
    state = rt.routes["default"]
    assert state.breaker_store is stores.get(redis_server.url)
    breaker = state.breaker("monolith")
    await eventually(
        lambda: metrics.registry.get_sample_value("strangler_breaker_storage_up") == 1.0
    )
    fail(breaker, 2)
    assert (
        metrics.registry.get_sample_value(
            "strangler_breaker_state", {"route": "default", "backend": "monolith"}
        )
        == 2.0
    )
    same = build(config(redis_server.url), rt, metrics)
    assert same.breaker_stores is stores
    assert same.routes["default"].breaker("monolith") is breaker
    # New thresholds: a new breaker, which takes the shared state at once.
    rebuilt = build(config(redis_server.url, failures=5), same, metrics)
    fresh = rebuilt.routes["default"].breaker("monolith")
    assert fresh is not breaker and fresh.state == OPEN
    # No storage: a plain local breaker.
    local = build(config(None, failures=5), rebuilt, metrics).routes["default"]
    assert local.breaker_store is None and local.breaker("monolith").state == CLOSED
    await stores.close()
    await close_all(rt.upstreams.values())


class LoopLag:
    """The worst delay of a 10 ms tick on the running loop, while in the block."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - t0 - 0.01)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
