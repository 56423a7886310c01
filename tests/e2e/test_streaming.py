"""SPEC §7 streaming through the real process: flat memory both ways, no buffering, broken
streams stay broken, a client that leaves releases the backend at once."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, wait_until

GIB = 1 << 30
RSS_BUDGET_KIB = 16 * 1024  # "a few MiB": far below the body sizes


def test_one_gib_download_streams_with_flat_memory(proxy: ProxyProcess, b: Backends) -> None:
    httpx.get(proxy.url + "/big?size=1000000", timeout=10)  # warm up pools and buffers
    baseline = proxy.rss_kib()
    proxy.reset_peak_rss()
    received = 0
    with httpx.stream("GET", proxy.url + "/big?size=" + str(GIB), timeout=60) as r:
        assert r.headers["content-length"] == str(GIB)
        for chunk in r.iter_raw(1 << 20):
            received += len(chunk)
    assert received == GIB
    grew = proxy.peak_rss_kib() - baseline
    assert grew < RSS_BUDGET_KIB, f"proxy RSS grew by {grew} KiB for a 1 GiB download"


def test_one_gib_upload_streams_with_flat_memory(proxy: ProxyProcess, b: Backends) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for _ in range(1024):
            digest.update(chunk)
            yield chunk

    httpx.post(proxy.url + "/upload", content=b"warm", timeout=10)
    baseline = proxy.rss_kib()
    proxy.reset_peak_rss()
    r = httpx.post(proxy.url + "/upload", content=body(), timeout=120)
    assert r.status_code == 200
    assert r.json()["size"] == GIB and r.json()["sha256"] == digest.hexdigest()
    grew = proxy.peak_rss_kib() - baseline
    assert grew < RSS_BUDGET_KIB, f"proxy RSS grew by {grew} KiB for a 1 GiB upload"


def test_dripping_backend_reaches_the_client_as_it_drips(proxy: ProxyProcess, b: Backends) -> None:
    gate = b.orders.event("drip-gate")
    with httpx.stream("GET", proxy.url + "/drip?n=2&interval=0&gate=drip-gate", timeout=10) as r:
        lines = r.iter_lines()
        first = next(lines)
        # The backend holds its second chunk until the first is seen through the proxy.
        assert first == "chunk 0" and not gate.is_set()
        gate.set()
        assert list(lines) == ["chunk 1"]


@pytest.mark.parametrize("framing", ["length=big", "length=none"])
def test_backend_dying_mid_stream_breaks_the_client_response(
    proxy: ProxyProcess, b: Backends, framing: str
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", proxy.url + f"/die?{framing}", timeout=10) as r:
            assert r.status_code == 200
            for _ in r.iter_raw():
                pass
    entry = proxy.wait_access(lambda e: e["path"] == "/die" and "error" in e)
    assert entry["error"].startswith("protocol")


def test_small_body_cut_short_before_headers_went_out_is_a_clean_502(
    proxy: ProxyProcess, b: Backends
) -> None:
    r = httpx.get(proxy.url + "/die?length=small", timeout=10)
    assert r.status_code == 502 and r.headers["content-type"] == "application/problem+json"


def test_client_going_away_releases_the_backend_at_once(proxy: ProxyProcess, b: Backends) -> None:
    started = b.orders.event("slow-started")
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(b"GET /slow/patient?delay=20 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert started.wait(5)
    t0 = time.monotonic()
    s.close()
    assert wait_until(lambda: "/slow/patient" in b.orders.disconnects, timeout=5)
    assert time.monotonic() - t0 < 2
    entry = proxy.wait_access(lambda e: e["path"] == "/slow/patient")
    assert entry["status"] == 499


def _http10(proxy: ProxyProcess, target: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(b"GET " + target + b" HTTP/1.0\r\nHost: x\r\n\r\n")
    return s


def test_http10_client_gets_an_unknown_length_body_of_any_size_close_delimited(
    proxy: ProxyProcess, b: Backends
) -> None:
    """HTTP/1.0 has no chunked framing: the body goes out as it comes and ends with the
    connection, streamed (20 MiB, more than anything the proxy would hold)."""
    size = 20 << 20
    baseline = proxy.rss_kib()
    proxy.reset_peak_rss()
    with _http10(proxy, b"/big?size=%d&length=0" % size) as s:
        data = bytearray()
        while chunk := s.recv(1 << 20):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lowered = head.lower()
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in lowered
    assert b"content-length" not in lowered and b"transfer-encoding" not in lowered
    assert len(body) == size and body == b"x" * size
    assert proxy.peak_rss_kib() - baseline < RSS_BUDGET_KIB


def test_http10_client_gets_a_dripping_body_as_it_drips(proxy: ProxyProcess, b: Backends) -> None:
    gate = b.orders.event("drip-gate-10")
    with _http10(proxy, b"/drip?n=2&interval=0&gate=drip-gate-10") as s:
        seen = b""
        while b"chunk 0\n" not in seen:  # bounded by the socket's 10 s timeout
            chunk = s.recv(65536)
            assert chunk, seen
            seen += chunk
        assert not gate.is_set()  # the backend holds chunk 1 until chunk 0 was seen here
        gate.set()
        while chunk := s.recv(65536):
            seen += chunk
    assert seen.endswith(b"\r\n\r\nchunk 0\nchunk 1\n")


def test_http10_client_sees_a_reset_when_the_backend_dies_mid_body(
    proxy: ProxyProcess, b: Backends
) -> None:
    """A close-delimited body ends with the connection: an orderly close would present the
    cut body as complete, so the proxy resets the connection instead."""
    with _http10(proxy, b"/die?length=none") as s:
        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := s.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200")
