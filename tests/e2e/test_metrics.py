"""/metrics of the real process (SPEC §9): `promtool check metrics` has nothing to say, label
values are route and backend names (never a raw path), counts are exact, and with
`--workers 2` the admin port shows one aggregate of both workers: counters and histograms
summed, gauges not multiplied, a split override applied by every worker."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, wait_until

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TOKEN = "metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

CONFIG = """version: 1
legacy: monolith
backends:
  monolith: {{url: "{monolith}"}}
  orders: {{url: "{orders}"}}
  dead: {{url: "http://127.0.0.1:{dead}"}}
defaults:
  retry: {{attempts: 1}}
routes:
  - name: counted
    match: {{prefix: /counted}}
    backend: orders
  - name: split
    match: {{prefix: /split}}
    split: {{orders: 25, monolith: 75}}
  - name: orders
    match: {{prefix: /api/orders}}
    backend: orders
    fallback: monolith
  - name: dead
    match: {{prefix: /dead}}
    backend: dead
    breaker: {{failure_threshold: 2, reset_timeout: 300}}
  - name: shadowed
    match: {{prefix: /shadowed}}
    backend: monolith
    shadow: {{backend: orders, percent: 100, compare: true}}
"""
ROUTES = {"counted", "split", "orders", "dead", "shadowed", "default", "none"}
BACKENDS = {"monolith", "orders", "dead", "none"}
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER"}


def make_config(b: Backends) -> str:
    return CONFIG.format(monolith=b.monolith_url, orders=b.orders_url, dead=b.dead_port)


@pytest.fixture(scope="module")
def proxy(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("metrics")
    with ProxyProcess(make_config(backends), workdir, env={"STRANGLER_ADMIN_TOKEN": TOKEN}) as p:
        yield p


@pytest.fixture(scope="module")
def workers2(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("metrics-workers")
    # TMPDIR: the CLI makes its multiprocess directory there, where the test can read the
    # files each process writes (one per pid).
    env = {"STRANGLER_ADMIN_TOKEN": TOKEN, "TMPDIR": str(workdir)}
    p = ProxyProcess(make_config(backends), workdir, env=env, args=["--workers", "2"])
    with p:
        yield p


def scrape(p: ProxyProcess) -> str:
    r = httpx.get(p.admin + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def value(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += s.value
    return total


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


def traffic(p: ProxyProcess) -> None:
    """Requests that touch most metrics: answers, 404s, a 502, an open breaker, a fallback,
    a shadow comparison, an odd method."""
    with httpx.Client(timeout=10) as c:
        c.get(p.url + "/counted/1")
        c.get(p.url + "/split/1")
        c.get(p.url + "/status/404")
        c.post(p.url + "/api/orders/1", content=b"x")
        c.get(p.url + "/api/orders/x?status=503")  # 503 from orders: falls back to monolith
        c.get(p.url + "/dead/1")
        c.get(p.url + "/dead/1")
        c.get(p.url + "/dead/1")  # breaker open
        c.get(p.url + "/shadowed/1")
        c.request("PROPFIND", p.url + "/dav/x")
        c.get(p.url + "/../../etc/passwd")


def test_promtool_check_metrics_says_nothing(proxy: ProxyProcess) -> None:
    traffic(proxy)
    text = scrape(proxy)
    assert wait_until(
        lambda: value(scrape(proxy), "strangler_shadow_results_total") >= 1, 5, 0.1
    ), "the shadow comparison was not counted"
    text = scrape(proxy)
    for name in (
        "strangler_requests_total",
        "strangler_request_duration_seconds_count",
        "strangler_upstream_failures_total",
        "strangler_breaker_rejections_total",
        "strangler_fallbacks_total",
        "strangler_shadow_results_total",
        "strangler_split_percent",
        "strangler_backend_info",
        "strangler_breaker_state",
    ):
        assert value(text, name) > 0, f"{name} has no sample after the traffic"
    assert value(text, "strangler_breaker_state", route="dead", backend="dead") == 2
    assert value(text, "strangler_requests_total", method="OTHER", route="default") == 1
    done = promtool_check(text)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_label_values_are_names_never_paths(proxy: ProxyProcess) -> None:
    marker = uuid.uuid4().hex
    with httpx.Client(timeout=10) as c:
        for path in (
            f"/some/random/path-{marker}",
            f"/counted/{marker}",
            f"/api/orders/{marker}?q={marker}",
            f"/status/418?{marker}",
        ):
            assert c.get(proxy.url + path).status_code in (200, 418)
        c.request(marker.upper()[:10], proxy.url + "/x")
    text = scrape(proxy)
    assert marker not in text.lower()
    assert "/some" not in text and "path-" not in text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("route", "default") in ROUTES, s
            assert s.labels.get("backend", "none") in BACKENDS | {"none"}, s
            assert s.labels.get("fallback", "monolith") in BACKENDS, s
            assert s.labels.get("method", "GET") in METHODS, s
            assert s.labels.get("status", "200").isdigit(), s


def test_requests_are_counted_exactly(proxy: ProxyProcess) -> None:
    labels = {"route": "counted", "backend": "orders"}
    before = scrape(proxy)
    ok, hist = (
        value(before, "strangler_requests_total", **labels, status="200", method="GET"),
        value(before, "strangler_request_duration_seconds_count", **labels),
    )
    not_found = value(before, "strangler_requests_total", **labels, status="404")
    with httpx.Client(timeout=10) as c:
        for i in range(37):
            assert c.get(f"{proxy.url}/counted/{i}").status_code == 200
        for _ in range(3):
            assert c.get(f"{proxy.url}/counted/x?status=404").status_code == 404

    def settled() -> bool:
        text = scrape(proxy)
        return value(text, "strangler_request_duration_seconds_count", **labels) >= hist + 40

    assert wait_until(settled, 5, 0.05)
    after = scrape(proxy)
    assert value(after, "strangler_requests_total", **labels, status="200", method="GET") == ok + 37
    assert value(after, "strangler_requests_total", **labels, status="404") == not_found + 3
    assert value(after, "strangler_request_duration_seconds_count", **labels) == hist + 40
    bucket = value(after, "strangler_request_duration_seconds_bucket", **labels, le="+Inf")
    assert bucket == hist + 40


# --- two workers ----------------------------------------------------------------------------


def multiproc_dir(p: ProxyProcess) -> Path:
    (found,) = p.workdir.glob("strangler-metrics-*")
    return found


def per_process(p: ProxyProcess, name: str, **labels: str) -> dict[int, float]:
    """`name`'s count as written by each process (pid) to its own multiprocess file."""
    counts: dict[int, float] = {}
    for path in multiproc_dir(p).glob("*.db"):
        kind, _, pid = path.stem.rpartition("_")
        if kind not in ("counter", "histogram"):
            continue
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            for s in metric.samples:
                if s.name == name and labels.items() <= s.labels.items():
                    counts[int(pid)] = counts.get(int(pid), 0) + s.value
    return counts


def fresh_connections(p: ProxyProcess, path: str, n: int) -> list[httpx.Response]:
    """n requests, each on a new connection, 8 at a time: the kernel spreads them over the
    workers."""

    def one(i: int) -> httpx.Response:
        return httpx.get(f"{p.url}{path}{i}", timeout=15)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def test_two_workers_are_aggregated(workers2: ProxyProcess) -> None:
    p = workers2
    assert p.proc is not None
    labels = {"route": "counted", "backend": "orders"}
    sent = 0
    for _ in range(10):  # until both workers have served some
        replies = fresh_connections(p, "/counted/", 40)
        assert all(r.status_code == 200 for r in replies)
        sent += len(replies)
        served_by = per_process(p, "strangler_requests_total", **labels)
        if len([n for n in served_by.values() if n > 0]) >= 2:
            break
    assert wait_until(
        lambda: sum(per_process(p, "strangler_requests_total", **labels).values()) >= sent, 5
    )
    served_by = per_process(p, "strangler_requests_total", **labels)
    assert p.proc.pid not in served_by or served_by[p.proc.pid] == 0  # the supervisor serves none
    assert len([n for n in served_by.values() if n > 0]) == 2, served_by
    assert sum(served_by.values()) == sent

    text = scrape(p)
    assert value(text, "strangler_requests_total", **labels) == sent
    assert value(text, "strangler_request_duration_seconds_count", **labels) == sent
    assert value(text, "strangler_request_duration_seconds_bucket", **labels, le="+Inf") == sent
    assert value(text, "strangler_request_duration_seconds_bucket", **labels, le="30.0") == sent
    assert 0 < value(text, "strangler_request_duration_seconds_sum", **labels) < sent * 15
    # Gauges are not multiplied by the number of processes.
    assert value(text, "strangler_split_percent", route="split", backend="orders") == 25
    assert value(text, "strangler_split_percent", route="split", backend="monolith") == 75
    assert value(text, "strangler_backend_info", backend="orders", role="service") == 1
    assert value(text, "strangler_backend_info", backend="monolith", role="legacy") == 1
    assert value(text, "strangler_bulkhead_in_flight", route="counted") == 0
    assert value(text, "strangler_breaker_state", route="counted", backend="orders") == 0
    assert "strangler_breaker_storage_up" not in text
    done = promtool_check(text)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # /api/routes merges the workers the same way.
    view = httpx.get(p.admin + "/api/routes", timeout=10).json()
    counted = next(r for r in view["routes"] if r["name"] == "counted")
    assert counted["bulkhead"]["max_concurrent"] == 100  # 50 per worker, not 200


def test_two_workers_count_a_breaker_opening_once(workers2: ProxyProcess) -> None:
    p = workers2
    replies = fresh_connections(p, "/dead/", 24)
    assert {r.status_code for r in replies} <= {502, 503}
    assert wait_until(
        lambda: value(scrape(p), "strangler_requests_total", route="dead") == 24, 5, 0.1
    )
    text = scrape(p)
    assert value(text, "strangler_breaker_state", route="dead", backend="dead") == 2  # max
    failures = value(text, "strangler_upstream_failures_total", route="dead", reason="connect")
    rejections = value(text, "strangler_breaker_rejections_total", route="dead")
    assert failures + rejections == 24
    assert failures >= 2  # at least the threshold's failures, in each worker that opened


def test_a_split_override_reaches_every_worker(workers2: ProxyProcess) -> None:
    p = workers2
    labels = {"route": "split", "backend": "monolith"}
    r = httpx.post(
        p.admin + "/api/routes/split/split",
        json={"orders": 0, "monolith": 100},
        headers=AUTH,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    try:
        before = per_process(p, "strangler_requests_total", **labels)
        answers: Counter[str] = Counter()
        for _ in range(10):  # until both workers have served some under the override
            replies = fresh_connections(p, "/split/", 40)
            answers.update(r.json()["served_by"] for r in replies)
            now = per_process(p, "strangler_requests_total", **labels)
            if len([pid for pid in now if now[pid] > before.get(pid, 0)]) >= 2:
                break
        assert set(answers) == {"monolith"}, answers
        assert len([pid for pid in now if now[pid] > before.get(pid, 0)]) == 2
        text = scrape(p)
        # livemax: a worker still on the file's split would show 25 here.
        assert value(text, "strangler_split_percent", route="split", backend="orders") == 0
        assert value(text, "strangler_split_percent", route="split", backend="monolith") == 100
        view = httpx.get(p.admin + "/api/routes", timeout=10).json()
        split = next(x for x in view["routes"] if x["name"] == "split")
        assert split["override"] == {"orders": 0, "monolith": 100}
    finally:
        r = httpx.delete(p.admin + "/api/routes/split/split", headers=AUTH, timeout=10)
        assert r.status_code == 200
    text = scrape(p)
    assert value(text, "strangler_split_percent", route="split", backend="orders") == 25
    replies = fresh_connections(p, "/split/", 40)
    assert set(Counter(r.json()["served_by"] for r in replies)) == {"orders", "monolith"}
