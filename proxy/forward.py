"""Sending a request to a backend and relaying its answer: the narrow seam to the client.

`Upstream.send(...)` returns an `UpstreamResponse` (status, headers, a body stream) once
the backend's headers have arrived. The client behind it is our own (`proxy.pool`: an
asyncio Protocol per connection, httptools, a LIFO keep-alive pool per backend) and raises
only our errors. An answer that breaks HTTP is an UpstreamProtocolError: a head our server
could not pass on, a body cut short or longer than declared; a connection that carried one
is never reused. WebSocket upgrades keep aiohttp (`Upstream.ws_session`), imported only
when a WebSocket is proxied.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.errors import (
    ProxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.headers import Headers, downstream_response_headers
from proxy.pool import IDLE_TIMEOUT, Body, Connection, Pool, head_problem
from proxy.retry import is_replayable

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "IDLE_TIMEOUT",
    "Body",
    "BodyErrorSource",
    "Timeouts",
    "Upstream",
    "UpstreamResponse",
    "close_all",
    "head_problem",
    "map_error",
]


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float
    total: float


def map_error(exc: BaseException) -> UpstreamError:
    """An exception of the I/O underneath as one of ours (SPEC §5's table)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the backend did not answer in time")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamConnectError(f"cannot connect to the backend: {exc}")
    return UpstreamProtocolError(f"bad exchange with the backend: {type(exc).__name__}")


class UpstreamResponse:
    """A backend's answer whose headers have arrived; the body is still on the wire."""

    __slots__ = ("status", "headers", "_conn", "_owner")

    def __init__(self, conn: Connection, owner: Upstream) -> None:
        self.status = conn.status
        self.headers: Headers = downstream_response_headers(conn.raw)
        self._conn = conn
        self._owner: Upstream | None = owner

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, without waiting to fill a buffer."""
        read_chunk = self._conn.read_chunk
        while True:
            chunk = await read_chunk()
            if not chunk:
                return
            yield chunk

    def at_eof(self) -> bool:
        conn = self._conn
        return conn.complete and not conn.chunks

    async def read(self, limit: int) -> bytes:
        """The whole body, up to `limit` bytes (for comparison and fallback decisions)."""
        conn = self._conn
        if conn.complete:  # all of it is here already: the common case for small answers
            data = conn.take() if conn.chunks else b""
            conn.consumed = True
            if len(data) > limit:
                raise UpstreamProtocolError(f"the response body is larger than {limit} bytes")
            return data
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await conn.read_chunk()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise UpstreamProtocolError(f"the response body is larger than {limit} bytes")
            parts.append(chunk)

    def close(self) -> None:
        """Give the connection back when the exchange ended cleanly, close it otherwise."""
        owner = self._owner
        if owner is None:
            return
        self._owner = None
        self._conn.pool.release(self._conn)
        owner.release()


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
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._tls else 80)
        self._pool: Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self.users = 0  # requests between send() and their response's close(), WebSockets
        self.retired = False

    def target(self, path: str, query: bytes) -> str:
        """The URL the backend is asked for: its base path, the routed path, the raw query."""
        target = self.base_path + path
        return f"{target}?{query.decode('latin-1')}" if query else target

    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(self._host, self._port, limit=self.max_connections, tls=self._tls)
        return self._pool

    def ws_session(self) -> aiohttp.ClientSession:
        """An aiohttp session for WebSocket upgrades only, made on the first one."""
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                # One session serves every user: no upstream cookie may pass between them.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
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
        pool = self._pool or self.pool()
        total = timeouts.total if remaining is None else max(0.001, remaining)
        resendable = (body is None or isinstance(body, bytes)) and (
            is_replayable(method, False) or _has_idempotency_key(headers)
        )
        self.users += 1
        try:
            conn = await pool.exchange(
                method,
                target,
                headers,
                body,
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.read,
                deadline=pool.loop.time() + total,
                resendable=resendable,
            )
        except BaseException as exc:
            self.release()
            if body_error is not None and body_error.error is not None:
                raise body_error.error from exc
            if isinstance(exc, OSError | TimeoutError):
                raise map_error(exc) from exc
            raise
        return UpstreamResponse(conn, self)

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            self._close_soon()

    def retire(self) -> None:
        """A reload no longer uses this pool: close it once its last user is done (also a
        pool a late request of an old snapshot opened after the retirement)."""
        self.retired = True
        if self.users == 0:
            self._close_soon()

    def _close_soon(self) -> None:
        asyncio.ensure_future(self.close())

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _has_idempotency_key(headers: Headers) -> bool:
    for name, _ in headers:
        if len(name) == 15 and name.lower() == b"idempotency-key":
            return True
    return False


class BodyErrorSource:
    """A request body stream that failed for a reason of its own (too large, client gone):
    that reason, not the client library's echo of it, is the error."""

    error: ProxyError | None = None


async def close_all(upstreams: Any) -> None:
    await asyncio.gather(*(u.close() for u in upstreams), return_exceptions=True)
