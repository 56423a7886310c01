"""Bare ASGI apps for bench/floors.py: what a server alone, and a server with a client, cost
(on uvicorn, or on strangler's own server through bench/floor_server.py).

uvicorn bench.floor_apps:local     answers 1 KiB itself (the server's floor)
uvicorn bench.floor_apps:forward   relays GETs to $FLOOR_ORIGIN with one aiohttp session
                                   (the floor of the client strangler had first, DESIGN.md)
uvicorn bench.floor_apps:pooled    relays GETs to $FLOOR_ORIGIN through proxy.pool, strangler's
                                   own client (its floor: no pipeline, log or metrics)
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from proxy.forward import Timeouts, Upstream

BODY = b"x" * 1024
_sessions: list[aiohttp.ClientSession] = []


async def local(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"1024")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def _session() -> aiohttp.ClientSession:
    if not _sessions:
        _sessions.append(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        )
    return _sessions[0]


async def forward(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    url = os.environ["FLOOR_ORIGIN"] + scope["path"]
    async with _session().get(url) as resp:
        body = await resp.read()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


_upstreams: list[Upstream] = []
_TIMEOUTS = Timeouts(connect=1.0, read=10.0, total=30.0)


async def pooled(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if not _upstreams:
        _upstreams.append(Upstream("origin", os.environ["FLOOR_ORIGIN"], max_connections=100))
    upstream = _upstreams[0]
    headers = [(b"host", upstream.host_header or b"")]
    resp = await upstream.send("GET", scope["path"], headers, None, _TIMEOUTS)
    try:
        body = await resp.read(1 << 20)
    finally:
        resp.close()
    out = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": resp.status, "headers": out})
    await send({"type": "http.response.body", "body": body})
