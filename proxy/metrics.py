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

The per-request series (`strangler_requests_total`, `strangler_request_duration_seconds`,
`strangler_bulkhead_in_flight`) are plain numbers too in one process, exposed by collectors
in exactly the text the Counter, Histogram and Gauge would give: their children took a lock
and a few Python calls per update, ~8% of the proxy's instructions per request (callgrind).

Only the series of the table are exposed: no `*_created` companions (prometheus_client adds
them to the text format of one process, never to the multiprocess aggregate), and the two
health gauges appear only once something sets them ("absent without one").
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
            registry=r if multiprocess else None,
        )
        self.duration = Histogram(
            "strangler_request_duration_seconds",
            "Time from receiving a request to its last byte sent.",
            ["route", "backend"],
            buckets=BUCKETS,
            registry=r if multiprocess else None,
        )
        # (route, backend, method, status) -> requests; (route, backend) -> _Pair; in the
        # order a series first appeared, as a Counter's and a Histogram's children are.
        self._counts: dict[tuple[str, str, str, int], int] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}
        if not multiprocess:
            r.register(_RequestSeries(self))
            self.record = self._record_plain  # type: ignore[method-assign]
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
            registry=r if multiprocess else None,
        )
        self._flights = (
            None if multiprocess else _RouteGauge(self.bulkhead_in_flight, r, labels=("route",))
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
        if self._flights is not None:
            flights = self._flights.values
            for route in [route for route in flights if route not in routes]:
                del flights[route]

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
        """One answered request (with several workers: into the metric children)."""
        pair = self._pairs.get((o.route, o.backend))
        key = (o.method if o.method in KNOWN_METHODS else "OTHER", o.status)
        counter = None if pair is None else pair.requests.get(key)
        if counter is None:
            counter = self._child(self.requests, o.route, o.backend, key[0], str(o.status))
            pair = pair or self._pair(
                o.route, o.backend, self._child(self.duration, o.route, o.backend)
            )
            pair.requests[key] = counter
        assert pair is not None
        counter.inc()
        pair.duration.observe(o.duration)
        pair.series.add(o.status >= 500, o.duration)

    def _record_plain(self, o: Outcome) -> None:
        """`record` in one process: plain numbers, read by `_RequestSeries` at scrape time."""
        route, backend, status, seconds = o.route, o.backend, o.status, o.duration
        pair = self._pairs.get((route, backend))
        if pair is None:
            pair = self._pair(route, backend, None)
        key = (route, backend, o.method if o.method in KNOWN_METHODS else "OTHER", status)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        pair.buckets[bisect_left(BUCKETS, seconds)] += 1  # le: the first bound >= seconds
        pair.sum += seconds
        pair.series.add(status >= 500, seconds)

    def _pair(self, route: str, backend: str, duration: Any) -> _Pair:
        """`duration`: the histogram's child with several workers; None in one process."""
        pair = _Pair(duration, self.window.series(route, backend))
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
        if self._flights is not None:
            self._flights.values[route] = value
            return
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
    """A gauge of one process kept as plain numbers and exposed at scrape time as `gauge`
    would be: same name, help, type, labels, order and values. Keyed by the tuple of its
    label values, or by the value itself when it has one label."""

    def __init__(
        self,
        gauge: Gauge,
        registry: CollectorRegistry,
        labels: tuple[str, ...] = ("route", "backend"),
    ) -> None:
        self.name = gauge._name
        self.documentation = gauge._documentation
        self.labels = list(labels)
        self.values: dict[Any, int] = {}
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        single = len(self.labels) == 1
        for key, value in list(self.values.items()):
            family.add_metric((key,) if single else key, value)
        yield family


_LE = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]


class _RequestSeries(Collector):
    """`strangler_requests_total` and `strangler_request_duration_seconds` of one process,
    from the plain numbers `Metrics._record_plain` keeps, as the Counter and Histogram would
    show them (cumulative buckets, `_count`, `_sum`; no `_created`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        m = self.metrics
        requests = CounterMetricFamily(
            m.requests._name, m.requests._documentation, labels=m.requests._labelnames
        )
        duration = HistogramMetricFamily(
            m.duration._name, m.duration._documentation, labels=m.duration._labelnames
        )
        return requests, duration

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> Iterator[Any]:
        requests, duration = self._families()
        m = self.metrics
        for (route, backend, method, status), count in list(m._counts.items()):
            requests.add_metric((route, backend, method, str(status)), count)
        for (route, backend), pair in list(m._pairs.items()):
            total, cumulative = 0, []
            for le, n in zip(_LE, pair.buckets, strict=True):
                total += n
                cumulative.append((le, total))
            duration.add_metric((route, backend), cumulative, pair.sum)
        yield requests
        yield duration


class _Pair:
    """What one (route, backend) records into, bound on its first request: the histogram's
    child (several workers) or its counts (one process), and the page's window."""

    __slots__ = ("duration", "series", "requests", "buckets", "sum")

    def __init__(self, duration: Any, series: Series) -> None:
        self.duration = duration
        self.series = series
        self.requests: dict[tuple[str, int], Any] = {}  # (method, status) -> counter child
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
