"""Sending a request to a backend and relaying its answer: the narrow seam to the client.

`Upstream.send(...)` returns an `UpstreamResponse` (status, headers, a body stream) once
the backend's headers have arrived, and maps the client library's errors onto ours. An
answer that breaks HTTP is an UpstreamProtocolError: a head our server could not pass on, a
body cut short or longer than declared; a connection that carried one is never reused. Only
this module knows aiohttp, so a faster client can replace it without touching the rest.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from yarl import URL

from proxy.errors import (
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.headers import Headers, downstream_response_headers

Body = bytes | AsyncIterator[bytes] | None

IDLE_TIMEOUT = 4.0
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
# What a header name and value may hold (RFC 9110 token; HTAB, visible ASCII, obs-text):
# our server could not send on anything else (a 500), or would split the answer.
_TOKEN_OR_LF = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n"
_VALUE_OR_TAB = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float
    total: float

    def client_timeout(self, remaining: float | None = None) -> aiohttp.ClientTimeout:
        total = self.total if remaining is None else max(0.001, remaining)
        return aiohttp.ClientTimeout(total=total, sock_connect=self.connect, sock_read=self.read)


def map_error(exc: BaseException) -> UpstreamError:
    """The client library's exception as one of ours (SPEC §5's table)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout("connecting to the backend timed out")
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout("the backend did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to the backend: {exc.os_error or exc}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamProtocolError("the backend's response body was cut short or malformed")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamProtocolError(f"the backend's answer is malformed: {exc.message[:200]}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamProtocolError("the backend closed the connection without answering")
    return UpstreamProtocolError(f"bad exchange with the backend: {type(exc).__name__}")


def head_problem(status: int, raw_headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """What keeps a final answer's status and headers from being passed on as they are."""
    if not 200 <= status <= 599:
        return f"the backend answered with status {status}"
    names = b"\n".join([name for name, _ in raw_headers])
    if names.translate(None, _TOKEN_OR_LF):
        return "the backend sent a malformed header name"
    if b"\t".join([value for _, value in raw_headers]).translate(None, _VALUE_OR_TAB):
        return "the backend sent a control character in a header value"
    if b"transfer-encoding" in names.lower():
        for name, value in raw_headers:
            if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
                return "the backend sent a transfer coding other than chunked"  # not undone
    return None


class _Handler(ResponseHandler):
    """A connection that passes on no answer our server could not send (see `head_problem`)
    and takes no bytes nobody asked for. aiohttp parses whatever a kept-alive connection
    receives as the next answer and hands it to the next request sent on it: bytes past a
    backend's declared length would answer someone else's request. Here they close the
    connection, and spoil the answer they followed if it is still being read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._asked = False  # a request is out and its final answer has not ended
        self._answer: StreamReader | None = None

    def set_response_params(self, **kwargs: Any) -> None:
        # aiohttp calls this once per request, just before sending it.
        self._asked, self._answer = True, None
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        if data and not self._asked:
            self._refuse()
            return
        super().data_received(data)

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        if not self._asked:
            self._refuse()  # a second answer in the same read as the end of the first
            return
        message, payload = data
        if 100 <= message.code <= 199 and message.code != 101:
            super().feed_data(data, size)  # interim: the final answer is still to come
            return
        problem = head_problem(message.code, message.raw_headers)
        if problem is not None:
            self.set_exception(HttpProcessingError(message=problem))  # and never reused
            return
        self._answer = payload
        payload.on_eof(self._answered)
        super().feed_data(data, size)

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        if not self._asked and isinstance(exc, HttpProcessingError):
            self._spoil()  # bytes after the answer that did not even parse
        super().set_exception(exc, *args)

    def _answered(self) -> None:
        self._asked = False

    def _refuse(self) -> None:
        self._spoil()
        if self.transport is not None:
            self.transport.close()

    def _spoil(self) -> None:
        if self._answer is not None:
            error = aiohttp.ClientPayloadError("the backend sent more than the length it declared")
            self._answer.set_exception(error)
            self._answer = None


class _Connector(aiohttp.TCPConnector):
    """aiohttp's pool, its connections speaking through `_Handler` (a private hook of
    aiohttp's, kept here until our own client replaces it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._factory = functools.partial(_new_handler, loop=self._loop)


def _new_handler(loop: asyncio.AbstractEventLoop) -> ResponseHandler:
    return _Handler(loop)


class UpstreamResponse:
    """A backend's answer whose headers have arrived; the body is still on the wire."""

    __slots__ = ("status", "headers", "_resp", "_done", "_owner")

    def __init__(self, resp: aiohttp.ClientResponse, owner: Upstream) -> None:
        self.status = resp.status
        self.headers: Headers = downstream_response_headers(resp.raw_headers)
        self._resp = resp
        self._done = False
        self._owner: Upstream | None = owner

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, without waiting to fill a buffer."""
        content = self._resp.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError, HttpProcessingError) as exc:
            raise map_error(exc) from exc
        self._done = True

    def at_eof(self) -> bool:
        return self._resp.content.at_eof()

    async def read(self, limit: int) -> bytes:
        """The whole body, up to `limit` bytes (for comparison and fallback decisions)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamProtocolError(f"the response body is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Give the connection back when the body was read to its end, drop it otherwise."""
        if self._done or self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()
        if self._owner is not None:
            self._owner.release()
            self._owner = None


class Upstream:
    """One backend: its base URL and a pool of kept-alive connections."""

    def __init__(
        self, name: str, url: str, *, max_connections: int, preserve_host: bool = False
    ) -> None:
        parts = urlsplit(url)
        self.name = name
        self.url = url
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        self.host_header: bytes | None = None if preserve_host else parts.netloc.encode()
        self.max_connections = max_connections
        self.settings = (url, max_connections, preserve_host)
        self._session: aiohttp.ClientSession | None = None
        self.users = 0  # requests between send() and their response's close(), WebSockets
        self.retired = False

    def target(self, path: str, query: bytes) -> str:
        """The URL the backend is asked for: its base path, the routed path, the raw query."""
        target = self.base_path + path
        return f"{target}?{query.decode('latin-1')}" if query else target

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = _Connector(
                limit=self.max_connections,
                limit_per_host=0,
                # Below the idle timeout of common backends (uvicorn, node: 5 s), so we
                # close an idle connection before the backend does and never send on one
                # it is closing (nothing resends a request behind the retry policy).
                keepalive_timeout=IDLE_TIMEOUT,
                ttl_dns_cache=10,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(),
                trust_env=False,
            )
            # Every resend is the pipeline's (counted, budgeted, never for a body it cannot
            # replay), not aiohttp's silent second try of an idempotent request.
            self._session._retry_connection = False
        return self._session

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        timeouts: Timeouts,
        *,
        remaining: float | None = None,
        body_error: BodyErrorSource | None = None,
    ) -> UpstreamResponse:
        """Send one attempt; return once the backend's status and headers arrived."""
        session = self._client()
        url = URL(self.origin + target, encoded=True)
        wire_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        self.acquire()
        try:
            resp = await session.request(
                method,
                url,
                headers=wire_headers,
                data=body,
                allow_redirects=False,
                timeout=timeouts.client_timeout(remaining),
                compress=None,
                auto_decompress=False,
            )
        except BaseException as exc:
            self.release()
            if body_error is not None and body_error.error is not None:
                raise body_error.error from exc
            if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | OSError):
                raise map_error(exc) from exc
            raise
        return UpstreamResponse(resp, self)

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            self._close_soon()

    def retire(self) -> None:
        """A reload no longer uses this pool: close it once its last user is done (also a
        session a late request of an old snapshot opened after the retirement)."""
        self.retired = True
        if self.users == 0:
            self._close_soon()

    def _close_soon(self) -> None:
        asyncio.ensure_future(self.close())

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class BodyErrorSource:
    """A request body stream that failed for a reason of its own (too large, client gone):
    that reason, not the client library's echo of it, is the error."""

    error: ProxyError | None = None


async def close_all(upstreams: Any) -> None:
    await asyncio.gather(*(u.close() for u in upstreams), return_exceptions=True)
