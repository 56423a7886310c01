"""A test backend: a raw ASGI app whose paths each show one behaviour, and that records
what it received so tests can assert what reached the backend."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qs


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.hits: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.disconnects: list[str] = []
        self.events: dict[str, threading.Event] = {}
        self.fail_status: int | None = None
        self.lock = threading.Lock()

    def event(self, key: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(key, threading.Event())

    def reset(self) -> None:
        self.hits.clear()
        self.requests.clear()
        self.disconnects.clear()
        self.events.clear()
        self.fail_status = None


def _query(scope: dict[str, Any]) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}


async def read_body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


async def _json(
    send: Any, status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


def make_app(rec: Recorder) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await _websocket(rec, scope, receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        raw = scope.get("raw_path", path.encode()).decode("latin-1")
        rec.hits[path] += 1
        q = _query(scope)
        head = path.split("/")[1] if path.count("/") >= 1 else ""
        if rec.fail_status is not None and not path.startswith("/control"):
            await read_body(receive)
            await _json(send, rec.fail_status, {"served_by": rec.name, "failing": True})
            return
        handler = HANDLERS.get(head, _echo)
        await handler(rec, scope, receive, send, q, raw)

    return app


async def _echo(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    body = await read_body(receive)
    info = {
        "served_by": rec.name,
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": raw,
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "http_version": scope.get("http_version"),
    }
    rec.requests.append(info)
    await _json(send, int(q.get("status", 200)), info, [(b"x-served-by", rec.name.encode())])


async def _status(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    code = int(scope["path"].split("/")[2])
    await read_body(receive)
    rec.requests.append({"method": scope["method"], "path": scope["path"]})
    headers = [(b"x-served-by", rec.name.encode())]
    if code in (204, 304):
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    await _json(send, code, {"served_by": rec.name, "status": code}, headers)


async def _drip(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    """n chunks, `interval` seconds apart; the chunk after the first waits for `gate`."""
    n, interval = int(q.get("n", 5)), float(q.get("interval", 0.2))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    for i in range(n):
        await send(
            {"type": "http.response.body", "body": f"chunk {i}\n".encode(), "more_body": True}
        )
        if i == 0 and "gate" in q:
            gate = rec.event(q["gate"])
            for _ in range(200):
                if gate.is_set():
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(interval)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _big(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    size = int(q.get("size", 1 << 20))
    chunk = b"x" * 65536
    headers = [(b"content-type", b"application/octet-stream")]
    if q.get("length", "1") == "1":
        headers.append((b"content-length", str(size).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    sent = 0
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        await send({"type": "http.response.body", "body": piece, "more_body": True})
        sent += len(piece)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _upload(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            rec.disconnects.append(scope["path"])
            return
        chunk = message.get("body", b"")
        digest.update(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            break
    await _json(send, 200, {"served_by": rec.name, "size": size, "sha256": digest.hexdigest()})


async def _slow(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    """Answers after `delay` seconds, unless the client goes away first (then it notes it)."""
    await read_body(receive)
    delay = float(q.get("delay", 1))
    rec.event("slow-started").set()
    waiter = asyncio.ensure_future(receive())
    done, _ = await asyncio.wait({waiter}, timeout=delay)
    if done and waiter.result()["type"] == "http.disconnect":
        rec.disconnects.append(scope["path"])
        return
    waiter.cancel()
    await _json(send, 200, {"served_by": rec.name, "slept": delay})


async def _die(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    """Promises `length` bytes (small: 1000, big: 10**6, none: chunked), sends 100 and breaks
    the connection."""
    await read_body(receive)
    headers = [(b"content-type", b"text/plain")]
    promised = {"small": b"1000", "big": b"1000000"}.get(q.get("length", "small"))
    if promised:
        headers.append((b"content-length", promised))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"y" * 100, "more_body": True})
    await asyncio.sleep(0.05)
    raise RuntimeError("the backend dies mid-stream")


async def _cookies(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    await read_body(receive)
    headers = [
        (b"set-cookie", b"a=1; Path=/"),
        (b"x-order", b"first"),
        (b"set-cookie", b"b=2; Path=/"),
        (b"x-order", b"second"),
        (b"set-cookie", b"c=3; Path=/; HttpOnly"),
        (b"connection", b"x-secret-hop"),
        (b"x-secret-hop", b"must not reach the client"),
        (b"keep-alive", b"timeout=5"),
        (b"content-length", b"2"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


async def _count(
    rec: Recorder, scope: Any, receive: Any, send: Any, q: dict[str, str], raw: str
) -> None:
    body = await read_body(receive)
    rec.requests.append({"method": scope["method"], "path": scope["path"], "body": body.decode()})
    status = int(q.get("status", 200))
    await _json(send, status, {"served_by": rec.name, "hits": rec.hits[scope["path"]]})


async def _websocket(rec: Recorder, scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    assert message["type"] == "websocket.connect"
    rec.hits["ws:" + scope["path"]] += 1
    protocols = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": protocols[0] if protocols else None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            rec.disconnects.append(f"ws:{message.get('code')}")
            return
        text = message.get("text")
        if text is not None and text.startswith("close "):
            await send(
                {"type": "websocket.close", "code": int(text.split()[1]), "reason": "asked to"}
            )
            return
        if text is not None:
            await send({"type": "websocket.send", "text": f"{rec.name}: {text}"})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes", b"")[::-1]})


HANDLERS = {
    "status": _status,
    "drip": _drip,
    "big": _big,
    "upload": _upload,
    "slow": _slow,
    "die": _die,
    "cookies": _cookies,
    "count": _count,
}
