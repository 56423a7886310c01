"""The main port's HTTP/1.1 protocol: uvicorn's httptools protocol with the limits a proxy
at the edge needs (config `limits`): request line and header size, header count, a
deadline for a request's headers, so a slow or oversized client is cut off early instead
of holding a connection or memory; a deadline for a client that stops taking a response;
the idle keep-alive timeout; and the number of client
connections, past which a new connection's request gets 503 and the connection is closed
(uvicorn's own `limit_concurrency` would refuse requests on every connection instead).
It also refuses CONNECT (no tunnels) and what a backend could read otherwise than we do:
framing other than plain chunked, two Host headers; and it never merges a chunked body's
trailer into the headers. For HTTP/1.0 clients it frames a response of unknown length by
closing the connection (uvicorn would send them chunked, which they cannot read)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from proxy.config import Limits


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


Refusal = Callable[[int, str, str], None]  # status, reason, client address


def guarded_protocol(limits: Limits, on_refusal: Refusal | None = None) -> type[HttpToolsProtocol]:
    """A protocol class enforcing `limits`, for uvicorn's `http=` setting; `on_refusal` hears
    of every request it answers itself (they never reach the pipeline)."""

    class GuardedProtocol(_Guarded):
        LIMITS = limits
        OVER = set()
        ON_REFUSAL = staticmethod(on_refusal) if on_refusal is not None else None

    return GuardedProtocol


class _Guarded(HttpToolsProtocol):
    LIMITS = Limits()
    ON_REFUSAL: Refusal | None = None
    OVER: ClassVar[set[_Guarded]] = set()  # open connections past max_connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Ours, per connection (see connection_made); uvicorn's would count every connection
        # against each request. And the keep-alive timeout as configured, fractions included.
        self.limit_concurrency = None
        self.timeout_keep_alive = self.LIMITS.keepalive_timeout  # type: ignore[assignment]
        self._over_limit = False
        self._in_head = True
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._parsed_bytes = 0  # request target and headers parsed so far
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        served = len(self.connections) - len(self.OVER)  # this one included
        if served > self.LIMITS.max_connections:
            self._over_limit = True
            self.OVER.add(self)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        self.OVER.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except _Refused as refused:
            self._refuse(refused.status, refused.reason)
            return
        except httptools.HttpParserCallbackError as err:
            cause = err.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.reason)
                return
            self._refuse(400, "Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")
            return
        finally:
            self._unset_keepalive_if_required()
        if self._in_head:
            # Headers still incomplete: bound what a slow or endless head may hold. (A chunk
            # that completes the head is measured by the parsed size instead.)
            self._head_bytes += len(data)
            if self._head_bytes > self.LIMITS.max_header_bytes:
                self._refuse(431, "Request header fields too large.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._parsed_bytes = 0
        self._header_count = 0
        if self._head_timer is None:  # a connection's first head is due since it opened
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._parsed_bytes += len(url)
        if len(self.url) > self.LIMITS.max_request_line:
            raise _Refused(414, "Request-URI too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._parsed_bytes += len(name) + len(value) + 4
        if self._header_count > self.LIMITS.max_headers:
            raise _Refused(431, "Too many request header fields.")
        if self._parsed_bytes > self.LIMITS.max_header_bytes:
            raise _Refused(431, "Request header fields too large.")
        if not self._in_head:
            # A chunked body's trailer: never merged into the headers (RFC 9110 §6.5.1), where
            # routing, X-Forwarded-For or the backend would take it for a header.
            return
        lowered = name.lower()
        if lowered == b"host" and any(k == b"host" for k, _ in self.headers):
            # RFC 9112 §3.2: one Host only; two could route here and be read there otherwise.
            raise _Refused(400, "More than one Host header.")
        if lowered == b"transfer-encoding":
            # Only plain chunked framing is understood; anything else (other codings, a list,
            # a second Transfer-Encoding) could be read differently by the backend.
            if value.strip().lower() != b"chunked" or any(
                k == b"transfer-encoding" for k, _ in self.headers
            ):
                raise _Refused(400, "Unsupported Transfer-Encoding.")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        if self._over_limit:
            raise _Refused(503, "Too many client connections.")
        if self.parser.get_method() == b"CONNECT":
            raise _Refused(400, "CONNECT is not served: this is a reverse proxy, not a tunnel.")
        if self.parser.get_http_version() == "1.1" and not any(
            k == b"host" for k, _ in self.headers
        ):
            raise _Refused(400, "An HTTP/1.1 request must carry a Host header.")  # RFC 9112 §3.2
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Every request's task starts here (a pipelined one later than its head): the cycle
        # is still uvicorn's own and nothing of it has run.
        if cycle.scope["http_version"] == "1.0":
            cycle.__class__ = _Http10Cycle
        super()._start_asgi_task(cycle, app)

    def pause_writing(self) -> None:
        """The client's write buffer is full: it has `send_timeout` seconds to take enough of
        it for writing to resume. One that stops reading would otherwise hold its request,
        its bulkhead slot and its upstream connection for ever (a slow-read attack)."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(
                self.LIMITS.send_timeout, self._client_stopped_reading
            )

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _client_stopped_reading(self) -> None:
        # Abort, not close: close would wait for the buffer the client does not read. The
        # request sees its client gone (499) and releases what it holds.
        self._send_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.LIMITS.header_timeout, self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and self.transport is not None and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(408, "Request headers not received in time.")
            else:
                self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer the client with `status` and close: nothing of the request is forwarded."""
        self._cancel_head_timer()
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            # Too late for an answer of ours (a trailer over the limit). A finished cycle is
            # the previous request's on a kept-alive connection: this one still gets one.
            self.transport.close()
            return
        if self.ON_REFUSAL is not None:
            self.ON_REFUSAL(status, reason, self.client[0] if self.client else "")
        body = reason.encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"retry-after: 1\r\n" if status == 503 else b"",
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: ",
                    str(len(body)).encode(),
                    b"\r\nconnection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()


# Larger than any body: the count a close-delimited response is let run against.
_OPEN_ENDED = 1 << 62


class _Http10Cycle(RequestResponseCycle):
    """A request/response cycle for an HTTP/1.0 client, which cannot read chunked: a response
    of unknown length goes out as it comes and ends when the connection closes (RFC 9112
    §6.3, as NGINX does), where uvicorn would frame it chunked. It streams like any other,
    with flat memory. Ended by an error, the connection is reset rather than closed, so the
    client cannot take a cut body for the whole of it (a close would look like the end)."""

    _open_ended = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            if (
                not self.response_started
                and self.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
                and not any(
                    name.lower() in (b"content-length", b"transfer-encoding")
                    for name, _ in message.get("headers", ())
                )
            ):
                self._open_ended = True
                self.chunked_encoding = False  # nothing framed: no length, no chunks
                self.expected_content_length = _OPEN_ENDED
        elif self._open_ended and not message.get("more_body", False):
            self.expected_content_length = len(message.get("body", b""))  # promised nothing
        await super().send(message)

    async def run_asgi(self, app: Any) -> None:
        async def app_or_reset(scope: Any, receive: Any, send: Any) -> None:
            try:
                await app(scope, receive, send)
            except BaseException:
                if self._open_ended and not self.response_complete:
                    self._reset()
                raise

        await super().run_asgi(app_or_reset)

    def _reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()
