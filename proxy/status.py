"""The data behind `GET /api/routes` and the migration page (SPEC §8).

Each data-plane process takes a `snapshot` of its live state (plain, picklable data); the
admin side `merge`s the snapshots of every worker (one with a single worker) and `render`s
the answer with the route definitions of its own runtime. One path for both cases.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from proxy.runtime import RouteState, Runtime, describe
from proxy.stats import summarize

SEVERITY = {"closed": 0, "half-open": 1, "open": 2}
RECENT_SHOWN = 20  # mismatches per route in /api/routes; the policy keeps 100


def snapshot(rt: Runtime, ready: bool, health: Mapping[str, bool]) -> dict[str, Any]:
    routes: dict[str, Any] = {}
    for state in rt.routes.values():
        routes[state.name] = {
            "breakers": {b: state.breaker_state(b) for b in _backends_of(state)},
            "bulkhead": {
                "in_flight": state.bulkhead.in_flight,
                "queued": state.bulkhead.queued,
                "max_concurrent": state.bulkhead.max_concurrent,
                "max_queue": state.bulkhead.max_queue,
            },
            "shadow": _shadow_snapshot(state),
        }
    return {
        "ready": ready,
        "tasks": _task_count(),
        "routes": routes,
        "window": rt.metrics.window.raw(),
        "span": rt.metrics.window.span,
        "health": dict(health),
    }


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop (a snapshot taken outside the server)
        return 0


def _shadow_snapshot(state: RouteState) -> dict[str, Any] | None:
    shadow = state.shadow
    if shadow is None:
        return None
    return {
        **shadow.counts,
        "recent_mismatches": shadow.recent_mismatches,
        "backend": shadow.backend,
    }


def _backends_of(state: RouteState) -> list[str]:
    names = [*state.split.weights, *state.base_split.weights]
    if state.fallback:
        names.append(state.fallback)
    return list(dict.fromkeys(names))


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers' snapshots as one: counts summed, the worst breaker state, the newest
    mismatches."""
    routes: dict[str, Any] = {}
    window: dict[tuple[str, str], list[Any]] = {}
    health: dict[str, bool | None] = {}
    span = max((snap.get("span", 60.0) for snap in snapshots), default=60.0)
    tasks = sum(snap.get("tasks", 0) for snap in snapshots)
    for snap in snapshots:
        for name, route in snap["routes"].items():
            _merge_route(routes.setdefault(name, _empty_route()), route)
        for route_name, backend, requests, errors, histogram in snap["window"]:
            row = window.setdefault((route_name, backend), [0, 0, {}])
            row[0] += requests
            row[1] += errors
            for bucket, count in histogram.items():
                row[2][bucket] = row[2].get(bucket, 0) + count
        for backend, up in snap["health"].items():
            health[backend] = bool(health.get(backend, True) and up) if up is not None else None
    for route in routes.values():
        if route["shadow"] is not None:
            recent = sorted(route["shadow"]["recent_mismatches"], key=lambda m: -m["time"])
            route["shadow"]["recent_mismatches"] = recent[:RECENT_SHOWN]
    process = {"workers": len(snapshots), "tasks": tasks}
    return {"routes": routes, "window": window, "health": health, "span": span, "process": process}


def _empty_route() -> dict[str, Any]:
    return {
        "breakers": {},
        "bulkhead": {"in_flight": 0, "queued": 0, "max_concurrent": 0, "max_queue": 0},
        "shadow": None,
    }


def _merge_route(into: dict[str, Any], route: dict[str, Any]) -> None:
    for backend, state in route["breakers"].items():
        known = into["breakers"].get(backend, "closed")
        into["breakers"][backend] = max(known, state, key=SEVERITY.__getitem__)
    for key in ("in_flight", "queued", "max_concurrent", "max_queue"):
        into["bulkhead"][key] += route["bulkhead"][key]
    shadow = route["shadow"]
    if shadow is not None:
        mine = into["shadow"] or {
            **shadow,
            "match": 0,
            "mismatch": 0,
            "error": 0,
            "dropped": 0,
            "recent_mismatches": [],
        }
        for key in ("match", "mismatch", "error", "dropped"):
            mine[key] += shadow.get(key, 0)
        mine["recent_mismatches"] = [*mine["recent_mismatches"], *shadow["recent_mismatches"]]
        into["shadow"] = mine


def render(rt: Runtime, merged: dict[str, Any], last_reload: dict[str, Any]) -> dict[str, Any]:
    """The `/api/routes` answer."""
    routes = [_route_view(state, merged) for state in rt.routes.values()]
    return {
        "routes": routes,
        "migrated_share": migrated_share(merged["window"], rt.legacy),
        "legacy": rt.legacy,
        "last_reload": last_reload,
        "process": merged.get("process", {}),
    }


def _route_view(state: RouteState, merged: dict[str, Any]) -> dict[str, Any]:
    live = merged["routes"].get(state.name, _empty_route())
    backends: dict[str, Any] = {}
    for backend in _backends_of(state):
        requests, errors, histogram = merged["window"].get((state.name, backend), (0, 0, {}))
        backends[backend] = {
            "breaker": live["breakers"].get(backend, "closed"),
            **summarize(requests, errors, histogram, merged.get("span", 60.0)),
            "up": merged["health"].get(backend),
        }
    view: dict[str, Any] = {
        "name": state.name,
        "match": describe(state),
        "split": dict(state.split.weights),
        "configured_split": dict(state.base_split.weights),
        "override": dict(state.override) if state.override is not None else None,
        "backends": backends,
        "bulkhead": live["bulkhead"],
        "fallback": state.fallback,
    }
    if live["shadow"] is not None:
        view["shadow"] = live["shadow"]
    return view


def migrated_share(window: dict[tuple[str, str], list[Any]], legacy: str) -> float:
    """The share of the last minute's answered requests that new services answered (requests
    refused before a backend was chosen count for neither side)."""
    total = migrated = 0
    for (_, backend), (requests, _, _) in window.items():
        if backend == "none":
            continue
        total += requests
        if backend != legacy:
            migrated += requests
    return round(migrated / total, 4) if total else 0.0
