"""Sending a request to a backend and relaying its answer: the narrow seam to the client.

`Upstream.send(...)` returns an `UpstreamResponse` (status, headers, a body stream) once
the backend's headers have arrived, and maps the client library's errors onto ours. Only
this module knows aiohttp, so a faster client can replace it without touching the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
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

_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


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
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamProtocolError("the backend closed the connection without answering")
    return UpstreamProtocolError(f"bad exchange with the backend: {type(exc).__name__}")


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
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
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
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                keepalive_timeout=30.0,
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
