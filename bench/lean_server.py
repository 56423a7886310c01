"""A lean main-port server, for measurement only: how much of strangler's time is uvicorn's.

    python bench/lean_server.py run -c CONFIG --port P --admin-port A ...   (as `strangler run`)
    LEAN_BARE=1 python bench/lean_server.py run ...   (no pipeline: relays through proxy.pool)

`strangler run` with its main port served by `LeanProtocol` instead of uvicorn: one asyncio
Protocol per client connection on httptools, the ASGI messages strangler's pipeline sends
(`http.response.start`, `http.response.body`), the response head written with the first
piece of the body in one write. It has none of the hardening of proxy/protocol.py (limits,
head deadline, refusals, trailers), no WebSocket and no pipelining, so its numbers are the
bound of what a server of our own could give, not a replacement. The admin port stays on
uvicorn. See bench/PROFILE.md.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy import server  # noqa: E402
from proxy.app import ProxyApp  # noqa: E402
from proxy.forward import Timeouts  # noqa: E402

_REASONS = {200: b"OK", 204: b"No Content", 304: b"Not Modified", 404: b"Not Found"}


class LeanProtocol(asyncio.Protocol):
    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.head: bytes | None = None
        self.chunked = False
        self.keep_alive = True
        self.peer: tuple[str, int] = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")[:2]

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        self._wake()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.complete = b"", [], [], False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()  # one request at a time on a connection
        path, _, query = self.url.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": self.parser.get_http_version(),
            "method": self.parser.get_method().decode("ascii"),
            "scheme": "http",
            "path": path.decode("latin-1"),
            "raw_path": path,
            "query_string": query,
            "headers": self.headers,
            "client": self.peer,
            "server": None,
        }
        self.keep_alive = self.parser.should_keep_alive()
        self.loop.create_task(self._run(scope))
        self.transport.resume_reading()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self.receive, self.send)
        except Exception:
            if self.transport is not None:
                self.transport.close()

    async def receive(self) -> dict[str, Any]:
        while True:
            if self.disconnected:
                return {"type": "http.disconnect"}
            if self.body or self.complete:
                body = b"".join(self.body)
                self.body = []
                more = not self.complete
                if not more:
                    self.complete = False  # later calls wait for a disconnect
                    self.body = []
                    return {"type": "http.request", "body": body, "more_body": False}
                if body:
                    return {"type": "http.request", "body": body, "more_body": True}
            self.waiter = self.loop.create_future()
            await self.waiter

    async def send(self, message: dict[str, Any]) -> None:
        transport = self.transport
        assert transport is not None
        if message["type"] == "http.response.start":
            status = message["status"]
            lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"-"))]
            self.chunked = True
            for name, value in message["headers"]:
                if name.lower() == b"content-length":
                    self.chunked = False
                lines.append(b"%s: %s\r\n" % (name, value))
            if self.chunked:
                lines.append(b"transfer-encoding: chunked\r\n")
            lines.append(b"\r\n")
            self.head = b"".join(lines)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = [self.head] if self.head is not None else []
        self.head = None
        if self.chunked:
            if body:
                out += [b"%x\r\n" % len(body), body, b"\r\n"]
            if not more:
                out.append(b"0\r\n\r\n")
        elif body:
            out.append(body)
        if out and not self.disconnected:
            transport.writelines(out)
        if not more and not self.keep_alive:
            transport.close()


_TIMEOUTS = Timeouts(connect=1.0, read=10.0, total=30.0)


async def bare(app: ProxyApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """No pipeline: the request relayed to the config's legacy backend through proxy.pool."""
    rt = app.holder.current
    upstream = rt.upstreams[rt.legacy]
    headers = [(b"host", upstream.host_header or b"")]
    resp = await upstream.send("GET", scope["path"], headers, None, _TIMEOUTS)
    try:
        body = await resp.read(1 << 20)
    finally:
        resp.close()
    out = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": resp.status, "headers": out})
    await send({"type": "http.response.body", "body": body})


class LeanServer:
    """What server.DataPlane uses of uvicorn's Server, for the main port only."""

    def __init__(self, config: Any) -> None:
        self.app = config.app
        self.started = False
        self.should_exit = False
        self.force_exit = False

    async def serve(self, sockets: list[Any]) -> None:
        app: Any = self.app
        if os.environ.get("LEAN_BARE"):
            proxy_app = app

            async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
                await bare(proxy_app, scope, receive, send)

        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: LeanProtocol(app), sock=sockets[0])
        self.started = True
        while not self.should_exit:
            await asyncio.sleep(0.1)
        srv.close()


_uvicorn_server = server._Server


def _server(config: Any) -> Any:
    if isinstance(config.app, ProxyApp):
        return LeanServer(config)
    return _uvicorn_server(config)


if __name__ == "__main__":
    server._Server = _server  # type: ignore[assignment,misc]
    sys.argv = ["proxy", *sys.argv[1:]]
    runpy.run_module("proxy", run_name="__main__", alter_sys=True)
