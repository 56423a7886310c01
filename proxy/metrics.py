"""Every metric of SPEC §9, defined once, and the sinks the data plane reports into.

Labelled children are made on first use and cached: recording a request looks up the
children bound to its (route, backend) once, then counts. Nothing is made per route up
front except what SPEC §9 shows for every route (split, breaker state). In one process
those two are plain numbers by (route, backend), exposed at scrape time by a collector of
our own (`_RouteGauge`): a Gauge child each, with its lock and value object, was ~2 MB
with 1,000 routes. With several workers prometheus_client's multiprocess mode is on
(PROMETHEUS_MULTIPROC_DIR): the workers' values reach the supervisor's /metrics only
through the per-process files Gauge children write, so there they stay children. Each
gauge says how workers combine.

Only the series of the table are exposed: no `*_created` companions (prometheus_client adds
them to the text format of one process, never to the multiprocess aggregate), and the two
health gauges appear only once something sets them ("absent without one").
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.outcome import Outcome
from proxy.stats import Series, Window

BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
BREAKER_VALUES = {"closed": 0, "half-open": 1, "open": 2}

disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.requests = Counter(
            "strangler_requests_total",
            "Requests answered, by route, backend that answered, method and status sent.",
            ["route", "backend", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "strangler_request_duration_seconds",
            "Time from receiving a request to its last byte sent.",
            ["route", "backend"],
            buckets=BUCKETS,
            registry=r,
        )
        self.upstream_failures = Counter(
            "strangler_upstream_failures_total",
            "Failed attempts to a backend, by reason (connect, timeout, status, protocol).",
            ["route", "backend", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "strangler_retries_total", "Retried attempts.", ["route", "backend"], registry=r
        )
        # Beyond SPEC §9: what the retry-budget alert needs to be exact rather than inferred.
        self.retries_refused = Counter(
            "strangler_retry_budget_exhausted_total",
            "Retries a failed attempt qualified for that the route's retry budget refused.",
            ["route", "backend"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "strangler_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["route", "backend"],
            multiprocess_mode="livemax",
            registry=r if multiprocess else None,
        )
        # One process: the values alone, exposed where the Gauge would have been.
        self._breakers = None if multiprocess else _RouteGauge(self.breaker_state, r)
        self.breaker_rejections = Counter(
            "strangler_breaker_rejections_total",
            "Requests not sent to a backend because its breaker was open.",
            ["route", "backend"],
            registry=r,
        )
        self.fallbacks = Counter(
            "strangler_fallbacks_total",
            "Requests sent to the fallback backend.",
            ["route", "backend", "fallback"],
            registry=r,
        )
        self.bulkhead_in_flight = Gauge(
            "strangler_bulkhead_in_flight",
            "Requests of a route in flight.",
            ["route"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.bulkhead_rejections = Counter(
            "strangler_bulkhead_rejections_total",
            "Requests refused because a route's bulkhead and queue were full.",
            ["route"],
            registry=r,
        )
        self.split_percent = Gauge(
            "strangler_split_percent",
            "The share of a route's traffic each backend gets, in percent.",
            ["route", "backend"],
            multiprocess_mode="livemax",
            registry=r if multiprocess else None,
        )
        self._splits = None if multiprocess else _RouteGauge(self.split_percent, r)
        self.shadow_results = Counter(
            "strangler_shadow_results_total",
            "Shadow comparisons: match, mismatch or error.",
            ["route", "backend", "result"],
            registry=r,
        )
        self.config_reloads = Counter(
            "strangler_config_reloads_total",
            "Config reloads by result.",
            ["result"],
            registry=r,
        )
        self.backend_info = Gauge(
            "strangler_backend_info",
            "Declared backends and their role (legacy or service).",
            ["backend", "role"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.backend_up = Gauge(
            "strangler_backend_up",
            "1 when the backend's active health check passes, 0 when not.",
            ["backend"],
            multiprocess_mode="livemax",
            registry=r,
        )
        # Absent unless a shared breaker storage is configured (SPEC §9): made on first use.
        self.breaker_storage_up: Gauge | None = None
        self._children: dict[tuple[Any, ...], Any] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._in_flight: dict[str, Any] = {}
        self.window = Window()

    def retain(self, routes: set[str], roles: Mapping[str, str]) -> None:
        """Forget the gauges of routes and backends a reload removed (and a backend's old
        role): they would show their last value forever. Counters keep their history."""
        by_route = (id(self.split_percent), id(self.breaker_state), id(self.bulkhead_in_flight))
        metrics = {
            id(m): m
            for m in (
                self.split_percent,
                self.breaker_state,
                self.bulkhead_in_flight,
                self.backend_info,
                self.backend_up,
            )
        }
        for key in list(self._children):
            metric_id, labels = key[0], key[1:]
            if metric_id not in metrics:
                continue
            if metric_id in by_route:
                stale = labels[0] not in routes or (len(labels) > 1 and labels[1] not in roles)
            elif metric_id == id(self.backend_info):
                stale = roles.get(labels[0]) != labels[1]
            else:
                stale = labels[0] not in roles
            if stale:
                self._forget(metrics[metric_id], key)
        for gauge in (self._splits, self._breakers):
            if gauge is not None:
                values = gauge.values
                for pair in [p for p in values if p[0] not in routes or p[1] not in roles]:
                    del values[pair]

    def _forget(self, metric: Any, key: tuple[Any, ...]) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Series live in per-process files: a zero is the only way to retract one.
            self._children[key].set(0)
            return
        metric.remove(*key[1:])
        del self._children[key]
        if metric is self.bulkhead_in_flight:
            self._in_flight.pop(key[1], None)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, o: Outcome) -> None:
        pair = self._pairs.get((o.route, o.backend))
        key = (o.method if o.method in KNOWN_METHODS else "OTHER", o.status)
        counter = None if pair is None else pair.requests.get(key)
        if counter is None:
            counter = self._child(self.requests, o.route, o.backend, key[0], str(o.status))
            pair = pair or self._pair(o.route, o.backend)
            pair.requests[key] = counter
        assert pair is not None
        counter.inc()
        pair.duration.observe(o.duration)
        pair.series.add(o.status >= 500, o.duration)

    def _pair(self, route: str, backend: str) -> _Pair:
        pair = _Pair(self._child(self.duration, route, backend), self.window.series(route, backend))
        self._pairs[(route, backend)] = pair
        return pair

    def upstream_failure(self, route: str, backend: str, reason: str) -> None:
        self._child(self.upstream_failures, route, backend, reason).inc()

    def retry(self, route: str, backend: str) -> None:
        self._child(self.retries, route, backend).inc()

    def retry_refused(self, route: str, backend: str) -> None:
        self._child(self.retries_refused, route, backend).inc()

    def set_breaker_state(self, route: str, backend: str, state: str) -> None:
        if self._breakers is not None:
            self._breakers.values[(route, backend)] = BREAKER_VALUES[state]
        else:
            self._child(self.breaker_state, route, backend).set(BREAKER_VALUES[state])

    def breaker_rejection(self, route: str, backend: str) -> None:
        self._child(self.breaker_rejections, route, backend).inc()

    def fallback(self, route: str, backend: str, fallback: str) -> None:
        self._child(self.fallbacks, route, backend, fallback).inc()

    def set_in_flight(self, route: str, value: int) -> None:
        child = self._in_flight.get(route)
        if child is None:
            child = self._in_flight[route] = self._child(self.bulkhead_in_flight, route)
        child.set(value)

    def bulkhead_rejection(self, route: str) -> None:
        self._child(self.bulkhead_rejections, route).inc()

    def set_split(self, route: str, weights: Mapping[str, int], backends: Any) -> None:
        """Every backend's share of `route`; a backend the route never sent traffic to has
        no series (not a 0: with many routes and backends those are most of the memory)."""
        splits = self._splits
        for backend in backends:
            weight = weights.get(backend, 0)
            if splits is not None:
                pair = (route, backend)
                if weight or pair in splits.values:
                    splits.values[pair] = weight
            elif weight or (id(self.split_percent), route, backend) in self._children:
                self._child(self.split_percent, route, backend).set(weight)

    def shadow_result(self, route: str, backend: str, result: str) -> None:
        self._child(self.shadow_results, route, backend, result).inc()

    def reload(self, result: str) -> None:
        self._child(self.config_reloads, result).inc()

    def set_backend_info(self, backend: str, role: str) -> None:
        self._child(self.backend_info, backend, role).set(1)

    def set_backend_up(self, backend: str, up: bool) -> None:
        self._child(self.backend_up, backend).set(1 if up else 0)

    def set_storage_up(self, up: bool) -> None:
        if self.breaker_storage_up is None:
            self.breaker_storage_up = Gauge(
                "strangler_breaker_storage_up",
                "1 while the shared breaker storage answers, 0 when not.",
                multiprocess_mode="livemax",
                registry=self.registry,
            )
        self.breaker_storage_up.set(1 if up else 0)


class _RouteGauge(Collector):
    """A (route, backend) gauge of one process kept as plain numbers and exposed at scrape
    time as `gauge` would be: same name, help, type, labels, order and values."""

    def __init__(self, gauge: Gauge, registry: CollectorRegistry) -> None:
        self.name = gauge._name
        self.documentation = gauge._documentation
        self.values: dict[tuple[str, str], int] = {}
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=["route", "backend"])]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=["route", "backend"])
        for (route, backend), value in list(self.values.items()):
            family.add_metric((route, backend), value)
        yield family


class _Pair:
    """The children one (route, backend) records into, bound on its first request."""

    __slots__ = ("duration", "series", "requests")

    def __init__(self, duration: Any, series: Series) -> None:
        self.duration = duration
        self.series = series
        self.requests: dict[tuple[str, int], Any] = {}  # (method, status) -> counter child
