"""`strangler status` and `strangler split` (SPEC §1) against the real proxy's admin API: the
compact table and its JSON, the kill switch moving live traffic, and clear messages (exit 1)
when the proxy is unreachable or the token is refused. The token is never printed."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Backends
from tests.e2e.harness import ROOT, ProxyProcess, free_port

TOKEN = "cli-" + secrets.token_hex(16)

CONFIG = """version: 1
legacy: monolith
backends:
  monolith: {{url: "{monolith}"}}
  orders: {{url: "{orders}"}}
  dead: {{url: "http://127.0.0.1:{dead}"}}
defaults:
  retry: {{attempts: 1}}
routes:
  - name: orders
    match: {{prefix: /api/orders}}
    split: {{orders: 100, monolith: 0}}
  - name: checkout
    match: {{prefix: /checkout, methods: [GET]}}
    split: {{orders: 25, monolith: 75}}
    shadow: {{backend: orders, percent: 100, compare: true}}
  - name: fragile
    match: {{prefix: /fragile}}
    backend: dead
    breaker: {{failure_threshold: 1, reset_timeout: 300}}
"""


@pytest.fixture(scope="module")
def proxy(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    text = CONFIG.format(
        monolith=backends.monolith_url, orders=backends.orders_url, dead=backends.dead_port
    )
    workdir = tmp_path_factory.mktemp("cli-admin")
    # The config names no token_env: the default, STRANGLER_ADMIN_TOKEN, as for the CLI.
    with ProxyProcess(text, workdir, env={"STRANGLER_ADMIN_TOKEN": TOKEN}) as p:
        yield p


@pytest.fixture()
def p(proxy: ProxyProcess) -> Iterator[ProxyProcess]:
    """The module's proxy without overrides before and after the test."""
    for route in ("orders", "checkout"):
        httpx.delete(
            f"{proxy.admin}/api/routes/{route}/split",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ).raise_for_status()
    yield proxy


def strangler(
    *args: str, token: str | None = TOKEN, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "STRANGLER_ADMIN_TOKEN"}
    if token is not None:
        environ["STRANGLER_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**environ, **env},
    )


def served(p: ProxyProcess, path: str, n: int = 20) -> Counter[str]:
    with httpx.Client(timeout=10) as client:
        return Counter(client.get(p.url + path).json()["served_by"] for _ in range(n))


def assert_token_not_shown(done: subprocess.CompletedProcess[str], token: str = TOKEN) -> None:
    assert token not in done.stdout and token not in done.stderr


# --- strangler status -----------------------------------------------------------------------


def test_status_prints_routes_splits_breakers_and_shadow(p: ProxyProcess) -> None:
    assert served(p, "/checkout/1", 8)
    # The first failure opens the fragile route's breaker (threshold 1): then 503s.
    codes = [httpx.get(p.url + "/fragile/x", timeout=10).status_code for _ in range(2)]
    assert codes[-1] == 503 and set(codes) <= {502, 503}

    done = strangler("status", "--admin", p.admin)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert "orders  /api/orders  orders 100% / monolith 0%" in lines
    assert "checkout  /checkout GET  orders 25% / monolith 75%" in lines
    assert "fragile  /fragile  dead 100%" in lines
    assert "default  /  monolith 100%" in lines
    assert sum(line.split() == ["BACKEND", "BREAKER", "RPS", "ERR", "%", "P95", "MS", "UP"]
               for line in lines) == 4  # fmt: skip
    fragile = lines[lines.index("fragile  /fragile  dead 100%") :]
    dead_row = next(line.split() for line in fragile if line.split()[:1] == ["dead"])
    assert dead_row[1:3] == ["open", "!"], dead_row
    checkout = lines[lines.index("checkout  /checkout GET  orders 25% / monolith 75%") :]
    orders_row = next(line.split() for line in checkout if line.split()[:1] == ["orders"])
    assert orders_row[1] == "closed"
    shadow = next(line for line in checkout if "shadow match rate" in line)
    assert "match" in shadow and "mismatch" in shadow
    assert any(line.startswith("migrated share: ") for line in lines)
    assert any(line.startswith("last reload: ") and "success" in line for line in lines)


def test_status_json_is_the_admin_api_answer(p: ProxyProcess) -> None:
    done = strangler("status", "--admin", p.admin, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {"routes", "migrated_share", "last_reload"} <= set(data)
    by_name = {r["name"]: r for r in data["routes"]}
    assert set(by_name) == {"orders", "checkout", "fragile", "default"}
    assert by_name["checkout"]["split"] == {"orders": 25, "monolith": 75}
    assert by_name["orders"]["override"] is None
    assert set(by_name["orders"]["backends"]["orders"]) >= {"breaker", "rps", "p95_ms", "up"}


def test_status_admin_url_may_omit_the_scheme(p: ProxyProcess) -> None:
    done = strangler("status", "--admin", f"127.0.0.1:{p.admin_port}/")
    assert done.returncode == 0, done.stderr
    assert "orders  /api/orders" in done.stdout


def test_status_when_the_proxy_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = strangler("status", "--admin", url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "cannot reach the admin API at " + url in done.stderr
    assert "connection refused" in done.stderr
    assert "Traceback" not in done.stderr
    done = strangler("status", "--admin", url, "--json")
    assert done.returncode == 1 and done.stdout == ""


# --- strangler split ------------------------------------------------------------------------


def test_the_kill_switch_moves_traffic_at_once(p: ProxyProcess) -> None:
    assert served(p, "/api/orders/1", 10) == {"orders": 10}

    done = strangler("split", "orders", "orders=0", "monolith=100", "--admin", p.admin)

    assert done.returncode == 0, done.stderr
    assert (
        done.stdout == "orders: orders 0% / monolith 100% (live override until the next reload)\n"
    )
    assert_token_not_shown(done)
    assert served(p, "/api/orders/1") == {"monolith": 20}
    status = strangler("status", "--admin", p.admin)
    assert "orders  /api/orders  orders 0% / monolith 100% (override)" in status.stdout

    cleared = strangler("split", "orders", "--clear", "--admin", p.admin)
    assert cleared.returncode == 0, cleared.stderr
    assert "override cleared" in cleared.stdout
    assert served(p, "/api/orders/1", 10) == {"orders": 10}


def test_split_reads_the_token_from_the_env_var_it_is_told(p: ProxyProcess) -> None:
    done = strangler(
        "split",
        "checkout",
        "orders=50",
        "monolith=50",
        "--admin",
        p.admin,
        "--token-env",
        "MY_STRANGLER_TOKEN",
        token=None,
        MY_STRANGLER_TOKEN=TOKEN,
    )
    assert done.returncode == 0, done.stderr
    assert_token_not_shown(done)
    view = httpx.get(p.admin + "/api/routes", timeout=10).json()
    checkout = next(r for r in view["routes"] if r["name"] == "checkout")
    assert checkout["override"] == {"orders": 50, "monolith": 50}


def test_a_wrong_token_is_refused_with_the_401_detail(p: ProxyProcess) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    done = strangler("split", "orders", "orders=0", "monolith=100", "--admin", p.admin, token=wrong)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "refused: 401 Unauthorized" in done.stderr
    assert "Bearer TOKEN" in done.stderr  # the API's detail
    assert_token_not_shown(done, wrong)
    assert_token_not_shown(done)
    assert served(p, "/api/orders/1", 5) == {"orders": 5}


def test_no_token_in_the_env_is_a_clear_message(p: ProxyProcess) -> None:
    done = strangler("split", "orders", "orders=0", "monolith=100", "--admin", p.admin, token=None)
    assert done.returncode == 1
    assert "set $STRANGLER_ADMIN_TOKEN" in done.stderr


def test_an_invalid_split_shows_the_api_reason(p: ProxyProcess) -> None:
    done = strangler("split", "orders", "orders=10", "nope=90", "--admin", p.admin)
    assert done.returncode == 1
    assert "400" in done.stderr and "nope" in done.stderr
    done = strangler("split", "orders", "orders=10", "monolith=80", "--admin", p.admin)
    assert done.returncode == 1
    assert "sum to 90" in done.stderr
    done = strangler("split", "nope", "orders=100", "--admin", p.admin)
    assert done.returncode == 1 and "404" in done.stderr
    assert served(p, "/api/orders/1", 5) == {"orders": 5}


def test_a_malformed_weight_is_a_usage_error(p: ProxyProcess) -> None:
    done = strangler("split", "orders", "orders:0", "--admin", p.admin)
    assert done.returncode == 2
    assert "BACKEND=PCT" in done.stderr


def test_split_when_the_proxy_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = strangler("split", "orders", "orders=0", "monolith=100", "--admin", url)
    assert done.returncode == 1
    assert "cannot reach the admin API at " + url in done.stderr
    assert_token_not_shown(done)
