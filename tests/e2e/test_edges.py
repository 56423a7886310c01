"""Hardening at the edge of the main port (config `limits`), with raw sockets against the
real process: oversized request lines and heads, too many headers, slow heads, request
smuggling shapes, and requests that would make strangler an open proxy."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, raw_request, wait_until

LIMITS = (
    "limits: {max_request_line: 200, max_header_bytes: 4096, max_headers: 20, header_timeout: 1,"
    " body_timeout: 1, send_timeout: 1}"
)


@pytest.fixture(scope="module")
def edge(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    text = f"""
version: 1
legacy: monolith
backends:
  monolith: {{url: "{backends.monolith_url}"}}
{LIMITS}
routes:
  - name: narrow
    match: {{prefix: /narrow}}
    rewrite: {{strip_prefix: /narrow}}
    backend: monolith
    bulkhead: {{max_concurrent: 1, max_queue: 0}}
"""
    workdir: Path = tmp_path_factory.mktemp("edge")
    with ProxyProcess(text, workdir) as p:
        yield p


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply[9:12])


def send(edge: ProxyProcess, data: bytes) -> bytes:
    return raw_request(edge.port, data, timeout=5)


def test_request_line_too_long_is_414(edge: ProxyProcess, b: Backends) -> None:
    assert status_of(send(edge, b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n")) == 414
    assert b.monolith.requests == []


def test_header_block_too_large_is_431(edge: ProxyProcess, b: Backends) -> None:
    reply = send(edge, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    assert status_of(reply) == 431
    assert b.monolith.requests == []


def test_header_block_too_large_when_sent_in_pieces_is_431(edge: ProxyProcess, b: Backends) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(200):
                s.sendall(b"X-Piece-%03d: " % i + b"b" * 40 + b"\r\n")
        except OSError:
            pass
        reply = s.recv(200)
    assert status_of(reply) == 431


def test_too_many_headers_is_431(edge: ProxyProcess, b: Backends) -> None:
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(30))
    assert status_of(send(edge, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")) == 431


def test_slow_head_is_cut_off_with_408(edge: ProxyProcess, b: Backends) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        t0 = time.monotonic()
        reply = b""
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: abcdefghijklmnopqrstuvwxyz\r\n":
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        reply = s.recv(200)
    assert status_of(reply) == 408
    assert time.monotonic() - t0 < 4


def test_idle_connection_without_a_request_is_closed(edge: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        t0 = time.monotonic()
        assert s.recv(100) == b""
    assert 0.5 < time.monotonic() - t0 < 4


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\nHost: x\nContent-Length: 0\n\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ],
)
def test_ambiguous_framing_is_400_and_never_forwarded(
    edge: ProxyProcess, b: Backends, request_bytes: bytes
) -> None:
    reply = send(edge, request_bytes)
    assert status_of(reply) == 400
    assert b"connection: close" in reply.lower()
    assert b.monolith.requests == []


def test_absolute_form_never_reaches_another_host(edge: ProxyProcess, b: Backends) -> None:
    reply = send(
        edge,
        b"GET http://other.example/secret HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    assert status_of(reply) == 200
    assert b.monolith.requests[-1]["path"] == "/secret"


def test_refusals_are_counted_and_logged_as_route_none(edge: ProxyProcess, b: Backends) -> None:
    import httpx

    send(edge, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    entry = edge.wait_access(lambda e: e["status"] == 431)
    assert entry["route"] == "none" and entry["backend"] == "none" and entry["error"]
    metrics = httpx.get(edge.admin + "/metrics", timeout=5).text
    line = 'strangler_requests_total{backend="none",method="OTHER",route="none",status="431"}'
    assert line in metrics


def test_http11_without_host_is_400_http10_without_host_is_served(
    edge: ProxyProcess, b: Backends
) -> None:
    assert status_of(send(edge, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")) == 400
    assert b.monolith.requests == []
    assert status_of(send(edge, b"GET /x HTTP/1.0\r\n\r\n")) == 200


def _read_one_response(s: socket.socket) -> bytes:
    """One whole Content-Length response, however TCP splits it (bounded by the timeout)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, body
        body += chunk
    assert len(body) == length, "no bytes beyond the first response were expected"
    return head + b"\r\n\r\n" + body


def test_a_bad_request_after_a_good_one_on_a_kept_alive_connection_gets_its_400(
    edge: ProxyProcess, b: Backends
) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        first = _read_one_response(s)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(
            b"GET /second HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        second = b""
        while chunk := s.recv(65536):
            second += chunk
    assert second.startswith(b"HTTP/1.1 400"), second[:80]


def _read_until_closed(s: socket.socket, limit: float = 5.0) -> bytes:
    s.settimeout(limit)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    return reply


def test_a_body_that_stops_coming_is_cut_off_with_408_and_never_forwarded(
    edge: ProxyProcess, b: Backends
) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        t0 = time.monotonic()
        reply = _read_until_closed(s)  # the connection is closed: its framing is lost
        elapsed = time.monotonic() - t0
    assert status_of(reply) == 408, reply[:200]
    assert b"application/problem+json" in reply and b"10 bytes received" in reply
    assert 0.8 < elapsed < 4, elapsed
    assert not any(r["path"] == "/stalled" for r in b.monolith.requests)
    entry = edge.wait_access(lambda e: e["path"] == "/stalled")
    assert entry["status"] == 408 and entry["route"] == "default"


def test_a_body_sent_in_pieces_within_the_timeout_is_served_however_long_it_takes(
    edge: ProxyProcess, b: Backends
) -> None:
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(b"POST /paced HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        t0 = time.monotonic()
        for part in (b"ab", b"cd", b"ef"):  # 1.35 s in all; no gap reaches body_timeout (1 s)
            time.sleep(0.45)
            s.sendall(part)
        reply = _read_one_response(s)
    assert status_of(reply) == 200 and time.monotonic() - t0 > 1.2
    assert [r["body_size"] for r in b.monolith.requests if r["path"] == "/paced"] == [6]


def test_a_streamed_body_that_stalls_gets_408_and_the_backend_sees_it_end(
    edge: ProxyProcess, b: Backends
) -> None:
    size, sent = 300_000, 150_000  # past the 64 KiB held for replay: it streams to the backend
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        s.sendall(b"u" * sent)
        reply = _read_until_closed(s)
    assert status_of(reply) == 408, reply[:200]
    assert wait_until(lambda: "/upload" in b.monolith.disconnects, 5, 0.05)


def test_clients_slow_to_send_their_bodies_hold_no_bulkhead_slot(
    edge: ProxyProcess, b: Backends
) -> None:
    """narrow admits one request at a time and queues none: three uploads waiting on their
    clients must not take that slot from a request that is ready."""
    import httpx

    def tasks() -> int:
        return int(httpx.get(edge.admin + "/api/routes", timeout=5).json()["process"]["tasks"])

    idle = tasks()
    slow = [socket.create_connection(("127.0.0.1", edge.port), timeout=5) for _ in range(3)]
    try:
        for s in slow:
            s.sendall(b"POST /narrow/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
        # All three are in, waiting for their bodies (had one taken the slot, the other two
        # would have had their 503 at once and be gone).
        assert wait_until(lambda: tasks() >= idle + 3, 5, 0.05), (idle, tasks())
        ready = raw_request(
            edge.port, b"GET /narrow/now HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(ready) == 200, ready[:300]
        slow[0].sendall(b"-done!")  # the rest of its body: now it is served
        assert status_of(_read_one_response(slow[0])) == 200
    finally:
        for s in slow:
            s.close()


def test_a_client_that_stops_reading_is_cut_off_and_gives_its_bulkhead_slot_back(
    edge: ProxyProcess, b: Backends
) -> None:
    def narrow_status() -> int:
        request = b"GET /narrow/now HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        return status_of(raw_request(edge.port, request))

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect(("127.0.0.1", edge.port))
        s.sendall(b"GET /narrow/big?size=100000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        # narrow's one slot is the download's while the client reads nothing...
        assert wait_until(lambda: narrow_status() == 503, 5, 0.05)
        # ...until send_timeout (1 s) of a full buffer cuts the client off
        assert wait_until(lambda: narrow_status() == 200, 10, 0.1)
        assert 0.9 < time.monotonic() - t0 < 8
        entry = edge.wait_access(lambda e: e["path"] == "/narrow/big")
        assert entry["status"] == 499 and entry["bytes"] < 100_000_000
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except OSError:
            pass  # reset: the proxy aborted the connection
    assert received < 100_000_000  # never presented as complete


def test_a_client_that_reads_slowly_but_steadily_gets_the_whole_response(
    edge: ProxyProcess, b: Backends
) -> None:
    """6 MiB, more than the proxy's socket buffers hold, so its writes pause again and again,
    read a piece every 20 ms: several times send_timeout (1 s) in all, never cut off."""
    size = 6 << 20
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        s.settimeout(5)
        s.connect(("127.0.0.1", edge.port))
        s.sendall(
            b"GET /narrow/big?size=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size
        )
        t0 = time.monotonic()
        data = bytearray()
        while chunk := s.recv(64 * 1024):
            data += chunk
            time.sleep(0.02)
        took = time.monotonic() - t0
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert status_of(head) == 200 and len(body) == size
    assert took > 1.5, took  # at least 96 reads of at most 64 KiB, 20 ms apart
