"""The main port's HTTP/1.1 protocol: uvicorn's httptools protocol with the limits a proxy
at the edge needs (config `limits`): request line and header size, header count, and a
deadline for a request's headers, so a slow or oversized client is cut off early instead
of holding a connection or memory."""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from proxy.config import Limits


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def guarded_protocol(limits: Limits) -> type[HttpToolsProtocol]:
    """A protocol class enforcing `limits`, for uvicorn's `http=` setting."""

    class GuardedProtocol(_Guarded):
        LIMITS = limits

    return GuardedProtocol


class _Guarded(HttpToolsProtocol):
    LIMITS = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
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
            # Headers still incomplete: bound what a slow or endless head may hold.
            self._head_bytes += len(data)
            if self._head_bytes > self.LIMITS.max_header_bytes:
                self._refuse(431, "Request header fields too large.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_bytes += len(url)
        if len(self.url) > self.LIMITS.max_request_line:
            raise _Refused(414, "Request-URI too long.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._header_count > self.LIMITS.max_headers:
            raise _Refused(431, "Too many request header fields.")
        if self._head_bytes > self.LIMITS.max_header_bytes:
            raise _Refused(431, "Request header fields too large.")
        if name.lower() == b"transfer-encoding":
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
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head is due within the keep-alive timeout, then header_timeout.
        self._in_head = True
        self._head_bytes = 0

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
        body = reason.encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: ",
                    str(len(body)).encode(),
                    b"\r\nconnection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()
