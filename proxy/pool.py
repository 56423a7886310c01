"""Our HTTP/1.1 client: one asyncio Protocol per backend connection, a LIFO pool per backend.

`Pool.exchange(...)` sends one request on a kept-alive connection (the most recently used
idle one, or a new one while fewer than `limit` are open; beyond that requests wait in
arrival order) and returns the `Connection` once the answer's status and headers arrived.
The body then comes through `Connection.read_chunk()`, buffered up to `READ_HIGH` bytes
before the backend is paused. `Pool.release(conn)` keeps the connection for the next
request only when its exchange ended cleanly: the whole answer read as framed, the whole
request sent, no error, no `Connection: close`.

What a connection refuses, closing itself (never to be reused): bytes nobody asked for (on
an idle connection, or after the end of the body the backend declared), an answer our server
could not pass on (`head_problem`), a head over `MAX_HEAD` bytes or `MAX_HEADERS` fields,
anything httptools cannot parse, a 101. Errors are those of `proxy.errors`: connect refused
or DNS -> UpstreamConnectError, a connect timeout -> UpstreamConnectTimeout, the read timeout
(no byte for `read` seconds while the backend owes us one) or the total -> UpstreamTimeout,
everything else -> UpstreamProtocolError.

A kept-alive connection the backend closed before any byte of the answer came is replaced
by a new one, once, when the request may reach the backend twice (`resendable`: its body is
in hand and it is replay-safe, SPEC §5); a POST is never sent again that way.

Reads are at most `READ_SIZE` bytes: a connection is an `asyncio.BufferedProtocol` that
hands the loop one buffer shared by every connection of the loop (a read is copied out of
it before the next one), rather than taking the loop's reads of up to 256 KiB.

One timer per exchange covers the read and total timeouts: it is armed for the nearer of
the two and, when it fires, re-armed unless a byte came (data_received only notes the time);
while we, not the backend, hold things up (a slow client body, a paused reader) the read
timeout waits.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httptools

from proxy.errors import (
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.outbox import outbox

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterator[bytes] | None

# Below the idle timeout of common backends (uvicorn, node: 5 s), so we close an idle
# connection before the backend does and seldom send on one it is closing.
IDLE_TIMEOUT = 4.0
# Body bytes buffered before the backend is paused, and resumed. A connection holds at most
# one read past READ_HIGH: with 256 KiB here 8 connections relaying 1 MiB bodies held ~3 MiB
# more at once, for no more MB/s.
READ_HIGH = 64 * 1024
READ_LOW = 16 * 1024
# The largest read (the loop's own would bring up to 256 KiB at once).
READ_SIZE = 64 * 1024
MAX_HEAD = 64 * 1024  # an answer's status line and headers, at most
MAX_HEADERS = 128
_EARLY = 0.002  # the loop's timers are coarse: a deadline this close counts as reached

# What a header name and value may hold (RFC 9110 token; HTAB, visible ASCII, obs-text):
# our server could not send on anything else (a 500), or would split the answer.
_TOKEN_OR_LF = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n"
_VALUE_OR_TAB = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_BODYLESS_METHODS_NEED_LENGTH = frozenset({"POST", "PUT", "PATCH"})

# Exchange states.
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3


def head_problem(status: int, raw_headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """What keeps a final answer's status and headers from being passed on as they are
    (and from being held: more than MAX_HEADERS fields or MAX_HEAD bytes)."""
    if not 200 <= status <= 599:
        return f"the backend answered with status {status}"
    if len(raw_headers) > MAX_HEADERS:
        return f"the backend sent more than {MAX_HEADERS} header fields"
    names = b"\n".join([name for name, _ in raw_headers])
    values = b"\t".join([value for _, value in raw_headers])
    if len(names) + len(values) + 3 * len(raw_headers) > MAX_HEAD:
        return "the backend's answer head is too large"
    if names.translate(None, _TOKEN_OR_LF):
        return "the backend sent a malformed header name"
    if values.translate(None, _VALUE_OR_TAB):
        return "the backend sent a control character in a header value"
    if names.lower().find(b"transfer-encoding") >= 0:  # `in` costs a TypeError first
        for name, value in raw_headers:
            if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
                return "the backend sent a transfer coding other than chunked"  # not undone
    return None


def request_head(method: str, target: str, headers: Headers, body: Body) -> tuple[bytes, bool]:
    """The request line and headers on the wire, and whether the body goes chunked. The
    headers are sent as given (Host among them); only the body's framing is added: its
    length for bytes, the client's Content-Length or chunked coding for a stream."""
    lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    length: bytes | None = None
    for pair in headers:
        name = pair[0]
        if len(name) == 14 and name.lower() == b"content-length":
            length = pair[1]
            if isinstance(body, bytes) and length != b"%d" % len(body):
                continue  # ours, below, is the one that is true
        lines.append(b"%s: %s\r\n" % pair)
    chunked = False
    if body is None:
        if length is None and method in _BODYLESS_METHODS_NEED_LENGTH:
            lines.append(b"content-length: 0\r\n")
    elif isinstance(body, bytes):
        if length != b"%d" % len(body):
            lines.append(b"content-length: %d\r\n" % len(body))
    elif length is None:
        lines.append(b"transfer-encoding: chunked\r\n")
        chunked = True
    lines.append(b"\r\n")
    return b"".join(lines), chunked


class _Unasked(Exception):
    """Bytes the connection was not asked for: raised out of a parser callback."""


class _Refused(Exception):
    """An answer the connection refuses (its error is already set): stops the parser."""


_read_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary()
)


def read_buffer(loop: asyncio.AbstractEventLoop) -> memoryview:
    """The loop's read buffer, shared by its connections: the loop reads into it and calls
    `buffer_updated` at once, which copies the bytes out; no other read comes between."""
    buffer = _read_buffers.get(loop)
    if buffer is None:
        buffer = _read_buffers[loop] = memoryview(bytearray(READ_SIZE))
    return buffer


class Connection(asyncio.BufferedProtocol):
    """One connection to a backend and the exchange on it, if any."""

    __slots__ = (
        "pool",
        "loop",
        "transport",
        "parser",
        "state",
        "reused",
        "lost",
        "idle_since",
        "counted",
        # the exchange
        "head_only",
        "status",
        "raw",
        "interim",
        "keep_alive",
        "close_delimited",
        "head_bytes",
        "received",
        "length",
        "body_seen",
        "fresh_parser",
        "head_waiter",
        "chunks",
        "buffered",
        "reader",
        "error",
        "consumed",
        "reading_paused",
        "writer",
        "sent_all",
        "write_paused",
        "drain_waiter",
        "client_wait",
        "timer",
        "deadline",
        "read_timeout",
        "last",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = _IDLE
        self.reused = False
        self.lost = False
        self.idle_since = 0.0
        self.counted = True  # holds one of the pool's `limit` places
        self.head_only = False
        self.status = 0
        self.raw: Headers = []
        self.interim = False
        self.keep_alive = False
        self.close_delimited = False
        self.head_bytes = 0
        self.received = 0
        self.length: int | None = None  # the declared body length (-1: none), looked up once
        self.body_seen = 0
        self.fresh_parser = False  # the parser missed bytes read past it: a new one
        self.head_waiter: asyncio.Future[None] | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.reader: asyncio.Future[None] | None = None
        self.error: UpstreamError | None = None
        self.consumed = False
        self.reading_paused = False
        self.writer: asyncio.Task[None] | None = None
        self.sent_all = True
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.client_wait = False
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.read_timeout = 0.0
        self.last = 0.0

    # --- the exchange, called by the pool -----------------------------------------------

    def start(
        self,
        head: bytes,
        body: Body,
        chunked: bool,
        *,
        head_only: bool,
        read_timeout: float,
        deadline: float,
    ) -> asyncio.Future[None]:
        """Send a request: the future is done once the final answer's head is in. The
        caller awaits it and calls `abort()` if that raises."""
        transport = self.transport
        assert transport is not None and self.state == _IDLE
        loop = self.loop
        self.state = _HEAD
        self.head_only = head_only
        self.raw = []
        self.interim = False
        self.head_bytes = self.received = self.buffered = self.body_seen = 0
        self.length = None
        self.chunks = []
        self.error = None
        self.consumed = False
        self.read_timeout = read_timeout
        self.deadline = deadline
        now = self.last = loop.time()
        due = min(now + read_timeout, deadline)
        timer = self.timer
        # An exchange that ends in time leaves its timer running: when it is due no later
        # than this one's, it serves (`_on_timer` sets it again for the time now due), and
        # a request costs no timer made and cancelled.
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(due, self._on_timer)
        waiter = self.head_waiter = loop.create_future()
        self.sent_all = True
        try:
            if body is None:
                self.pool.outbox.write(transport, head)  # with the loop turn's other writes
            elif isinstance(body, bytes):
                if len(body) < 16384:
                    self.pool.outbox.write(transport, head + body)
                else:
                    self.pool.outbox.settle()
                    transport.writelines((head, body))
            else:
                self.pool.outbox.settle()
                transport.write(head)
                self.sent_all = False
                self.writer = loop.create_task(self._send_body(body, chunked))
        except (OSError, RuntimeError) as exc:  # closed under us: nothing went out
            self.lost = True
            raise UpstreamProtocolError("the backend closed the connection") from exc
        return waiter

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream a request body, waiting whenever the backend's socket buffer is full."""
        transport = self.transport
        assert transport is not None
        it = body.__aiter__()
        try:
            while True:
                self.client_wait = True
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    self.client_wait = False
                if self.lost or transport.is_closing():
                    return
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                self.last = self.loop.time()
                if self.write_paused:
                    await self._drain()
            if chunked and not self.lost:
                transport.write(b"0\r\n\r\n")
            self.sent_all = True
        except ProxyError as exc:  # the client's body failed: too large, client gone
            self._fail(_BodyFailed(exc))
        except (OSError, RuntimeError):
            self.abort()  # the exchange's own error comes from connection_lost
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - a task's error would only be logged at GC
            self._fail(UpstreamProtocolError(f"the request body failed: {type(exc).__name__}"))

    async def _drain(self) -> None:
        while self.write_paused and not self.lost:
            waiter = self.drain_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self.drain_waiter = None
            self.last = self.loop.time()

    async def read_chunk(self) -> bytes:
        """The next piece of the body, b"" at its end; raises the exchange's error."""
        while True:
            if self.error is not None:
                raise self.error
            if self.chunks:
                return self.take_one()
            if self.state == _DONE:
                self.consumed = True
                return b""
            waiter = self.reader = self.loop.create_future()
            try:
                await waiter
            finally:
                self.reader = None

    def take(self) -> bytes:
        """All body bytes buffered so far."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.reading_paused:
            self._resume()
        return data

    def take_one(self) -> bytes:
        """The oldest piece of the body buffered (pieces are not joined: no copy)."""
        chunks = self.chunks
        if len(chunks) == 1:
            data = chunks[0]
            self.chunks = []
            self.buffered = 0
        else:
            data = chunks.pop(0)
            self.buffered -= len(data)
        if self.reading_paused and self.buffered <= READ_LOW:
            self._resume()
        return data

    def _resume(self) -> None:
        self.reading_paused = False
        self.last = self.loop.time()
        if self.transport is not None:
            self.transport.resume_reading()

    @property
    def complete(self) -> bool:
        """The answer arrived to its end (its bytes may still be buffered here)."""
        return self.state == _DONE and self.error is None

    def reusable(self) -> bool:
        return (
            self.state == _DONE
            and self.error is None
            and self.keep_alive
            and self.sent_all
            and not self.lost
        )

    def reset(self) -> None:
        """Ready for the next request on this connection."""
        self.state = _IDLE
        self.reused = True
        self.chunks = []
        self.raw = []
        self.writer = None
        if self.head_only or self.fresh_parser:
            # httptools cannot be told a HEAD's answer has no body, nor skip what we read
            # past it: a new parser.
            self.parser = httptools.HttpResponseParser(self)
            self.fresh_parser = False

    def abort(self) -> None:
        """Close the connection and end its exchange; it is never used again."""
        self._stop_timer()
        writer = self.writer
        if writer is not None and not writer.done():
            writer.cancel()
        self.pool.forget(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.pool.outbox.settle()
            if transport.get_write_buffer_size():
                transport.abort()  # unsent bytes would keep it open
            else:
                transport.close()

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.pool.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _IDLE:
            self.abort()  # bytes nobody asked for: they would answer the next request
            return
        self.received += len(data)
        self.last = self.loop.time()
        if state == _BODY and self._body_past_parser(data):
            return
        try:
            self.parser.feed_data(data)
        except _Refused:
            self.abort()
            return
        except httptools.HttpParserUpgrade:
            self._malformed("the backend switched protocols")
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Refused):
                self.abort()
            else:
                self._malformed(str(exc))
            return
        if self.state == _HEAD:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._fail(UpstreamProtocolError("the backend's answer head is too large"))

    def _body_past_parser(self, data: bytes) -> bool:
        """A body with a Content-Length is taken as it comes, without httptools (which would
        copy every byte once more); False for any other framing."""
        length = self.length
        if length is None:
            length = self.length = -1 if self.close_delimited else _content_length(self.raw)
        if length < 0:
            return False  # chunked, or to the end of the connection: httptools reads it
        remaining = length - self.body_seen
        size = len(data)
        self.fresh_parser = True
        if size > remaining:  # more than declared
            if remaining:
                self._add_body(data[:remaining])
            self.state = _DONE
            self._stop_timer()
            self._fail(_spoiled())
            return True
        self._add_body(data)
        if size == remaining:
            self.state = _DONE
            self._wake()
        return True

    def eof_received(self) -> bool | None:
        return None  # close: connection_lost ends the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._stop_timer()
        self.pool.forget(self)
        state = self.state
        if state == _HEAD:
            self._fail(UpstreamProtocolError("the backend closed the connection without answering"))
        elif state == _BODY and self.error is None:
            if self.close_delimited:
                self.state = _DONE  # its body ends where the connection does
                self._wake()
            else:
                self._fail(UpstreamProtocolError("the backend's response body was cut short"))
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state != _HEAD:
            raise _Unasked

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw.append((name, value))

    def on_headers_complete(self) -> None:
        if self.state != _HEAD:
            raise _Unasked
        status = self.parser.get_status_code()
        raw = self.raw
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: the answer is still to come
            self.raw = []
            return
        problem = head_problem(status, raw)
        if problem is not None:
            self._fail(UpstreamProtocolError(problem))
            raise _Refused
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only:
            self.state = _DONE  # nothing follows a HEAD's head; what does is not asked for
        else:
            self.state = _BODY
            self.close_delimited = not self.keep_alive and _unframed(status, raw)
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.state != _BODY:
            raise _Unasked
        self._add_body(body)

    def _add_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self.body_seen += len(body)
        if self.reader is not None:
            self._wake()
        if self.buffered > READ_HIGH and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.state == _BODY:
            self.state = _DONE
            self._wake()
        elif not (self.state == _DONE and self.head_only):
            raise _Unasked

    # --- endings -----------------------------------------------------------------------

    def _malformed(self, reason: str) -> None:
        if self.state == _HEAD:
            error = UpstreamProtocolError(f"the backend's answer is malformed: {reason[:200]}")
        elif self.state == _BODY:
            error = UpstreamProtocolError("the backend's response body was malformed")
        else:
            error = _spoiled()
        self._fail(error)

    def _fail(self, error: UpstreamError) -> None:
        """End the exchange with `error` (unless it already ended) and close."""
        state = self.state
        if state == _HEAD:
            waiter = self.head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        elif self.error is None and not self.consumed:
            if not (state == _DONE and self.head_only):
                self.error = error  # also spoils an answer whose end was followed by more
            self._wake()
        self.abort()

    def _wake(self) -> None:
        reader = self.reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.state not in (_HEAD, _BODY):
            return  # the exchange ended in time: the timer was left for the next one
        now = self.loop.time()
        deadline = self.deadline
        if now >= deadline - _EARLY:
            self._fail(UpstreamTimeout("the backend did not answer in time"))
            return
        if self.reading_paused or self.client_wait:
            due = now + self.read_timeout  # waiting on our side, not on the backend
        else:
            due = self.last + self.read_timeout
            if due <= now + _EARLY:
                self._fail(UpstreamTimeout("the backend did not answer in time"))
                return
        self.timer = self.loop.call_at(min(due, deadline), self._on_timer)


def _spoiled() -> UpstreamProtocolError:
    return UpstreamProtocolError("the backend sent more than the length it declared")


class _BodyFailed(UpstreamProtocolError):
    """The client's request body failed; the pipeline reports the body's own error."""

    def __init__(self, cause: ProxyError) -> None:
        super().__init__(cause.detail)
        self.cause = cause


def _content_length(raw: Headers) -> int:
    """The Content-Length of a head httptools accepted; -1 unless it is a plain number and
    the body is not chunked."""
    length = -1
    for name, value in raw:
        if len(name) == 14 and name.lower() == b"content-length":
            value = value.strip()
            if not value.isdigit() or length >= 0:
                return -1
            length = int(value)
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            return -1
    return length


def _unframed(status: int, raw: Headers) -> bool:
    """An answer with neither Content-Length nor chunked coding: its body ends at EOF."""
    if status in (204, 304):
        return False
    for name, _ in raw:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            return False
    return True


class Pool:
    """The kept-alive connections to one backend: at most `limit` open or opening; idle
    ones reused most recent first and closed after IDLE_TIMEOUT."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        tls: bool = False,
        idle_timeout: float = IDLE_TIMEOUT,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.loop = loop or asyncio.get_running_loop()
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self.open = 0  # connections open or opening
        self.idle: list[Connection] = []  # oldest first
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.outbox = outbox(self.loop)
        self.read_buffer = read_buffer(self.loop)
        self.closed = False
        self._sweep: asyncio.TimerHandle | None = None

    async def exchange(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        *,
        connect_timeout: float,
        read_timeout: float,
        deadline: float,
        resendable: bool,
    ) -> Connection:
        """Send the request; the connection once the answer's head is in. A kept-alive
        connection the backend closed before answering is replaced by a new one, once,
        when `resendable` (the body is in hand and the request may reach the backend
        twice)."""
        head, chunked = request_head(method, target, headers, body)
        head_only = method == "HEAD"
        conn = self._take() or await self._open(connect_timeout, deadline)
        while True:
            try:
                await conn.start(
                    head,
                    body,
                    chunked,
                    head_only=head_only,
                    read_timeout=read_timeout,
                    deadline=deadline,
                )
                return conn
            except UpstreamProtocolError:
                conn.abort()
                if not (resendable and conn.reused and conn.lost and not conn.received):
                    raise
                resendable = False  # once
            except BaseException:
                conn.abort()
                raise
            finally:
                conn.head_waiter = None
            conn = await self._open(connect_timeout, deadline)

    def _take(self) -> Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.lost or conn.transport is None or conn.transport.is_closing():
                conn.abort()
                continue
            if self.loop.time() - conn.idle_since < self.idle_timeout:
                return conn
            conn.abort()  # and every one below it, idle longer
            for older in list(idle):
                older.abort()
        return None

    async def _open(self, connect_timeout: float, deadline: float) -> Connection:
        if self.open >= self.limit:
            conn = await self._wait(deadline)
            if conn is not None:
                return conn
        else:
            self.open += 1
        try:
            return await self._connect(connect_timeout, deadline)
        except BaseException:
            self.open -= 1
            self._wake_one()
            raise

    async def _wait(self, deadline: float) -> Connection | None:
        """Wait for a connection someone releases (returned) or a place to open one (None,
        the place already counted)."""
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        timer = self.loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                given = waiter.result()  # handed over as we were cancelled: pass it on
                if given is None:
                    self.open -= 1
                    self._wake_one()
                else:
                    self.release(given)
            raise
        finally:
            timer.cancel()

    async def _connect(self, connect_timeout: float, deadline: float) -> Connection:
        budget = deadline - self.loop.time()
        try:
            async with asyncio.timeout(min(connect_timeout, budget)):
                _, conn = await self.loop.create_connection(
                    self._connection,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError as exc:
            if connect_timeout <= budget:
                raise UpstreamConnectTimeout("connecting to the backend timed out") from exc
            raise UpstreamTimeout("the backend did not answer in time") from exc
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to the backend: {exc}") from exc
        return conn

    def _connection(self) -> Connection:
        return Connection(self)

    def release(self, conn: Connection) -> None:
        """The exchange on `conn` is over: keep the connection if it ended cleanly."""
        if self.closed or not conn.reusable():
            conn.abort()
            return
        conn.reset()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_at(conn.idle_since + self.idle_timeout, self._close_idle)

    def forget(self, conn: Connection) -> None:
        """`conn` is closing: it no longer holds a place, nor waits in the idle list."""
        if not conn.counted:
            return
        conn.counted = False
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters and self.open < self.limit:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.open += 1
                waiter.set_result(None)
                return

    def _close_idle(self) -> None:
        self._sweep = None
        now = self.loop.time()
        while self.idle and now - self.idle[0].idle_since >= self.idle_timeout - _EARLY:
            self.idle.pop(0).abort()
        if self.idle:
            due = self.idle[0].idle_since + self.idle_timeout
            self._sweep = self.loop.call_at(due, self._close_idle)

    def close(self) -> None:
        """Close the idle connections; the busy ones close when released."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.idle):
            conn.abort()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("the backend's pool was closed"))


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("no connection to the backend came free in time"))
