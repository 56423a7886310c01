"""Hardening through the real process (Hardening 1-4, 6), extending test_edges.py:

- the backend receives exactly the path the route was chosen on: 200 generated raw paths
  (seeded) sent with raw sockets, compared with `routing.normalize` + the route's rewrite;
- not an open proxy: absolute-form targets, CONNECT, Host headers and `//host` paths naming
  other sites (a counting listener, the admin port itself) reach only configured backends;
- what the client says: a chunked trailer is never merged into the headers, two Host
  headers are refused;
- limits: the idle keep-alive timeout (busy connections are not cut), fractional timeouts,
  a head measured the same whatever its TCP segmentation, the head deadline counted from
  the connection's start, the maximum number of client connections;
- a bad reload never disturbs traffic: fuzzed invalid configs written while requests flow.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.errors import BadRequest
from proxy.loader import ConfigError, load_text
from proxy.routing import Router, Rule, normalize, normalize_prefix, strip_prefix
from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, raw_request, wait_until

TOKEN_ENV = "STRANGLER_HARDENING_TOKEN"
TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# name: (prefix, backend, strip_prefix)
ROUTES: dict[str, tuple[str, str, str | None]] = {
    "orders": ("/api/orders", "orders", None),
    "orders-admin": ("/api/orders/admin", "monolith", None),
    "svc": ("/svc/orders", "orders", "/svc"),
    "admin": ("/admin", "orders_base", None),
    "semi": ("/a;b", "orders", None),
    "cafe": ("/café/x", "orders_base", "/café"),
    "tilde": ("/%7Euser", "orders", "/~user"),
    "slash": ("/a%2Fb", "monolith", "/a%2fb"),
    "preserved": ("/preserved", "preserved", None),
}
BASES = {"monolith": "", "orders": "", "orders_base": "/base", "preserved": ""}
SERVED_BY = {
    "monolith": "monolith",
    "orders": "orders",
    "orders_base": "orders",
    "preserved": "orders",
}


def hardening_config(b: Backends, routes: dict[str, tuple[str, str, str | None]]) -> str:
    lines = [
        "version: 1",
        "legacy: monolith",
        f"admin: {{token_env: {TOKEN_ENV}}}",
        "backends:",
        f'  monolith: {{url: "{b.monolith_url}"}}',
        f'  orders: {{url: "{b.orders_url}"}}',
        f'  orders_base: {{url: "{b.orders_url}/base"}}',
        f'  preserved: {{url: "{b.orders_url}", preserve_host: true}}',
        "defaults:",
        "  retry: {attempts: 1}",
        "limits: {keepalive_timeout: 1, header_timeout: 2, max_header_bytes: 8192}",
        "routes:",
    ]
    for name, (prefix, backend, strip) in routes.items():
        lines += [
            f"  - name: {name}",
            f'    match: {{prefix: "{prefix}"}}',
            f"    backend: {backend}",
        ]
        lines += [f'    rewrite: {{strip_prefix: "{strip}"}}'] if strip else []
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def hard(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir: Path = tmp_path_factory.mktemp("hardening")
    text = hardening_config(backends, ROUTES)
    with ProxyProcess(text, workdir, env={TOKEN_ENV: TOKEN}) as p:
        yield p


class Conn:
    """One raw client connection: requests written as given, responses read by their framing."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a response: {self.buf[:100]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            size = int(headers["content-length"])
            while len(self.buf) < size and self._fill():
                pass
            body, self.buf = self.buf[:size], self.buf[size:]
        else:
            body = self._chunked() if "chunked" in headers.get("transfer-encoding", "") else b""
        return int(lines[0].split()[1]), headers, body

    def _chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            size_line, self.buf = self.buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                self._fill()
            body, self.buf = body + self.buf[:size], self.buf[size + 2 :]
            if size == 0:
                return body

    def get(
        self, target: bytes, headers: bytes = b"Host: x\r\n"
    ) -> tuple[int, dict[str, str], bytes]:
        self.send(b"GET " + target + b" HTTP/1.1\r\n" + headers + b"\r\n")
        return self.response()

    def closed_within(self, seconds: float) -> float | None:
        """Seconds until the server closed the connection; None if it stayed open."""
        t0 = time.monotonic()
        self.sock.settimeout(seconds)
        try:
            while self._fill():
                pass
        except TimeoutError:
            return None
        except OSError:
            pass
        return time.monotonic() - t0


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply[9:12])


# --- the backend receives the path the route was chosen on -----------------------------------

# Pieces of request targets a client can put on the wire (no space, control, `?`, `#` or
# non-ASCII byte: the HTTP parser takes those apart or refuses them before routing).
PIECES = [
    "/", "/", "/", "/", ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "%2f", "%2F", "%5c", "%5C",
    "\\", ";", ";v=1", "%3b", "%00", "%c0%ae", "%C0%AE%c0%AE", "%25", "%252e", "%252F", "a", "b",
    "api", "orders", "admin", "svc", "x", "a;b", "caf%C3%A9", "caf%c3%a9", "%7Euser", "~user",
    "%7e", "-", "_", "%41", "%61pi", "'", '"', "<", ">", "{", "}", "|", "^", "`", "!", "$", "&",
    "(", ")", "*", "+", ",", "=", ":", "@", "[", "]", "%", "%4", "%zz", "preserved",
]  # fmt: skip
QUERY = ["", "", "a=1", "a=%zz&b=/../c", "x=%2F;y=\\", "q=%C3%A9&&", "=", "a=b?c=d", "..%2f"]


def generated_targets(seed: int = 20241201, count: int = 200) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    known = [
        "/api/orders/7", "/api/orders/admin/x", "/api/ordersX", "/api/orders%2Fadmin",
        "/api/orders/%2e%2e/orders/admin", "/api/orders/admin/%2e%2e", "/svc/orders/1",
        "/svc/orders", "/admin/%2e%2e/api/orders", "/caf%c3%a9/x/1", "/%7euser/1",
        "/a;b/c", "/a%3bb/c", "/a%2fb/c", "/a%2Fb", "/api\\orders", "/api/orders;x=1/admin",
        "/api/orders/%c0%ae%c0%ae/admin", "/%2e%2e/admin", "/admin/../..", "//api/orders",
        "/api//orders", "/%61pi/%6Frders/admin",
    ]  # fmt: skip
    targets = [(k.encode(), b"") for k in known]
    while len(targets) < count:
        path = "/" + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
        targets.append((path.encode(), rng.choice(QUERY).encode()))
    return targets


def expected_route(path: str) -> str:
    rules = [
        Rule(name=name, prefix=normalize_prefix(prefix), target=name, order=i)
        for i, (name, (prefix, _, _)) in enumerate(ROUTES.items())
    ]
    return Router.build(rules, "default").match(path, "GET", None, lambda name: None)


def test_the_backend_receives_the_path_the_route_was_chosen_on(
    hard: ProxyProcess, b: Backends
) -> None:
    targets = generated_targets()
    expected: dict[str, tuple[str, str, str, str]] = {}  # request id -> route, backend, path, query
    refused: set[str] = set()
    conn = Conn(hard.port)
    try:
        for i, (path, query) in enumerate(targets):
            rid = f"path-{i}"
            target = path + (b"?" + query if query else b"")
            try:
                routed = normalize(path)
            except BadRequest:
                routed = None
            try:
                status, _, body = conn.get(target, f"Host: x\r\nX-Request-ID: {rid}\r\n".encode())
            except (ConnectionError, OSError):
                conn.close()
                conn = Conn(hard.port)
                status, _, body = conn.get(target, f"Host: x\r\nX-Request-ID: {rid}\r\n".encode())
            if routed is None:
                assert status == 400, (target, body)
                refused.add(rid)
                continue
            assert status == 200, (target, status, body[:200])
            route = expected_route(routed)
            prefix, backend, strip = ROUTES.get(route, ("/", "monolith", None))
            sent = strip_prefix(routed, strip) if strip else routed
            info = json.loads(body)
            assert info["served_by"] == SERVED_BY[backend], (target, route, info["served_by"])
            assert info["raw_path"] == BASES[backend] + sent, (target, route)
            assert info["query_string"] == query.decode("latin-1"), target
            expected[rid] = (route, backend, info["raw_path"], info["query_string"])
    finally:
        conn.close()
    assert len(refused) >= 5 and len(expected) >= 150  # the generator covers both
    # Every answer came from the route expected, and nothing else reached a backend.
    seen = {}
    for rec in (b.monolith, b.orders):
        for info in rec.requests:
            rid = dict((k.lower(), v) for k, v in info.get("headers", [])).get("x-request-id")
            seen[rid] = info
    assert set(seen) == set(expected)
    access: dict[str, dict[str, Any]] = {}

    def logged() -> bool:
        access.update((e["request_id"], e) for e in hard.access_log())
        return all(f"path-{i}" in access for i in range(len(targets)))

    assert wait_until(logged, 10, 0.1)  # the access log is written by a thread
    for rid, (route, *_rest) in expected.items():
        assert access[rid]["route"] == route, (rid, access[rid])
    for rid in refused:
        assert access[rid]["route"] == "none" and access[rid]["status"] == 400


# --- not an open proxy ------------------------------------------------------------------------


class CountingListener:
    """A port where connections are counted: nothing of the proxy may ever arrive here."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture()
def elsewhere() -> Iterator[CountingListener]:
    listener = CountingListener()
    yield listener
    listener.close()


def echoed(reply: bytes) -> dict[str, Any]:
    assert status_of(reply) == 200, reply[:300]
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def headers_of(info: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in info["headers"]}


def test_other_sites_named_anywhere_reach_only_configured_backends(
    hard: ProxyProcess, b: Backends, elsewhere: CountingListener
) -> None:
    other = f"127.0.0.1:{elsewhere.port}".encode()
    close = b"Connection: close\r\n"

    def send(line: bytes, host: bytes = other, extra: bytes = b"") -> bytes:
        data = line + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + close + extra + b"\r\n"
        return raw_request(hard.port, data, timeout=5)

    info = echoed(send(b"GET http://" + other + b"/abs?q=1"))
    assert [info["served_by"], info["raw_path"], info["query_string"]] == [
        "monolith",
        "/abs",
        "q=1",
    ]
    info = echoed(send(b"GET https://" + other + b"/api/orders/1", host=b"x"))
    assert (info["served_by"], info["raw_path"]) == ("orders", "/api/orders/1")
    info = echoed(send(b"GET /host-only"))
    assert info["served_by"] == "monolith"
    assert headers_of(info)["host"] == b.monolith_url.removeprefix("http://")
    info = echoed(send(b"GET /preserved/p"))  # the Host is kept, the connection is not
    assert info["served_by"] == "orders" and headers_of(info)["host"] == other.decode()
    info = echoed(send(b"GET //" + other + b"/x"))  # a path, not an authority
    assert (info["served_by"], info["raw_path"]) == ("monolith", "//" + other.decode() + "/x")
    info = echoed(send(b"GET /", extra=b"X-Forwarded-Host: " + other + b"\r\n"))
    assert info["served_by"] == "monolith"
    # h2c smuggling: the upgrade never reaches the backend, so no tunnel is ever opened.
    info = echoed(
        send(
            b"GET /h2c",
            extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        )
    )
    assert not {"upgrade", "http2-settings"} & set(headers_of(info))
    b.reset()
    for line in (
        b"CONNECT " + other,
        b"CONNECT http://" + other + b"/",
        b"CONNECT /api/orders/1",
        b"GET http://" + other,
        b"GET " + other + b"/x",
        b"GET @" + other + b"/x",
        b"OPTIONS *",
    ):
        assert status_of(send(line)) == 400, line
    assert b.monolith.requests == [] and b.orders.requests == []
    time.sleep(0.3)
    assert elsewhere.accepted == 0


@pytest.mark.parametrize(
    "target",
    [
        "/api/reload",
        "//api/reload",
        "/%61pi/reload",
        "/api/./reload",
        "/API/reload",
        "http://127.0.0.1:{admin}/api/reload",
        "/api/routes/orders/split",
        "http://127.0.0.1:{admin}/api/routes/orders/split",
    ],
)
def test_admin_api_spellings_on_the_main_port_reach_the_backend(
    hard: ProxyProcess, b: Backends, target: str
) -> None:
    before = httpx.get(hard.admin + "/api/routes", timeout=10).json()
    line = target.format(admin=hard.admin_port).encode()
    body = b'{"orders": 0, "monolith": 100}'
    data = (
        b"POST "
        + line
        + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % hard.admin_port
        + f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n".encode()
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    assert echoed(raw_request(hard.port, data))["served_by"] == "monolith"
    after = httpx.get(hard.admin + "/api/routes", timeout=10).json()
    assert after["last_reload"] == before["last_reload"]
    assert [r["override"] for r in after["routes"]] == [r["override"] for r in before["routes"]]


# --- what the client says the request is -----------------------------------------------------


@pytest.mark.parametrize(
    "trailer",
    [b"X-Request-ID: from-trailer", b"X-Forwarded-For: 6.6.6.6", b"Authorization: Bearer t"],
)
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_a_chunked_trailer_is_never_taken_for_a_header(
    hard: ProxyProcess, b: Backends, trailer: bytes, method: bytes
) -> None:
    """The whole message arrives before routing: its trailer must still not count as a header
    (routing, X-Forwarded-For, the request id, the backend would all believe it)."""
    data = (
        method
        + b" /trailer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"5\r\nhello\r\n0\r\n"
        + trailer
        + b"\r\n\r\n"
    )
    info = echoed(raw_request(hard.port, data))
    assert info["body_size"] == 5
    value = trailer.split(b": ", 1)[1].decode()
    assert all(value not in v for _, v in info["headers"]), info["headers"]


@pytest.mark.parametrize("hosts", [(b"x", b"shop.example.com"), (b"x", b"x")])
def test_two_host_headers_are_a_bad_request(
    hard: ProxyProcess, b: Backends, hosts: tuple[bytes, bytes]
) -> None:
    data = b"GET / HTTP/1.1\r\nHost: %s\r\nHost: %s\r\n\r\n" % hosts
    assert status_of(raw_request(hard.port, data)) == 400
    assert b.monolith.requests == [] and b.orders.requests == []


# --- limits -----------------------------------------------------------------------------------


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    hard: ProxyProcess,
) -> None:
    conn = Conn(hard.port)
    try:
        assert conn.get(b"/ka/idle")[0] == 200
        closed = conn.closed_within(6)
    finally:
        conn.close()
    assert closed is not None and 0.6 < closed < 4, closed


def test_a_busy_kept_alive_connection_is_not_cut(hard: ProxyProcess) -> None:
    conn = Conn(hard.port)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.6:  # longer than the timeout, never idle that long
            assert conn.get(b"/ka/busy")[0] == 200
            time.sleep(0.4)
        # A response that takes longer than the keep-alive timeout is not cut either.
        assert conn.get(b"/slow/ka?delay=1.2")[0] == 200
        assert conn.get(b"/ka/after")[0] == 200
    finally:
        conn.close()


def test_a_head_is_measured_the_same_whatever_its_segmentation(hard: ProxyProcess) -> None:
    """6000 bytes of headers (limit 8192) pass whole and in pieces; 9000 are refused."""

    def head(size: int) -> bytes:
        fields = b"".join(b"X-F%02d: " % i + b"v" * 92 + b"\r\n" for i in range(size // 100))
        return b"GET /segmented HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"

    for size, status in ((6000, 200), (9000, 431)):
        data = head(size)
        assert status_of(raw_request(hard.port, data, read_until_close=False)) == status
        conn = Conn(hard.port)
        try:
            try:
                for at in range(0, len(data), 500):
                    conn.send(data[at : at + 500])
                    time.sleep(0.01)
            except OSError:
                assert status == 431  # refused as soon as the limit was passed
            assert conn.response()[0] == status, size
        finally:
            conn.close()


def test_the_head_deadline_counts_from_the_connection_start(hard: ProxyProcess) -> None:
    """header_timeout 2: idle 1.5 s, then a byte every 0.2 s is cut off near 2 s, not 3.5 s."""
    with socket.create_connection(("127.0.0.1", hard.port), timeout=6) as s:
        t0 = time.monotonic()
        time.sleep(1.5)
        reply = b""
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 40:
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > 5:
                break
        reply = s.recv(200)
        elapsed = time.monotonic() - t0
    assert status_of(reply) == 408
    assert elapsed < 3.2, elapsed


@pytest.fixture(scope="module")
def crowded(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    text = f"""version: 1
legacy: monolith
backends:
  monolith: {{url: "{backends.monolith_url}"}}
limits: {{max_connections: 5, keepalive_timeout: 0.5}}
"""
    with ProxyProcess(text, tmp_path_factory.mktemp("crowded")) as p:
        yield p


def test_past_max_connections_a_new_connection_gets_503_and_is_closed(
    crowded: ProxyProcess, b: Backends
) -> None:
    held = [Conn(crowded.port) for _ in range(5)]
    try:
        time.sleep(0.2)
        extra = raw_request(crowded.port, b"GET /sixth HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        assert status_of(extra) == 503
        assert b"connection: close" in extra.lower() and b"retry-after: 1" in extra.lower()
        assert b.monolith.hits["/sixth"] == 0
        # The five held connections are served: the limit refuses the sixth, not theirs.
        for i, conn in enumerate(held):
            assert conn.get(b"/held/%d" % i)[0] == 200
        held.pop().close()
        time.sleep(0.2)
        fresh = b"GET /fresh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert status_of(raw_request(crowded.port, fresh)) == 200
    finally:
        for conn in held:
            conn.close()


def test_a_fractional_keepalive_timeout_is_honoured(crowded: ProxyProcess) -> None:
    conn = Conn(crowded.port)
    try:
        assert conn.get(b"/ka/1")[0] == 200
        time.sleep(0.15)
        assert conn.get(b"/ka/2")[0] == 200  # still open: 0.5 s is not 0
        closed = conn.closed_within(5)
    finally:
        conn.close()
    assert closed is not None and 0.25 < closed < 3, closed


# --- a bad reload never disturbs traffic ------------------------------------------------------


def invalid_configs(valid: str, count: int = 10, seed: int = 7) -> list[str]:
    """Seeded mutations of `valid` that the loader refuses, and a few nasty ones."""
    rng = random.Random(seed)
    found = [
        valid.replace("version: 1", "version: !!python/object/apply:os.system ['false']"),
        valid + "x: &a [*a]\n",
        valid.replace('prefix: "/api/orders"', 'prefix: "/%2e%2e/x"'),
        valid + "---\nversion: 1\n",
    ]
    while len(found) < count:
        lines = valid.splitlines()
        i = rng.randrange(len(lines))
        op = rng.choice(["delete", "indent", "flip", "swap"])
        if op == "delete":
            del lines[i]
        elif op == "indent":
            lines[i] = " " + lines[i]
        elif op == "flip" and lines[i]:
            at = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:at] + rng.choice(":{}[]&*!'\"") + lines[i][at + 1 :]
        else:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines) + "\n"
        try:
            load_text(text, "probe.yaml")
        except ConfigError:
            found.append(text)
    return found


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_fuzzed_invalid_reloads_never_disturb_traffic(hard: ProxyProcess, b: Backends) -> None:
    valid = hard.config_path.read_text()
    failures: list[str] = []
    done = threading.Event()
    sent = [0]

    def traffic() -> None:
        with httpx.Client(base_url=hard.url, timeout=10) as client:
            while not done.is_set():
                for path, by in (("/api/orders/9", "orders"), ("/legacy/1", "monolith")):
                    try:
                        r = client.get(path)
                        if r.status_code != 200 or r.json()["served_by"] != by:
                            failures.append(f"{path}: {r.status_code} {r.text[:100]}")
                    except httpx.HTTPError as err:
                        failures.append(f"{path}: {err!r}")
                    sent[0] += 1

    def last_reload() -> dict[str, Any]:
        return httpx.get(hard.admin + "/api/routes", timeout=10).json()["last_reload"]

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        for i, text in enumerate(invalid_configs(valid)):
            with pytest.raises(ConfigError) as info:
                load_text(text, str(hard.config_path))
            errors = [str(issue) for issue in info.value.issues]
            write_atomically(hard.config_path, text)
            if i % 4 == 0:  # seen by the file watch
                seen = lambda errors=errors: last_reload()["errors"] == errors  # noqa: E731
                assert wait_until(seen, 15, 0.1), errors
            else:  # or asked for through the admin API
                r = httpx.post(hard.admin + "/api/reload", headers=AUTH, timeout=10)
                assert r.status_code == 400 and r.json()["errors"] == errors
            assert last_reload()["result"] == "failure"
    finally:
        write_atomically(hard.config_path, valid)
        r = httpx.post(hard.admin + "/api/reload", headers=AUTH, timeout=10)
        done.set()
        thread.join(15)
    assert r.status_code == 200
    assert failures == [] and sent[0] > 20
    assert httpx.get(hard.url + "/svc/orders/2", timeout=10).json()["raw_path"] == "/orders/2"
    assert not Path("/tmp/strangler-fuzz-pwned").exists()
