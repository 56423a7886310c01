"""SPEC §9 metric definitions: every metric of the table with exactly its name, type and
label names, defined once, buckets from 1 ms to 30 s, bounded label values, cached children.

Read back through the Prometheus text format (`generate_latest`), as a scraper sees it."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.metrics import BUCKETS, Metrics
from proxy.outcome import Outcome

# SPEC §9: name -> (type, label names)
SPEC: dict[str, tuple[str, frozenset[str]]] = {
    "strangler_requests_total": ("counter", frozenset({"route", "backend", "method", "status"})),
    "strangler_request_duration_seconds": ("histogram", frozenset({"route", "backend"})),
    "strangler_upstream_failures_total": ("counter", frozenset({"route", "backend", "reason"})),
    "strangler_retries_total": ("counter", frozenset({"route", "backend"})),
    "strangler_breaker_state": ("gauge", frozenset({"route", "backend"})),
    "strangler_breaker_rejections_total": ("counter", frozenset({"route", "backend"})),
    "strangler_fallbacks_total": ("counter", frozenset({"route", "backend", "fallback"})),
    "strangler_bulkhead_in_flight": ("gauge", frozenset({"route"})),
    "strangler_bulkhead_rejections_total": ("counter", frozenset({"route"})),
    "strangler_split_percent": ("gauge", frozenset({"route", "backend"})),
    "strangler_shadow_results_total": ("counter", frozenset({"route", "backend", "result"})),
    "strangler_config_reloads_total": ("counter", frozenset({"result"})),
    "strangler_backend_info": ("gauge", frozenset({"backend", "role"})),
    "strangler_backend_up": ("gauge", frozenset({"backend"})),
    "strangler_breaker_storage_up": ("gauge", frozenset()),
    # Beyond the table (the retry-budget alert reads it):
    "strangler_retry_budget_exhausted_total": ("counter", frozenset({"route", "backend"})),
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def family_of(name: str) -> str:
    """The family name the text parser gives: a counter's without its `_total`."""
    return name.removesuffix("_total") if SPEC[name][0] == "counter" else name


def outcome(method: str = "GET", status: int = 200, duration: float = 0.012, **kw: Any) -> Outcome:
    o = Outcome("rid", method, kw.pop("path", "/api/orders/7"), 0.0)
    o.route, o.backend = kw.get("route", "orders"), kw.get("backend", "orders")
    o.status, o.duration = status, duration
    return o


def touch_all(m: Metrics) -> None:
    """One value for every metric of the table, through the methods the data plane calls."""
    m.record(outcome())
    m.upstream_failure("orders", "orders", "connect")
    m.retry("orders", "orders")
    m.retry_refused("orders", "orders")
    m.set_breaker_state("orders", "orders", "open")
    m.breaker_rejection("orders", "orders")
    m.fallback("orders", "orders", "monolith")
    m.set_in_flight("orders", 3)
    m.bulkhead_rejection("orders")
    m.set_split("orders", {"orders": 25, "monolith": 75}, ["orders", "monolith"])
    m.shadow_result("orders", "orders", "match")
    m.reload("success")
    m.set_backend_info("monolith", "legacy")
    m.set_backend_up("orders", True)
    m.set_storage_up(True)


def families(m: Metrics) -> dict[str, Any]:
    text = generate_latest(m.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(m: Metrics) -> list[Sample]:
    return [s for f in families(m).values() for s in f.samples]


@pytest.fixture()
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def test_every_metric_of_the_table_with_its_type_and_labels(metrics: Metrics) -> None:
    touch_all(metrics)
    found = families(metrics)
    for name, (kind, labels) in SPEC.items():
        family = found.get(family_of(name))
        assert family is not None, f"{name} missing"
        assert family.type == kind, f"{name}: {family.type}, not {kind}"
        assert family.documentation.strip(), f"{name} has no HELP text"
        sample_names = {family_of(name) + suffix for suffix in SUFFIXES[kind]}
        assert {s.name for s in family.samples} == sample_names, f"{name}: other series"
        for sample in family.samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == labels | extra, f"{sample.name}: {sample.labels}"


def test_nothing_but_the_table_and_each_metric_defined_once(metrics: Metrics) -> None:
    touch_all(metrics)
    names = [f.name for f in families(metrics).values() if f.name.startswith("strangler_")]
    assert sorted(names) == sorted(family_of(n) for n in SPEC)  # no `_created` companions
    # Defined once: a second definition in the same registry is refused by prometheus_client,
    # and two Metrics objects on separate registries do not collide.
    Metrics(CollectorRegistry())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(metrics.registry)


def test_values_of_the_touched_metrics(metrics: Metrics) -> None:
    touch_all(metrics)
    reg = metrics.registry
    labels = {"route": "orders", "backend": "orders"}
    assert reg.get_sample_value(
        "strangler_requests_total", {**labels, "method": "GET", "status": "200"}
    ) == (1.0)
    assert reg.get_sample_value("strangler_request_duration_seconds_count", labels) == 1.0
    assert reg.get_sample_value("strangler_breaker_state", labels) == 2.0
    assert reg.get_sample_value("strangler_bulkhead_in_flight", {"route": "orders"}) == 3.0
    split = {"route": "orders", "backend": "monolith"}
    assert reg.get_sample_value("strangler_split_percent", split) == 75.0
    assert reg.get_sample_value("strangler_config_reloads_total", {"result": "success"}) == 1.0
    info = {"backend": "monolith", "role": "legacy"}
    assert reg.get_sample_value("strangler_backend_info", info) == 1.0
    assert reg.get_sample_value("strangler_backend_up", {"backend": "orders"}) == 1.0
    assert reg.get_sample_value("strangler_breaker_storage_up") == 1.0
    metrics.set_breaker_state("orders", "orders", "half-open")
    assert reg.get_sample_value("strangler_breaker_state", labels) == 1.0
    metrics.set_backend_up("orders", False)
    assert reg.get_sample_value("strangler_backend_up", {"backend": "orders"}) == 0.0


def test_health_and_storage_gauges_are_absent_until_set(metrics: Metrics) -> None:
    """SPEC §9: `strangler_backend_up` is absent without a health check and
    `strangler_breaker_storage_up` without a shared storage (a 0 would page someone)."""
    metrics.record(outcome())
    names = {s.name for s in samples(metrics)}
    assert "strangler_backend_up" not in names
    assert "strangler_breaker_storage_up" not in names
    metrics.set_storage_up(False)
    assert metrics.registry.get_sample_value("strangler_breaker_storage_up") == 0.0
    metrics.set_storage_up(True)
    assert metrics.registry.get_sample_value("strangler_breaker_storage_up") == 1.0


def test_histogram_buckets_run_from_1_ms_to_30_s(metrics: Metrics) -> None:
    metrics.record(outcome(duration=0.0004))
    metrics.record(outcome(duration=12.0))
    metrics.record(outcome(duration=45.0))
    buckets = {
        float(s.labels["le"]): s.value
        for s in samples(metrics)
        if s.name == "strangler_request_duration_seconds_bucket"
    }
    bounds = sorted(buckets)
    assert bounds[0] == 0.001
    assert bounds[-2] == 30.0 and math.isinf(bounds[-1])
    assert len(bounds) >= 10, "too coarse to tell 5 ms from 50 ms"
    assert all(b < 1.0 for b in bounds[:6]), "most buckets below a second"
    assert buckets[0.001] == 1  # 0.4 ms
    assert buckets[30.0] == 2  # 0.4 ms and 12 s
    assert buckets[math.inf] == 3  # 45 s counted only in +Inf


def test_unknown_methods_become_other_and_paths_are_never_labels(metrics: Metrics) -> None:
    for method in ("BREW", "PROPFIND", "X" * 200, "get"):
        metrics.record(outcome(method=method, path=f"/user/{method}/secret"))
    metrics.record(outcome(method="PATCH"))
    methods = {s.labels["method"] for s in samples(metrics) if s.name == "strangler_requests_total"}
    assert methods == {"OTHER", "PATCH"}
    text = generate_latest(metrics.registry).decode()
    assert "BREW" not in text and "/user/" not in text and "secret" not in text
    assert (
        metrics.registry.get_sample_value(
            "strangler_requests_total",
            {"route": "orders", "backend": "orders", "method": "OTHER", "status": "200"},
        )
        == 4.0
    )


def test_labelled_children_are_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """With several workers requests go into metric children (one process: plain numbers,
    below), looked up once per label set."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics(CollectorRegistry())
    first = metrics._child(metrics.requests, "orders", "orders", "GET", "200")
    assert metrics._child(metrics.requests, "orders", "orders", "GET", "200") is first
    assert metrics._child(metrics.requests, "orders", "orders", "GET", "503") is not first

    calls: list[tuple[str, ...]] = []
    for metric in (metrics.requests, metrics.duration):
        original = metric.labels

        def counting(*labels: str, _original: Any = original) -> Any:
            calls.append(labels)
            return _original(*labels)

        monkeypatch.setattr(metric, "labels", counting)
    for _ in range(50):
        metrics.record(outcome(status=201))
    # One lookup per new label set (requests and duration), none on the 49 later requests.
    assert calls == [("orders", "orders", "GET", "201"), ("orders", "orders")]
    assert metrics.requests.labels("orders", "orders", "GET", "201")._value.get() == 50.0


def test_gauges_say_how_workers_combine(metrics: Metrics) -> None:
    """SPEC §9: with several workers the in-flight gauge is summed, the others show the largest
    value of any (live) worker."""
    metrics.set_storage_up(True)
    assert metrics.bulkhead_in_flight._multiprocess_mode == "livesum"
    for gauge in (
        metrics.breaker_storage_up,
        metrics.breaker_state,
        metrics.split_percent,
        metrics.backend_info,
        metrics.backend_up,
    ):
        assert gauge._multiprocess_mode == "livemax", gauge._name


def test_a_reload_forgets_the_gauges_of_removed_routes_and_backends() -> None:
    from proxy.loader import load_text
    from proxy.runtime import build

    before = load_text(
        """
version: 1
legacy: monolith
backends:
  monolith: {url: "http://127.0.0.1:1"}
  orders: {url: "http://127.0.0.1:2"}
routes:
  - {name: orders, match: {prefix: /o}, split: {orders: 25, monolith: 75}}
""",
        "a.yaml",
    )
    after = load_text(
        """
version: 1
legacy: orders
backends:
  orders: {url: "http://127.0.0.1:2"}
routes: []
""",
        "b.yaml",
    )
    metrics = Metrics()
    first = build(before, None, metrics)
    value = metrics.registry.get_sample_value
    assert value("strangler_split_percent", {"route": "orders", "backend": "orders"}) == 25
    assert value("strangler_backend_info", {"backend": "orders", "role": "service"}) == 1
    build(after, first, metrics)
    assert value("strangler_split_percent", {"route": "orders", "backend": "orders"}) is None
    assert value("strangler_breaker_state", {"route": "orders", "backend": "orders"}) is None
    assert value("strangler_backend_info", {"backend": "monolith", "role": "legacy"}) is None
    assert value("strangler_backend_info", {"backend": "orders", "role": "service"}) is None
    assert value("strangler_backend_info", {"backend": "orders", "role": "legacy"}) == 1
    assert value("strangler_split_percent", {"route": "default", "backend": "orders"}) == 100


def test_route_gauges_read_as_prometheus_client_gauges_would(metrics: Metrics) -> None:
    """In one process the split and breaker gauges are plain numbers behind a collector of
    our own: the text a scraper reads is the one real Gauges give for the same changes
    (help, type, label order, float format, series order, removals)."""
    reference = CollectorRegistry()
    gauges = {
        name: Gauge(name, doc, ["route", "backend"], registry=reference)
        for name, doc in (
            ("strangler_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open."),
            (
                "strangler_split_percent",
                "The share of a route's traffic each backend gets, in percent.",
            ),
        )
    }
    split, state = gauges["strangler_split_percent"], gauges["strangler_breaker_state"]
    metrics.set_split("orders", {"orders": 25, "monolith": 75}, ["monolith", "orders", "cart"])
    split.labels("orders", "monolith").set(75)
    split.labels("orders", "orders").set(25)
    metrics.set_split("orders", {"orders": 0, "monolith": 100}, ["monolith", "orders", "cart"])
    split.labels("orders", "monolith").set(100)
    split.labels("orders", "orders").set(0)  # had a share: stays, at 0
    metrics.set_split("gone", {"cart": 100}, ["cart"])
    split.labels("gone", "cart").set(100)
    for route, backend, name, value in [
        ("orders", "orders", "open", 2),
        ("orders", "monolith", "closed", 0),
        ("gone", "cart", "half-open", 1),
        ("orders", "orders", "half-open", 1),
    ]:
        metrics.set_breaker_state(route, backend, name)
        state.labels(route, backend).set(value)
    metrics.retain({"orders", "default"}, {"orders": "service", "monolith": "legacy"})
    split.remove("gone", "cart")
    state.remove("gone", "cart")

    def families_text(registry: CollectorRegistry) -> str:
        lines = generate_latest(registry).decode().splitlines()
        return "\n".join(
            line for line in lines if "_split_percent" in line or "_breaker_st" in line
        )

    expected = families_text(reference)
    assert 'strangler_split_percent{backend="orders",route="orders"} 0.0' in expected
    assert families_text(metrics.registry) == expected
    assert metrics.registry.get_sample_value(
        "strangler_breaker_state", {"route": "orders", "backend": "orders"}
    ) == (1.0)
    # Not a Gauge child per series (~0.8 KiB each, 2,757 of them with 1,000 routes).
    assert not metrics.split_percent._metrics and not metrics.breaker_state._metrics


def test_route_gauges_are_children_with_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """With several workers the values must reach the per-process files the supervisor
    aggregates, which only Gauge children write: there they stay children (the aggregate
    itself is tested end to end, tests/e2e/test_metrics.py, two workers)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    m = Metrics(CollectorRegistry())
    m.set_split("orders", {"orders": 25, "monolith": 75}, ["orders", "monolith"])
    m.set_breaker_state("orders", "orders", "open")
    assert len(m.split_percent._metrics) == 2 and len(m.breaker_state._metrics) == 1
    labels = {"route": "orders", "backend": "orders"}
    assert m.registry.get_sample_value("strangler_split_percent", labels) == 25.0
    assert m.registry.get_sample_value("strangler_breaker_state", labels) == 2.0


def test_request_series_read_as_prometheus_client_metrics_would(metrics: Metrics) -> None:
    """In one process requests, durations and in-flight counts are plain numbers behind
    collectors of our own: the text a scraper reads is the one a real Counter, Histogram and
    Gauge give for the same requests (help, type, labels, bucket edges, cumulative counts,
    count, sum, series order, float format, a reload's removal of in-flight series)."""
    reference = CollectorRegistry()
    counter = Counter(
        "strangler_requests_total",
        "Requests answered, by route, backend that answered, method and status sent.",
        ["route", "backend", "method", "status"],
        registry=reference,
    )
    histogram = Histogram(
        "strangler_request_duration_seconds",
        "Time from receiving a request to its last byte sent.",
        ["route", "backend"],
        buckets=BUCKETS,
        registry=reference,
    )
    flights = Gauge(
        "strangler_bulkhead_in_flight",
        "Requests of a route in flight.",
        ["route"],
        registry=reference,
    )
    # Every bucket's edge exactly, between edges, beyond the last, and repeats.
    durations = [0.0, 0.0004, *BUCKETS, 0.0011, 0.003, 0.7, 29.0, 31.0, 120.0]
    for i, seconds in enumerate(durations):
        route, backend = ("orders", "orders") if i % 3 else ("cart", "monolith")
        method = ("GET", "POST", "BREW")[i % 3]
        status = (200, 503, 404, 200)[i % 4]
        metrics.record(outcome(method, status, seconds, route=route, backend=backend))
        counter.labels(route, backend, "OTHER" if method == "BREW" else method, str(status)).inc()
        histogram.labels(route, backend).observe(seconds)
    for route, value in [("orders", 3), ("cart", 1), ("orders", 0), ("gone", 2)]:
        metrics.set_in_flight(route, value)
        flights.labels(route).set(value)
    metrics.retain({"orders", "cart"}, {"orders": "service", "monolith": "legacy"})
    flights.remove("gone")

    def text(registry: CollectorRegistry) -> str:
        names = ("strangler_requests", "strangler_request_duration", "strangler_bulkhead_in")
        lines = generate_latest(registry).decode().splitlines()
        return "\n".join(line for line in lines if any(n in line for n in names))

    expected = text(reference)
    assert 'le="0.0025"' in expected and 'route="gone"' not in expected
    assert text(metrics.registry) == expected
    # Not a child with a lock per series.
    assert not metrics.requests._metrics and not metrics.duration._metrics
    assert not metrics.bulkhead_in_flight._metrics
