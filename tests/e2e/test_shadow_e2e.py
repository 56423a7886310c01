"""SPEC §6 through the real process: copies reach the shadow backend marked as such, the
client gets the primary's answer and never waits on the shadow, and the comparison counts
show in the admin API and the metrics."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, UpstreamServer, free_port, wait_until
from tests.e2e.upstream import Recorder, make_app

SLOW_SHADOW = 2.0


def slow_app(delay: float) -> Any:
    """A shadow backend that answers every request after `delay` seconds."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        await asyncio.sleep(delay)
        body = b'{"slow": true}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


class Shadows:
    def __init__(self) -> None:
        self.mirror = Recorder("mirror")
        self.twin = Recorder("orders")  # answers as the primary does
        self.servers = {
            "mirror": UpstreamServer(make_app(self.mirror)),
            "twin": UpstreamServer(make_app(self.twin)),
            "slow": UpstreamServer(slow_app(SLOW_SHADOW)),
        }
        self.dead_port = free_port()

    def url(self, name: str) -> str:
        return self.servers[name].url


@pytest.fixture(scope="module")
def shadows() -> Iterator[Shadows]:
    s = Shadows()
    for server in s.servers.values():
        server.start()
    yield s
    for server in s.servers.values():
        server.stop()


def make_config(b: Backends, s: Shadows) -> str:
    return f"""version: 1
legacy: monolith
backends:
  monolith: {{url: "{b.monolith_url}"}}
  orders: {{url: "{b.orders_url}"}}
  mirror: {{url: "{s.url("mirror")}"}}
  twin: {{url: "{s.url("twin")}"}}
  slow: {{url: "{s.url("slow")}"}}
  dead: {{url: "http://127.0.0.1:{s.dead_port}"}}
defaults:
  retry: {{attempts: 1}}
routes:
  - name: mirrored
    match: {{prefix: /mirrored}}
    backend: orders
    shadow: {{backend: mirror}}
  - name: mirrored-post
    match: {{prefix: /mirrored-post}}
    backend: orders
    shadow: {{backend: mirror, methods: [GET, POST]}}
  - name: slow-shadow
    match: {{prefix: /slowshadow}}
    backend: orders
    shadow: {{backend: slow, compare: true}}
  - name: no-shadow
    match: {{prefix: /noshadow}}
    backend: orders
  - name: dead-shadow
    match: {{prefix: /deadshadow}}
    backend: orders
    shadow: {{backend: dead, compare: true}}
  - name: cmp
    match: {{prefix: /status}}
    backend: orders
    shadow: {{backend: twin, compare: true}}
  - name: ignoring
    match: {{prefix: /ign}}
    rewrite: {{strip_prefix: /ign}}
    backend: orders
    shadow: {{backend: mirror, compare: true, ignore: [$.served_by]}}
"""


@pytest.fixture(scope="module")
def proxy(
    backends: Backends, shadows: Shadows, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir: Path = tmp_path_factory.mktemp("shadow")
    with ProxyProcess(make_config(backends, shadows), workdir) as p:
        yield p


def unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex}"


def shadow_of(p: ProxyProcess, route: str) -> dict[str, Any]:
    routes = httpx.get(p.admin + "/api/routes", timeout=10).json()["routes"]
    found = next(r for r in routes if r["name"] == route)
    assert "shadow" in found, found
    shadow: dict[str, Any] = found["shadow"]
    return shadow


def shadow_metric(p: ProxyProcess, route: str, backend: str, result: str) -> float:
    text = httpx.get(p.admin + "/metrics", timeout=10).text
    pattern = re.compile(
        r"^strangler_shadow_results_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M
    )
    for m in pattern.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels == {"route": route, "backend": backend, "result": result}:
            return float(m.group("value"))
    return 0.0


def mirror_requests(s: Shadows, path: str) -> list[dict[str, Any]]:
    return [r for r in list(s.mirror.requests) if r.get("path") == path]


def header_values(request: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in request["headers"] if k.lower() == name]


def test_copies_arrive_marked_and_the_client_gets_the_primary(
    proxy: ProxyProcess, backends: Backends, shadows: Shadows
) -> None:
    path = unique("/mirrored")
    reply = httpx.get(
        proxy.url + path + "?q=1", headers={"X-Strangler-Shadow": "forged"}, timeout=10
    )
    assert reply.status_code == 200
    assert reply.json()["served_by"] == "orders"
    assert reply.headers["x-served-by"] == "orders"
    assert wait_until(lambda: len(mirror_requests(shadows, path)) == 1, 5)
    copy = mirror_requests(shadows, path)[0]
    assert copy["method"] == "GET" and copy["query_string"] == "q=1"
    assert header_values(copy, "x-strangler-shadow") == ["1"]
    assert header_values(copy, "host") == [shadows.url("mirror").removeprefix("http://")]
    assert header_values(copy, "x-request-id") == [reply.headers["x-request-id"]]
    primary = next(r for r in backends.orders.requests if r.get("path") == path)
    # the client's own mark is not forwarded on the primary path
    assert header_values(primary, "x-strangler-shadow") == []
    time.sleep(0.3)
    assert len(mirror_requests(shadows, path)) == 1  # one copy, not more


def test_a_client_cannot_pass_itself_off_as_shadow_traffic(
    proxy: ProxyProcess, backends: Backends
) -> None:
    path = unique("/noshadow")
    httpx.get(proxy.url + path, headers={"X-Strangler-Shadow": "1"}, timeout=10)
    primary = next(r for r in backends.orders.requests if r.get("path") == path)
    assert header_values(primary, "x-strangler-shadow") == []


def test_post_is_shadowed_only_when_methods_say_so(proxy: ProxyProcess, shadows: Shadows) -> None:
    plain = unique("/mirrored")
    assert httpx.post(proxy.url + plain, content=b"abc", timeout=10).status_code == 200
    named = unique("/mirrored-post")
    assert httpx.post(proxy.url + named, content=b"hello", timeout=10).status_code == 200
    assert wait_until(lambda: len(mirror_requests(shadows, named)) == 1, 5)
    copy = mirror_requests(shadows, named)[0]
    assert copy["method"] == "POST" and copy["body_size"] == 5
    # a GET sent after the plain POST is copied; the POST itself never is
    after = unique("/mirrored")
    httpx.get(proxy.url + after, timeout=10)
    assert wait_until(lambda: len(mirror_requests(shadows, after)) == 1, 5)
    time.sleep(0.5)
    assert mirror_requests(shadows, plain) == []


def median_latency(client: httpx.Client, prefix: str) -> float:
    took = []
    for _ in range(20):
        started = time.perf_counter()
        reply = client.get(unique(prefix))
        took.append(time.perf_counter() - started)
        assert reply.status_code == 200 and reply.json()["served_by"] == "orders"
    return statistics.median(took)


def test_slow_and_failing_shadows_do_not_delay_the_client(proxy: ProxyProcess) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for prefix in ("/noshadow", "/slowshadow", "/deadshadow"):  # warm the pools
            client.get(unique(prefix))
        without = median_latency(client, "/noshadow")
        slow = median_latency(client, "/slowshadow")
        dead = median_latency(client, "/deadshadow")
        without_again = median_latency(client, "/noshadow")
    baseline = max(without, without_again)
    print(
        f"\nmedian client latency over 20 requests: without shadow {without * 1000:.1f} ms "
        f"(again {without_again * 1000:.1f} ms), slow {SLOW_SHADOW:.0f} s shadow "
        f"{slow * 1000:.1f} ms, dead shadow {dead * 1000:.1f} ms"
    )
    assert slow < baseline + 0.1
    assert dead < baseline + 0.1
    assert slow < SLOW_SHADOW / 4


def test_a_failing_shadow_counts_error(proxy: ProxyProcess) -> None:
    before = shadow_of(proxy, "dead-shadow")["error"]
    for _ in range(3):
        assert httpx.get(proxy.url + unique("/deadshadow"), timeout=10).status_code == 200
    assert wait_until(lambda: shadow_of(proxy, "dead-shadow")["error"] >= before + 3, 10)
    counts = shadow_of(proxy, "dead-shadow")
    assert counts["match"] == counts["mismatch"] == 0
    assert wait_until(lambda: shadow_metric(proxy, "dead-shadow", "dead", "error") >= 3, 5)


def test_slow_shadow_answers_are_compared_after_the_fact(proxy: ProxyProcess) -> None:
    # the slow shadow's answers ({"slow": true}) differ from the primary's echo
    assert wait_until(lambda: shadow_of(proxy, "slow-shadow")["mismatch"] >= 20, 15)


def test_match_and_mismatch_counts_and_recent_mismatches(
    proxy: ProxyProcess, shadows: Shadows
) -> None:
    start = shadow_of(proxy, "cmp")
    for _ in range(4):
        assert httpx.get(proxy.url + "/status/200", timeout=10).status_code == 200
    assert wait_until(lambda: shadow_of(proxy, "cmp")["match"] == start["match"] + 4, 5)
    shadows.twin.fail_status = 500
    try:
        reply = httpx.get(proxy.url + "/status/200?mm=1", timeout=10)
        assert reply.status_code == 200 and reply.json() == {"served_by": "orders", "status": 200}
        assert wait_until(lambda: shadow_of(proxy, "cmp")["mismatch"] == start["mismatch"] + 1, 5)
    finally:
        shadows.twin.fail_status = None
    shadow = shadow_of(proxy, "cmp")
    assert shadow["match"] == start["match"] + 4
    assert shadow["error"] == start["error"]
    newest = shadow["recent_mismatches"][0]
    assert newest["request_id"] == reply.headers["x-request-id"]
    assert newest["method"] == "GET" and newest["target"] == "/status/200?mm=1"
    assert newest["status"] == [200, 500]
    assert "status: 200 != 500" in newest["diff"]
    assert wait_until(lambda: shadow_metric(proxy, "cmp", "twin", "match") >= 4, 5)
    assert shadow_metric(proxy, "cmp", "twin", "mismatch") >= 1


def test_ignored_paths_are_left_out_of_the_comparison(proxy: ProxyProcess) -> None:
    before = shadow_of(proxy, "ignoring")
    httpx.get(proxy.url + "/ign/status/200", timeout=10)
    assert wait_until(lambda: shadow_of(proxy, "ignoring")["match"] == before["match"] + 1, 5)
    assert shadow_of(proxy, "ignoring")["mismatch"] == before["mismatch"]


def test_recent_mismatches_are_the_newest_and_bounded(
    proxy: ProxyProcess, shadows: Shadows
) -> None:
    """The policy keeps the last 100 (tests/unit/test_shadow.py); the admin API shows the
    newest of them, newest first, never more than 100."""
    start = shadow_of(proxy, "cmp")["mismatch"]
    shadows.twin.fail_status = 503
    try:
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for n in range(105):
                assert client.get(f"/status/200?n={n}").status_code == 200
        assert wait_until(lambda: shadow_of(proxy, "cmp")["mismatch"] == start + 105, 10)
    finally:
        shadows.twin.fail_status = None
    recent = shadow_of(proxy, "cmp")["recent_mismatches"]
    print(f"\n/api/routes shows {len(recent)} recent mismatches of route cmp")
    assert 1 <= len(recent) <= 100
    # newest first (by when the comparison was made: copies run concurrently, so allow
    # neighbours to finish out of order)
    numbers = [int(m["target"].rpartition("=")[2]) for m in recent]
    assert len(set(numbers)) == len(numbers)
    assert 104 in numbers[:5]
    assert min(numbers) >= 105 - len(recent) - 10
    assert [m["time"] for m in recent] == sorted((m["time"] for m in recent), reverse=True)
    assert all(m["status"] == [200, 503] for m in recent)
