"""Shared breaker state (SPEC §5 `breaker.storage`) between two real `strangler run`
processes and a real redis-server: an opening reaches the other proxy within a second, and
Redis dying and coming back costs no request.

Each test has routes of its own (a breaker is per route) and paths of its own (the test
upstream counts hits per path), so the tests do not depend on order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import ProxyProcess, UpstreamServer
from tests.e2e.upstream import Recorder, make_app
from tests.unit.test_breaker_store import RedisServer

STORAGE_UP = "strangler_breaker_storage_up"
BREAKER_STATE = "strangler_breaker_state"
THRESHOLD = 3

CONFIG = """
version: 1
legacy: healthy
backends:
  healthy: {{url: "{healthy}"}}
  flaky: {{url: "{flaky}"}}
defaults:
  retry: {{attempts: 1}}
  breaker: {{failure_threshold: {threshold}, reset_timeout: 120, storage: "{storage}"}}
routes:
  - {{name: first, match: {{prefix: /first}}, backend: flaky}}
  - {{name: steady, match: {{prefix: /steady}}, backend: flaky}}
  - {{name: late, match: {{prefix: /late}}, backend: flaky}}
  - {{name: ok, match: {{prefix: /ok}}, backend: healthy}}
"""


@dataclass
class Fleet:
    redis: RedisServer
    flaky: Recorder
    healthy: Recorder
    a: ProxyProcess
    b: ProxyProcess


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("shared-breakers")
    server = RedisServer(workdir).start()
    flaky, healthy = Recorder("flaky"), Recorder("healthy")
    servers = [UpstreamServer(make_app(flaky)), UpstreamServer(make_app(healthy))]
    config = CONFIG.format(
        healthy=servers[1].url, flaky=servers[0].url, threshold=THRESHOLD, storage=server.url
    )
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    a, b = ProxyProcess(config, workdir / "a"), ProxyProcess(config, workdir / "b")
    try:
        for upstream in servers:
            upstream.start()
        a.start()
        b.start()
        yield Fleet(server, flaky, healthy, a, b)
    finally:
        a.stop()
        b.stop()
        for upstream in servers:
            upstream.stop()
        server.stop()


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float | None:
    text = httpx.get(proxy.admin + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def breaker_state(proxy: ProxyProcess, route: str) -> float | None:
    return metric(proxy, BREAKER_STATE, route=route, backend="flaky")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `predicate` held; fails after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"still false after {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def both_up(fleet: Fleet, value: float) -> Callable[[], bool]:
    return lambda: all(metric(p, STORAGE_UP) == value for p in (fleet.a, fleet.b))


def open_through(proxy: ProxyProcess, path: str) -> float:
    """Fail `THRESHOLD` requests through `proxy`; the time its breaker opened."""
    for _ in range(THRESHOLD):
        assert httpx.get(proxy.url + path + "?status=500", timeout=5).status_code == 500
    return time.monotonic()


def assert_rejected_by_breaker(r: httpx.Response, route: str) -> None:
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["route"] == route
    assert int(r.headers["retry-after"]) > 60


def test_a_breaker_opened_through_one_proxy_is_open_on_the_other_within_a_second(
    fleet: Fleet,
) -> None:
    wait_for(both_up(fleet, 1.0))
    assert breaker_state(fleet.b, "first") == 0.0
    opened = open_through(fleet.a, "/first/x")
    assert breaker_state(fleet.a, "first") == 2.0
    wait_for(lambda: breaker_state(fleet.b, "first") == 2.0, timeout=5)
    assert time.monotonic() - opened < 1.0
    assert_rejected_by_breaker(httpx.get(fleet.b.url + "/first/x", timeout=5), "first")
    assert fleet.flaky.hits["/first/x"] == THRESHOLD  # b sent nothing to the upstream


@dataclass
class Sender:
    """Sends GETs to `url` one after the other until stopped; keeps what each got."""

    url: str
    results: list[tuple[int | str, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    status: int | str = client.get(self.url).status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                self.results.append((status, time.monotonic() - t0))
                time.sleep(0.01)


def test_killing_redis_loses_no_request_and_its_return_resyncs(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    wait_for(both_up(fleet, 1.0))
    open_through(a, "/steady/x")
    wait_for(lambda: breaker_state(b, "steady") == 2.0, timeout=5)
    senders = [Sender(proxy.url + path) for proxy in (a, b) for path in ("/ok/x", "/steady/x")]
    threads = [threading.Thread(target=s.run, daemon=True) for s in senders]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        fleet.redis.kill()
        wait_for(both_up(fleet, 0.0), timeout=5)
        time.sleep(1.0)  # traffic while Redis is gone
        fleet.redis.start()  # empty, on the same port
        wait_for(both_up(fleet, 1.0), timeout=10)
        time.sleep(0.3)
    finally:
        for sender in senders:
            sender.stop.set()
        for thread in threads:
            thread.join(10)

    for sender in senders:
        expected = 200 if "/ok/" in sender.url else 503
        statuses = {status for status, _ in sender.results}
        assert statuses == {expected}, sender.url
        assert len(sender.results) >= 20, sender.url
        assert max(took for _, took in sender.results) < 2.0, sender.url  # no hang
    assert fleet.flaky.hits["/steady/x"] == THRESHOLD
    for proxy in (a, b):
        messages = [line.get("message", "") for line in proxy.log_lines()]
        assert sum(m.startswith("breaker storage down") for m in messages) == 1

    # Redis came back empty: the instances wrote their state back...
    client = redis.Redis.from_url(fleet.redis.url, decode_responses=True, socket_timeout=2)
    try:
        wait_for(lambda: client.hget("strangler:breaker:steady/flaky", "state") == "open", 5)
    finally:
        client.close()
    # ...and share new transitions again.
    opened = open_through(b, "/late/x")
    wait_for(lambda: breaker_state(a, "late") == 2.0, timeout=5)
    assert time.monotonic() - opened < 1.0
    assert_rejected_by_breaker(httpx.get(a.url + "/late/x", timeout=5), "late")
    assert fleet.flaky.hits["/late/x"] == THRESHOLD
