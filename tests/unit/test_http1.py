"""The main port's HTTP/1.1 server (proxy.http1) on 127.0.0.1 with small ASGI apps and raw
asyncio clients: pipelining in order and one at a time, a streamed response's head before
its body, response splitting refused, an app's failures, Content-Length kept honest,
100-continue only when the body is wanted, request body flow control, a client that
leaves, and the graceful drain. The proxy-level edges (limits, smuggling, timeouts) are
tested against the real process in tests/e2e/test_edges.py and test_hardening.py."""

from __future__ import annotations

import asyncio
import gc
import io
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.app import Holder, ProxyApp
from proxy.config import Limits
from proxy.http1 import BODY_FOLLOWS, HIGH_WATER, MainServer
from proxy.loader import load_text
from proxy.logs import AccessLog, LogSink
from proxy.metrics import Metrics
from proxy.outbox import outbox
from proxy.runtime import build

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@asynccontextmanager
async def serving(app: App, grace: float = 2.0, **limits: Any) -> AsyncIterator[MainServer]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    server = MainServer(app, Limits(**limits), grace)
    task = asyncio.ensure_future(server.serve([sock]))
    async with asyncio.timeout(5):
        while not server.started:
            await asyncio.sleep(0.005)
    server.port = sock.getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.should_exit = True
        async with asyncio.timeout(grace + 5):
            await task


async def connect(server: MainServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)  # type: ignore[attr-defined]


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response with a Content-Length or chunked body: status line, headers, body."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head[:-4].split(b"\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                parts.append(await reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        else:
            body = b""
    return status, headers, body


async def read_body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        parts.append(message["body"])
        if not message["more_body"]:
            return b"".join(parts)


async def answer(send: Any, body: bytes, status: int = 200, headers: Any = ()) -> None:
    head = [(b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = await read_body(receive)
    await answer(send, scope["method"].encode() + b" " + scope["raw_path"] + b" " + body)


async def test_pipelined_requests_are_answered_in_order_each_with_its_own_body() -> None:
    async with serving(echo) as server:
        reader, writer = await connect(server)
        writer.write(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nonePOST /b HTTP/1.1\r\n"
            b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n"
            b"GET /c?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        bodies = [(await read_response(reader))[2] for _ in range(3)]
        assert bodies == [b"POST /a one", b"POST /b two", b"GET /c "]
        writer.close()


async def test_a_pipelined_request_starts_only_once_the_one_before_it_is_answered() -> None:
    release = asyncio.Event()
    started: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        started.append(scope["path"])
        if scope["path"] == "/slow":
            await release.wait()
        await answer(send, scope["path"].encode())

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            while not started:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # time /fast would need to start, were it started early
        assert started == ["/slow"]
        release.set()
        assert (await read_response(reader))[2] == b"/slow"
        assert (await read_response(reader))[2] == b"/fast"
        assert started == ["/slow", "/fast"]
        writer.close()


async def test_a_streamed_response_s_head_reaches_the_client_before_its_first_piece() -> None:
    first_piece = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
        await first_piece.wait()
        await send({"type": "http.response.body", "body": b"late", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(2):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"x-a: 1\r\n" in head and b"transfer-encoding: chunked\r\n" in head
        first_piece.set()
        async with asyncio.timeout(2):
            assert await reader.readuntil(b"0\r\n\r\n") == b"4\r\nlate\r\n0\r\n\r\n"
        writer.close()


async def test_a_head_whose_body_follows_at_once_waits_for_it() -> None:
    """`strangler.body_follows` (the pipeline's whole answers): the head is not flushed on
    its own; it leaves with the body."""
    body_now = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]}
        await send({**start, BODY_FOLLOWS: True})
        await body_now.wait()
        await send({"type": "http.response.body", "body": b"whole", "more_body": False})

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):  # the head alone does not come
            async with asyncio.timeout(0.2):
                await reader.readuntil(b"\r\n\r\n")
        body_now.set()
        status, headers, body = await read_response(reader)
        assert status.startswith(b"HTTP/1.1 200") and headers[b"x-a"] == b"1"
        assert body == b"whole"
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        (b"x-a", b"1\r\nset-cookie: evil=1"),
        (b"x-a", b"1\nset-cookie: evil=1"),
        (b"x-a", b"1\rset-cookie: evil=1"),
        (b"x-a", b"nul\x00byte"),
        (b"x-a", b"del\x7fbyte"),
        (b"x-a", b"esc\x1bbyte"),
        (b"x-a", b"1\n\rset-cookie: evil=1"),
        (b"x-a\r\nset-cookie", b"evil=1"),
    ],
)
async def test_a_response_header_that_would_split_the_response_gets_500(
    header: tuple[bytes, bytes],
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, b"hello", headers=[header])

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            reply = await reader.read()  # closed after the 500
        assert reply.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert b"evil" not in reply and b"hello" not in reply
        writer.close()


async def test_a_header_value_with_a_tab_is_sent() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, b"ok", headers=[(b"x-a", b"one\ttwo")])

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK" and headers[b"x-a"] == b"one\ttwo" and body == b"ok"
        writer.close()


async def test_an_app_failing_before_its_answer_gives_500_and_after_it_a_cut_connection() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/late":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"10")],
                }
            )
            await send({"type": "http.response.body", "body": b"12345", "more_body": True})
        raise RuntimeError("boom")

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 500 ")
        writer.close()
        reader, writer = await connect(server)
        writer.write(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            reply = await reader.read()  # EOF after 5 of the 10 bytes promised
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\n12345")
        writer.close()


async def test_a_body_shorter_than_its_content_length_never_looks_complete() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
        )
        await send({"type": "http.response.body", "body": b"12345"})

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            reply = await reader.read()
        assert reply.count(b"HTTP/1.1") == 1 and reply.endswith(b"12345")
        writer.close()


async def test_100_continue_is_sent_when_the_app_reads_the_body_and_only_then() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/read":
            await answer(send, await read_body(receive))
        else:
            await answer(send, b"not wanted", status=413, headers=[(b"connection", b"close")])

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(
            b"POST /read HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"data")
        assert (await read_response(reader))[2] == b"data"
        writer.close()

        reader, writer = await connect(server)
        writer.write(
            b"POST /no HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        async with asyncio.timeout(5):
            reply = await reader.read()
        assert reply.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in reply
        writer.close()


async def test_a_body_the_app_does_not_read_yet_is_not_read_from_the_client_either() -> None:
    held: list[int] = []
    go = asyncio.Event()
    size = 32 * 1024 * 1024

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await go.wait()
        held.append(receive.__self__.held)  # what the server had taken in meanwhile
        body = await read_body(receive)
        await answer(send, b"%d" % len(body))

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        with pytest.raises(TimeoutError):  # the client cannot send it all: reading paused
            async with asyncio.timeout(0.5):
                await writer.drain()
        go.set()
        await writer.drain()
        assert (await read_response(reader))[2] == b"%d" % size
        assert held[0] <= HIGH_WATER + 256 * 1024  # one read past the mark at most
        writer.close()


async def test_a_client_that_leaves_mid_request_is_seen_by_the_app() -> None:
    seen: list[str] = []
    done = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (message := await receive())["type"] == "http.request":
            pass
        seen.append(message["type"])
        done.set()

    async with serving(app) as server:
        reader, writer = await connect(server)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()
        async with asyncio.timeout(5):
            await done.wait()
        assert seen == ["http.disconnect"]


async def test_draining_closes_idle_connections_and_lets_busy_ones_finish() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/busy":
            started.set()
            await release.wait()
        await answer(send, scope["path"].encode())

    async with serving(app, grace=5) as server:
        idle_reader, idle_writer = await connect(server)
        idle_writer.write(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(idle_reader))[2] == b"/idle"
        reader, writer = await connect(server)
        writer.write(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await started.wait()
        server.should_exit = True
        async with asyncio.timeout(2):
            assert await idle_reader.read() == b""  # the idle connection is closed at once
        release.set()
        status, headers, body = await read_response(reader)
        assert body == b"/busy" and headers[b"connection"] == b"close"
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        writer.close()
        idle_writer.close()


async def test_past_the_grace_a_request_still_running_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = asyncio.get_running_loop()
    async with serving(app, grace=0.3) as server:
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        began = loop.time()
        server.should_exit = True
        async with asyncio.timeout(3):
            await cancelled.wait()
            await reader.read()  # the connection ends too
        assert 0.25 <= loop.time() - began < 2.0
        writer.close()


async def test_many_connections_answered_in_the_same_turns_each_get_their_own_answers() -> None:
    """Small answers leave through the loop's outbox, several per turn: none may reach
    another connection, be lost or overtake the one before it."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, scope["raw_path"] + b"?" + scope["query_string"])

    async with serving(app) as server:
        clients = [await connect(server) for _ in range(20)]
        for n, (_, writer) in enumerate(clients):
            writer.write(
                b"".join(b"GET /c%d?r=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (n, r) for r in range(5))
            )
        for n, (reader, writer) in enumerate(clients):
            got = [(await read_response(reader))[2] for _ in range(5)]
            assert got == [b"/c%d?r=%d" % (n, r) for r in range(5)]
            writer.close()


async def _garbage_after(server: MainServer, requests: int) -> Counter[str]:
    """The objects that only the cycle collector could free after `requests` requests."""
    reader, writer = await connect(server)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for n in range(requests):
            writer.write(b"GET /api/x%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
            status, _, _ = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK"
        await asyncio.sleep(0.01)  # the requests' tasks end after their answers
        gc.collect()
        return Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        writer.close()


async def test_a_request_through_the_whole_proxy_leaves_no_reference_cycle(
    tmp_path: Path,
) -> None:
    """A request freed by reference counting costs the cycle collector nothing; one cycle
    per request (a task kept by its own request, a handle by its callback's owner) made
    the collector ~5% of the proxy's CPU under load."""

    async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, b"from the backend")

    async with serving(backend) as origin:
        config = load_text(
            f"""
version: 1
legacy: monolith
backends:
  monolith: {{url: "http://127.0.0.1:{origin.port}"}}
  orders: {{url: "http://127.0.0.1:{origin.port}"}}
routes:
  - name: api
    match: {{prefix: /api}}
    split: {{orders: 50, monolith: 50}}
    sticky: {{cookie: uid}}
    retry: {{attempts: 2}}
    bulkhead: {{max_concurrent: 10}}
""",
            "cycles.yaml",
        )
        holder = Holder(build(config, None, Metrics(CollectorRegistry())))
        sink = LogSink(io.StringIO())
        try:
            async with serving(ProxyApp(holder, AccessLog(sink))) as proxy:
                garbage = await _garbage_after(proxy, 50)
        finally:
            sink.close()
    ours = {name: n for name, n in garbage.items() if n >= 50}
    assert not ours, f"left in cycles, per request: {ours}"


async def test_a_second_server_on_the_loop_keeps_the_main_port_s_busy_polling() -> None:
    """The admin port's server shares the main port's loop (one process): starting it
    after or before the main port's must not turn busy polling off."""
    loop = asyncio.get_running_loop()
    box = outbox(loop)
    saved = box.busy_poll
    try:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        main = MainServer(echo, Limits(), 1.0, busy_poll=0.0002)
        task = asyncio.ensure_future(main.serve([sock]))
        async with serving(echo):  # another server, busy_poll left at 0, started after
            async with asyncio.timeout(5):
                while not main.started:
                    await asyncio.sleep(0.005)
            assert box.busy_poll == 0.0002
        main.should_exit = True
        await task
    finally:
        box.busy_poll = saved
