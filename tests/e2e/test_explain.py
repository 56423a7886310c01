"""SPEC §1 `strangler explain` and §4 `GET /api/explain` through the real command and
process: what they say, in text and JSON, and that it is what the proxy then does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.explain import explain
from proxy.loader import load
from proxy.metrics import Metrics
from proxy.runtime import build
from proxy.split import Split, bucket_of
from tests.e2e.conftest import Backends
from tests.e2e.harness import ROOT, ProxyProcess

ROUTES = """
routes:
  - name: orders
    match: {prefix: /api/orders}
    rewrite: {strip_prefix: /api}
    split: {orders: 30, monolith: 70}
    sticky: {header: X-User-Id}
    fallback: monolith
    timeout: {read: 5}
    retry: {attempts: 3}
    breaker: {failure_threshold: 3}
    bulkhead: {max_concurrent: 20}
    max_body: 1MiB
  - name: orders-beta
    match: {prefix: /api/orders, headers: {X-Beta: "1"}}
    backend: orders
  - name: order-7-delete
    match: {prefix: /api/orders/7, methods: [DELETE]}
    backend: monolith
  - name: carts
    match: {prefix: /carts}
    split: {orders: 50, monolith: 50}
    sticky: {cookie: cart}
"""

WEIGHTS = {"orders": 30, "monolith": 70}


def make_config(b: Backends) -> str:
    return f"""version: 1
legacy: monolith
backends:
  monolith: {{url: "{b.monolith_url}"}}
  orders: {{url: "{b.orders_url}"}}
{ROUTES}"""


@pytest.fixture(scope="module")
def proxy(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir: Path = tmp_path_factory.mktemp("explain")
    with ProxyProcess(make_config(backends), workdir) as p:
        yield p


def strangler(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=os.environ.copy(),
    )


def cli_explain(p: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return strangler("explain", "-c", str(p.config_path), *args)


def admin_explain(p: ProxyProcess, url: str, *headers: str, method: str = "GET") -> Any:
    params = [("method", method), ("url", url), *(("header", h) for h in headers)]
    reply = httpx.get(p.admin + "/api/explain", params=params, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_text_output_says_what_and_why(proxy: ProxyProcess, backends: Backends) -> None:
    done = cli_explain(proxy, "GET", "/api/orders/7?b=2&a=1", "-H", "X-User-Id: 42")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    bucket = bucket_of("orders", "42")
    backend = Split.of(WEIGHTS, "monolith").backend_for(bucket)
    origin = backends.orders_url if backend == "orders" else backends.monolith_url
    lines = out.splitlines()

    def line(label: str) -> str:
        found = [x for x in lines if x.startswith(label)]
        assert found, f"no {label!r} line in:\n{out}"
        return found[0]

    assert "orders" in line("route:") and "prefix /api/orders" in line("route:")
    assert backend in line("backend:") and "sticky header X-User-Id" in line("backend:")
    assert str(bucket) in line("bucket:")
    assert "42" in line("sticky key:")
    assert "orders 30%" in line("split:") and "monolith 70%" in line("split:")
    assert line("upstream URL:").split()[-1] == f"{origin}/orders/7?b=2&a=1"
    # the routes with a longer or equal prefix that were tried first, and why they lost
    assert "order-7-delete" in out and "method GET is not one of DELETE" in out
    assert "orders-beta" in out and "x-beta" in out.lower()
    policies = line("policies:")
    for fact in ("3 attempts", "breaker at 3 failures", "bulkhead 20", "fallback monolith"):
        assert fact in policies, policies
    assert "5.0" in policies  # the route's read timeout, merged over the defaults


def test_json_output(proxy: ProxyProcess) -> None:
    done = cli_explain(proxy, "GET", "/api/orders/7", "-H", "X-User-Id: 42", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert {"route", "backend", "bucket", "sticky_key", "reason", "upstream_url"} <= set(answer)
    assert answer["route"] == "orders"
    assert answer["sticky_key"] == "42"
    assert answer["bucket"] == bucket_of("orders", "42")
    assert answer["backend"] == Split.of(WEIGHTS, "monolith").backend_for(answer["bucket"])
    assert answer["upstream_url"].endswith("/orders/7")
    assert [x["route"] for x in answer["lost"]] == ["order-7-delete", "orders-beta"]


def test_json_output_for_conditions_and_the_default_route(proxy: ProxyProcess) -> None:
    beta = json.loads(
        cli_explain(proxy, "GET", "/api/orders/1", "-H", "X-Beta: 1", "--json").stdout
    )
    assert (beta["route"], beta["backend"], beta["bucket"]) == ("orders-beta", "orders", None)
    delete = json.loads(cli_explain(proxy, "delete", "/api/orders/7/x", "--json").stdout)
    assert (delete["route"], delete["backend"]) == ("order-7-delete", "monolith")
    other = json.loads(cli_explain(proxy, "GET", "/elsewhere?q=1", "--json").stdout)
    assert (other["route"], other["backend"]) == ("default", "monolith")
    assert other["upstream_url"].endswith("/elsewhere?q=1")
    assert "legacy" in other["reason"] or "legacy" in str(other.get("matched"))


def test_admin_api_gives_the_cli_answer(proxy: ProxyProcess) -> None:
    for key in ("42", "alice", "7", "zed"):
        done = cli_explain(proxy, "GET", "/api/orders/7", "-H", f"X-User-Id: {key}", "--json")
        cli = json.loads(done.stdout)
        api = admin_explain(proxy, "/api/orders/7", f"X-User-Id:{key}")
        for field in ("route", "backend", "bucket", "sticky_key", "reason", "upstream_url"):
            assert api[field] == cli[field], field


def test_admin_api_refuses_bad_questions(proxy: ProxyProcess) -> None:
    assert httpx.get(proxy.admin + "/api/explain", timeout=10).status_code == 400
    bad_header = httpx.get(
        proxy.admin + "/api/explain", params={"url": "/x", "header": "nocolon"}, timeout=10
    )
    assert bad_header.status_code == 400
    above_root = httpx.get(proxy.admin + "/api/explain", params={"url": "/../x"}, timeout=10)
    assert above_root.status_code == 400


def test_explain_agrees_with_the_proxy_for_200_keys(
    proxy: ProxyProcess, backends: Backends
) -> None:
    # the CLI's code, in this process, from the same file: the CLI would say the same
    runtime = build(load(proxy.config_path), None, Metrics())
    got: Counter[str] = Counter()
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for n in range(200):
            key = f"user-{n}"
            said = admin_explain(proxy, "/api/orders/7?x=1", f"X-User-Id:{key}")
            local = explain(runtime, "GET", "/api/orders/7?x=1", [("X-User-Id", key)])
            assert (local["backend"], local["bucket"]) == (said["backend"], said["bucket"])
            reply = client.get("/api/orders/7?x=1", headers={"X-User-Id": key})
            served = reply.json()
            assert served["served_by"] == said["backend"], key
            assert said["upstream_url"].endswith(served["raw_path"] + "?x=1")
            got[said["backend"]] += 1
    assert set(got) == {"orders", "monolith"}


def test_explain_of_a_cookie_route(proxy: ProxyProcess) -> None:
    sent = admin_explain(proxy, "/carts/1", "Cookie: a=1; cart=abc")
    assert sent["sticky_key"] == "abc" and sent["bucket"] == bucket_of("carts", "abc")
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        reply = client.get("/carts/1", headers={"Cookie": "a=1; cart=abc"})
        assert reply.json()["served_by"] == sent["backend"]
    fresh = admin_explain(proxy, "/carts/1")
    assert fresh["sticky_key"] and "new sticky key" in fresh["reason"]
    assert fresh["bucket"] == bucket_of("carts", fresh["sticky_key"])


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nlegacy: monolith\nbackends:\n  monolith: {url: 'http://127.0.0.1:1'}\n"
        "routes:\n  - name: a\n    match: {prefix: /a}\n    split: {monolith: 50}\n"
    )
    done = strangler("explain", "-c", str(bad), "GET", "/a")
    assert done.returncode == 2
    assert done.stdout == ""
    assert str(bad) in done.stderr
    missing = strangler("explain", "-c", str(tmp_path / "nope.yaml"), "GET", "/a")
    assert missing.returncode == 2
