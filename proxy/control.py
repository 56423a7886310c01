"""The admin port's view of an in-process data plane (one worker)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.app import Holder
from proxy.explain import explain
from proxy.reload import Reloader
from proxy.runtime import Runtime


def check_split(weights: object, rt: Runtime) -> dict[str, int]:
    """A split from the admin API, validated like the config's; ValueError says why not."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError('the split must be a JSON object such as {"orders": 0, "monolith": 100}')
    clean: dict[str, int] = {}
    for backend, pct in weights.items():
        if backend not in rt.config.backends:
            known = ", ".join(rt.config.backends)
            raise ValueError(f"backend {backend!r} is not declared (declared: {known})")
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise ValueError(f"{backend}: {pct!r} is not an integer percentage from 0 to 100")
        clean[backend] = pct
    total = sum(clean.values())
    if total != 100:
        raise ValueError(f"the percentages sum to {total}, not 100")
    return clean


class LocalControl:
    def __init__(self, holder: Holder, reloader: Reloader, registry: CollectorRegistry) -> None:
        self.holder = holder
        self.reloader = reloader
        self.registry = registry

    @property
    def token_env(self) -> str:
        return self.holder.current.config.admin.token_env

    def is_ready(self) -> bool:
        return self.holder.ready and not self.holder.draining

    def metrics(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def routes(self) -> dict[str, Any]:
        from proxy.status import routes_view

        return routes_view(self.holder.current, self.reloader.last.as_dict())

    def explain(self, method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
        return explain(self.holder.current, method, url, headers)

    def set_split(self, route: str, weights: Mapping[str, int] | None) -> None:
        rt = self.holder.current
        if route not in rt.routes:
            raise KeyError(route)
        self.reloader.set_split(route, None if weights is None else check_split(weights, rt))

    def reload(self) -> dict[str, Any]:
        return self.reloader.reload().as_dict()
