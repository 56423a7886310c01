"""SPEC §7 header rules and HTTP edge cases through the real process."""

from __future__ import annotations

import json

import httpx

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, raw_request


def sent_headers(b: Backends, backend: str = "orders") -> list[tuple[str, str]]:
    rec = b.orders if backend == "orders" else b.monolith
    return [(k, v) for k, v in rec.requests[-1]["headers"]]


def header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


def test_hop_by_hop_and_connection_named_headers_are_dropped(
    proxy: ProxyProcess, b: Backends
) -> None:
    request = (
        b"GET /api/orders HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\n"
        b"Proxy: http://evil\r\nUpgrade: h2c\r\nX-Keep: yes\r\n\r\n"
    )
    raw_request(proxy.port, request, read_until_close=False)
    names = {k for k, _ in sent_headers(b)}
    for dropped in ("x-hop", "keep-alive", "te", "proxy-authorization", "proxy", "upgrade"):
        assert dropped not in names
    assert "x-keep" in names


def test_response_hop_by_hop_dropped_set_cookie_and_order_kept(
    proxy: ProxyProcess, b: Backends
) -> None:
    reply = raw_request(
        proxy.port, b"GET /cookies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head = reply.partition(b"\r\n\r\n")[0].decode().lower().split("\r\n")
    cookies = [line for line in head if line.startswith("set-cookie:")]
    assert cookies == [
        "set-cookie: a=1; path=/",
        "set-cookie: b=2; path=/",
        "set-cookie: c=3; path=/; httponly",
    ]
    order = [line for line in head if line.startswith("x-order:")]
    assert order == ["x-order: first", "x-order: second"]
    assert not any(line.startswith(("x-secret-hop", "keep-alive")) for line in head)


def test_forwarded_headers_from_an_untrusted_peer(proxy: ProxyProcess, b: Backends) -> None:
    httpx.get(
        proxy.url + "/api/orders",
        headers={
            "Host": "shop.example.com",
            "X-Forwarded-For": "1.2.3.4",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example.com",
        },
        timeout=10,
    )
    h = sent_headers(b)
    assert header(h, "x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert header(h, "x-forwarded-proto") == ["http"]
    assert header(h, "x-forwarded-host") == ["shop.example.com"]
    assert header(h, "host") == [proxy_host(b)]


def proxy_host(b: Backends) -> str:
    return b.orders_url.removeprefix("http://")


def test_preserve_host_forwards_the_clients_host(proxy: ProxyProcess, b: Backends) -> None:
    httpx.get(proxy.url + "/preserved/x", headers={"Host": "shop.example.com"}, timeout=10)
    assert header(sent_headers(b), "host") == ["shop.example.com"]


def test_request_id_kept_when_sane_generated_otherwise(proxy: ProxyProcess, b: Backends) -> None:
    kept = httpx.get(proxy.url + "/api/orders", headers={"X-Request-ID": "abc-123"}, timeout=10)
    assert kept.headers["x-request-id"] == "abc-123"
    assert header(sent_headers(b), "x-request-id") == ["abc-123"]
    for bad in ("x" * 129, "has space"):
        fresh = httpx.get(proxy.url + "/api/orders", headers={"X-Request-ID": bad}, timeout=10)
        new_id = fresh.headers["x-request-id"]
        assert new_id != bad and 1 <= len(new_id) <= 128
        assert header(sent_headers(b), "x-request-id") == [new_id]
    plain = httpx.get(proxy.url + "/api/orders", timeout=10)
    assert plain.headers["x-request-id"] == header(sent_headers(b), "x-request-id")[0]


def test_repeated_request_headers_are_kept(proxy: ProxyProcess, b: Backends) -> None:
    raw_request(
        proxy.port,
        b"GET /api/orders HTTP/1.1\r\nHost: x\r\nX-Multi: 1\r\nX-Multi: 2\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert header(sent_headers(b), "x-multi") == ["1", "2"]


def test_head_204_304_have_no_body(proxy: ProxyProcess, b: Backends) -> None:
    head = raw_request(
        proxy.port, b"HEAD /big?size=5000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    top, _, body = head.partition(b"\r\n\r\n")
    assert (
        top.startswith(b"HTTP/1.1 200") and b"content-length: 5000" in top.lower() and body == b""
    )
    for code in (204, 304):
        reply = raw_request(
            proxy.port,
            f"GET /status/{code} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
        top, _, body = reply.partition(b"\r\n\r\n")
        assert top.startswith(f"HTTP/1.1 {code}".encode()) and body == b""


def test_expect_100_continue(proxy: ProxyProcess, b: Backends) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n"
        )
        interim = s.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100")
        s.sendall(b"hello")
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert b"200 OK" in rest and b'"size": 5' in rest
    assert "expect" not in {k for k, _ in sent_headers(b)} if b.orders.requests else True


def test_http10_client(proxy: ProxyProcess, b: Backends) -> None:
    reply = raw_request(proxy.port, b"GET /drip?n=3&interval=0 HTTP/1.0\r\nHost: x\r\n\r\n")
    top, _, body = reply.partition(b"\r\n\r\n")
    assert top.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in top.lower()
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"


def test_unknown_length_response_is_chunked_for_http11(proxy: ProxyProcess, b: Backends) -> None:
    reply = raw_request(
        proxy.port, b"GET /drip?n=2&interval=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    top = reply.partition(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: chunked" in top


def test_content_length_kept(proxy: ProxyProcess, b: Backends) -> None:
    reply = httpx.get(proxy.url + "/big?size=300000", timeout=10)
    assert reply.headers["content-length"] == "300000" and len(reply.content) == 300000


def test_access_log_line(proxy: ProxyProcess, b: Backends) -> None:
    r = httpx.get(proxy.url + "/api/orders/77?q=1", timeout=10)
    entry = proxy.wait_access(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert entry["route"] == "orders" and entry["backend"] == "orders"
    assert entry["method"] == "GET" and entry["path"] == "/api/orders/77" and entry["status"] == 200
    assert entry["bytes"] == len(r.content) and entry["duration_ms"] > 0
    assert entry["time"].endswith("Z")
    json.dumps(entry)
