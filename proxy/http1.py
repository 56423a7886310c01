"""The main port's HTTP/1.1 server: an asyncio Protocol per client connection on httptools,
serving the ASGI app (`ProxyApp`) with only what a proxy's hot path needs.

It replaces uvicorn on the main port (and serves the admin port too) because uvicorn's
per-request machinery was a third of the proxy's CPU per request (bench/PROFILE.md): a
cycle object with an `asyncio.Event`, a flow-control object per connection, the request
target parsed and unquoted through `urllib`, the response head built with two regular
expressions per header and written apart from its body. Here a request costs one small
object and one task; a response's head goes out with its first piece of body in one write.

And it carries the limits a proxy at the edge needs (config `limits`): request line and
header size, header count, a deadline for a request's headers, so a slow or oversized
client is cut off early instead of holding a connection or memory; a deadline for a client
that stops taking a response; the idle keep-alive timeout; and the number of client
connections, past which a new connection's request gets 503 and the connection is closed.
It refuses CONNECT (no tunnels) and what a backend could read otherwise than we do:
framing other than plain chunked, two Host headers; it never merges a chunked body's
trailer into the headers. HTTP/1.0 clients get a response of unknown length close-delimited
(RFC 9112 §6.3), never chunked. Pipelined requests are answered in order, one at a time.

WebSocket upgrades are handed, bytes and transport, to uvicorn's websockets-sansio protocol.
uvicorn is imported on the first upgrade only: with click and its config machinery it is
~3 MiB of a worker's memory that a proxy without WebSocket traffic never needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
import struct
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

from proxy.config import Limits
from proxy.outbox import Outbox, outbox

log = logging.getLogger("strangler.server")

Refusal = Callable[[int, str, str], None]  # status, reason, client address


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}
HIGH_WATER = 65536  # request body bytes held for the app before reading pauses
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT = {"type": "http.disconnect"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HELD_WRITE = 16384  # a whole answer with a body up to this goes out through the outbox
_TASK = "strangler-request"
# A key of our own in an `http.response.start` message: the app's next message is its whole
# body, so the head waits for it rather than being flushed on its own (a loop callback per
# response, ~1% of a request's instructions). Other ASGI servers ignore unknown keys.
BODY_FOLLOWS = "strangler.body_follows"
_OPEN_ENDED = -1  # `remaining` of a close-delimited response: no count kept
# A response head may hold no control characters but the CRLFs that end its lines, and
# tabs (RFC 9110 §5.5); anything else could split the response or be read differently.
# Deleting every other byte leaves exactly one CRLF per line of a sound head: one C pass
# (a regular expression with lookarounds cost ~7 µs a head, counting plus a character
# class ~1.9 µs, this ~0.4 µs).
_NOT_CONTROL = bytes(b for b in range(256) if b == 0x09 or 0x20 <= b < 0x7F or b > 0x7F)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class MainServer:
    """Serves `app` on the given sockets until `should_exit`; then drains: stops accepting,
    closes idle connections, lets requests in flight finish for up to `grace` seconds
    (or until `force_exit`), cancels what is left. The attributes `started`,
    `should_exit` and `force_exit` mirror uvicorn's Server's. It serves the admin port too."""

    def __init__(
        self,
        app: Any,
        limits: Limits,
        grace: float,
        on_refusal: Refusal | None = None,
        ws_max_size: int = 16 * 1024 * 1024,
        busy_poll: float = 0.0,
    ) -> None:
        self.app = app
        self.busy_poll = busy_poll  # seconds (see proxy.outbox)
        self.limits = limits
        self.grace = grace
        self.on_refusal = on_refusal
        self.connections: set[Http1] = set()
        self.over: set[Http1] = set()  # open connections past max_connections
        self.tasks: set[asyncio.Task[None]] = set()
        self.started = False
        self.force_exit = False
        self._exit = asyncio.Event()
        # WebSocket connections are uvicorn's protocol's, after the handshake request; its
        # config is made, and uvicorn imported, on the first upgrade (`ws_protocol`).
        self.ws_max_size = ws_max_size
        self.ws_config: Any = None
        self.ws_state = _WsState()

    def ws_protocol(self) -> asyncio.Protocol:
        """A websockets-sansio protocol for an upgrade. The first call imports uvicorn and
        builds its config: a one-time stall of the loop (40-55 ms measured on the benchmark
        VM, of which ~7 ms is websockets reading its version through importlib.metadata),
        paid by the first WebSocket only, so that a worker that never proxies one does not
        carry uvicorn (~3.5 MiB; tests/e2e/test_lazy_imports.py)."""
        config = self.ws_config
        if config is None:
            config = self.ws_config = _ws_config(self.app, self.ws_max_size)
        protocol: asyncio.Protocol = config.ws_protocol_class(
            config=config, server_state=self.ws_state, app_state={}
        )
        return protocol

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()

    def open_connections(self) -> int:
        return len(self.connections) + len(self.ws_state.connections)

    async def _sweep(self, tick: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for conn in list(self.connections):
                if conn.head_since or conn.idle_since:
                    conn.check_deadlines(now)

    async def serve(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        if self.busy_poll:  # (the admin port's server, on the same loop, leaves it be)
            outbox(loop).busy_poll = self.busy_poll
        servers = [
            await loop.create_server(lambda: Http1(self), sock=sock, backlog=2048)
            for sock in sockets
        ]
        self.started = True
        limits = self.limits
        # Deadlines are checked this often: a tenth of the shortest, at most once a second.
        tick = min(1.0, max(0.005, min(limits.header_timeout, limits.keepalive_timeout) / 10))
        sweep = asyncio.ensure_future(self._sweep(tick))
        try:
            await self._exit.wait()
        finally:
            sweep.cancel()
        for server in servers:
            server.close()  # no new connections
        for conn in list(self.connections):
            conn.shutdown()
        for ws in list(self.ws_state.connections):
            ws.shutdown()
        deadline = time.monotonic() + self.grace
        while (
            (self.open_connections() or self.tasks or self.ws_state.tasks)
            and not self.force_exit
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        if self.tasks or self.ws_state.tasks:
            for task in [*self.tasks, *self.ws_state.tasks]:
                task.cancel("shutdown grace exceeded")
            await asyncio.wait([*self.tasks, *self.ws_state.tasks], timeout=1.0)
        for conn in list(self.connections):
            conn.abort()
        for server in servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)


class _WsState:
    """What uvicorn's WebSocket protocols share with their server: the attributes of
    `uvicorn.server.ServerState`, here so that making a server imports no uvicorn."""

    __slots__ = ("total_requests", "connections", "tasks", "default_headers")

    def __init__(self) -> None:
        self.total_requests = 0
        self.connections: set[Any] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.default_headers: list[tuple[bytes, bytes]] = []


def _ws_config(app: Any, ws_max_size: int) -> Any:
    import uvicorn  # here, not at the top: see `MainServer.ws_protocol`

    config = uvicorn.Config(
        app,
        ws="websockets-sansio",
        interface="asgi3",  # ProxyApp returns its coroutine: not detected as ASGI 3
        lifespan="off",
        loop="none",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        ws_max_size=ws_max_size,
    )
    config.load()
    return config


class Http1(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "server",
        "limits",
        "loop",
        "outbox",
        "parser",
        "transport",
        "client",
        "local",
        "exchange",
        "running",
        "queue",
        "read_paused",
        "write_paused",
        "drain_waiters",
        "over_limit",
        "in_head",
        "upgrading",
        "head_bytes",
        "parsed_bytes",
        "header_count",
        "url",
        "headers",
        "expect_100",
        "has_host",
        "has_te",
        "idle_since",
        "head_since",
        "send_timer",
    )

    def __init__(self, server: MainServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.outbox: Outbox = outbox(self.loop)
        self.parser = httptools.HttpRequestParser(self)
        # Answer the first of pipelined requests even when the client closes after them.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.exchange: Exchange | None = None  # the request being received
        self.running: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.read_paused = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.over_limit = False
        self.in_head = True
        self.upgrading = False
        self.head_bytes = 0  # bytes received while the head is incomplete
        self.parsed_bytes = 0  # request target and headers parsed so far
        self.header_count = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_100 = False
        self.has_host = False
        self.has_te = False
        # When the connection fell idle after an answer, when the head now due began (its
        # first byte, or the connection's opening); 0: not idle, no head due. The server's
        # sweep enforces keepalive_timeout and header_timeout from them: no timer per request.
        self.idle_since = 0.0
        self.head_since = 0.0
        self.send_timer: asyncio.TimerHandle | None = None

    # --- the connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.local = (local[0], local[1]) if isinstance(local, tuple) else None
        server = self.server
        server.connections.add(self)
        if server.open_connections() - len(server.over) > self.limits.max_connections:
            self.over_limit = True
            server.over.add(self)
        self.head_since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.over.discard(self)
        self._stop_deadlines()
        for exchange in (self.running, self.exchange):
            if exchange is not None:
                exchange.lost()
        self.queue.clear()
        self._wake_writers()
        self.parser = None  # type: ignore[assignment]

    def eof_received(self) -> None:
        return None  # a half-closed client is a gone client: close

    def data_received(self, data: bytes) -> None:
        self.idle_since = 0.0
        try:
            self.parser.feed_data(data)
        except _Refused as refused:
            self._refuse(refused.status, refused.reason)
            return
        except httptools.HttpParserCallbackError as err:
            cause = err.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.reason)
            else:
                self._refuse(400, "Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self.upgrading:
                self._to_websocket()
            return  # any other upgrade is not taken: the request was answered as plain HTTP
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")
            return
        if self.in_head:
            # Headers still incomplete: bound what a slow or endless head may hold. (A chunk
            # that completes the head is measured by the parsed size instead.)
            self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "Request header fields too large.")

    def shutdown(self) -> None:
        """The server drains: an idle connection closes now, a busy one after its answer."""
        running = self.running
        if running is None:
            if not self.transport.is_closing():
                self.close()
        else:
            running.keep_alive = False
            self.queue.clear()

    def abort(self) -> None:
        if not self.transport.is_closing():
            self.transport.abort()

    def write(self, data: bytes) -> None:
        """Write now, after whatever the outbox holds (it may hold this connection's)."""
        self.outbox.settle()
        self.transport.write(data)

    def close(self) -> None:
        self.outbox.settle()
        self.transport.close()

    # --- flow control -----------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.queue:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The client's write buffer is full: it has `send_timeout` seconds to take enough of
        it for writing to resume. One that stops reading would otherwise hold its request,
        its bulkhead slot and its upstream connection for ever (a slow-read attack)."""
        self.write_paused = True
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(
                self.limits.send_timeout, self._client_stopped_reading
            )

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        waiter = self.loop.create_future()
        self.drain_waiters.append(waiter)
        await waiter

    def _client_stopped_reading(self) -> None:
        # Abort, not close: close would wait for the buffer the client does not read. The
        # request sees its client gone (499) and releases what it holds.
        self.send_timer = None
        if not self.transport.is_closing():
            self.transport.abort()

    # --- parsing ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.parsed_bytes = 0
        self.header_count = 0
        self.url = b""
        self.headers = []
        self.expect_100 = False
        self.has_host = self.has_te = False
        if not self.head_since:  # a connection's first head is due since it opened
            self.head_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.parsed_bytes += len(url)
        if len(self.url) > self.limits.max_request_line:
            raise _Refused(414, "Request-URI too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.parsed_bytes += len(name) + len(value) + 4
        if self.header_count > self.limits.max_headers:
            raise _Refused(431, "Too many request header fields.")
        if self.parsed_bytes > self.limits.max_header_bytes:
            raise _Refused(431, "Request header fields too large.")
        if not self.in_head:
            # A chunked body's trailer: never merged into the headers (RFC 9110 §6.5.1), where
            # routing, X-Forwarded-For or the backend would take it for a header.
            return
        name = name.lower()
        if name == b"host":
            if self.has_host:
                # RFC 9112 §3.2: one Host only; two could route here and be read there.
                raise _Refused(400, "More than one Host header.")
            self.has_host = True
        elif name == b"transfer-encoding":
            # Only plain chunked framing is understood; anything else (other codings, a list,
            # a second Transfer-Encoding) could be read differently by the backend.
            if self.has_te or value.strip().lower() != b"chunked":
                raise _Refused(400, "Unsupported Transfer-Encoding.")
            self.has_te = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100 = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_since = 0.0
        parser = self.parser
        if self.over_limit:
            raise _Refused(503, "Too many client connections.")
        method = parser.get_method()
        if method == b"CONNECT":
            raise _Refused(400, "CONNECT is not served: this is a reverse proxy, not a tunnel.")
        version = parser.get_http_version()
        headers = self.headers
        if version == "1.1" and not self.has_host:
            raise _Refused(400, "An HTTP/1.1 request must carry a Host header.")  # RFC 9112 §3.2
        if parser.should_upgrade() and _upgrade(headers) == b"websocket":
            self.upgrading = True  # the parser stops here; data_received hands over
            return
        url = self.url
        if url[:1] == b"/" and url.find(b"#") < 0 and url[:2] != b"//":
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"", parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": "http",
            "method": method.decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
        }
        keep_alive = version != "1.0" and parser.should_keep_alive()
        exchange = Exchange(self, scope, keep_alive, self.expect_100)
        self.exchange = exchange
        if self.running is None:
            self._start(exchange)
        else:
            # Pipelined: answered once the requests before it are; nothing more is read
            # meanwhile, so a client cannot queue requests without bound.
            self.queue.append(exchange)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None or exchange.response_complete:
            return
        exchange.body.append(body)
        exchange.held += len(body)
        if exchange.held > HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.response_complete:
            return
        exchange.more_body = False
        exchange.wake()

    # --- requests ---------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self.running = exchange
        server = self.server
        # A Task made directly with a name: a nameless one formats "Task-N" on creation
        # (Python 3.11), ~0.3% of a request's instructions.
        task = exchange.task = asyncio.Task(exchange.run(server.app), loop=self.loop, name=_TASK)
        server.tasks.add(task)  # the task takes itself out when it ends

    def response_complete(self, exchange: Exchange) -> None:
        """`exchange`'s answer is out: the next pipelined request's turn, or idleness."""
        if self.running is exchange:
            self.running = None
        if self.transport.is_closing():
            return
        if self.queue:
            self._start(self.queue.popleft())
            if not self.queue:
                self.resume_reading()
        else:
            self.resume_reading()
            self.idle_since = self.loop.time()

    def _to_websocket(self) -> None:
        server = self.server
        server.connections.discard(self)
        self._stop_deadlines()
        self.outbox.settle()
        method = self.parser.get_method()
        output = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            output += [name, b": ", value, b"\r\n"]
        output.append(b"\r\n")
        protocol = server.ws_protocol()
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(output))
        self.transport.set_protocol(protocol)

    # --- deadlines and refusals -------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        """Called by the server's sweep: close what has waited past its deadline."""
        if self.head_since and now - self.head_since >= self.limits.header_timeout:
            self.head_since = 0.0
            self._head_too_slow()
        elif self.idle_since and now - self.idle_since >= self.limits.keepalive_timeout:
            self.idle_since = 0.0
            if not self.transport.is_closing():
                self.close()

    def _stop_deadlines(self) -> None:
        self.head_since = self.idle_since = 0.0
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _head_too_slow(self) -> None:
        if self.in_head and not self.transport.is_closing():
            if self.head_bytes:
                self._refuse(408, "Request headers not received in time.")
            else:
                self.close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer the client with `status` and close: nothing of the request is forwarded."""
        self.head_since = 0.0
        if self.transport.is_closing():
            return
        exchange = self.running
        if exchange is not None:
            if exchange.response_started:
                # Too late for an answer of ours (a trailer over the limit, say).
                self.close()
                return
            exchange.lost()  # the app's request is over: its answer would go nowhere
        if self.server.on_refusal is not None:
            self.server.on_refusal(status, reason, self.client[0] if self.client else "")
        body = reason.encode()
        self.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"retry-after: 1\r\n" if status == 503 else b"",
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body),
                    body,
                ]
            )
        )
        self.close()


def _upgrade(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    connection: list[bytes] = []
    upgrade = None
    for name, value in headers:
        if name == b"connection":
            connection = [token.strip().lower() for token in value.split(b",")]
        elif name == b"upgrade":
            upgrade = value.lower()
    return upgrade if b"upgrade" in connection else None


class Exchange:
    """One request and its response: ASGI `receive` and `send` for the app."""

    __slots__ = (
        "conn",
        "transport",
        "scope",
        "keep_alive",
        "waiting_100",
        "body",
        "held",
        "more_body",
        "ready",
        "waiter",
        "disconnected",
        "response_started",
        "response_complete",
        "chunked",
        "remaining",
        "bodyless",
        "head",
        "task",
    )

    def __init__(
        self, conn: Http1, scope: dict[str, Any], keep_alive: bool, expect_100: bool
    ) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.scope = scope
        self.keep_alive = keep_alive
        self.waiting_100 = expect_100
        self.body: list[bytes] = []
        self.held = 0
        self.more_body = True
        self.ready = False  # body or its end arrived since the app last received
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.remaining = 0  # body bytes the response's Content-Length still promises
        self.bodyless = False
        self.head: bytes | None = None  # written with the first piece of body
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self.ready = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def lost(self) -> None:
        if not self.response_complete:
            self.disconnected = True
        self.wake()

    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            # A response aborted mid-stream is how a backend's broken stream is passed on:
            # the pipeline logged it already.
            if not isinstance(exc, asyncio.CancelledError) and not getattr(
                exc, "already_logged", False
            ):
                log.error("the request failed in the proxy", exc_info=exc)
            if self.remaining == _OPEN_ENDED and not self.response_complete:
                self._reset()  # a close would look like the end of the body
            elif not self.response_started and not self.disconnected:
                self._answer_500()
            elif not self.response_complete:
                self.conn.close()
        else:
            if not self.response_complete and not self.disconnected:
                if self.response_started:
                    self.conn.close()
                else:
                    self._answer_500()
        finally:
            self.conn.server.tasks.discard(self.task)
            self.task = None

    def _answer_500(self) -> None:
        self.response_started = self.response_complete = True
        self.conn.write(
            STATUS_LINE[500] + b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
        )
        self.conn.close()

    def _reset(self) -> None:
        """Break the connection with a reset: the client cannot take a cut body for all."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    async def receive(self) -> dict[str, Any]:
        if self.waiting_100:
            self.waiting_100 = False
            if not self.transport.is_closing():
                self.conn.write(_CONTINUE)
        if not self.disconnected and not self.response_complete:
            if not self.ready:
                self.conn.resume_reading()
                waiter = self.waiter = self.conn.loop.create_future()
                try:
                    await waiter
                finally:
                    self.waiter = None
            self.ready = False
        if self.disconnected or self.response_complete:
            return _DISCONNECT
        body = self.body
        if self.held:
            chunk = body[0] if len(body) == 1 else b"".join(body)
            self.body = []
            self.held = 0
            self.conn.resume_reading()
        else:
            chunk = b""
        return {"type": "http.request", "body": chunk, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        if self.conn.write_paused and not self.disconnected:
            await self.conn.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            self._start(message["status"], message.get("headers", ()), BODY_FOLLOWS in message)
            return
        if self.response_complete:
            raise RuntimeError(f"{message['type']!r} sent after the response was complete")
        if message["type"] != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {message['type']!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out: list[bytes] = []
        if self.head is not None:
            out.append(self.head)
            self.head = None
        if self.bodyless:
            pass
        elif self.chunked:
            if body:
                out += (b"%x\r\n" % len(body), body, b"\r\n")
            if not more:
                out.append(b"0\r\n\r\n")
        elif body:
            if self.remaining != _OPEN_ENDED:
                if len(body) > self.remaining:
                    raise RuntimeError("response body longer than its Content-Length")
                self.remaining -= len(body)
            out.append(body)
        conn = self.conn
        if out:
            if not more and self.keep_alive and len(body) <= _HELD_WRITE:
                # A whole small answer: sent with the loop turn's other writes (see outbox).
                conn.outbox.write(self.transport, out[0] if len(out) == 1 else b"".join(out))
            else:
                conn.outbox.settle()
                if len(out) == 1:
                    self.transport.write(out[0])
                else:
                    self.transport.writelines(out)
        if not more:
            if self.remaining > 0:
                raise RuntimeError("response body shorter than its Content-Length")
            self.response_complete = True
            self.wake()
            if not self.keep_alive:
                conn.close()
            conn.response_complete(self)

    def _start(self, status: int, headers: Any, body_follows: bool = False) -> None:
        self.response_started = True
        self.waiting_100 = False
        scope = self.scope
        lines = 2
        parts = [STATUS_LINE.get(status) or _status_line(status)]
        framed = False
        close_sent = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length":
                if not framed:
                    self.remaining = int(value)
                    framed = True
            elif name == b"transfer-encoding":
                if value.lower() == b"chunked":
                    self.chunked = framed = True
                    self.remaining = 0
            elif name == b"connection":
                if b"close" in [token.strip().lower() for token in value.split(b",")]:
                    self.keep_alive = False
                    close_sent = True
            parts += (name, b": ", value, b"\r\n")
            lines += 1
        if not self.keep_alive and not close_sent:
            parts.append(b"connection: close\r\n")
            lines += 1
        if scope["method"] == "HEAD" or status in (204, 304):
            self.bodyless = True
            self.remaining = 0
        elif not framed:
            if scope["http_version"] == "1.0":
                # No length and no chunks for HTTP/1.0: the body ends where the connection
                # does (RFC 9112 §6.3), as NGINX does.
                self.remaining = _OPEN_ENDED
                if self.keep_alive:
                    self.keep_alive = False
                    parts.append(b"connection: close\r\n")
                    lines += 1
            else:
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
                lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        if head.translate(None, _NOT_CONTROL) != b"\r\n" * lines:
            self.response_started = False
            raise RuntimeError("invalid characters in a response header")
        self.head = head
        if body_follows:
            return  # the app sends its whole body next: the head goes out with it
        # Most answers send their body at once; a streamed one that waits for its first
        # piece must not keep its head from the client meanwhile.
        # (Not keeping the handle: exchange -> handle -> exchange would be a reference
        # cycle, and one per request made the cycle collector ~5% of the CPU under load.)
        self.conn.loop.call_soon(self._flush_head)

    def _flush_head(self) -> None:
        head = self.head
        if head is not None and not self.disconnected:
            self.head = None
            self.conn.write(head)
