"""Failing cleanly (SPEC §5 table): 502, 504 on each timeout, 413 on big bodies, all as
problem+json naming the route and request id."""

from __future__ import annotations

import time

import httpx

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess


def assert_problem(r: httpx.Response, status: int, route: str) -> dict[str, object]:
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["route"] == route
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["title"] and body["detail"]
    return body


def test_connect_refused_is_502(proxy: ProxyProcess, b: Backends) -> None:
    r = httpx.get(proxy.url + "/dead/x", timeout=10)
    assert_problem(r, 502, "dead")
    entry = proxy.wait_access(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert entry["status"] == 502 and entry["backend"] == "dead"


def test_read_timeout_is_504(proxy: ProxyProcess, b: Backends) -> None:
    t0 = time.monotonic()
    r = httpx.get(proxy.url + "/slow?delay=3", timeout=10)
    assert_problem(r, 504, "slow")
    assert 0.4 < time.monotonic() - t0 < 2.5


def test_total_timeout_is_504(proxy: ProxyProcess, b: Backends) -> None:
    t0 = time.monotonic()
    r = httpx.get(proxy.url + "/slow/total?delay=4", timeout=10)
    assert_problem(r, 504, "total-slow")
    assert 0.9 < time.monotonic() - t0 < 3


def test_connect_timeout_is_504(proxy: ProxyProcess, b: Backends) -> None:
    t0 = time.monotonic()
    r = httpx.get(proxy.url + "/blackhole", timeout=10)
    assert_problem(r, 504, "blackhole")
    assert time.monotonic() - t0 < 3


def test_a_post_whose_connection_never_opened_goes_to_the_fallback(
    proxy: ProxyProcess, b: Backends
) -> None:
    """A connect timeout sent nothing: even a POST may go to the fallback, body and all."""
    r = httpx.post(proxy.url + "/blackhole/fallback/orders", content=b"order-1", timeout=10)
    assert r.status_code == 200 and r.json()["served_by"] == "monolith"
    assert b.monolith.requests[-1]["body_size"] == len(b"order-1")
    entry = proxy.wait_access(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert entry["fallback_from"] == "blackhole"


def test_body_over_max_body_is_413_with_content_length(proxy: ProxyProcess, b: Backends) -> None:
    r = httpx.post(proxy.url + "/upload/limited", content=b"x" * 2048, timeout=10)
    assert_problem(r, 413, "limited")
    ok = httpx.post(proxy.url + "/upload/limited", content=b"x" * 1024, timeout=10)
    assert ok.status_code == 200 and ok.json()["size"] == 1024
    assert b.orders.hits["/upload/limited"] == 1


def test_body_over_max_body_is_413_when_chunked(proxy: ProxyProcess, b: Backends) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(8):
            yield b"y" * 512

    r = httpx.post(proxy.url + "/upload/limited", content=chunks(), timeout=10)
    assert_problem(r, 413, "limited")
    assert b.orders.hits["/upload/limited"] == 0
