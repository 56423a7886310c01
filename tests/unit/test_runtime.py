"""proxy.runtime: what a large config costs before its routes see a request. Breakers are
made on first use (their metric series exist from the start), and routes with the same
settings share their immutable policy parts."""

from __future__ import annotations

import textwrap

from prometheus_client import CollectorRegistry

from proxy.config import Config
from proxy.loader import load_text
from proxy.metrics import Metrics
from proxy.runtime import build
from proxy.status import snapshot

CONFIG = """\
version: 1
legacy: monolith
backends:
  monolith: {url: "http://127.0.0.1:8001"}
  orders: {url: "http://127.0.0.1:8002"}
routes:
  - name: a
    match: {prefix: /a}
    split: {orders: 25, monolith: 75}
    sticky: {cookie: sid}
    fallback: monolith
  - name: b
    match: {prefix: /b}
    split: {orders: 25, monolith: 75}
    sticky: {cookie: sid}
    fallback: monolith
  - name: c
    match: {prefix: /c}
    backend: orders
    timeout: {read: 5}
    retry: {attempts: 3}
"""


def config(text: str = CONFIG) -> Config:
    return load_text(textwrap.dedent(text), "t.yaml")


def state_value(m: Metrics, route: str, backend: str) -> float | None:
    labels = {"route": route, "backend": backend}
    return m.registry.get_sample_value("strangler_breaker_state", labels)


def test_no_breaker_is_made_before_a_request_but_every_state_is_exposed() -> None:
    m = Metrics(CollectorRegistry())
    rt = build(config(), None, m)
    assert all(not state.breakers for state in rt.routes.values())
    for route, backend in [("a", "orders"), ("a", "monolith"), ("c", "orders")]:
        assert state_value(m, route, backend) == 0.0
        assert rt.routes[route].breaker_state(backend) == "closed"
    snapshot(rt, True, {})  # what /api/routes and the workers' reports read
    assert all(not state.breakers for state in rt.routes.values())


def test_a_breaker_made_later_reports_its_changes() -> None:
    m = Metrics(CollectorRegistry())
    rt = build(config(), None, m)
    breaker = rt.routes["c"].breaker("orders")
    assert rt.routes["c"].breaker("orders") is breaker
    for _ in range(5):  # the default failure_threshold
        ticket = breaker.try_acquire()
        assert ticket is not None
        breaker.record_failure(ticket)
    assert rt.routes["c"].breaker_state("orders") == "open"
    assert state_value(m, "c", "orders") == 2.0


def test_a_breaker_made_on_the_old_snapshot_after_a_reload_is_the_new_ones_too() -> None:
    m = Metrics(CollectorRegistry())
    old = build(config(), None, m)
    new = build(config(CONFIG.replace("/c}", "/cc}")), old, m)
    made_late = old.routes["a"].breaker("orders")  # a request still on the old snapshot
    assert new.routes["a"].breaker("orders") is made_late


def test_routes_alike_share_their_immutable_parts_and_overrides_stay_their_own() -> None:
    rt = build(config(), None, Metrics(CollectorRegistry()))
    a, b, c = rt.routes["a"], rt.routes["b"], rt.routes["c"]
    assert a.split is b.split and a.timeouts is b.timeouts and a.retry is b.retry
    assert a.chooser.sticky is b.chooser.sticky
    assert a.chooser is not b.chooser and a.bulkhead is not b.bulkhead
    assert c.timeouts is not a.timeouts and c.timeouts.read == 5.0
    assert c.retry is not a.retry and c.retry.attempts == 3
    changed = rt.with_split("a", {"orders": 0, "monolith": 100})
    assert dict(changed.routes["b"].split.weights) == {"orders": 25, "monolith": 75}
    assert changed.routes["a"].override == {"orders": 0, "monolith": 100}
    assert changed.routes["b"].override is None
    assert changed.with_split("a", None).routes["a"].override is None
