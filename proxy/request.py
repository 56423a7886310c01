"""One client request as the data plane sees it, and its body as a bounded stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from proxy.errors import BadRequest, BodyTimeout, BodyTooLarge, ClientGone
from proxy.forward import BodyErrorSource
from proxy.headers import TrustedProxies, is_sane_request_id, new_request_id

Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class Request:
    """The parts of an ASGI `http` scope the pipeline reads, parsed at most once."""

    __slots__ = (
        "method",
        "raw_path",
        "query",
        "headers",
        "peer",
        "scheme",
        "request_id",
        "started",
        "receive",
        "_trusted",
        "_map",
        "_cookies",
        "_client_ip",
        "_length",
    )

    def __init__(self, scope: dict[str, Any], receive: Receive, trusted: TrustedProxies) -> None:
        self.method: str = scope["method"]
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        self.query: bytes = scope.get("query_string", b"")
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        client = scope.get("client")
        self.peer: str = client[0] if client else "0.0.0.0"
        self.scheme: str = scope.get("scheme", "http")
        self.receive = receive
        self.started = time.monotonic()
        self._trusted = trusted
        self._map: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None
        self._client_ip: str | None = None
        self._length: int | None | bool = False  # False: not parsed yet
        sent_id = self.header_bytes(b"x-request-id")
        self.request_id = (
            sent_id.decode("ascii")
            if sent_id is not None and is_sane_request_id(sent_id)
            else new_request_id()
        )

    def header_bytes(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        if self._map is None:
            found: dict[str, str] = {}
            for key, value in self.headers:
                found.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
            self._map = found
        return self._map.get(name.lower())

    def cookie(self, name: str) -> str | None:
        if self._cookies is None:
            jar: dict[str, str] = {}
            for key, value in self.headers:
                if key == b"cookie":
                    for pair in value.decode("latin-1").split(";"):
                        k, sep, v = pair.strip().partition("=")
                        if sep:
                            jar.setdefault(k, v.strip('"'))
            self._cookies = jar
        return self._cookies.get(name) or None

    @property
    def peer_is_trusted(self) -> bool:
        return self.peer in self._trusted

    @property
    def client_ip(self) -> str:
        if self._client_ip is None:
            self._client_ip = self._trusted.client_ip(
                self.peer, self.header_bytes(b"x-forwarded-for")
            )
        return self._client_ip

    @property
    def is_secure(self) -> bool:
        if self.peer_is_trusted:
            proto = self.header_bytes(b"x-forwarded-proto")
            if proto is not None:
                # A chain of proxies lists protocols client-first.
                return proto.split(b",")[0].strip().lower() == b"https"
        return self.scheme == "https"

    @property
    def host(self) -> str | None:
        host = self.header_bytes(b"host")
        return None if host is None else host.decode("latin-1")

    def content_length(self) -> int | None:
        """The declared body length; None when there is none (or chunked)."""
        length = self._length
        if length is False:
            value = self.header_bytes(b"content-length")
            if value is None:
                length = None
            elif not value.isdigit():
                raise BadRequest("malformed Content-Length")
            else:
                length = int(value)
            self._length = length
        return length

    @property
    def has_body(self) -> bool:
        return bool(self.content_length()) or self.header_bytes(b"transfer-encoding") is not None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class RequestBody(BodyErrorSource):
    """The client's body, read from ASGI `receive`, never more than `limit` bytes, and
    never waiting more than `timeout` seconds for its next piece (a client that stops
    sending its body would otherwise hold its connection, memory and, while the body
    streams, an upstream connection and a bulkhead slot for as long as it likes)."""

    __slots__ = (
        "_receive",
        "_limit",
        "_timeout",
        "received",
        "complete",
        "started",
        "on_complete",
    )

    def __init__(
        self,
        receive: Receive,
        limit: int | None,
        on_complete: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._receive = receive
        self._limit = limit
        self._timeout = timeout
        self.received = 0
        self.complete = False
        self.started = False
        self.error = None
        self.on_complete = on_complete

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b'' once it is complete."""
        if self.complete:
            return b""
        self.started = True
        if self._timeout is None:
            message = await self._receive()
        else:
            try:
                async with asyncio.timeout(self._timeout):
                    message = await self._receive()
            except TimeoutError:
                self.error = BodyTimeout(
                    f"no part of the request body came for {self._timeout:g} s "
                    f"({self.received} bytes received)"
                )
                raise self.error from None
        if message["type"] == "http.disconnect":
            self.error = ClientGone("the client went away while sending its body")
            raise self.error
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if self._limit is not None and self.received > self._limit:
            self.error = BodyTooLarge(f"the request body is larger than {self._limit} bytes")
            raise self.error
        if not message.get("more_body", False):
            self._finish()
        return chunk

    def _finish(self) -> None:
        self.complete = True
        if self.on_complete is not None:
            self.on_complete()

    def finish_empty(self) -> None:
        """A request without a body: nothing to read."""
        self._finish()

    async def read_up_to(self, size: int) -> bytes:
        """Read until the body ends or more than `size` bytes are in hand."""
        parts: list[bytes] = []
        held = 0
        while not self.complete and held <= size:
            chunk = await self.next_chunk()
            parts.append(chunk)
            held += len(chunk)
        return b"".join(parts)

    async def stream(self, head: bytes = b"") -> AsyncIterator[bytes]:
        if head:
            yield head
        while not self.complete:
            chunk = await self.next_chunk()
            if chunk:
                yield chunk


WATCH_AFTER = 0.1  # seconds a request runs before its client is watched


class Watches:
    """The requests whose client is to be watched once they have run WATCH_AFTER seconds:
    one timer ticks for all of them (a request only enters and leaves a dict), not a timer
    or a task each. Most requests are over before their watch would start."""

    __slots__ = ("_pending", "_timer", "_loop")

    def __init__(self) -> None:
        self._pending: dict[DisconnectWatch, float] = {}  # in order of arrival
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, watch: DisconnectWatch) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        self._pending[watch] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(WATCH_AFTER / 2, self._tick)

    def discard(self, watch: DisconnectWatch) -> None:
        self._pending.pop(watch, None)

    def _tick(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        due = loop.time() - WATCH_AFTER
        pending = self._pending
        ready = []
        for watch, since in pending.items():
            if since > due:
                break
            ready.append(watch)
        for watch in ready:
            del pending[watch]
            watch.begin()
        if pending:
            self._timer = loop.call_later(WATCH_AFTER / 2, self._tick)


class DisconnectWatch:
    """Cancels the request's task when the client goes away, once the body is read (only
    then is `receive` free to tell us). A cancelled request releases its upstream at once.

    The watch (a task waiting on `receive`) starts once the request has run for about
    WATCH_AFTER seconds (see `Watches`); a client gone earlier is seen as soon as it starts."""

    __slots__ = ("_receive", "_task", "_watches", "_watcher", "_waiting", "fired")

    def __init__(
        self, receive: Receive, task: asyncio.Task[Any] | None, watches: Watches | None = None
    ) -> None:
        self._receive = receive
        self._task = task
        self._watches = watches if watches is not None else Watches()
        self._watcher: asyncio.Task[None] | None = None
        self._waiting = False
        self.fired = False

    def start(self) -> None:
        if self._task is not None and self._watcher is None and not self._waiting:
            self._waiting = True
            self._watches.add(self)

    def begin(self) -> None:
        """Start watching now (called by `Watches`)."""
        self._waiting = False
        task = self._task
        if task is not None and not task.done() and self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
        if self._task is not None and not self._task.done():
            self.fired = True
            self._task.cancel()

    def stop(self) -> None:
        if self._waiting:
            self._waiting = False
            self._watches.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
