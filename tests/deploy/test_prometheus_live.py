"""The Grafana dashboard and the alert rules against a real Prometheus (Debian's binary)
scraping a real `strangler run` that carries traffic: every panel query and every alert
expression is valid PromQL over the metrics the proxy really exports, and the main panels
show data. Plus the dashboard's structure, which needs no server."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.common import (
    ALERTS,
    alert_rules,
    all_rules,
    dashboard,
    exported_metrics,
    metrics_in,
    panel_targets,
    panels,
)
from tests.e2e.harness import ProxyProcess, UpstreamServer, free_port, wait_until
from tests.e2e.upstream import Recorder, make_app

TOKEN = "live-test-token"
# What Grafana would put in the queries; 15 s spans enough 1 s scrapes for rate().
SUBSTITUTIONS = {
    "$__rate_interval": "15s",
    "$__interval": "2s",
    "$__range": "1m",
    "${route}": ".*",
    "$route": ".*",
    "${backend}": ".*",
    "$backend": ".*",
}
# Panels that may legitimately be empty here: no Redis, so no breaker storage gauge.
MAY_BE_EMPTY = {"Shared breaker storage"}
# The panels a migration is watched with: they must show data.
MAIN_PANELS = {
    "Traffic on new services",
    "Share of traffic on new services over time",
    "Request rate",
    "Error rate (5xx share)",
    "p95 latency",
    "p99 latency",
    "Request rate by role",
    "Error rate by role (5xx share)",
    "p95 latency by role",
    "p99 latency by role",
}


def grafana_to_promql(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a template variable this test does not know: {expr}"
    return expr


# ------------------------------------------------------------------------ static checks


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for name in ("route", "backend"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["multi"] and variable["includeAll"]
        assert variable["allValue"] == ".*", '`=~"$route"` must match every route on All'
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    exported = exported_metrics()
    for panel in panels(board):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            used = metrics_in(target["expr"])
            assert used and used <= exported, (panel["title"], used - exported)
    titles = {p["title"] for p in panels(board)}
    required = MAIN_PANELS | {
        "Configured split",
        "Circuit breakers",
        "Retries and fallbacks",
        "Bulkhead in flight",
        "Bulkhead rejections",
        "Shadow match rate",
        "Config reloads",
    }
    assert required <= titles, required - titles
    filtered = [e for _, e in panel_targets() if "$route" in e]
    assert len(filtered) >= len(panel_targets()) * 2 // 3, "most panels follow $route"


# ------------------------------------------------------------------------ a live stack


def config(monolith: str, orders: str, dead_port: int) -> str:
    return f"""
version: 1
legacy: monolith
shutdown_grace: 2
backends:
  monolith: {{url: "{monolith}"}}
  orders:
    url: "{orders}"
    health: {{path: /health, interval: 1}}
  dead: {{url: "http://127.0.0.1:{dead_port}"}}
defaults:
  retry: {{attempts: 2, backoff: 0.01, max_backoff: 0.02}}
routes:
  - name: checkout                  # a sticky split: the migration's progress
    match: {{prefix: /api/checkout}}
    split: {{orders: 50, monolith: 50}}
    sticky: {{header: X-User-Id}}
  - name: flaky                     # the new service answers 503: retries, then the breaker
    match: {{prefix: /status/503}}
    backend: orders
    breaker: {{failure_threshold: 3, reset_timeout: 60}}
  - name: spent                     # failing faster than the retry budget's floor allows
    match: {{prefix: /spent}}
    rewrite: {{strip_prefix: /spent}}
    backend: orders
    retry: {{budget: 0}}
    breaker: {{failure_threshold: 1000}}
  - name: dead                      # nothing listens: connect errors, fallback to legacy
    match: {{prefix: /dead}}
    backend: dead
    fallback: monolith
    timeout: {{connect: 0.5}}
  - name: shadowed                  # dark launch, compared
    match: {{prefix: /shadowed}}
    backend: monolith
    shadow: {{backend: orders, percent: 100, compare: true}}
  - name: narrow                    # a bulkhead of one, no queue
    match: {{prefix: /slow}}
    backend: orders
    bulkhead: {{max_concurrent: 1, max_queue: 0}}
"""


class Prometheus:
    def __init__(self, workdir: Path, admin_port: int) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        assert Path(binary).is_file(), "prometheus is missing: `make system-deps` installs it"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = workdir / "prometheus.yml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {
                            "job_name": "strangler",
                            "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
                        }
                    ],
                }
            )
        )
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = response.json()
        return body

    def series(self, expr: str) -> list[dict[str, Any]]:
        body = self.query(expr)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def send_traffic(proxy: ProxyProcess, round_: int) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for user in range(20):
            client.get(f"/api/checkout/{user}", headers={"X-User-Id": f"u{round_}-{user}"})
        for _ in range(6):  # 18 wanting a retry over 3 rounds: the floor of 10 lets 10 through
            client.get("/spent/status/503")
        for _ in range(2):
            client.get("/status/503")
            client.get("/dead/1")
            client.get("/shadowed/1")
            client.get("/anything/else")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: client.get("/slow?delay=0.4"), range(4)))


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[tuple[ProxyProcess, Prometheus]]:
    upstreams = [UpstreamServer(make_app(Recorder(n))) for n in ("monolith", "orders")]
    for server in upstreams:
        server.start()
    proxy = ProxyProcess(
        config(upstreams[0].url, upstreams[1].url, free_port()),
        tmp_path,
        env={"STRANGLER_ADMIN_TOKEN": TOKEN},
    )
    prometheus: Prometheus | None = None
    try:
        proxy.start()
        prometheus = Prometheus(tmp_path, proxy.admin_port)
        assert wait_until(prometheus.ready, 30, 0.1), prometheus.log_path.read_text()[-3000:]
        yield proxy, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        proxy.stop()
        for server in upstreams:
            server.stop()


@pytest.mark.timeout(120)
def test_every_panel_and_alert_query_runs_against_real_metrics(
    stack: tuple[ProxyProcess, Prometheus],
) -> None:
    proxy, prometheus = stack
    # Prometheus applies discovered targets every few seconds: traffic before its first
    # scrape would show as counters that never moved
    assert wait_until(lambda: bool(prometheus.series('up{job="strangler"} == 1')), 30, 0.2)
    reload = httpx.post(
        proxy.admin + "/api/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert reload.status_code == 200, reload.text
    started = time.monotonic()
    for round_ in range(3):
        send_traffic(proxy, round_)
        time.sleep(0.5)

    targets = [(title, grafana_to_promql(expr)) for title, expr in panel_targets()]
    main = [(title, expr) for title, expr in targets if title in MAIN_PANELS]

    share_expr = dict(targets)["Traffic on new services"]

    def main_panels_have_data() -> bool:
        share = prometheus.series(share_expr)
        moving = bool(share) and 0 < float(share[0]["value"][1]) < 1
        return moving and all(prometheus.series(expr) for _, expr in main)

    assert wait_until(main_panels_have_data, 30, 0.5), [
        title for title, expr in main if not prometheus.series(expr)
    ]

    empty = []
    for title, expr in targets:
        body = prometheus.query(expr)
        assert body["status"] == "success", f"{title}: {expr}\n{body}"
        if not body["data"]["result"] and title not in MAY_BE_EMPTY:
            empty.append(title)
    assert not empty, f"panels without data: {empty}"

    # what the traffic did shows up as it should
    states = prometheus.series('strangler_breaker_state{route="flaky"}')
    assert states and float(states[0]["value"][1]) == 2, states  # open
    refused = prometheus.series('strangler_retry_budget_exhausted_total{route="spent"}')
    # 18 wanted a retry, the floor lets 10 through per 10 s (all of it, unless the rounds
    # took longer than the window on a slow machine)
    assert refused and 1 <= float(refused[0]["value"][1]) <= 8, refused

    # the template variables' queries (Grafana's label_values) find the routes
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        selector, label = grafana_to_promql(match.group(1)), match.group(2)
        values = httpx.get(
            f"{prometheus.url}/api/v1/label/{label}/values",
            params={"match[]": selector},
            timeout=10,
        ).json()
        assert values["status"] == "success", values
        assert {"checkout", "monolith"} & set(values["data"]), values

    # every alert and recording expression is valid PromQL over these series
    for rule in all_rules():
        body = prometheus.query(rule["expr"])
        assert body["status"] == "success", f"{rule.get('alert')}: {body}"

    # and Prometheus loaded the rule file and evaluates every rule without error
    expected = {rule["alert"] for rule in alert_rules()}

    def evaluated() -> list[dict[str, Any]]:
        body = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        if {r["name"] for r in rules} == expected and all(
            not r["lastEvaluation"].startswith("0001") for r in rules
        ):
            return rules
        return []

    assert wait_until(lambda: bool(evaluated()), 15, 0.5), "the alert rules were not evaluated"
    for rule in evaluated():
        assert rule["health"] == "ok", rule
    assert time.monotonic() - started < 90
