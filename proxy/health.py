"""Active health checks (SPEC §2 `backends.*.health`): each checked backend is polled on
its path every `interval` seconds; 2xx and 3xx answers are up. The result is shown in
/api/routes and `strangler_backend_up`; it does not change routing (breakers do that)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from proxy.config import Config, Health
from proxy.errors import UpstreamError
from proxy.forward import Timeouts, Upstream
from proxy.logs import event

log = logging.getLogger("strangler.health")


class HealthChecks:
    def __init__(self, on_change: Callable[[str, bool], None]) -> None:
        self.status: dict[str, bool] = {}
        self._on_change = on_change
        self._tasks: dict[str, tuple[tuple[object, ...], asyncio.Task[None]]] = {}

    def update(self, config: Config, upstreams: Mapping[str, Upstream]) -> None:
        """Start, keep or stop checks so they match `config` (called on every reload)."""
        wanted = {name: b.health for name, b in config.backends.items() if b.health is not None}
        for name in list(self._tasks):
            key = (wanted.get(name), id(upstreams.get(name)))
            if self._tasks[name][0] != key:
                self._tasks.pop(name)[1].cancel()
                if name not in wanted:
                    self.status.pop(name, None)
        for name, health in wanted.items():
            if name not in self._tasks:
                upstream = upstreams[name]
                task = asyncio.ensure_future(self._run(name, upstream, health))
                self._tasks[name] = ((health, id(upstream)), task)

    async def _run(self, name: str, upstream: Upstream, health: Health) -> None:
        timeouts = Timeouts(health.timeout, health.timeout, health.timeout)
        headers = [
            (b"host", upstream.host_header or b"localhost"),
            (b"user-agent", b"strangler-health"),
        ]
        while True:
            up = await self.probe(upstream, health.path, headers, timeouts)
            if self.status.get(name) != up:
                level = logging.INFO if up else logging.WARNING
                event(log, "backend health changed", level, backend=name, up=up)
                self.status[name] = up
                self._on_change(name, up)
            await asyncio.sleep(health.interval)

    @staticmethod
    async def probe(
        upstream: Upstream, path: str, headers: list[tuple[bytes, bytes]], timeouts: Timeouts
    ) -> bool:
        try:
            resp = await upstream.send("GET", upstream.target(path, b""), headers, None, timeouts)
        except UpstreamError:
            return False
        try:
            with contextlib.suppress(UpstreamError):
                await resp.read(64 * 1024)
        finally:
            resp.close()
        return 200 <= resp.status < 400

    def stop(self) -> None:
        for _, task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
