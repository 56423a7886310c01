"""Bare ASGI apps for bench/floors.py: what uvicorn alone and uvicorn + aiohttp alone cost.

uvicorn bench.floor_apps:local     answers 1 KiB itself (the server's floor)
uvicorn bench.floor_apps:forward   relays GETs to $FLOOR_ORIGIN with one aiohttp session
                                   (the floor of today's client, as in DESIGN.md)
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

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
