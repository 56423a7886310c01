"""What the admin port reads and steers: the runtime model (config and overrides) held by
this process, and the live state reported by the data plane (this process, or the workers
through the supervisor)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from proxy.app import Holder
from proxy.explain import explain
from proxy.reload import Reloader
from proxy.runtime import Runtime
from proxy.status import merge, render


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


class AdminControl:
    def __init__(
        self,
        holder: Holder,
        reloader: Reloader,
        *,
        snapshots: Callable[[], list[dict[str, Any]]],
        metrics: Callable[[], tuple[bytes, str]],
        ready: Callable[[], bool],
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.holder = holder
        self.reloader = reloader
        self._snapshots = snapshots
        self._metrics = metrics
        self._ready = ready
        self._settle = settle

    @property
    def token_env(self) -> str:
        return self.holder.current.config.admin.token_env

    def is_ready(self) -> bool:
        return self._ready()

    def metrics(self) -> tuple[bytes, str]:
        return self._metrics()

    def routes(self) -> dict[str, Any]:
        merged = merge(self._snapshots())
        return render(self.holder.current, merged, self.reloader.last.as_dict())

    def explain(self, method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
        return explain(self.holder.current, method, url, headers)

    def set_split(self, route: str, weights: Mapping[str, int] | None) -> None:
        rt = self.holder.current
        if route not in rt.routes:
            raise KeyError(route)
        self.reloader.set_split(route, None if weights is None else check_split(weights, rt))

    async def reload(self) -> dict[str, Any]:
        return (await self.reloader.reload_async()).as_dict()

    async def settle(self) -> None:
        """Return once a change made through this control is live in every data plane (at
        once in one process; with workers, when each has said so, within a bound)."""
        if self._settle is not None:
            await self._settle()
