"""WebSocket upgrades (SPEC §7): routed like any request, then relayed frame by frame both
ways until one side closes; close codes and reasons pass through."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from proxy.errors import ProxyError, UpstreamConnectError, UpstreamTimeout, problem
from proxy.headers import upstream_request_headers, with_host
from proxy.logs import AccessLog
from proxy.outcome import Outcome
from proxy.request import Request, Send
from proxy.routing import host_of, normalize, strip_prefix
from proxy.runtime import Runtime

if TYPE_CHECKING:
    import aiohttp

# Negotiated by each hop on its own; the upstream client sets its own.
_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)


async def handle(
    rt: Runtime, scope: dict[str, Any], receive: Any, send: Send, log: AccessLog
) -> None:
    req = Request({**scope, "method": "GET"}, receive, rt.trusted)
    o = Outcome(req.request_id, "GET", req.raw_path.decode("latin-1"), req.started)
    o.client_ip = req.peer
    try:
        await _relay(rt, req, scope, receive, send, o)
    except ProxyError as err:
        o.status, o.error = err.status, err.detail
        await _refuse(scope, send, err, o)
    finally:
        o.duration = time.monotonic() - req.started
        rt.metrics.record(o)
        log.log(o)


async def _relay(
    rt: Runtime, req: Request, scope: dict[str, Any], receive: Any, send: Send, o: Outcome
) -> None:
    path = normalize(req.raw_path)
    state = rt.router.match(path, "GET", host_of(req.host), req.header)
    o.route = state.name
    if state.strip_prefix:
        path = strip_prefix(path, state.strip_prefix)
    choice = state.chooser.choose(state.split, req)
    o.backend = choice.backend
    upstream = rt.upstreams[choice.backend]
    headers = upstream_request_headers(
        [(k, v) for k, v in req.headers if k not in _HANDSHAKE],
        peer=req.peer,
        scheme="https" if scope.get("scheme") == "wss" else "http",
        peer_is_trusted=req.peer_is_trusted,
        request_id=req.request_id,
    )
    headers = with_host(headers, upstream.host_header, req.header_bytes(b"host"))
    import aiohttp  # only a WebSocket needs it: not imported by a proxy that sees none
    from yarl import URL

    url = URL(
        upstream.origin.replace("http", "ws", 1) + upstream.target(path, req.query), encoded=True
    )
    session = upstream.ws_session()
    # A reload that retires this backend's pool closes it once `users` is 0: a WebSocket
    # uses the pool for as long as it is open, so it counts as a user until it ends.
    upstream.acquire()
    try:
        t = state.timeouts
        try:
            # The handshake runs under the session's timeout, which has no limits: bound it
            # here, or a backend that never answers holds the client forever.
            async with asyncio.timeout(min(t.total, t.connect + t.read)):
                ws = await session.ws_connect(
                    url,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                    protocols=tuple(scope.get("subprotocols") or ()),
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=t.read),
                    autoping=True,
                    max_msg_size=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise _HandshakeRefused(exc.status) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"{choice.backend} did not complete the WebSocket handshake in time"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(
                f"cannot open a WebSocket to {choice.backend}: {exc}"
            ) from exc
        async with ws:
            accept_headers = [(b"x-request-id", req.request_id.encode())]
            if choice.set_cookie is not None:  # a new sticky key: the later requests agree
                accept_headers.append((b"set-cookie", choice.set_cookie))
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": ws.protocol,
                    "headers": accept_headers,
                }
            )
            o.status = 101
            await _pump(ws, receive, send)
    finally:
        upstream.release()


class _HandshakeRefused(ProxyError):
    status = 502
    title = "Backend refused the WebSocket"

    def __init__(self, upstream_status: int) -> None:
        super().__init__(f"the backend answered the upgrade with {upstream_status}")
        if 400 <= upstream_status < 600:
            self.status = upstream_status


async def _pump(ws: aiohttp.ClientWebSocketResponse, receive: Any, send: Send) -> None:
    import aiohttp

    to_upstream = asyncio.ensure_future(_client_to_upstream(ws, receive))
    try:
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
            else:
                break
        if msg.type == aiohttp.WSMsgType.CLOSING:
            # The client went away and `_client_to_upstream` is closing the backend's side
            # with the client's code: let that close handshake finish (it is bounded by
            # ws_close), never cancel it half way, or the backend sees 1000/1006 instead.
            await asyncio.wait({to_upstream})
            return
        if not to_upstream.done():
            code, reason = 1011, ""
            if msg.type == aiohttp.WSMsgType.CLOSE:
                code, reason = _sendable(msg.data or 1000, abnormal=1011), msg.extra or ""
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code, "reason": reason})
    finally:
        if not to_upstream.done():
            to_upstream.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await to_upstream


async def _client_to_upstream(ws: aiohttp.ClientWebSocketResponse, receive: Any) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            if message.get("text") is not None:
                await ws.send_str(message["text"])
            elif message.get("bytes") is not None:
                await ws.send_bytes(message["bytes"])
        elif kind == "websocket.disconnect":
            reason = (message.get("reason") or "").encode()
            code = _sendable(message.get("code") or 1000, abnormal=1001)
            await ws.close(code=code, message=reason)
            return


def _sendable(code: int, *, abnormal: int) -> int:
    """A close code as it may go on the wire (RFC 6455 §7.4): 1005 (no code was given)
    becomes 1000; 1006 and 1015 (the connection dropped, TLS failed), which are never
    sent, and codes outside the registered ranges become `abnormal`."""
    if code == 1005:
        return 1000
    if 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999:
        return code
    return abnormal


async def _refuse(scope: dict[str, Any], send: Send, err: ProxyError, o: Outcome) -> None:
    """Before the upgrade: an HTTP answer where the server lets us, else a close."""
    if "websocket.http.response" in scope.get("extensions", {}):
        status, headers, body = problem(err, route=o.route, request_id=o.request_id)
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011})
