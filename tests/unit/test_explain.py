"""proxy.explain (SPEC §1, §4): what it says about a request, and that it is what the request
path does with the same request."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from proxy import pipeline
from proxy.explain import explain, render
from proxy.loader import load_text
from proxy.metrics import Metrics
from proxy.request import Request
from proxy.runtime import Runtime, build
from proxy.split import Split, bucket_of

CONFIG = """\
version: 1
legacy: monolith
trusted_proxies: [10.0.0.0/8]
backends:
  monolith: {url: "http://127.0.0.1:8001"}
  orders: {url: "http://127.0.0.1:8002/base"}
  payments: {url: "http://127.0.0.1:8003"}
routes:
  - name: orders
    match: {prefix: /api/orders}
    rewrite: {strip_prefix: /api}
    split: {orders: 30, payments: 20, monolith: 50}
    sticky: {header: X-User-Id}
    fallback: monolith
    shadow: {backend: payments, percent: 10, compare: true, ignore: [$.at]}
    timeout: {read: 5}
    retry: {attempts: 3}
  - name: orders-beta
    match: {prefix: /api/orders, headers: {X-Beta: "1"}}
    backend: orders
  - name: order-delete
    match: {prefix: /api/orders/7, methods: [DELETE]}
    backend: monolith
  - name: carts
    match: {prefix: /carts}
    split: {orders: 50, monolith: 50}
    sticky: {cookie: cart}
  - name: by-ip
    match: {prefix: /ip}
    split: {orders: 50, monolith: 50}
    sticky: {client_ip: true}
  - name: hosted
    match: {prefix: /shop, host: shop.example.com}
    backend: orders
  - name: weighted
    match: {prefix: /w}
    split: {orders: 40, monolith: 60}
"""

ORDERS = {"orders": 30, "payments": 20, "monolith": 50}


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return build(load_text(CONFIG, "explain.yaml"), None, Metrics())


def request_path(
    rt: Runtime,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    *,
    peer: str = "127.0.0.1",
) -> tuple[str, str, int | None, str | None]:
    """What the request path itself picks for the request: route, backend, bucket, key."""
    path, _, query = target.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": (peer, 40000),
        "scheme": "http",
        "http_version": "1.1",
    }
    req = Request(scope, None, rt.trusted)
    state, _ = pipeline._match(rt, req)
    choice = state.chooser.choose(state.split, req)
    return state.name, choice.backend, choice.bucket, choice.sticky_key


def test_sticky_header_answer(rt: Runtime) -> None:
    answer = explain(rt, "GET", "/api/orders/7?b=2&a=%2F", [("X-User-Id", "42")])
    bucket = bucket_of("orders", "42")
    assert answer["route"] == "orders"
    assert answer["sticky_key"] == "42"
    assert answer["bucket"] == bucket
    assert answer["backend"] == Split.of(ORDERS, "monolith").backend_for(bucket)
    assert answer["reason"] == "sticky header X-User-Id"
    origin = {
        "orders": "http://127.0.0.1:8002/base",
        "payments": "http://127.0.0.1:8003",
        "monolith": "http://127.0.0.1:8001",
    }[answer["backend"]]
    assert answer["upstream_url"] == origin + "/orders/7?b=2&a=%2F"
    assert answer["matched"] == "prefix /api/orders"
    assert answer["lost"] == [
        {"route": "order-delete", "why": "method GET is not one of DELETE"},
        {"route": "orders-beta", "why": "no x-beta header"},
    ]
    assert answer["split"] == ORDERS and answer["override"] is False
    json.dumps(answer)  # the admin API and --json print it as is


def test_policies_in_force(rt: Runtime) -> None:
    p = explain(rt, "GET", "/api/orders/1", [])["policies"]
    assert p["timeout"] == {"connect": 1.0, "read": 5.0, "total": 60.0}
    assert p["retry"]["attempts"] == 3
    assert p["fallback"] == "monolith"
    assert p["sticky"] == "header X-User-Id"
    assert p["strip_prefix"] == "/api"
    assert p["shadow"] == {
        "backend": "payments",
        "percent": 10,
        "methods": ["GET", "HEAD", "OPTIONS"],
        "compare": True,
        "ignore": ["$.at"],
    }
    assert explain(rt, "GET", "/w", [])["policies"]["shadow"] is None


def test_every_bucket_boundary_backend_matches_the_split(rt: Runtime) -> None:
    split = Split.of(ORDERS, "monolith")
    for n in range(300):
        key = f"k{n}"
        answer = explain(rt, "GET", "/api/orders", [("X-User-Id", key)])
        assert answer["backend"] == split.backend_for(bucket_of("orders", key))


def test_conditions_and_default_route(rt: Runtime) -> None:
    beta = explain(rt, "GET", "/api/orders/1", [("X-Beta", "1")])
    assert (beta["route"], beta["backend"], beta["reason"]) == (
        "orders-beta",
        "orders",
        "only backend",
    )
    assert "header X-Beta: 1" in beta["matched"]
    delete = explain(rt, "delete", "/api/orders/7/items", [])
    assert (delete["route"], delete["backend"]) == ("order-delete", "monolith")
    assert "method in DELETE" in delete["matched"]
    other = explain(rt, "GET", "/nowhere/x?y", [])
    assert (other["route"], other["backend"], other["lost"]) == ("default", "monolith", [])
    assert "legacy" in other["matched"]
    assert other["upstream_url"] == "http://127.0.0.1:8001/nowhere/x?y"


def test_host_from_an_absolute_url_or_a_header(rt: Runtime) -> None:
    assert explain(rt, "GET", "http://shop.example.com/shop/1", [])["route"] == "hosted"
    assert explain(rt, "GET", "/shop/1", [("Host", "SHOP.example.com:8080")])["route"] == "hosted"
    lost = explain(rt, "GET", "/shop/1", [("Host", "other.example")])
    assert lost["route"] == "default"
    assert lost["lost"][0]["route"] == "hosted" and "other.example" in lost["lost"][0]["why"]


def test_path_is_normalized_and_climbing_is_refused(rt: Runtime) -> None:
    answer = explain(rt, "GET", "/x/../api/%6Frders/1", [])
    assert answer["route"] == "orders" and answer["path"] == "/api/orders/1"
    with pytest.raises(ValueError, match="400"):
        explain(rt, "GET", "/../etc", [])


def test_cookie_route(rt: Runtime) -> None:
    sent = explain(rt, "GET", "/carts/1", [("Cookie", "a=1; cart=abc; cart=zzz")])
    assert (sent["sticky_key"], sent["bucket"]) == ("abc", bucket_of("carts", "abc"))
    assert sent["reason"] == "sticky cookie cart"
    fresh = explain(rt, "GET", "/carts/1", [])
    assert fresh["reason"] == "new sticky key, cookie cart set"
    assert fresh["bucket"] == bucket_of("carts", fresh["sticky_key"])


def test_client_ip_route_believes_only_trusted_forwarders(rt: Runtime) -> None:
    direct = explain(rt, "GET", "/ip", [("X-Forwarded-For", "1.2.3.4")], client_ip="192.0.2.7")
    assert direct["sticky_key"] == "192.0.2.7"
    trusted = explain(rt, "GET", "/ip", [("X-Forwarded-For", "1.2.3.4")], client_ip="10.1.1.1")
    assert trusted["sticky_key"] == "1.2.3.4"
    assert trusted["bucket"] == bucket_of("by-ip", "1.2.3.4")


def test_override_is_shown_and_used(rt: Runtime) -> None:
    killed = rt.with_split("orders", {"orders": 0, "payments": 0, "monolith": 100})
    answer = explain(killed, "GET", "/api/orders/1", [("X-User-Id", "42")])
    assert answer["backend"] == "monolith" and answer["override"] is True
    assert "live override" in render(answer)


def test_render_has_one_fact_a_line(rt: Runtime) -> None:
    text = render(explain(rt, "GET", "/api/orders/7", [("X-User-Id", "42")]))
    labels = [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")]
    for label in ("route", "backend", "bucket", "sticky key", "split", "upstream URL"):
        assert label in labels, text
    assert "not route order-delete: method GET is not one of DELETE" in text
    assert "policies:" in text and "3 attempts" in text and "fallback monolith" in text
    assert "shadow 10% of GET/HEAD/OPTIONS to payments, compared" in text
    keyless = render(explain(rt, "GET", "/w", []))
    assert "sticky key:" not in keyless and "by weight, no sticky key" in keyless


@pytest.mark.parametrize(
    ("method", "target", "headers", "peer"),
    [
        ("GET", "/api/orders/7", [("X-User-Id", "u")], "127.0.0.1"),
        ("GET", "/api/orders/7", [("X-Beta", "1"), ("X-User-Id", "u")], "127.0.0.1"),
        ("DELETE", "/api/orders/7", [], "127.0.0.1"),
        ("GET", "/carts/9", [("Cookie", "cart=u")], "127.0.0.1"),
        ("GET", "/carts/9", [("Cookie", "x=1"), ("Cookie", 'cart="u"')], "127.0.0.1"),
        ("GET", "/ip/1", [], "192.0.2.9"),
        ("GET", "/ip/1", [("X-Forwarded-For", "u, 10.0.0.9")], "10.0.0.1"),
        ("GET", "/ip/1", [("X-Forwarded-For", "u")], "192.0.2.9"),
        ("GET", "/shop/1", [("Host", "shop.example.com")], "127.0.0.1"),
        ("GET", "/a/../api/orders", [("X-User-Id", "u")], "127.0.0.1"),
    ],
)
def test_explain_agrees_with_the_request_path(
    rt: Runtime, method: str, target: str, headers: list[tuple[str, str]], peer: str
) -> None:
    rng = random.Random(5)
    for _ in range(50):
        key = f"{rng.getrandbits(48):x}"
        sent = [(k, v.replace("u", key) if k != "Host" else v) for k, v in headers]
        said = explain(rt, method, target, sent, client_ip=peer)
        route, backend, bucket, sticky_key = request_path(rt, method, target, sent, peer=peer)
        assert said["route"] == route
        if said["reason"].startswith(("sticky", "only")):
            assert (said["backend"], said["bucket"], said["sticky_key"]) == (
                backend,
                bucket,
                sticky_key,
            )


def test_non_ascii_url_is_shown_percent_encoded(rt: Runtime) -> None:
    answer = explain(rt, "GET", "/nowhere/é?q=✓&a=%2f+b", [])
    assert answer["upstream_url"] == "http://127.0.0.1:8001/nowhere/%C3%A9?q=%E2%9C%93&a=%2f+b"
