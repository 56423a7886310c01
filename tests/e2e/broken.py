"""A backend that misbehaves on purpose, byte by byte: a raw asyncio TCP server (in a thread
with its own loop) whose behaviour is chosen by the request path, the query picking a variant:

/ok                      a correct keep-alive answer: `ok conn=C n=N` (connection id, its
                         request count), to prove a pooled connection is healthy
/reset-in-headers        part of a status line and headers, then RST (SO_LINGER 0)
/close-in-headers        the same, then FIN
/bad-header?v=           a header line without colon (nocolon), a space in a name (space),
                         a control byte, NUL, bare CR or DEL in a value (ctl, nul, cr, del),
                         two different Content-Lengths (two-lengths), bare LF line ends (lf),
                         Content-Length with chunked (cl-te), a negative length
                         (bad-length), a coding other than chunked (te-gzip, te-identity)
/huge-header?v=          a 1 MiB header value (value), 10,000 headers (many)
/bad-status?v=           `HTTP/1.1 abc` (abc), `FOO` (foo), headers without a status line
                         (none), a status outside 200-599 (600, 099, 101)
/short-body?size=&then=  Content-Length `size` (1000), half of it sent, then FIN (close) or
                         nothing more until the proxy closes (stall)
/long-body?extra=&delay= Content-Length 100, 100 more bytes after the body (`garbage`, or a
                         whole second answer `poison`), after `delay` seconds; the
                         connection then stays open and serves the next request
/never?read=&hold=       reads the request, never answers (read=0: does not even read the
                         body, and closes after `hold` seconds)
/slow-headers?interval=  drips a correct head a byte every `interval` seconds (0.3)
/early-answer?status=&then=  answers `status` (413) before reading the request body, then
                         closes (close) or reads the body to its end and closes (drain)
/chunked-bad             a chunked body with an invalid chunk size after the first chunk
/chunked-truncated       a chunked body that ends (FIN) without its last, 0-size chunk

It counts connections accepted and still open, the requests seen per path, and which
connection carried each request.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import parse_qs, urlsplit

from tests.e2e.harness import free_port, wait_until

MIB = 1 << 20
POISON_BODY = b"POISONED"
POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Poison: 1\r\n\r\n" + POISON_BODY


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    conn: int
    n: int  # the request's number on its connection, from 1


class Closed(Exception):
    """The handler closed (or reset) the connection: nothing more is read from it."""


Handler = Callable[
    ["BrokenBackend", asyncio.StreamReader, asyncio.StreamWriter, Request], Awaitable[None]
]


class BrokenBackend:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.requests: Counter[str] = Counter()
        self.log: list[tuple[int, str]] = []  # (connection id, path) of every request seen
        self.live: set[int] = set()  # ids of the connections still open
        self.body_bytes: Counter[str] = Counter()  # request body bytes read, per path
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle, in the test's thread ----------------------------------------------

    def start(self) -> BrokenBackend:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not wait_until(lambda: self._server is not None, 10):
            raise RuntimeError(f"broken backend on :{self.port} did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> BrokenBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hits(self, path: str) -> int:
        with self.lock:
            return self.requests[path]

    def last_connection(self, path: str) -> int:
        with self.lock:
            return next(conn for conn, seen in reversed(self.log) if seen == path)

    def served(self, conn: int) -> list[str]:
        """The paths of the requests a connection carried."""
        with self.lock:
            return [path for c, path in self.log if c == conn]

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, limit=4 * MIB)
        self._server = server
        async with server:
            await self._stop.wait()
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- one connection ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.accepted += 1
            self.open += 1
            conn = self.accepted
            self.live.add(conn)
        n = 0
        try:
            while True:
                req = await _read_head(reader, conn, n + 1)
                if req is None:
                    break
                n += 1
                with self.lock:
                    self.requests[req.path] += 1
                    self.log.append((conn, req.path))
                handler = HANDLERS.get(req.path, _not_found)
                await handler(self, reader, writer, req)
        except (Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            with self.lock:
                self.open -= 1
                self.live.discard(conn)
            if not writer.transport.is_closing():
                writer.transport.close()

    async def read_body(self, reader: asyncio.StreamReader, req: Request) -> None:
        """Read (and drop) the request body, counting its bytes."""
        size = 0
        if req.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                length = int(line.split(b";")[0].strip(), 16)
                if length == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                await reader.readexactly(length + 2)
                size += length
        else:
            remaining = int(req.headers.get("content-length", "0"))
            while remaining:
                chunk = await reader.read(min(remaining, 1 << 16))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(chunk)
                size += len(chunk)
        with self.lock:
            self.body_bytes[req.path] += size


async def _read_head(reader: asyncio.StreamReader, conn: int, n: int) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return Request(method, parts.path, query, headers, conn, n)


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def _close(writer: asyncio.StreamWriter) -> NoReturn:
    writer.transport.close()
    raise Closed


def _reset(writer: asyncio.StreamWriter) -> NoReturn:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    raise Closed


def _answer(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


# --- behaviours -----------------------------------------------------------------------------


async def _ok(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    await _write(w, _answer(f"ok conn={req.conn} n={req.n}".encode()))


async def _not_found(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    await _write(w, _answer(b"no such behaviour", status=b"404 Not Found"))


PARTIAL_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Len"


async def _reset_in_headers(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    await _write(w, PARTIAL_HEAD)
    await asyncio.sleep(float(req.query.get("delay", "0.01")))
    _reset(w)


async def _close_in_headers(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    await _write(w, PARTIAL_HEAD)
    await asyncio.sleep(float(req.query.get("delay", "0.01")))
    _close(w)


BAD_HEADERS = {
    "nocolon": b"HTTP/1.1 200 OK\r\nX-Broken header line\r\nContent-Length: 2\r\n\r\nok",
    "space": b"HTTP/1.1 200 OK\r\nX Bad: 1\r\nContent-Length: 2\r\n\r\nok",
    "ctl": b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    "nul": b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "cr": b"HTTP/1.1 200 OK\r\nX-Cr: a\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok",
    "del": b"HTTP/1.1 200 OK\r\nX-Del: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 4\r\n\r\nokok",
    "lf": b"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 2\n\nok",
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "te-identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok",
}


async def _bad_header(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    await _write(w, BAD_HEADERS[req.query.get("v", "nocolon")])


async def _huge_header(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    if req.query.get("v", "value") == "many":
        extra = b"".join(b"X-H-%d: v\r\n" % i for i in range(10_000))
    else:
        extra = b"X-Huge: " + b"v" * MIB + b"\r\n"
    await _write(w, _answer(b"ok", extra=extra))


BAD_STATUS = {
    "abc": b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",
    "foo": b"FOO\r\nContent-Length: 2\r\n\r\nok",
    "none": b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
    "600": b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok",
    "099": b"HTTP/1.1 099 Before\r\nContent-Length: 2\r\n\r\nok",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: nonsense\r\n\r\nok",
}


async def _bad_status(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    await _write(w, BAD_STATUS[req.query.get("v", "abc")])


async def _short_body(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    size = int(req.query.get("size", "1000"))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    await _write(w, head + b"s" * (size // 2))
    if req.query.get("then", "close") == "stall":
        while await r.read(65536):  # until the proxy gives up
            pass
    await asyncio.sleep(0.01)
    _close(w)


async def _long_body(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    extra = POISON if req.query.get("extra", "poison") == "poison" else b"G" * 100
    answer = _answer(b"L" * 100)
    delay = float(req.query.get("delay", "0"))
    if not delay:
        await _write(w, answer + extra)
        return
    await _write(w, answer)
    await asyncio.sleep(delay)
    await _write(w, extra)


async def _never(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    if req.query.get("read", "1") == "0":
        await asyncio.sleep(float(req.query.get("hold", "10")))  # the body stays unread
        _close(w)
    await b.read_body(r, req)
    while await r.read(65536):
        pass
    _close(w)


SLOW_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


async def _slow_headers(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    interval = float(req.query.get("interval", "0.3"))
    for i in range(len(SLOW_HEAD)):
        if r.at_eof() or w.transport.is_closing():
            _close(w)
        await _write(w, SLOW_HEAD[i : i + 1])
        await asyncio.sleep(interval)


async def _early_answer(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    status = int(req.query.get("status", "413"))
    reason = b"OK" if status == 200 else b"Payload Too Large"
    body = b"early %d" % status
    await _write(
        w, _answer(body, status=b"%d %s" % (status, reason), extra=b"Connection: close\r\n")
    )
    if req.query.get("then", "close") == "drain":
        await b.read_body(r, req)
    _close(w)


async def _chunked_bad(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    await _write(w, head + b"5\r\nhello\r\nZZ\r\nnot a chunk\r\n0\r\n\r\n")


async def _chunked_truncated(
    b: BrokenBackend, r: asyncio.StreamReader, w: asyncio.StreamWriter, req: Request
) -> None:
    await b.read_body(r, req)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    await _write(w, head + b"5\r\nhello\r\n6\r\n world\r\n")
    await asyncio.sleep(0.01)
    _close(w)


HANDLERS: dict[str, Handler] = {
    "/ok": _ok,
    "/reset-in-headers": _reset_in_headers,
    "/close-in-headers": _close_in_headers,
    "/bad-header": _bad_header,
    "/huge-header": _huge_header,
    "/bad-status": _bad_status,
    "/short-body": _short_body,
    "/long-body": _long_body,
    "/never": _never,
    "/slow-headers": _slow_headers,
    "/early-answer": _early_answer,
    "/chunked-bad": _chunked_bad,
    "/chunked-truncated": _chunked_truncated,
}
