"""The /api/routes data: snapshots merged across workers, rendered with the runtime."""

from __future__ import annotations

from proxy.loader import load_text
from proxy.metrics import Metrics
from proxy.runtime import build
from proxy.stats import Window, summarize
from proxy.status import merge, render, snapshot

CONFIG = """
version: 1
legacy: monolith
backends:
  monolith: {url: "http://127.0.0.1:1"}
  orders: {url: "http://127.0.0.1:2"}
routes:
  - name: orders
    match: {prefix: /api/orders}
    split: {orders: 25, monolith: 75}
    fallback: monolith
"""


def test_window_summary_over_the_last_minute() -> None:
    now = [1000.0]
    window = Window(clock=lambda: now[0])
    for i in range(100):
        window.add("orders", "orders", 500 if i < 5 else 200, 0.010 if i < 95 else 0.5)
    ((route, backend, requests, errors, histogram),) = window.raw()
    summary = summarize(requests, errors, histogram)
    assert (route, backend, requests, errors) == ("orders", "orders", 100, 5)
    assert summary["error_rate"] == 0.05
    assert 9.0 <= summary["p95_ms"] <= 12.0
    now[0] += 61
    assert window.raw() == []


def test_merge_sums_counts_and_takes_the_worst_breaker() -> None:
    rt = build(load_text(CONFIG, "x.yaml"), None, Metrics())
    rt.metrics.window.add("orders", "orders", 200, 0.01)
    rt.metrics.window.add("orders", "monolith", 200, 0.01)
    one = snapshot(rt, True, {"orders": True})
    two = snapshot(rt, True, {"orders": False})
    two["routes"]["orders"]["breakers"]["orders"] = "open"
    merged = merge([one, two])
    view = render(rt, merged, {"time": 0, "result": "success", "errors": []})
    orders = next(r for r in view["routes"] if r["name"] == "orders")
    assert orders["split"] == {"orders": 25, "monolith": 75} and orders["override"] is None
    assert orders["backends"]["orders"]["breaker"] == "open"
    assert orders["backends"]["orders"]["requests"] == 2
    assert orders["backends"]["orders"]["up"] is False
    assert orders["bulkhead"]["max_concurrent"] == 200
    assert view["migrated_share"] == 0.5
    assert {r["name"] for r in view["routes"]} == {"orders", "default"}


def test_override_shows_in_the_view() -> None:
    rt = build(load_text(CONFIG, "x.yaml"), None, Metrics())
    rt = rt.with_split("orders", {"orders": 0, "monolith": 100})
    view = render(rt, merge([snapshot(rt, True, {})]), {})
    orders = next(r for r in view["routes"] if r["name"] == "orders")
    assert orders["override"] == {"orders": 0, "monolith": 100}
    assert orders["split"] == {"orders": 0, "monolith": 100}
