"""SPEC §7 WebSocket upgrades through the real process: routed like any request, relayed
frame by frame both ways, subprotocols negotiated, close codes and reasons passed on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from proxy.split import Split, bucket_of
from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, config, wait_until


def ws_url(proxy: ProxyProcess, path: str) -> str:
    return proxy.url.replace("http://", "ws://") + path


def test_echo_text_and_binary_both_ways(proxy: ProxyProcess, b: Backends) -> None:
    with connect(ws_url(proxy, "/api/orders/ws?x=1"), open_timeout=10) as ws:
        for n in range(5):
            ws.send(f"hello {n}")
            assert ws.recv(timeout=5) == f"orders: hello {n}"
        ws.send(b"\x00\x01\x02\xff")
        assert ws.recv(timeout=5) == b"\xff\x02\x01\x00"
        big = bytes(range(256)) * 4096  # 1 MiB in one frame
        ws.send(big)
        assert ws.recv(timeout=10) == big[::-1]
        ws.send("é ünïcode ✓")
        assert ws.recv(timeout=5) == "orders: é ünïcode ✓"
    assert b.orders.hits["ws:/api/orders/ws"] == 1
    assert b.monolith.hits["ws:/api/orders/ws"] == 0


def test_subprotocol_is_negotiated(proxy: ProxyProcess, b: Backends) -> None:
    with connect(
        ws_url(proxy, "/api/orders/chat"), subprotocols=["chat.v2", "chat.v1"], open_timeout=10
    ) as ws:
        assert ws.subprotocol == "chat.v2"  # the backend picks the first it is offered
        ws.send("hi")
        assert ws.recv(timeout=5) == "orders: hi"
    with connect(ws_url(proxy, "/api/orders/chat"), open_timeout=10) as ws:
        assert ws.subprotocol is None


def test_strip_prefix_applies_to_websockets(proxy: ProxyProcess, b: Backends) -> None:
    with connect(ws_url(proxy, "/svc/orders/live"), open_timeout=10) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "orders: x"
    assert b.orders.hits["ws:/orders/live"] == 1
    assert b.orders.hits["ws:/svc/orders/live"] == 0


def test_unrouted_websocket_goes_to_legacy(proxy: ProxyProcess, b: Backends) -> None:
    with connect(ws_url(proxy, "/socket"), open_timeout=10) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "monolith: x"


def test_client_close_code_reaches_the_backend(proxy: ProxyProcess, b: Backends) -> None:
    with connect(ws_url(proxy, "/api/orders/close-me"), open_timeout=10) as ws:
        ws.send("ping")
        assert ws.recv(timeout=5) == "orders: ping"
        ws.close(code=4001, reason="client leaves")
    assert wait_until(lambda: "ws:4001" in b.orders.disconnects, 5), b.orders.disconnects


def test_backend_close_code_and_reason_reach_the_client(proxy: ProxyProcess, b: Backends) -> None:
    with connect(ws_url(proxy, "/api/orders/closing"), open_timeout=10) as ws:
        ws.send("close 4002")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4002
    assert closed.value.rcvd.reason == "asked to"


def test_websocket_to_a_dead_backend_is_refused_before_the_upgrade(
    proxy: ProxyProcess, b: Backends
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(proxy, "/dead/ws"), open_timeout=10)
    response = refused.value.response
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/problem+json")
    assert b'"route": "dead"' in response.body or b'"route":"dead"' in response.body
    entry = proxy.wait_access(lambda e: e["path"] == "/dead/ws")
    assert entry["status"] == 502 and entry["backend"] == "dead"


OWN_ROUTES = """routes:
  - name: hang
    match: {prefix: /hang}
    backend: blackhole
    timeout: {connect: 0.5, read: 1}
  - name: sticky
    match: {prefix: /sticky}
    split: {monolith: 50, orders: 50}
    sticky: {cookie: sid}
"""


@pytest.fixture(scope="module")
def own(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy of this module's own: a backend that never answers, a sticky cookie route."""
    urls = {
        "monolith": backends.monolith_url,
        "orders": backends.orders_url,
        "blackhole": f"http://127.0.0.1:{backends.blackhole_port}",
    }
    with ProxyProcess(config(urls, OWN_ROUTES), tmp_path_factory.mktemp("ws")) as p:
        yield p


def test_websocket_to_a_backend_that_never_answers_times_out(own: ProxyProcess) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(own, "/hang/ws"), open_timeout=20)
    took = time.monotonic() - started
    assert refused.value.response.status_code == 504
    assert took < 10, took


def test_websocket_on_a_sticky_cookie_route(own: ProxyProcess) -> None:
    weights = {"monolith": 50, "orders": 50}
    with connect(ws_url(own, "/sticky/ws"), open_timeout=10) as ws:
        assert ws.response is not None
        set_cookie = ws.response.headers["Set-Cookie"]
        ws.send("who")
        first = str(ws.recv(timeout=5)).split(":")[0]
    key = set_cookie.split(";")[0].removeprefix("sid=")
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert first == Split.of(weights, "monolith").backend_for(bucket_of("sticky", key))
    for _ in range(5):
        with connect(
            ws_url(own, "/sticky/ws"), additional_headers={"Cookie": f"sid={key}"}, open_timeout=10
        ) as ws:
            assert ws.response is not None and "Set-Cookie" not in ws.response.headers
            ws.send("who")
            assert str(ws.recv(timeout=5)).split(":")[0] == first


def test_access_log_line_for_a_websocket(proxy: ProxyProcess, b: Backends) -> None:
    with connect(
        ws_url(proxy, "/svc/orders/logged?a=1"),
        additional_headers={"X-Request-ID": "ws-log-test-1"},
        open_timeout=10,
    ) as ws:
        ws.send("x")
        ws.recv(timeout=5)
        assert ws.response is not None
        assert ws.response.headers["X-Request-ID"] == "ws-log-test-1"
    entry = proxy.wait_access(lambda e: e["request_id"] == "ws-log-test-1")
    assert entry["status"] == 101
    assert entry["route"] == "svc" and entry["backend"] == "orders"
    assert entry["method"] == "GET"
    assert entry["path"].startswith("/svc/orders/logged")
    assert entry["duration_ms"] >= 0
