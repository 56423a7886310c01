"""SPEC §3 through the real process: longest segment prefix, conditions, normalization,
rewrite, and the query string byte for byte."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, raw_request


def get(proxy: ProxyProcess, path: str, **kw: object) -> httpx.Response:
    return httpx.get(proxy.url + path, timeout=10, **kw)  # type: ignore[arg-type]


def test_prefix_matches_whole_segments(proxy: ProxyProcess, b: Backends) -> None:
    assert get(proxy, "/api/orders").json()["served_by"] == "orders"
    assert get(proxy, "/api/orders/7").json()["served_by"] == "orders"
    assert get(proxy, "/api/ordersX").json()["served_by"] == "monolith"
    entry = proxy.wait_access(lambda e: e["path"] == "/api/ordersX")
    assert entry["route"] == "default" and entry["backend"] == "monolith"


def test_more_conditions_win_among_equal_prefixes(proxy: ProxyProcess, b: Backends) -> None:
    assert get(proxy, "/api/orders/1", headers={"X-Beta": "1"}).json()["served_by"] == "monolith"
    assert get(proxy, "/api/orders/1", headers={"X-Beta": "2"}).json()["served_by"] == "orders"
    deleted = httpx.delete(proxy.url + "/api/orders/1", timeout=10)
    assert deleted.json()["served_by"] == "monolith"
    entry = proxy.wait_access(lambda e: e["method"] == "DELETE")
    assert entry["route"] == "orders-writes"


def test_host_condition(proxy: ProxyProcess, b: Backends) -> None:
    hosted = get(proxy, "/hosted/x", headers={"Host": "SHOP.example.com:8080"})
    assert hosted.json()["served_by"] == "orders"
    assert (
        get(proxy, "/hosted/x", headers={"Host": "other.example.com"}).json()["served_by"]
        == "monolith"
    )


def test_dot_segments_are_resolved_before_routing(proxy: ProxyProcess, b: Backends) -> None:
    reply = raw_request(
        proxy.port,
        b"GET /api/orders/../products/%7E1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200")
    assert b.monolith.requests[-1]["raw_path"] == "/api/products/~1"
    raw_request(
        proxy.port, b"GET /x/%2e%2e/api/orders/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert b.orders.requests[-1]["raw_path"] == "/api/orders/5"


def test_climbing_above_root_is_400_problem(proxy: ProxyProcess, b: Backends) -> None:
    for target in (b"/../etc/passwd", b"/api/%2e%2e/%2E%2E/x", b"/a/b/../../../c"):
        reply = raw_request(
            proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), reply
        assert b"application/problem+json" in head
        assert b'"route": "none"' in body
    assert b.monolith.requests == [] and b.orders.requests == []


def test_encoded_slash_never_splits_a_segment(proxy: ProxyProcess, b: Backends) -> None:
    raw_request(
        proxy.port, b"GET /api/orders/a%2fb/..%2Fc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert b.orders.requests[-1]["raw_path"] == "/api/orders/a%2Fb/..%2Fc"
    raw_request(proxy.port, b"GET /api%2Forders/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b.monolith.requests[-1]["raw_path"] == "/api%2Forders/1"


def test_strip_prefix_and_backend_base_path(proxy: ProxyProcess, b: Backends) -> None:
    assert get(proxy, "/svc/orders/7").json()["raw_path"] == "/orders/7"
    assert get(proxy, "/svc/orders").json()["raw_path"] == "/orders"
    assert get(proxy, "/based/x").json()["raw_path"] == "/base/based/x"


def test_query_string_is_forwarded_byte_for_byte(proxy: ProxyProcess, b: Backends) -> None:
    query = b"b=2&a=1&x=%2f%2F&y=a+b&&z&%zz=%ZZ&u=%C3%A9"
    raw_request(
        proxy.port,
        b"GET /api/orders?" + query + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert b.orders.requests[-1]["query_string"] == query.decode()


def test_nothing_is_reserved_on_the_main_port(proxy: ProxyProcess, b: Backends) -> None:
    for path in ("/healthz", "/metrics", "/readyz", "/api/routes"):
        assert get(proxy, path).json()["served_by"] == "monolith"
