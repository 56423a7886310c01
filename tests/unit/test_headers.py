"""Header rules of SPEC §7 as pure functions."""

from __future__ import annotations

from proxy.headers import (
    TrustedProxies,
    downstream_response_headers,
    is_sane_request_id,
    upstream_request_headers,
    with_host,
)


def forward(
    headers: list[tuple[bytes, bytes]], *, trusted: bool = False
) -> dict[bytes, list[bytes]]:
    out = upstream_request_headers(
        headers, peer="10.1.2.3", scheme="http", peer_is_trusted=trusted, request_id="rid"
    )
    found: dict[bytes, list[bytes]] = {}
    for k, v in out:
        found.setdefault(k, []).append(v)
    return found


def test_hop_by_hop_and_connection_listed_headers_are_dropped() -> None:
    sent = forward(
        [
            (b"host", b"shop"),
            (b"connection", b"keep-alive, X-Private"),
            (b"x-private", b"1"),
            (b"keep-alive", b"5"),
            (b"te", b"trailers"),
            (b"trailer", b"x"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"proxy-authorization", b"x"),
            (b"proxy", b"http://evil"),
            (b"expect", b"100-continue"),
            (b"x-strangler-shadow", b"1"),
            (b"x-kept", b"yes"),
        ]
    )
    assert set(sent) == {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"x-kept",
    }


def test_forwarded_headers_untrusted_peer() -> None:
    sent = forward(
        [
            (b"host", b"shop.example.com"),
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"x-forwarded-for", b"2.2.2.2"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"evil"),
        ]
    )
    assert sent[b"x-forwarded-for"] == [b"1.1.1.1, 2.2.2.2, 10.1.2.3"]
    assert sent[b"x-forwarded-proto"] == [b"http"]
    assert sent[b"x-forwarded-host"] == [b"shop.example.com"]
    assert sent[b"x-request-id"] == [b"rid"]


def test_forwarded_headers_trusted_peer_are_kept() -> None:
    sent = forward(
        [(b"host", b"inner"), (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"outer")],
        trusted=True,
    )
    assert sent[b"x-forwarded-proto"] == [b"https"]
    assert sent[b"x-forwarded-host"] == [b"outer"]


def test_with_host() -> None:
    assert with_host([(b"a", b"1")], b"backend:1", b"client")[0] == (b"host", b"backend:1")
    assert with_host([(b"a", b"1")], None, b"client")[0] == (b"host", b"client")
    assert with_host([(b"a", b"1")], None, None) == [(b"a", b"1")]


def test_response_headers_keep_order_and_repeats() -> None:
    raw = [
        (b"Set-Cookie", b"a=1"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Set-Cookie", b"b=2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Keep-Alive", b"5"),
        (b"X-Request-ID", b"backend-id"),
        (b"Content-Length", b"3"),
    ]
    assert downstream_response_headers(raw) == [
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Length", b"3"),
    ]


def test_request_id_sanity() -> None:
    assert is_sane_request_id(b"abc-123")
    assert is_sane_request_id(b"x" * 128)
    assert not is_sane_request_id(b"x" * 129)
    assert not is_sane_request_id(b"")
    assert not is_sane_request_id(b"has space")
    assert not is_sane_request_id("é".encode())


def test_trusted_proxies_and_client_ip() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "::1"])
    assert "10.9.9.9" in trusted and "::1" in trusted
    assert "11.0.0.1" not in trusted and "garbage" not in trusted
    assert trusted.client_ip("10.0.0.1", b"203.0.113.7, 10.0.0.5") == "203.0.113.7"
    assert trusted.client_ip("10.0.0.1", b"10.0.0.9") == "10.0.0.1"
    assert trusted.client_ip("198.51.100.1", b"203.0.113.7") == "198.51.100.1"
    assert TrustedProxies([]).client_ip("10.0.0.1", b"203.0.113.7") == "10.0.0.1"
