"""Our upstream client (proxy.pool behind proxy.forward) against small raw asyncio servers:
keep-alive and LIFO reuse, the pool's size limit and its waiters, the one resend of a stale
kept-alive connection, each body framing, HEAD/204/304/1xx, the three timeouts, flow
control both ways, and no reuse of a connection after anything went wrong."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from proxy.errors import (
    BodyTooLarge,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.forward import BodyErrorSource, Timeouts, Upstream, UpstreamResponse
from proxy.pool import READ_HIGH, READ_SIZE, Pool, request_head

FAST = Timeouts(connect=1.0, read=1.0, total=5.0)
HOST = [(b"host", b"backend")]


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    conn: int
    raw_head: bytes


Handler = Callable[["Backend", asyncio.StreamReader, asyncio.StreamWriter, Seen], Awaitable[bool]]


@dataclass
class Backend:
    """A raw HTTP/1.1 server: `handler` answers each request and returns whether to keep
    the connection for the next one."""

    handler: Handler
    port: int = 0
    accepted: int = 0
    live: set[int] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    read_body: bool = True
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def __aenter__(self) -> Backend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def upstream(self, max_connections: int = 10) -> Upstream:
        return Upstream("b", f"http://127.0.0.1:{self.port}", max_connections=max_connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = self.accepted
        self.live.add(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                seen = await read_request(reader, conn, self.read_body)
                if seen is None:
                    break
                self.seen.append(seen)
                if not await self.handler(self, reader, writer, seen):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.live.discard(conn)
            self._writers.discard(writer)
            writer.close()


async def read_request(reader: asyncio.StreamReader, conn: int, read_body: bool) -> Seen | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if read_body and headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += (await reader.readexactly(size + 2))[:-2]
    elif read_body and "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return Seen(method, target, headers, body, conn, head)


def answer(body: bytes = b"ok", status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def ok(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
    w.write(answer(f"conn={s.conn} body={len(s.body)}".encode()))
    await w.drain()
    return True


async def send(
    up: Upstream,
    method: str = "GET",
    target: str = "/",
    body: bytes | AsyncIterator[bytes] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    timeouts: Timeouts = FAST,
    body_error: BodyErrorSource | None = None,
) -> UpstreamResponse:
    return await up.send(
        method, target, HOST + (headers or []), body, timeouts, body_error=body_error
    )


async def fetch(up: Upstream, method: str = "GET", target: str = "/", **kw: object) -> bytes:
    resp = await send(up, method, target, **kw)  # type: ignore[arg-type]
    try:
        return await resp.read(1 << 30)
    finally:
        resp.close()


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# --- keep-alive and the pool ------------------------------------------------------------------


async def test_a_kept_alive_connection_serves_the_next_request() -> None:
    async with Backend(ok) as b:
        up = b.upstream()
        assert await fetch(up) == b"conn=1 body=0"
        assert await fetch(up) == b"conn=1 body=0"
        assert b.accepted == 1
        await up.close()


async def test_the_most_recently_released_connection_is_reused_first() -> None:
    async with Backend(ok) as b:
        up = b.upstream()
        first, second = await send(up), await send(up)
        assert (await first.read(100), await second.read(100)) == (
            b"conn=1 body=0",
            b"conn=2 body=0",
        )
        first.close()
        second.close()
        assert await fetch(up) == b"conn=2 body=0"
        assert await fetch(up) == b"conn=2 body=0"
        await up.close()


async def test_the_pool_opens_at_most_its_limit_and_waiters_go_in_arrival_order() -> None:
    async with Backend(ok) as b:
        up = b.upstream(max_connections=1)
        held = await send(up)
        order: list[int] = []

        async def waiter(i: int) -> None:
            resp = await send(up, target=f"/{i}")
            order.append(i)
            await resp.read(100)
            resp.close()

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert order == [] and b.accepted == 1
        await held.read(100)
        held.close()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2] and b.accepted == 1
        await up.close()


async def test_a_waiter_gives_up_at_its_total_timeout() -> None:
    async with Backend(ok) as b:
        up = b.upstream(max_connections=1)
        held = await send(up)
        with pytest.raises(UpstreamTimeout):
            await send(up, timeouts=Timeouts(connect=1.0, read=1.0, total=0.1))
        held.close()
        assert await fetch(up) == b"conn=1 body=0"
        await up.close()


async def test_a_closed_connection_frees_its_place_for_a_waiter() -> None:
    async with Backend(replying(answer(b"x" * 4_000_000))) as b:
        up = b.upstream(max_connections=1)
        held = await send(up)
        later = asyncio.ensure_future(fetch(up))
        await asyncio.sleep(0.02)
        held.close()  # the body is still coming: the connection is closed, not handed over
        assert len(await later) == 4_000_000
        assert b.accepted == 2
        await up.close()


async def test_idle_connections_are_closed_after_the_idle_timeout() -> None:
    async with Backend(ok) as b:
        pool = Pool("127.0.0.1", b.port, limit=4, idle_timeout=0.2)
        up = b.upstream()
        up._pool = pool
        await fetch(up)
        assert b.live == {1}
        await until(lambda: not b.live)
        assert pool.idle == [] and pool.open == 0
        assert await fetch(up) == b"conn=2 body=0"
        pool.close()


async def test_a_connection_the_backend_closed_while_idle_is_not_used() -> None:
    async def once(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        await ok(b, r, w, s)
        return False  # closes after answering, without saying so

    async with Backend(once) as b:
        up = b.upstream()
        await fetch(up, "POST", body=b"x")
        await until(lambda: up.pool().open == 0)
        assert await fetch(up, "POST", body=b"y") == b"conn=2 body=1"
        assert len(b.seen) == 2
        await up.close()


# --- the one resend of a stale connection -------------------------------------------------------


def stale_after_first() -> Handler:
    """Answers the first request of each connection; closes on the second without answering
    (a backend that closed an idle connection as the request went out)."""

    async def handler(
        b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen
    ) -> bool:
        if sum(1 for x in b.seen if x.conn == s.conn) > 1:
            return False
        return await ok(b, r, w, s)

    return handler


@pytest.mark.parametrize(
    ("method", "headers"), [("GET", []), ("PUT", []), ("POST", [(b"idempotency-key", b"k1")])]
)
async def test_a_replay_safe_request_on_a_stale_connection_is_resent_once_on_a_new_one(
    method: str, headers: list[tuple[bytes, bytes]]
) -> None:
    async with Backend(stale_after_first()) as b:
        up = b.upstream()
        await fetch(up)
        assert await fetch(up, method, body=b"abc", headers=headers) == b"conn=2 body=3"
        assert [s.conn for s in b.seen] == [1, 1, 2]
        await up.close()


async def test_a_post_on_a_stale_connection_is_not_sent_again() -> None:
    async with Backend(stale_after_first()) as b:
        up = b.upstream()
        await fetch(up)
        with pytest.raises(UpstreamProtocolError):
            await fetch(up, "POST", body=b"abc")
        assert [s.method for s in b.seen] == ["GET", "POST"]
        await up.close()


async def test_a_streamed_body_on_a_stale_connection_is_not_sent_again() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"abc"

    async with Backend(stale_after_first()) as b:
        up = b.upstream()
        await fetch(up)
        with pytest.raises(UpstreamProtocolError):
            await fetch(up, "PUT", body=body())
        assert len(b.seen) == 2
        await up.close()


async def test_a_new_connection_closed_without_an_answer_is_not_resent() -> None:
    async def close(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        return False

    async with Backend(close) as b:
        up = b.upstream()
        with pytest.raises(UpstreamProtocolError):
            await fetch(up)
        assert len(b.seen) == 1
        await up.close()


async def test_a_stale_connection_that_sent_part_of_an_answer_is_not_resent() -> None:
    async def partial(
        b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen
    ) -> bool:
        if len(b.seen) == 1:
            return await ok(b, r, w, s)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await w.drain()
        return False

    async with Backend(partial) as b:
        up = b.upstream()
        await fetch(up)
        with pytest.raises(UpstreamProtocolError):
            await fetch(up)
        assert len(b.seen) == 2
        await up.close()


# --- framing ---------------------------------------------------------------------------------


def replying(data: bytes, keep: bool = True) -> Handler:
    async def handler(
        b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen
    ) -> bool:
        w.write(data)
        await w.drain()
        return keep

    return handler


async def test_a_chunked_answer_is_read_to_its_last_chunk_and_the_connection_kept() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    async with Backend(replying(data)) as b:
        up = b.upstream()
        resp = await send(up)
        assert ("transfer-encoding", "chunked") not in [
            (k.decode().lower(), v.decode()) for k, v in resp.headers
        ]
        assert b"".join([c async for c in resp.chunks()]) == b"hello world"
        resp.close()
        assert await fetch(up) == b"hello world"
        assert b.accepted == 1
        await up.close()


async def test_an_answer_delimited_by_close_ends_at_eof_and_the_connection_is_not_kept() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with Backend(replying(data, keep=False)) as b:
        up = b.upstream()
        assert await fetch(up) == b"until the end"
        assert await fetch(up) == b"until the end"
        assert b.accepted == 2
        await up.close()


async def test_a_body_cut_short_is_a_protocol_error() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"
    async with Backend(replying(data, keep=False)) as b:
        up = b.upstream()
        resp = await send(up)
        with pytest.raises(UpstreamProtocolError):
            await resp.read(100)
        resp.close()
        await up.close()


async def test_a_head_answer_has_no_body_and_its_connection_is_reused() -> None:
    async def handler(
        b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen
    ) -> bool:
        if s.method == "HEAD":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            w.write(answer(b"after head"))
        await w.drain()
        return True

    async with Backend(handler) as b:
        up = b.upstream()
        resp = await send(up, "HEAD")
        assert resp.status == 200 and (b"Content-Length", b"1000") in resp.headers
        assert await resp.read(10) == b""
        resp.close()
        assert await fetch(up) == b"after head"
        assert b.accepted == 1
        await up.close()


async def test_a_head_answer_followed_by_a_body_closes_the_connection() -> None:
    async with Backend(replying(answer(b"a body no HEAD may have"))) as b:
        up = b.upstream()
        resp = await send(up, "HEAD")
        assert resp.status == 200
        resp.close()
        assert await fetch(up) == b"a body no HEAD may have"
        assert b.accepted == 2
        await up.close()


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
async def test_204_and_304_have_no_body_and_keep_the_connection(status: str) -> None:
    async with Backend(replying(f"HTTP/1.1 {status}\r\nX-A: 1\r\n\r\n".encode())) as b:
        up = b.upstream()
        resp = await send(up)
        assert resp.status == int(status[:3]) and await resp.read(10) == b""
        resp.close()
        await fetch(up)
        assert b.accepted == 1
        await up.close()


async def test_interim_answers_are_skipped() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + answer(b"final")
    )
    async with Backend(replying(data)) as b:
        up = b.upstream()
        resp = await send(up)
        assert resp.status == 200 and (b"Link", b"</a.css>; rel=preload") not in resp.headers
        assert await resp.read(100) == b"final"
        resp.close()
        await up.close()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 600 Nope\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Huge: " + b"v" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 200 + b"Content-Length: 0\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ],
)
async def test_an_answer_our_server_could_not_pass_on_is_a_protocol_error(data: bytes) -> None:
    async with Backend(replying(data)) as b:
        up = b.upstream()
        with pytest.raises(UpstreamProtocolError):
            await send(up)
        await until(lambda: not b.live)
        assert up.pool().open == 0
        await up.close()


async def test_hop_by_hop_headers_are_dropped_and_order_and_repeats_kept() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"
    )
    async with Backend(replying(data)) as b:
        up = b.upstream()
        resp = await send(up)
        assert resp.headers == [
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Content-Length", b"0"),
        ]
        resp.close()
        await up.close()


# --- no reuse after anything went wrong ----------------------------------------------------------


async def test_bytes_after_the_declared_length_spoil_the_answer_and_the_connection() -> None:
    async with Backend(replying(answer(b"declared") + b"more bytes")) as b:
        up = b.upstream()
        resp = await send(up)
        with pytest.raises(UpstreamProtocolError):
            await resp.read(100)
        resp.close()
        with pytest.raises(UpstreamProtocolError):
            await fetch(up)  # a new connection, spoiled in its turn
        assert b.accepted == 2
        await up.close()


async def test_bytes_after_a_body_that_came_later_spoil_it_too() -> None:
    async def split(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)  # the body comes in reads of its own, past httptools
        w.write(b"b" * 100_000 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return True

    async with Backend(split) as b:
        up = b.upstream()
        resp = await send(up)
        with pytest.raises(UpstreamProtocolError):
            await resp.read(1 << 20)
        resp.close()
        await until(lambda: not b.live)
        await up.close()


async def test_a_connection_is_reused_after_a_long_body() -> None:
    async with Backend(replying(answer(b"l" * 3_000_000))) as b:
        up = b.upstream()
        for _ in range(3):
            resp = await send(up)
            assert sum([len(c) async for c in resp.chunks()]) == 3_000_000
            resp.close()
        assert b.accepted == 1
        await up.close()


async def test_bytes_arriving_on_an_idle_connection_close_it() -> None:
    async def late(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        await ok(b, r, w, s)
        await asyncio.sleep(0.05)
        w.write(answer(b"nobody asked"))
        return True

    async with Backend(late) as b:
        up = b.upstream()
        assert await fetch(up) == b"conn=1 body=0"
        await until(lambda: up.pool().open == 0)
        assert await fetch(up) == b"conn=2 body=0"
        await up.close()


async def test_an_answer_closed_before_its_end_closes_the_connection() -> None:
    async with Backend(replying(answer(b"x" * 1_000_000))) as b:
        up = b.upstream()
        resp = await send(up)
        resp.close()
        await until(lambda: not b.live)
        assert await fetch(up) == b"x" * 1_000_000
        assert b.accepted == 2
        await up.close()


async def test_connection_close_is_honoured() -> None:
    async with Backend(replying(answer(extra="Connection: close\r\n"))) as b:
        up = b.upstream()
        await fetch(up)
        await fetch(up)
        assert b.accepted == 2
        await up.close()


# --- timeouts -------------------------------------------------------------------------------------


async def test_connect_refused_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    up = Upstream("b", f"http://127.0.0.1:{port}", max_connections=2)
    with pytest.raises(UpstreamConnectError):
        await send(up)
    assert up.pool().open == 0
    await up.close()


async def test_an_unresolvable_host_is_a_connect_error() -> None:
    up = Upstream("b", "http://no-such-host.invalid:80", max_connections=2)
    with pytest.raises(UpstreamConnectError):
        await send(up)
    await up.close()


async def test_a_connection_that_never_opens_is_a_connect_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = [listener]
    for _ in range(8):  # fill the accept queue: new connections hang in SYN-SENT
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    try:
        up = Upstream("b", f"http://127.0.0.1:{port}", max_connections=2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamConnectTimeout):
            await send(up, timeouts=Timeouts(connect=0.2, read=5.0, total=5.0))
        assert loop.time() - t0 < 1.0
        await up.close()
    finally:
        for s in held:
            s.close()


async def never(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
    await r.read()  # until the client closes
    return False


async def test_no_byte_within_the_read_timeout_is_a_timeout() -> None:
    async with Backend(never) as b:
        up = b.upstream()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamTimeout):
            await send(up, timeouts=Timeouts(connect=1.0, read=0.2, total=5.0))
        assert 0.15 < loop.time() - t0 < 1.0
        await until(lambda: not b.live)
        await up.close()


async def test_a_kept_alive_connection_keeps_its_timer_and_a_shorter_timeout_still_holds() -> None:
    """An exchange that ends in time leaves its read timer for the next one on the same
    connection (no timer made and cancelled per request); a next exchange due sooner gets a
    timer of its own, and one that never answers still times out on time."""
    answers = 0

    async def twice(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        nonlocal answers
        answers += 1
        if answers > 2:
            await r.read()  # the third request is never answered
            return False
        w.write(answer())
        await w.drain()
        return True

    async with Backend(twice) as b:
        up = b.upstream()
        long = Timeouts(connect=1.0, read=30.0, total=60.0)
        assert await fetch(up, timeouts=long) == b"ok"
        conn = up.pool().idle[-1]
        first = conn.timer
        assert first is not None and not first.cancelled()
        assert await fetch(up, timeouts=long) == b"ok"
        assert conn.timer is first  # due no later than the second's: it served
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamTimeout):
            await send(up, timeouts=Timeouts(connect=1.0, read=0.2, total=5.0))
        assert 0.15 < loop.time() - t0 < 1.0  # not the 30 s the kept timer was due at
        assert first.cancelled() and b.accepted == 1
        await up.close()


async def test_a_body_that_stops_coming_is_a_timeout() -> None:
    async def stall(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await r.read()
        return False

    async with Backend(stall) as b:
        up = b.upstream()
        resp = await send(up, timeouts=Timeouts(connect=1.0, read=0.2, total=5.0))
        with pytest.raises(UpstreamTimeout):
            await resp.read(100)
        resp.close()
        await up.close()


async def test_a_dripping_answer_is_cut_at_the_total_timeout() -> None:
    async def drip(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(0.05)
            w.write(b"x")
        return True

    async with Backend(drip) as b:
        up = b.upstream()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        resp = await send(up, timeouts=Timeouts(connect=1.0, read=0.2, total=0.5))
        with pytest.raises(UpstreamTimeout):
            await resp.read(1000)
        assert 0.4 < loop.time() - t0 < 1.5
        resp.close()
        await up.close()


async def test_a_reader_that_is_slow_is_not_a_read_timeout() -> None:
    async with Backend(replying(answer(b"y" * 2_000_000))) as b:
        up = b.upstream()
        resp = await send(up, timeouts=Timeouts(connect=1.0, read=0.1, total=5.0))
        await asyncio.sleep(0.3)  # the backend is paused meanwhile: not its fault
        assert len(await resp.read(1 << 30)) == 2_000_000
        resp.close()
        await up.close()


# --- flow control and request bodies ------------------------------------------------------------


async def test_a_slow_reader_pauses_the_backend_and_memory_stays_bounded() -> None:
    size = 8 * 1024 * 1024
    bound = 320 * 1024  # 64 KiB, and at most one read (256 KiB) past it
    async with Backend(replying(answer(b"z" * size))) as b:
        up = b.upstream()
        resp = await send(up)
        conn = resp._conn
        await asyncio.sleep(0.2)
        assert conn.reading_paused and READ_HIGH < conn.buffered <= bound
        got = 0
        async for chunk in resp.chunks():
            got += len(chunk)
            assert conn.buffered <= bound
            await asyncio.sleep(0)
        assert got == size
        resp.close()
        await up.close()


async def reads_of_read_size_at_most() -> None:
    """A connection the backend filled while it was paused: with the loop's own reads (256
    KiB) it would hold one such read past READ_HIGH and pass on pieces that big."""
    size = 4 * 1024 * 1024
    async with Backend(replying(answer(b"z" * size))) as b:
        up = b.upstream()
        resp = await send(up)
        conn = resp._conn
        (writer,) = b._writers
        for _ in range(400):  # until the kernel holds plenty the backend could not deliver
            queued = size - writer.transport.get_write_buffer_size() - conn.received
            if conn.reading_paused and queued >= 512 * 1024:
                break
            await asyncio.sleep(0.005)
        else:
            pytest.fail("the backend was not paused with 512 KiB in the socket buffers")
        got = biggest = 0
        async for chunk in resp.chunks():
            got += len(chunk)
            biggest = max(biggest, len(chunk))
            assert conn.buffered <= READ_HIGH + READ_SIZE
            await asyncio.sleep(0)
        assert got == size and biggest <= READ_SIZE == 64 * 1024
        resp.close()
        await up.close()


async def test_reads_are_64_kib_at_most() -> None:
    await reads_of_read_size_at_most()


def test_reads_are_64_kib_at_most_on_uvloop() -> None:
    import uvloop

    uvloop.run(reads_of_read_size_at_most())


async def stream(parts: int, size: int) -> AsyncIterator[bytes]:
    for i in range(parts):
        yield bytes([65 + i % 26]) * size
        await asyncio.sleep(0)


async def test_a_body_of_unknown_length_goes_chunked() -> None:
    async with Backend(ok) as b:
        up = b.upstream()
        assert await fetch(up, "POST", body=stream(5, 1000)) == b"conn=1 body=5000"
        seen = b.seen[-1]
        assert (
            seen.headers["transfer-encoding"] == "chunked" and "content-length" not in seen.headers
        )
        assert seen.body == b"".join(bytes([65 + i]) * 1000 for i in range(5))
        assert await fetch(up) == b"conn=1 body=0"  # the connection is kept
        await up.close()


async def test_a_body_with_the_clients_content_length_goes_as_is() -> None:
    async with Backend(ok) as b:
        up = b.upstream()
        length = [(b"content-length", b"3000")]
        assert await fetch(up, "PUT", body=stream(3, 1000), headers=length) == b"conn=1 body=3000"
        assert "transfer-encoding" not in b.seen[-1].headers
        await up.close()


async def test_a_held_body_gets_its_length() -> None:
    async with Backend(ok) as b:
        up = b.upstream()
        assert await fetch(up, "POST", body=b"12345") == b"conn=1 body=5"
        assert b.seen[-1].headers["content-length"] == "5"
        assert await fetch(up, "POST") == b"conn=1 body=0"
        assert b.seen[-1].headers["content-length"] == "0"
        assert await fetch(up, "GET") == b"conn=1 body=0"
        assert "content-length" not in b.seen[-1].headers
        await up.close()


async def test_a_big_upload_to_a_slow_reader_waits_for_the_socket() -> None:
    async def slow(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        got = 0
        while got < 16 * 1024 * 1024:
            await asyncio.sleep(0.001)
            got += len(await r.read(256 * 1024))
        w.write(answer(b"got %d" % got))
        return True

    b = Backend(slow, read_body=False)
    async with b:
        up = b.upstream()
        length = [(b"content-length", b"%d" % (16 * 1024 * 1024))]
        resp = await send(up, "POST", body=stream(64, 256 * 1024), headers=length)
        assert resp._conn.sent_all
        assert await resp.read(100) == b"got %d" % (16 * 1024 * 1024)
        resp.close()
        await up.close()


async def test_an_early_answer_ends_the_upload_and_the_connection() -> None:
    async def early(b: Backend, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Seen) -> bool:
        w.write(answer(b"too big", "413 Payload Too Large"))
        await r.read()
        return False

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"e" * 65536
            await asyncio.sleep(0.001)

    b = Backend(early, read_body=False)
    async with b:
        up = b.upstream()
        resp = await send(up, "POST", body=endless())
        assert resp.status == 413 and await resp.read(100) == b"too big"
        resp.close()
        await until(lambda: not b.live)
        assert up.pool().open == 0
        await up.close()


async def test_a_failing_client_body_is_the_error() -> None:
    source = BodyErrorSource()

    async def failing() -> AsyncIterator[bytes]:
        yield b"first"
        source.error = BodyTooLarge("too large")
        raise source.error

    async with Backend(never, read_body=False) as b:
        up = b.upstream()
        with pytest.raises(BodyTooLarge):
            await send(up, "POST", body=failing(), body_error=source)
        await until(lambda: not b.live)
        await up.close()


async def test_a_cancelled_request_closes_its_connection() -> None:
    async with Backend(never) as b:
        up = b.upstream()
        task = asyncio.ensure_future(send(up))
        await until(lambda: bool(b.seen))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not b.live)
        assert up.pool().open == 0 and up.users == 0
        await up.close()


# --- the request on the wire -------------------------------------------------------------------


def test_the_request_head_is_the_line_and_the_headers_as_given() -> None:
    head, chunked = request_head(
        "GET", "/a?b=c", [(b"host", b"h"), (b"x-a", b"1"), (b"x-a", b"2")], None
    )
    assert head == b"GET /a?b=c HTTP/1.1\r\nhost: h\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
    assert not chunked


def test_a_held_body_replaces_a_content_length_that_disagrees() -> None:
    head, _ = request_head("POST", "/", [(b"host", b"h"), (b"content-length", b"9")], b"abc")
    assert head == b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\n"
