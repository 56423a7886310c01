"""The data behind `GET /api/routes` and the migration page (SPEC §8), from one snapshot."""

from __future__ import annotations

from typing import Any

from proxy.runtime import RouteState, Runtime


def routes_view(rt: Runtime, last_reload: dict[str, Any]) -> dict[str, Any]:
    routes = [_route_view(rt, state) for state in rt.routes.values()]
    return {
        "routes": routes,
        "migrated_share": migrated_share(rt),
        "legacy": rt.legacy,
        "last_reload": last_reload,
    }


def _route_view(rt: Runtime, state: RouteState) -> dict[str, Any]:
    backends: dict[str, Any] = {}
    names = list(dict.fromkeys([*state.split.weights, *state.base_split.weights]))
    if state.fallback:
        names.append(state.fallback)
    for backend in dict.fromkeys(names):
        breaker = state.breaker(backend)
        backends[backend] = {
            "breaker": breaker.state,
            **rt.metrics.window.summary(state.name, backend),
            "up": None,
        }
    match = state.config.match.model_dump(exclude_none=True) if state.config else {"prefix": "/"}
    return {
        "name": state.name,
        "match": match,
        "split": dict(state.split.weights),
        "override": dict(state.override) if state.override is not None else None,
        "backends": backends,
        "bulkhead": {
            "in_flight": state.bulkhead.in_flight,
            "queued": state.bulkhead.queued,
            "max_concurrent": state.bulkhead.max_concurrent,
        },
        "fallback": state.fallback,
    }


def migrated_share(rt: Runtime) -> float:
    """The share of the last minute's requests answered by backends other than legacy."""
    total = migrated = 0.0
    for route, backend in rt.metrics.window.keys():
        requests = rt.metrics.window.summary(route, backend)["requests"]
        total += requests
        if backend not in (rt.legacy, "none"):
            migrated += requests
    return round(migrated / total, 4) if total else 0.0
