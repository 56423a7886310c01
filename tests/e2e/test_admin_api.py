"""The admin API (SPEC §8) through the real `strangler run` process: `/api/routes`, live split
overrides and reloads behind the bearer token, `/api/explain`, and an admin port that is
neither on the main port nor on any address but loopback unless configured.

One proxy with a token for the module (each test puts back what it changed), one without.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, wait_until

TOKEN_ENV = "STRANGLER_E2E_ADMIN_TOKEN"
UNSET_ENV = "STRANGLER_E2E_UNSET_TOKEN"
TOKEN = "e2e-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}

CONFIG = """version: 1
legacy: monolith
admin: {{token_env: {token_env}}}
backends:
  monolith: {{url: "{monolith}"}}
  orders: {{url: "{orders}"}}
defaults:
  retry: {{attempts: 1}}
routes:
  - name: orders
    match: {{prefix: /api/orders, methods: [GET, POST]}}
    split: {{orders: 100, monolith: 0}}
  - name: sticky
    match: {{prefix: /sticky}}
    split: {{orders: 30, monolith: 70}}
    sticky: {{header: X-User-Id}}
  - name: shadowed
    match: {{prefix: /shadowed}}
    backend: monolith
    shadow: {{backend: orders, percent: 100, compare: true}}
"""


def make_config(b: Backends, token_env: str = TOKEN_ENV) -> str:
    return CONFIG.format(token_env=token_env, monolith=b.monolith_url, orders=b.orders_url)


@pytest.fixture(scope="module")
def proxy(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("admin-api")
    with ProxyProcess(make_config(backends), workdir, env={TOKEN_ENV: TOKEN}) as p:
        yield p


class DefaultAdminHost(ProxyProcess):
    """`strangler run` without --admin-host: the admin address comes from the config."""

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--admin-host")
        return cmd[:i] + cmd[i + 2 :]


@pytest.fixture(scope="module")
def tokenless(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("admin-api-tokenless")
    p = DefaultAdminHost(make_config(backends, UNSET_ENV), workdir)
    p.env.pop(UNSET_ENV, None)
    with p:
        yield p


@pytest.fixture()
def clean(proxy: ProxyProcess) -> Iterator[ProxyProcess]:
    """The module's proxy with no override before and after the test."""
    for route in ("orders", "sticky"):
        _delete_override(proxy, route)
    yield proxy
    for route in ("orders", "sticky"):
        _delete_override(proxy, route)


def _delete_override(p: ProxyProcess, route: str) -> None:
    r = httpx.delete(f"{p.admin}/api/routes/{route}/split", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text


def routes(p: ProxyProcess) -> dict[str, Any]:
    r = httpx.get(p.admin + "/api/routes", timeout=10)
    assert r.status_code == 200
    return r.json()


def route(p: ProxyProcess, name: str) -> dict[str, Any]:
    return next(r for r in routes(p)["routes"] if r["name"] == name)


def setting(p: ProxyProcess, name: str) -> tuple[Any, ...]:
    """What a split change would change: the split, the override, the configured split."""
    view = route(p, name)
    return view["split"], view["override"], view["configured_split"]


def served(p: ProxyProcess, path: str, n: int = 20) -> Counter[str]:
    with httpx.Client(timeout=10) as client:
        return Counter(client.get(p.url + path).json()["served_by"] for _ in range(n))


def post_split(
    p: ProxyProcess, name: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{p.admin}/api/routes/{name}/split",
        content=json.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=10,
    )


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


# --- GET /api/routes ----------------------------------------------------------------------


def test_api_routes_has_what_the_page_shows(clean: ProxyProcess) -> None:
    p = clean
    assert served(p, "/api/orders/1", 10) == {"orders": 10}
    assert served(p, "/shadowed/x", 4) == {"monolith": 4}
    data = routes(p)
    assert {"routes", "migrated_share", "last_reload"} <= set(data)
    assert set(data["last_reload"]) >= {"time", "result", "errors"}
    assert data["last_reload"]["result"] == "success" and data["last_reload"]["errors"] == []
    assert 0 < data["migrated_share"] <= 1
    by_name = {r["name"]: r for r in data["routes"]}
    assert set(by_name) == {"orders", "sticky", "shadowed", "default"}
    for view in by_name.values():
        assert {"name", "match", "split", "override", "backends", "bulkhead"} <= set(view)
        assert {"in_flight", "queued", "max_concurrent"} <= set(view["bulkhead"])
        for backend in view["backends"].values():
            assert {"breaker", "rps", "error_rate", "p95_ms", "up"} <= set(backend)
            assert backend["breaker"] in ("closed", "half-open", "open")
    orders = by_name["orders"]
    assert orders["match"] == {"prefix": "/api/orders", "methods": ["GET", "POST"]}
    assert orders["split"] == {"orders": 100, "monolith": 0} and orders["override"] is None
    assert orders["backends"]["orders"]["rps"] > 0
    assert orders["backends"]["orders"]["error_rate"] == 0
    assert orders["backends"]["orders"]["p95_ms"] > 0
    assert orders["backends"]["orders"]["up"] is None  # no active health check configured
    assert orders["bulkhead"]["in_flight"] == 0 and orders["bulkhead"]["max_concurrent"] == 100
    shadow = by_name["shadowed"]["shadow"]
    assert {"match", "mismatch", "error", "recent_mismatches"} <= set(shadow)
    assert isinstance(shadow["recent_mismatches"], list)
    assert "shadow" not in orders or orders["shadow"] is None


# --- tokens ---------------------------------------------------------------------------------


def test_every_post_is_refused_with_403_when_no_token_is_configured(
    tokenless: ProxyProcess,
) -> None:
    p = tokenless
    before = setting(p, "orders")
    for headers in ({}, AUTH, {"Authorization": "Bearer x"}):
        body = assert_problem(
            post_split(p, "orders", {"orders": 0, "monolith": 100}, headers=headers), 403
        )
        assert UNSET_ENV in body["detail"]
        assert_problem(httpx.post(p.admin + "/api/reload", headers=headers, timeout=10), 403)
        assert_problem(
            httpx.delete(p.admin + "/api/routes/orders/split", headers=headers, timeout=10), 403
        )
    assert setting(p, "orders") == before
    assert served(p, "/api/orders/1", 5) == {"orders": 5}
    # Reads need no token.
    assert httpx.get(p.admin + "/api/routes", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer  {TOKEN}",
    ],
)
def test_a_missing_or_wrong_token_is_401(clean: ProxyProcess, authorization: str | None) -> None:
    p = clean
    headers = {} if authorization is None else {"Authorization": authorization}
    before = setting(p, "orders")
    body = assert_problem(
        post_split(p, "orders", {"orders": 0, "monolith": 100}, headers=headers), 401
    )
    assert TOKEN not in str(body)
    assert_problem(httpx.post(p.admin + "/api/reload", headers=headers, timeout=10), 401)
    assert setting(p, "orders") == before


def test_the_bearer_scheme_is_case_insensitive(clean: ProxyProcess) -> None:
    r = post_split(
        clean,
        "orders",
        {"orders": 0, "monolith": 100},
        headers={"Authorization": f"bearer {TOKEN}"},
    )
    assert r.status_code == 200, r.text


# --- POST /api/routes/{name}/split -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"orders": 50, "nope": 50}, "nope"),
        ({"orders": 50, "monolith": 40}, "90"),
        ({"orders": 60, "monolith": 60}, "120"),
        ({"orders": 50.5, "monolith": 49.5}, "integer"),
        ({"orders": "50", "monolith": "50"}, "integer"),
        ({"orders": True, "monolith": 99}, "integer"),
        ({"orders": -10, "monolith": 110}, "integer"),
        ({"orders": 100.0}, "integer"),
        ({}, "object"),
        ([["orders", 100]], "object"),
        (None, "object"),
        (100, "object"),
    ],
)
def test_an_invalid_split_is_a_400_and_changes_nothing(
    clean: ProxyProcess, body: Any, says: str
) -> None:
    p = clean
    before = setting(p, "orders")
    problem = assert_problem(post_split(p, "orders", body, headers=AUTH), 400)
    assert says in problem["detail"]
    assert setting(p, "orders") == before
    assert served(p, "/api/orders/1", 5) == {"orders": 5}


def test_a_body_that_is_not_json_is_a_400(clean: ProxyProcess) -> None:
    r = httpx.post(
        clean.admin + "/api/routes/orders/split",
        content=b"orders=0&monolith=100",
        headers=AUTH,
        timeout=10,
    )
    assert_problem(r, 400)
    assert route(clean, "orders")["override"] is None


def test_an_unknown_route_is_a_404(clean: ProxyProcess) -> None:
    body = assert_problem(post_split(clean, "nope", {"orders": 100}, headers=AUTH), 404)
    assert "nope" in body["detail"]
    r = httpx.delete(clean.admin + "/api/routes/nope/split", headers=AUTH, timeout=10)
    assert_problem(r, 404)


def test_a_split_override_applies_shows_and_is_removed_by_delete(clean: ProxyProcess) -> None:
    p = clean
    r = post_split(p, "orders", {"orders": 0, "monolith": 100}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "route": "orders",
        "split": {"orders": 0, "monolith": 100},
        "override": True,
    }
    assert served(p, "/api/orders/1") == {"monolith": 20}  # at once: the kill switch
    view = route(p, "orders")
    assert view["split"] == {"orders": 0, "monolith": 100}
    assert view["override"] == {"orders": 0, "monolith": 100}
    assert view["configured_split"] == {"orders": 100, "monolith": 0}
    metrics = httpx.get(p.admin + "/metrics", timeout=10).text
    assert 'strangler_split_percent{backend="orders",route="orders"} 0.0' in metrics
    assert 'strangler_split_percent{backend="monolith",route="orders"} 100.0' in metrics

    r = httpx.delete(p.admin + "/api/routes/orders/split", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["override"] is False
    assert route(p, "orders")["override"] is None
    assert served(p, "/api/orders/1") == {"orders": 20}


def test_a_partial_split_sends_nothing_to_unnamed_backends(clean: ProxyProcess) -> None:
    r = post_split(clean, "sticky", {"monolith": 100}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert served(clean, "/sticky/x") == {"monolith": 20}
    assert route(clean, "sticky")["split"] == {"monolith": 100}


def test_the_next_reload_drops_an_override(clean: ProxyProcess) -> None:
    p = clean
    assert post_split(p, "orders", {"orders": 0, "monolith": 100}, headers=AUTH).status_code == 200
    assert served(p, "/api/orders/1", 5) == {"monolith": 5}
    r = httpx.post(p.admin + "/api/reload", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["result"] == "success", r.text
    assert route(p, "orders")["override"] is None
    assert served(p, "/api/orders/1", 5) == {"orders": 5}


# --- POST /api/reload -----------------------------------------------------------------------


def rewrite_unwatched(path: Path, text: str) -> None:
    """Change the file's content but not what the file watcher compares (inode, size, mtime),
    so only an explicit reload (API, SIGHUP) picks it up."""
    st = path.stat()
    data = text.encode()
    assert len(data) <= st.st_size, "the new text must not be longer than the file"
    data += b"\n" * (st.st_size - len(data))  # blank lines: the same size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_reload_answers_success(clean: ProxyProcess) -> None:
    r = httpx.post(clean.admin + "/api/reload", headers=AUTH, timeout=10)
    assert r.status_code == 200
    assert r.json()["result"] == "success"
    last = routes(clean)["last_reload"]
    assert last["result"] == "success" and last["errors"] == []


def test_reload_of_an_invalid_file_is_a_400_listing_the_errors(clean: ProxyProcess) -> None:
    p = clean
    original = p.config_path.read_text()
    before = routes(p)["routes"]
    bad = original.replace("split: {orders: 100, monolith: 0}", "split: {orders: 90, monolith: 0}")
    bad = bad.replace("backend: monolith\n    shadow", "backend: nope\n    shadow")
    try:
        rewrite_unwatched(p.config_path, bad)
        r = httpx.post(p.admin + "/api/reload", headers=AUTH, timeout=10)
        body = assert_problem(r, 400)
        errors = body["errors"]
        split_line, backend_line = line_of(bad, "orders: 90"), line_of(bad, "backend: nope")
        assert len(errors) == 2, errors
        assert errors[0].startswith(f"{p.config_path}:{split_line}: routes[0].split: ")
        assert "90" in errors[0]
        assert errors[1].startswith(f"{p.config_path}:{backend_line}: routes[2].backend: ")
        assert "nope" in errors[1]
        # Nothing changed: the same routes, the traffic where it was; the page says why.
        after = routes(p)
        assert [(x["name"], x["split"]) for x in after["routes"]] == [
            (x["name"], x["split"]) for x in before
        ]
        assert after["last_reload"]["result"] == "failure"
        assert after["last_reload"]["errors"] == errors
        assert served(p, "/api/orders/1", 5) == {"orders": 5}
        assert served(p, "/shadowed/1", 5) == {"monolith": 5}
    finally:
        rewrite_unwatched(p.config_path, original)
    r = httpx.post(p.admin + "/api/reload", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert routes(p)["last_reload"]["errors"] == []


# --- the admin port is the admin port -------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/routes", "/metrics", "/healthz", "/readyz", "/"])
def test_admin_paths_on_the_main_port_go_to_the_backend(
    proxy: ProxyProcess, b: Backends, path: str
) -> None:
    r = httpx.get(proxy.url + path, timeout=10)
    assert r.status_code == 200
    assert r.json()["served_by"] == "monolith" and r.json()["path"] == path
    assert b.monolith.hits[path] == 1


def test_admin_posts_on_the_main_port_go_to_the_backend(proxy: ProxyProcess, b: Backends) -> None:
    r = httpx.post(proxy.url + "/api/reload", headers=AUTH, timeout=10)
    assert r.json()["served_by"] == "monolith"
    r = httpx.post(
        proxy.url + "/api/routes/orders/split",
        json={"orders": 0, "monolith": 100},
        headers=AUTH,
        timeout=10,
    )
    assert r.json()["served_by"] == "monolith"
    assert route(proxy, "orders")["override"] is None


def test_the_admin_port_binds_to_loopback_unless_configured(tokenless: ProxyProcess) -> None:
    p = tokenless
    # The log is written by a thread: the line may trail readiness a little.
    assert wait_until(
        lambda: any(e.get("message") == "strangler is serving" for e in p.log_lines()), 5
    )
    serving = next(e for e in p.log_lines() if e.get("message") == "strangler is serving")
    assert serving["admin"] == f"http://127.0.0.1:{p.admin_port}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", p.admin_port), timeout=2).close()
    assert httpx.get(p.admin + "/healthz", timeout=10).status_code == 200


# --- GET /api/explain ------------------------------------------------------------------------


def test_explain_says_route_backend_and_bucket(proxy: ProxyProcess) -> None:
    r = httpx.get(
        proxy.admin + "/api/explain",
        params={"method": "GET", "url": "/sticky/7", "header": "X-User-Id:42"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert {"route", "backend", "bucket", "sticky_key", "reason", "upstream_url"} <= set(answer)
    assert answer["route"] == "sticky" and answer["sticky_key"] == "42"
    assert 0 <= answer["bucket"] < 10_000
    assert answer["backend"] == ("orders" if answer["bucket"] < 3000 else "monolith")
    # The proxy agrees with its explanation.
    reply = httpx.get(proxy.url + "/sticky/7", headers={"X-User-Id": "42"}, timeout=10)
    assert reply.json()["served_by"] == answer["backend"]

    r = httpx.get(proxy.admin + "/api/explain", params={"url": "/nothing/here"}, timeout=10)
    assert r.json()["route"] == "default" and r.json()["backend"] == "monolith"


def test_explain_refuses_a_request_without_url(proxy: ProxyProcess) -> None:
    assert_problem(httpx.get(proxy.admin + "/api/explain", timeout=10), 400)
    r = httpx.get(
        proxy.admin + "/api/explain", params={"url": "/x", "header": "no-colon"}, timeout=10
    )
    assert_problem(r, 400)
