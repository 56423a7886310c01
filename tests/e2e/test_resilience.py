"""SPEC §5 resilience through the real `strangler run` process, in front of real failing
upstreams: retries and their budget, circuit breakers, fallback and bulkheads. Each test
asserts what the backends received, what the clients got and what /metrics says.

Every test has routes of its own (breakers, budgets and bulkheads are per route) and paths
of its own (the test service counts hits per path), so the tests do not depend on order.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from tests.e2e.harness import ProxyProcess, UpstreamServer, free_port, wait_until
from tests.e2e.upstream import Recorder, make_app, read_body

KIB = 1024


class Service:
    """The extracted service under test, an ASGI app. The query string picks its behaviour:

    fail=S            always answers status S
    flaky=N&status=S  answers S to the first N requests of its path, then 200
    sleep=D           answers after D seconds (slowfirst=N: only the first N requests sleep)
    hold=KEY          answers once the test calls `release(KEY)` (30 s at most)
    holdbody=KEY      sends its headers and a first chunk at once, the rest after `release`
    die=1             promises a big body, sends 100 bytes and breaks the connection

    A path in `failing` answers that status whatever the query says. Every request is
    recorded (path, method, arrival time, body size); a client that went away while the
    service was waiting is counted in `disconnects`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.received: list[dict[str, Any]] = []
        self.disconnects: Counter[str] = Counter()
        self.failing: dict[str, int] = {}
        self._gates: dict[str, threading.Event] = {}

    def gate(self, key: str) -> threading.Event:
        with self.lock:
            return self._gates.setdefault(key, threading.Event())

    def release(self, key: str) -> None:
        self.gate(key).set()

    def arrivals(self, path: str) -> list[float]:
        return [r["time"] for r in list(self.received) if r["path"] == path]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        body = await read_body(receive)
        headers = dict((k.decode().lower(), v.decode()) for k, v in scope["headers"])
        with self.lock:
            self.hits[path] += 1
            n = self.hits[path]
            self.received.append(
                {
                    "path": path,
                    "method": scope["method"],
                    "time": time.monotonic(),
                    "body_size": len(body),
                    "idempotency_key": headers.get("idempotency-key"),
                }
            )
        status = self.failing.get(path) or int(q.get("fail", 0))
        if not status and n <= int(q.get("flaky", 0)):
            status = int(q.get("status", 503))
        if status:
            await _json(send, status, {"served_by": self.name, "failing": True})
            return
        if "sleep" in q and n <= int(q.get("slowfirst", n)):
            if not await self._wait(receive, path, lambda: False, float(q["sleep"])):
                return
        if "hold" in q:
            gate = self.gate(q["hold"])
            if not await self._wait(receive, path, gate.is_set, 30.0):
                return
        if "holdbody" in q:
            await _hold_body(send, self.gate(q["holdbody"]))
            return
        if "die" in q:
            await _die(send)
            return
        await _json(send, 200, {"served_by": self.name, "path": path, "body_size": len(body)})

    async def _wait(
        self, receive: Any, path: str, ready: Callable[[], bool], timeout: float
    ) -> bool:
        """Waits until `ready()` or `timeout`; False (and noted) if the client went away."""
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(receive())
        deadline = loop.time() + timeout
        try:
            while not ready() and loop.time() < deadline:
                done, _ = await asyncio.wait({gone}, timeout=0.01)
                if done and gone.result()["type"] == "http.disconnect":
                    with self.lock:
                        self.disconnects[path] += 1
                    return False
            return True
        finally:
            gone.cancel()


async def _json(send: Any, status: int, data: Any) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _hold_body(send: Any, gate: threading.Event) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
    for _ in range(3000):
        if gate.is_set():
            break
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b"last\n"})


async def _die(send: Any) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"1000000")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"y" * 100, "more_body": True})
    await asyncio.sleep(0.05)
    raise RuntimeError("the backend dies mid-stream")


CONFIG = """
version: 1
legacy: mono
backends:
  mono: {{url: "{mono}"}}
  svc: {{url: "{svc}"}}
  dead: {{url: "{dead}"}}
defaults:
  timeout: {{connect: 1.0, read: 10.0, total: 20.0}}
  retry:
    attempts: 3
    backoff: 0.01
    max_backoff: 0.05
    on: [connect, timeout, 502, 503, 504]
    budget: 1.0          # the budget has a test of its own, on the `budget` route
  breaker: {{failure_threshold: 100000, reset_timeout: 30}}
routes:
  - {{name: retry, match: {{prefix: /retry}}, backend: svc}}
  - name: retry-slow
    match: {{prefix: /retry-slow}}
    backend: svc
    timeout: {{read: 0.3}}
  - name: retry-total
    match: {{prefix: /retry-total}}
    backend: svc
    timeout: {{read: 0.4, total: 1.0}}
    retry: {{attempts: 5}}
  - {{name: retry-dead, match: {{prefix: /retry-dead}}, backend: dead}}
  - name: retry-backoff
    match: {{prefix: /retry-backoff}}
    backend: svc
    retry: {{attempts: 6, backoff: 0.1, max_backoff: 0.15}}
  - name: budget
    match: {{prefix: /budget}}
    backend: svc
    retry: {{attempts: 3, backoff: 0.001, max_backoff: 0.001, budget: 0.2}}
  - name: breaker
    match: {{prefix: /breaker}}
    backend: svc
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 3, reset_timeout: 30}}
  - name: breaker-retry
    match: {{prefix: /breaker-retry}}
    backend: svc
    retry: {{attempts: 3}}
    breaker: {{failure_threshold: 2, reset_timeout: 30}}
  - name: half-open
    match: {{prefix: /half-open}}
    backend: svc
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 2, reset_timeout: 1, success_threshold: 2}}
  - name: reopen
    match: {{prefix: /reopen}}
    backend: svc
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 1, reset_timeout: 1}}
  - name: gone
    match: {{prefix: /gone}}
    backend: svc
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 1, reset_timeout: 30}}
  - name: iso-a
    match: {{prefix: /iso-a}}
    backend: svc
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 2, reset_timeout: 30}}
  - name: iso-b
    match: {{prefix: /iso-b}}
    backend: svc
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 2, reset_timeout: 30}}
  - name: fallback
    match: {{prefix: /fallback}}
    backend: svc
    fallback: mono
    retry: {{attempts: 2}}
  - name: fallback-open
    match: {{prefix: /fallback-open}}
    backend: svc
    fallback: mono
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 2, reset_timeout: 30}}
  - name: fallback-dead
    match: {{prefix: /fallback-dead}}
    backend: dead
    fallback: mono
    retry: {{attempts: 2}}
  - name: fallback-slow
    match: {{prefix: /fallback-slow}}
    backend: svc
    fallback: mono
    timeout: {{read: 0.3}}
    retry: {{attempts: 1}}
  - name: fallback-total
    match: {{prefix: /fallback-total}}
    backend: svc
    fallback: mono
    timeout: {{read: 5, total: 1}}
    retry: {{attempts: 1}}
  - name: no-chain
    match: {{prefix: /no-chain}}
    backend: svc
    fallback: dead
    retry: {{attempts: 1}}
  - name: bulkhead
    match: {{prefix: /bulkhead}}
    backend: svc
    bulkhead: {{max_concurrent: 2, max_queue: 1, queue_timeout: 5}}
  - name: queue
    match: {{prefix: /queue}}
    backend: svc
    bulkhead: {{max_concurrent: 1, max_queue: 1, queue_timeout: 0.5}}
  - name: queue-gone
    match: {{prefix: /queue-gone}}
    backend: svc
    bulkhead: {{max_concurrent: 1, max_queue: 1, queue_timeout: 5}}
  - name: fifo
    match: {{prefix: /fifo}}
    backend: svc
    bulkhead: {{max_concurrent: 1, max_queue: 3, queue_timeout: 5}}
  - name: flood
    match: {{prefix: /flood}}
    backend: svc
    bulkhead: {{max_concurrent: 2, max_queue: 2, queue_timeout: 0.5}}
  - {{name: fast, match: {{prefix: /fast}}, backend: svc}}
  - name: slot
    match: {{prefix: /slot}}
    backend: svc
    retry: {{attempts: 1}}
    bulkhead: {{max_concurrent: 1, max_queue: 0}}
"""


@dataclass
class Env:
    proxy: ProxyProcess
    svc: Service
    mono: Recorder

    def url(self, path: str) -> str:
        return self.proxy.url + path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    svc, mono = Service("svc"), Recorder("mono")
    with UpstreamServer(svc) as s, UpstreamServer(make_app(mono)) as m:
        dead = f"http://127.0.0.1:{free_port()}"
        config = CONFIG.format(svc=s.url, mono=m.url, dead=dead)
        workdir: Path = tmp_path_factory.mktemp("resilience")
        with ProxyProcess(config, workdir) as proxy:
            yield Env(proxy, svc, mono)


def fresh(prefix: str) -> str:
    """A path under `prefix` that no other test uses."""
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


# -- metrics ---------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Scrape:
    """One read of the proxy's /metrics."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m and not line.startswith("#"):
                labels = dict(_LABEL.findall(m.group(2) or ""))
                self.samples.append((m.group(1), labels, float(m.group(3))))

    def value(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`; 0 when none."""
        return sum(
            v
            for n, have, v in self.samples
            if n == name and all(have.get(k) == want for k, want in labels.items())
        )


def scrape(env: Env) -> Scrape:
    r = httpx.get(env.proxy.admin + "/metrics", timeout=10)
    assert r.status_code == 200
    return Scrape(r.text)


def breaker_state(env: Env, route: str, backend: str = "svc") -> float:
    return scrape(env).value("strangler_breaker_state", route=route, backend=backend)


# -- assertions on answers -------------------------------------------------------------


def assert_problem(r: httpx.Response, status: int, route: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["route"] == route
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["title"] and body["detail"]
    if status == 503:
        assert int(r.headers["retry-after"]) >= 1
    return body


def assert_served(r: httpx.Response, status: int, by: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["served_by"] == by


def breaker_log(env: Env, route: str) -> list[str]:
    """The states the route's breaker went through, from the proxy's log."""
    return [
        line["state"]
        for line in env.proxy.log_lines()
        if line.get("message") == "breaker state changed" and line.get("route") == route
    ]


# -- 1. retries ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_replay_safe_request_is_retried_on_503_then_succeeds(env: Env, method: str) -> None:
    path = fresh("/retry")
    before = scrape(env)
    r = httpx.request(method, env.url(path + "?flaky=1&status=503"), timeout=10)
    assert r.status_code == 200
    if method != "HEAD":
        assert r.json()["served_by"] == "svc"
    assert env.svc.hits[path] == 2
    after = scrape(env)
    labels = {"route": "retry", "backend": "svc"}
    retries = "strangler_retries_total"
    assert after.value(retries, **labels) - before.value(retries, **labels) == 1
    failures = "strangler_upstream_failures_total"
    status_failures = after.value(failures, reason="status", **labels)
    assert status_failures - before.value(failures, reason="status", **labels) == 1
    entry = env.proxy.wait_access(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert entry["status"] == 200 and entry["attempts"] == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_request_that_is_not_replay_safe_reaches_a_failing_backend_once(
    env: Env, method: str
) -> None:
    path = fresh("/retry")
    r = httpx.request(method, env.url(path + "?fail=503"), content=b"order", timeout=10)
    assert_served(r, 503, "svc")  # the backend's own answer, not retried
    time.sleep(0.2)
    assert env.svc.hits[path] == 1


def test_post_that_timed_out_or_could_not_connect_is_sent_once(env: Env) -> None:
    path = fresh("/retry-slow")
    r = httpx.post(env.url(path + "?sleep=2"), content=b"order", timeout=10)
    assert_problem(r, 504, "retry-slow")
    before = scrape(env)
    r = httpx.post(env.url("/retry-dead/x"), content=b"order", timeout=10)
    assert_problem(r, 502, "retry-dead")
    after = scrape(env)
    labels = {"route": "retry-dead", "backend": "dead", "reason": "connect"}
    connects = "strangler_upstream_failures_total"
    assert after.value(connects, **labels) - before.value(connects, **labels) == 1
    assert env.svc.hits[path] == 1


def test_post_with_idempotency_key_is_retried_with_its_body(env: Env) -> None:
    path = fresh("/retry")
    body = b"x" * (10 * KIB)
    headers = {"Idempotency-Key": "k-" + uuid.uuid4().hex}
    r = httpx.post(env.url(path + "?flaky=2"), content=body, headers=headers, timeout=10)
    assert_served(r, 200, "svc")
    got = [x for x in env.svc.received if x["path"] == path]
    assert len(got) == 3
    assert all(x["body_size"] == len(body) for x in got)
    assert {x["idempotency_key"] for x in got} == {headers["Idempotency-Key"]}


def test_only_the_causes_in_retry_on_are_retried(env: Env) -> None:
    not_listed, listed = fresh("/retry"), fresh("/retry")
    assert_served(httpx.get(env.url(not_listed + "?fail=500"), timeout=10), 500, "svc")
    assert_served(httpx.get(env.url(listed + "?fail=502"), timeout=10), 502, "svc")
    assert env.svc.hits[not_listed] == 1
    assert env.svc.hits[listed] == 3  # attempts: 3, tries in all


def test_timeout_is_retried(env: Env) -> None:
    path = fresh("/retry-slow")
    before = scrape(env)
    r = httpx.get(env.url(path + "?sleep=3&slowfirst=1"), timeout=10)
    assert_served(r, 200, "svc")
    assert env.svc.hits[path] == 2
    labels = {"route": "retry-slow", "backend": "svc", "reason": "timeout"}
    name = "strangler_upstream_failures_total"
    assert scrape(env).value(name, **labels) - before.value(name, **labels) == 1


def test_connect_error_is_retried(env: Env) -> None:
    before = scrape(env)
    r = httpx.get(env.url("/retry-dead/x"), timeout=10)
    assert_problem(r, 502, "retry-dead")
    after = scrape(env)
    labels = {"route": "retry-dead", "backend": "dead"}
    failures, retries = "strangler_upstream_failures_total", "strangler_retries_total"
    connects = after.value(failures, reason="connect", **labels)
    assert connects - before.value(failures, reason="connect", **labels) == 3
    assert after.value(retries, **labels) - before.value(retries, **labels) == 2


def test_total_timeout_bounds_all_attempts(env: Env) -> None:
    path = fresh("/retry-total")
    t0 = time.monotonic()
    r = httpx.get(env.url(path + "?sleep=5"), timeout=10)
    took = time.monotonic() - t0
    assert_problem(r, 504, "retry-total")
    # read 0.4 s, total 1 s, 5 attempts: without the total bound this would take 2 s.
    assert 0.9 < took < 2.5, took
    assert 2 <= env.svc.hits[path] <= 3


def test_backoff_is_jittered_and_capped_at_max_backoff(env: Env) -> None:
    gaps: list[float] = []
    for _ in range(2):  # 10 retries: within the budget's floor
        path = fresh("/retry-backoff")
        r = httpx.get(env.url(path + "?flaky=5"), timeout=10)
        assert_served(r, 200, "svc")
        times = env.svc.arrivals(path)
        assert len(times) == 6
        gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
    print(f"\nbackoff gaps (s): {[round(g, 3) for g in gaps]}")
    # backoff 0.1, max_backoff 0.15: uncapped, the pauses could reach 0.4, 0.8 and 1.6 s.
    assert max(gaps) < 0.15 + 0.2  # the cap, plus room for a loaded machine
    assert max(gaps) - min(gaps) > 0.03  # full jitter: pauses vary


def test_bodies_over_64_kib_stream_and_are_not_retried(env: Env) -> None:
    small, at_limit, over, big = (fresh("/retry") for _ in range(4))
    assert_served(httpx.put(env.url(small + "?flaky=1"), content=b"s" * KIB), 200, "svc")
    r = httpx.put(env.url(at_limit + "?flaky=1"), content=b"a" * (64 * KIB), timeout=10)
    assert_served(r, 200, "svc")
    r = httpx.put(env.url(over + "?flaky=1"), content=b"o" * (64 * KIB + 1), timeout=10)
    assert_served(r, 503, "svc")
    r = httpx.put(env.url(big + "?flaky=1"), content=b"b" * (1024 * KIB), timeout=10)
    assert_served(r, 503, "svc")
    assert [env.svc.hits[p] for p in (small, at_limit, over, big)] == [2, 2, 1, 1]
    sizes = [x["body_size"] for x in env.svc.received if x["path"] in (at_limit, over, big)]
    assert sorted(sizes) == [64 * KIB, 64 * KIB, 64 * KIB + 1, 1024 * KIB]


def test_retry_budget_caps_retries_during_a_total_outage(env: Env) -> None:
    """attempts 3 would mean 2 retries per request, 400 for 200 requests; the budget allows
    max(10, 0.2 x requests in the last 10 s). The floor lets the first requests retry."""
    path = fresh("/budget")
    requests = 200

    def client(n: int) -> list[int]:
        with httpx.Client(timeout=10) as c:
            return [c.get(env.url(path + "?fail=503")).status_code for _ in range(n)]

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        statuses = [
            s for f in [pool.submit(client, requests // 4) for _ in range(4)] for s in f.result()
        ]
    took = time.monotonic() - t0
    assert statuses == [503] * requests
    retries = env.svc.hits[path] - requests
    bound = max(10, 0.2 * requests)
    print(f"\n{requests} requests in {took:.2f}s: backend saw {retries} retries (bound {bound:g})")
    assert took < 9, "the budget's window is 10 s: the bound holds for a burst shorter than it"
    assert 10 <= retries <= bound + 2
    labels = {"route": "budget", "backend": "svc"}
    m = scrape(env)
    assert m.value("strangler_retries_total", **labels) == retries
    # Each request ends with its attempts used up (2 retries) or with one refused retry.
    refused = m.value("strangler_retry_budget_exhausted_total", **labels)
    assert requests - retries // 2 <= refused <= requests


# -- 2. circuit breakers ---------------------------------------------------------------


def test_breaker_opens_after_threshold_and_the_backend_gets_nothing_while_open(env: Env) -> None:
    failing, fine, other = fresh("/breaker"), fresh("/breaker"), fresh("/breaker")
    for _ in range(2):
        assert_served(httpx.get(env.url(failing + "?fail=500"), timeout=10), 500, "svc")
    assert_served(httpx.get(env.url(fine), timeout=10), 200, "svc")  # ends the run
    for _ in range(2):
        assert_served(httpx.get(env.url(failing + "?fail=500"), timeout=10), 500, "svc")
    assert breaker_state(env, "breaker") == 0  # failure_threshold 3 counts consecutive ones
    # the third in a row opens it; a 500 counts though it is not in retry.on
    assert_served(httpx.get(env.url(failing + "?fail=500"), timeout=10), 500, "svc")
    assert breaker_state(env, "breaker") == 2
    t0 = time.monotonic()
    for method, path in [("GET", failing), ("GET", other), ("POST", other), ("DELETE", other)]:
        r = httpx.request(method, env.url(path), timeout=10)
        body = assert_problem(r, 503, "breaker")  # no fallback on this route
        assert body["title"] == "Circuit breaker open"
        # Retry-After: the breaker's remaining open time (reset_timeout 30 s)
        assert 30 - (time.monotonic() - t0) - 2 <= int(r.headers["retry-after"]) <= 30
    time.sleep(0.2)
    assert env.svc.hits[failing] == 5 and env.svc.hits[other] == 0
    m = scrape(env)
    labels = {"route": "breaker", "backend": "svc"}
    assert m.value("strangler_breaker_rejections_total", **labels) == 4
    assert m.value("strangler_requests_total", status="503", **labels) == 4
    assert m.value("strangler_requests_total", status="500", **labels) == 5
    assert m.value("strangler_upstream_failures_total", reason="status", **labels) == 5
    assert wait_until(lambda: breaker_log(env, "breaker") == ["open"], 5)


def test_breaker_that_opens_during_retries_stops_them(env: Env) -> None:
    """attempts 3, failure_threshold 2: the second failure opens the breaker, so there is no
    third attempt, and the client gets the backend's answer: its request was not refused."""
    path = fresh("/breaker-retry")
    assert_served(httpx.get(env.url(path + "?fail=503"), timeout=10), 503, "svc")
    assert env.svc.hits[path] == 2
    m = scrape(env)
    labels = {"route": "breaker-retry", "backend": "svc"}
    assert m.value("strangler_breaker_state", **labels) == 2
    assert m.value("strangler_retries_total", **labels) == 1
    assert m.value("strangler_breaker_rejections_total", **labels) == 0
    assert_problem(httpx.get(env.url(path), timeout=10), 503, "breaker-retry")
    assert env.svc.hits[path] == 2


def test_half_open_lets_exactly_one_trial_through_and_successes_close_it(env: Env) -> None:
    path, key = fresh("/half-open"), uuid.uuid4().hex
    url = env.url(f"{path}?hold={key}")
    env.svc.failing[path] = 503
    for _ in range(2):  # failure_threshold: 2
        assert_served(httpx.get(url, timeout=10), 503, "svc")
    assert breaker_state(env, "half-open") == 2
    del env.svc.failing[path]
    time.sleep(1.3)  # reset_timeout: 1 s
    assert env.svc.hits[path] == 2

    # 20 requests at once: one is the trial (held by the backend), the others are refused.
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(httpx.get, url, timeout=20) for _ in range(20)]
        assert wait_until(lambda: sum(f.done() for f in futures) >= 19, 10)
        time.sleep(0.3)
        assert env.svc.hits[path] == 3
        assert breaker_state(env, "half-open") == 1
        env.svc.release(key)
        answers = [f.result() for f in futures]
    assert env.svc.hits[path] == 3  # exactly one trial reached the backend
    statuses = Counter(r.status_code for r in answers)
    assert statuses == {200: 1, 503: 19}
    for r in answers:
        if r.status_code == 503:
            assert_problem(r, 503, "half-open")
    # success_threshold: 2 — one success keeps it half-open, the second closes it
    assert breaker_state(env, "half-open") == 1
    assert_served(httpx.get(url, timeout=10), 200, "svc")
    assert breaker_state(env, "half-open") == 0
    for _ in range(5):
        assert_served(httpx.get(url, timeout=10), 200, "svc")
    assert env.svc.hits[path] == 9
    rejected = scrape(env).value(
        "strangler_breaker_rejections_total", route="half-open", backend="svc"
    )
    assert rejected == 19
    assert wait_until(
        lambda: breaker_log(env, "half-open") == ["open", "half-open", "closed"], 5
    ), breaker_log(env, "half-open")


def test_failed_trial_opens_the_breaker_again(env: Env) -> None:
    path = fresh("/reopen")
    assert_served(httpx.get(env.url(path + "?fail=503"), timeout=10), 503, "svc")
    assert breaker_state(env, "reopen") == 2
    time.sleep(1.2)
    assert_served(httpx.get(env.url(path + "?fail=503"), timeout=10), 503, "svc")  # the trial
    assert_problem(httpx.get(env.url(path), timeout=10), 503, "reopen")
    assert env.svc.hits[path] == 2
    assert breaker_state(env, "reopen") == 2


def test_one_routes_failures_do_not_open_another_routes_breaker(env: Env) -> None:
    a, b = fresh("/iso-a"), fresh("/iso-b")
    for _ in range(2):
        assert_served(httpx.get(env.url(a + "?fail=503"), timeout=10), 503, "svc")
    assert_problem(httpx.get(env.url(a), timeout=10), 503, "iso-a")
    assert_served(httpx.get(env.url(b), timeout=10), 200, "svc")  # same backend, other route
    assert env.svc.hits[a] == 2 and env.svc.hits[b] == 1
    assert breaker_state(env, "iso-a") == 2
    assert breaker_state(env, "iso-b") == 0


def test_client_that_goes_away_is_not_a_breaker_failure(env: Env) -> None:
    path = fresh("/gone")
    for n in (1, 2):  # failure_threshold: 1, so one counted failure would open it
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(env.url(path + "?sleep=5"), timeout=0.3)
        assert wait_until(lambda n=n: env.svc.disconnects[path] == n, 5)
    assert_served(httpx.get(env.url(path), timeout=10), 200, "svc")
    m = scrape(env)
    assert m.value("strangler_breaker_state", route="gone", backend="svc") == 0
    assert m.value("strangler_upstream_failures_total", route="gone") == 0
    assert wait_until(
        lambda: scrape(env).value("strangler_requests_total", route="gone", status="499") == 2, 5
    )
    # ...while a real failure does open it.
    assert_served(httpx.get(env.url(path + "?fail=500"), timeout=10), 500, "svc")
    assert_problem(httpx.get(env.url(path), timeout=10), 503, "gone")
    assert env.svc.hits[path] == 4


# -- 3. fallback -----------------------------------------------------------------------


def test_get_that_still_fails_after_retries_is_served_by_the_fallback(env: Env) -> None:
    path = fresh("/fallback")
    before = scrape(env)
    r = httpx.get(env.url(path + "?fail=503"), timeout=10)
    assert_served(r, 200, "mono")
    assert env.svc.hits[path] == 2  # attempts: 2, then the fallback, once
    assert env.mono.hits[path] == 1
    after = scrape(env)
    fb = {"route": "fallback", "backend": "svc", "fallback": "mono"}
    name = "strangler_fallbacks_total"
    assert after.value(name, **fb) - before.value(name, **fb) == 1
    ok = {"route": "fallback", "backend": "mono", "status": "200"}
    assert (
        after.value("strangler_requests_total", **ok)
        - before.value("strangler_requests_total", **ok)
        == 1
    )
    entry = env.proxy.wait_access(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert entry["backend"] == "mono" and entry["fallback_from"] == "svc"


def test_post_that_may_have_reached_the_backend_is_not_sent_to_the_fallback(env: Env) -> None:
    failed, timed_out = fresh("/fallback"), fresh("/fallback-slow")
    assert_served(httpx.post(env.url(failed + "?fail=503"), content=b"o"), 503, "svc")
    r = httpx.post(env.url(timed_out + "?sleep=3"), content=b"o", timeout=10)
    assert_problem(r, 504, "fallback-slow")
    time.sleep(0.2)
    assert env.svc.hits[failed] == 1 and env.svc.hits[timed_out] == 1
    assert env.mono.hits[failed] == 0 and env.mono.hits[timed_out] == 0
    # The same timeout on a GET goes to the fallback.
    get = fresh("/fallback-slow")
    assert_served(httpx.get(env.url(get + "?sleep=3"), timeout=10), 200, "mono")
    assert env.svc.hits[get] == 1 and env.mono.hits[get] == 1


def test_post_with_idempotency_key_falls_back_after_retries(env: Env) -> None:
    path = fresh("/fallback")
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    r = httpx.post(env.url(path + "?fail=502"), content=b"z" * 5000, headers=headers)
    assert_served(r, 200, "mono")
    assert env.svc.hits[path] == 2 and env.mono.hits[path] == 1
    assert [x["body_size"] for x in env.mono.requests if x["path"] == path] == [5000]


def test_post_that_could_not_connect_goes_to_the_fallback_once(env: Env) -> None:
    """A connect error sent nothing, and the body is in hand: the fallback may have it."""
    path = fresh("/fallback-dead")
    r = httpx.post(env.url(path), content=b"p" * 3000, timeout=10)
    assert_served(r, 200, "mono")
    assert env.mono.hits[path] == 1
    assert [x["body_size"] for x in env.mono.requests if x["path"] == path] == [3000]


def test_open_breaker_sends_everything_to_the_fallback(env: Env) -> None:
    path = fresh("/fallback-open")
    for _ in range(2):  # failure_threshold: 2; each failed GET is served by the fallback
        assert_served(httpx.get(env.url(path + "?fail=503"), timeout=10), 200, "mono")
    assert breaker_state(env, "fallback-open") == 2
    assert_served(httpx.get(env.url(path), timeout=10), 200, "mono")
    r = httpx.post(env.url(path), content=b"new order", timeout=10)  # nothing sent: safe
    assert_served(r, 200, "mono")
    assert env.svc.hits[path] == 2 and env.mono.hits[path] == 4
    m = scrape(env)
    fb = {"route": "fallback-open", "backend": "svc", "fallback": "mono"}
    assert m.value("strangler_fallbacks_total", **fb) == 4
    labels = {"route": "fallback-open", "backend": "svc"}
    assert m.value("strangler_breaker_rejections_total", **labels) == 2
    served = m.value("strangler_requests_total", route="fallback-open", backend="mono")
    assert served == 4
    assert m.value("strangler_requests_total", route="fallback-open", status="503") == 0


def test_no_fallback_once_the_total_timeout_is_spent(env: Env) -> None:
    """The total timeout bounds every attempt, the fallback's included: a GET that used it
    all gets 504, and the fallback is not sent a request it has no time to answer."""
    path = fresh("/fallback-total")
    t0 = time.monotonic()
    r = httpx.get(env.url(path + "?sleep=4"), timeout=10)
    assert_problem(r, 504, "fallback-total")
    assert time.monotonic() - t0 < 2.0
    time.sleep(0.2)
    assert env.svc.hits[path] == 1 and env.mono.hits[path] == 0
    m = scrape(env)
    assert m.value("strangler_fallbacks_total", route="fallback-total") == 0
    mono = {"route": "fallback-total", "backend": "mono"}
    assert m.value("strangler_upstream_failures_total", **mono) == 0


def test_fallback_is_never_chained_further(env: Env) -> None:
    path = fresh("/no-chain")
    r = httpx.get(env.url(path + "?fail=503"), timeout=10)
    assert_problem(r, 502, "no-chain")  # the fallback's own failure; legacy is not tried
    assert env.svc.hits[path] == 1 and env.mono.hits[path] == 0
    m = scrape(env)
    fb = {"route": "no-chain", "backend": "svc", "fallback": "dead"}
    assert m.value("strangler_fallbacks_total", **fb) == 1
    assert m.value("strangler_fallbacks_total", route="no-chain") == 1


# -- 4. bulkheads ----------------------------------------------------------------------


@dataclass
class Timed:
    response: httpx.Response | None
    took: float
    error: Exception | None = None


def timed_get(url: str, timeout: float = 20) -> Timed:
    t0 = time.monotonic()
    try:
        return Timed(httpx.get(url, timeout=timeout), time.monotonic() - t0)
    except httpx.HTTPError as exc:
        return Timed(None, time.monotonic() - t0, exc)


def test_bulkhead_burst_answers_capacity_and_refuses_the_rest_at_once(env: Env) -> None:
    path, key = fresh("/bulkhead"), uuid.uuid4().hex
    url = env.url(f"{path}?hold={key}")
    with ThreadPoolExecutor(6) as pool:  # max_concurrent 2 + max_queue 1; 6 at once
        futures: list[Future[Timed]] = [pool.submit(timed_get, url) for _ in range(6)]
        assert wait_until(lambda: sum(f.done() for f in futures) >= 3, 10)
        time.sleep(0.3)
        refused = [f.result() for f in futures if f.done()]
        assert len(refused) == 3 and env.svc.hits[path] == 2
        m = scrape(env)
        assert m.value("strangler_bulkhead_in_flight", route="bulkhead") == 2
        env.svc.release(key)
        results = [f.result() for f in futures]
    for t in refused:
        assert t.response is not None and t.took < 1.5
        body = assert_problem(t.response, 503, "bulkhead")
        assert body["title"] == "Route at capacity"
    statuses = Counter(t.response.status_code for t in results if t.response is not None)
    assert statuses == {200: 3, 503: 3}
    assert env.svc.hits[path] == 3
    m = scrape(env)
    assert m.value("strangler_bulkhead_rejections_total", route="bulkhead") == 3
    none = {"route": "bulkhead", "backend": "none", "status": "503"}
    assert m.value("strangler_requests_total", **none) == 3
    assert m.value("strangler_requests_total", route="bulkhead", status="200") == 3
    assert wait_until(
        lambda: scrape(env).value("strangler_bulkhead_in_flight", route="bulkhead") == 0, 5
    )


def test_queue_timeout_is_honoured(env: Env) -> None:
    path, key = fresh("/queue"), uuid.uuid4().hex
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(timed_get, env.url(f"{path}?hold={key}"))
        assert wait_until(lambda: env.svc.hits[path] == 1, 10)
        queued = timed_get(env.url(path))  # max_queue 1: it waits, queue_timeout 0.5 s
        env.svc.release(key)
        held = holder.result().response
    assert held is not None and held.status_code == 200
    assert queued.response is not None
    assert_problem(queued.response, 503, "queue")
    assert 0.45 < queued.took < 2.0, queued.took
    assert env.svc.hits[path] == 1


def test_queued_client_that_leaves_gives_up_its_place(env: Env) -> None:
    first, leaver, later, key = (*(fresh("/queue-gone") for _ in range(3)), uuid.uuid4().hex)
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(timed_get, env.url(f"{first}?hold={key}"))
        assert wait_until(lambda: env.svc.hits[first] == 1, 10)
        with pytest.raises(httpx.ReadTimeout):  # queued (max_queue 1), then gone
            httpx.get(env.url(leaver), timeout=0.3)
        gone = {"route": "queue-gone", "status": "499"}
        assert wait_until(lambda: scrape(env).value("strangler_requests_total", **gone) == 1, 5)
        waiting = pool.submit(timed_get, env.url(later))  # its place in the queue is free
        time.sleep(0.3)
        assert not waiting.done()
        env.svc.release(key)
        answers = [holder.result().response, waiting.result().response]
    assert [r.status_code if r is not None else None for r in answers] == [200, 200]
    assert env.svc.hits[leaver] == 0  # nobody was waiting for that answer
    assert scrape(env).value("strangler_bulkhead_rejections_total", route="queue-gone") == 0


def test_queued_requests_get_in_in_arrival_order(env: Env) -> None:
    first, key = fresh("/fifo"), uuid.uuid4().hex
    later = [fresh("/fifo") for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(timed_get, env.url(f"{first}?hold={key}"))]
        assert wait_until(lambda: env.svc.hits[first] == 1, 10)
        for path in later:
            futures.append(pool.submit(timed_get, env.url(path)))
            time.sleep(0.15)
        env.svc.release(key)
        answers = [f.result().response for f in futures]
    assert [r.status_code if r is not None else None for r in answers] == [200] * 4
    order = [x["path"] for x in env.svc.received if x["path"] in later]
    assert order == later


def test_flooded_route_does_not_slow_another_route(env: Env) -> None:
    def latencies(n: int, pause: float = 0.0) -> list[float]:
        out = []
        with httpx.Client(timeout=10) as c:
            for _ in range(n):
                time.sleep(pause)
                t0 = time.monotonic()
                r = c.get(env.url(fresh("/fast")))
                out.append(time.monotonic() - t0)
                assert r.status_code == 200
        return out

    baseline = statistics.median(latencies(20))
    flood_path, key = fresh("/flood"), uuid.uuid4().hex
    stop = threading.Event()
    flood_statuses: Counter[int] = Counter()

    def flood() -> None:
        with httpx.Client(timeout=20) as c:
            while not stop.is_set():
                r = c.get(env.url(f"{flood_path}?hold={key}"))
                flood_statuses[r.status_code] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: flood_statuses[503] >= 12 and env.svc.hits[flood_path] == 2, 10)
        during = latencies(100, pause=0.01)
        flood_hits = env.svc.hits[flood_path]
    finally:
        stop.set()
        env.svc.release(key)
        for t in threads:
            t.join(10)
    median, p90 = statistics.median(during), sorted(during)[int(0.9 * len(during))]
    print(
        f"\nfast route median latency: {baseline * 1000:.1f} ms alone, "
        f"{median * 1000:.1f} ms (p90 {p90 * 1000:.1f} ms) while /flood is flooded; "
        f"flood answers {dict(flood_statuses)}"
    )
    assert flood_hits == 2  # max_concurrent: the rest waited or were refused
    assert median < 0.1, "a flooded route slowed down another route"
    assert scrape(env).value("strangler_bulkhead_rejections_total", route="flood") >= 12


def test_slot_is_held_until_the_last_byte_is_relayed(env: Env) -> None:
    path, key = fresh("/slot"), uuid.uuid4().hex
    with httpx.stream("GET", env.url(f"{path}?holdbody={key}"), timeout=10) as r:
        lines = r.iter_lines()
        assert r.status_code == 200 and next(lines) == "first"
        # The headers are through, the body is not: the slot (max_concurrent 1) is taken.
        assert_problem(httpx.get(env.url(fresh("/slot")), timeout=10), 503, "slot")
        env.svc.release(key)
        assert list(lines) == ["last"]
    assert_served(httpx.get(env.url(fresh("/slot")), timeout=10), 200, "svc")


def test_slot_is_released_when_the_backend_dies_mid_stream(env: Env) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(env.url(fresh("/slot") + "?die=1"), timeout=10).raise_for_status()
    for _ in range(3):  # max_concurrent 1, max_queue 0: a leaked slot would answer 503
        assert_served(httpx.get(env.url(fresh("/slot")), timeout=10), 200, "svc")
    m = scrape(env)
    assert m.value("strangler_upstream_failures_total", route="slot", reason="protocol") >= 1
    assert m.value("strangler_bulkhead_in_flight", route="slot") == 0


def test_slot_is_released_when_the_client_goes_away_or_the_backend_fails(env: Env) -> None:
    gone = fresh("/slot")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(env.url(gone + "?sleep=5"), timeout=0.3)
    assert wait_until(lambda: env.svc.disconnects[gone] == 1, 5)
    assert_served(httpx.get(env.url(fresh("/slot") + "?fail=503"), timeout=10), 503, "svc")
    assert_served(httpx.get(env.url(fresh("/slot")), timeout=10), 200, "svc")
    rejected = scrape(env).value("strangler_bulkhead_rejections_total", route="slot")
    assert rejected == 1  # the one asked for while a stream held the slot, no more
