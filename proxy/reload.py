"""The only module that changes which runtime snapshot is current: config reloads (file
change, SIGHUP, admin API) and live split overrides.

A reload that fails validation changes nothing. Requests in flight keep the snapshot they
started with; connection pools a reload retires are closed once their last request ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy import offload
from proxy.app import Holder
from proxy.config import Config, ConfigError
from proxy.forward import Upstream
from proxy.logs import event
from proxy.runtime import Runtime, build, retired_upstreams

log = logging.getLogger("strangler.reload")


@dataclass(frozen=True)
class ReloadResult:
    time: float
    result: str  # "success" or "failure"
    errors: tuple[str, ...] = ()
    initial: bool = False  # the config loaded at start, not a reload

    def as_dict(self) -> dict[str, object]:
        return {
            "time": self.time,
            "result": self.result,
            "errors": list(self.errors),
            "initial": self.initial,
        }


@dataclass
class Reloader:
    holder: Holder
    path: Path
    last: ReloadResult = field(
        default_factory=lambda: ReloadResult(time.time(), "success", initial=True)
    )
    on_config: list[Callable[[Config, Runtime], None]] = field(default_factory=list)
    on_split: list[Callable[[str, Mapping[str, int] | None], None]] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def reload(self) -> ReloadResult:
        """Read and validate the file (in a child process, `offload`); swap the snapshot
        only when it is valid."""
        return self._finish(self._read())

    async def reload_async(self) -> ReloadResult:
        """`reload`, waiting for the validating child on a thread: a large config (about a
        second for 1,000 routes) must not stall requests. Reloads run one at a time."""
        async with self._lock:
            return self._finish(await asyncio.to_thread(self._read))

    def _read(self) -> Config | ConfigError:
        try:
            return offload.load(self.path)
        except ConfigError as err:
            return err

    def _finish(self, loaded: Config | ConfigError) -> ReloadResult:
        metrics = self.holder.current.metrics
        if isinstance(loaded, ConfigError):
            errors = tuple(str(i) for i in loaded.issues)
            self.last = ReloadResult(time.time(), "failure", errors)
            metrics.reload("failure")
            event(log, "config reload failed", logging.ERROR, errors=list(errors))
            return self.last
        self.apply(loaded)
        self.last = ReloadResult(time.time(), "success")
        metrics.reload("success")
        event(log, "config reloaded", routes=len(loaded.routes), file=str(self.path))
        return self.last

    def apply(self, config: Config) -> None:
        """Make `config` current, keeping the state whose settings did not change."""
        old = self.holder.current
        new = build(config, old, old.metrics)
        self.holder.current = new
        self._retire(retired_upstreams(old, new))
        for callback in self.on_config:
            callback(config, new)

    def set_split(self, route: str, weights: Mapping[str, int] | None) -> None:
        """A live split override (None: back to the file's split), until the next reload."""
        self.holder.current = self.holder.current.with_split(route, weights)
        event(log, "split override", route=route, split=dict(weights) if weights else None)
        for callback in self.on_split:
            callback(route, weights)

    def _retire(self, upstreams: list[Upstream]) -> None:
        for upstream in upstreams:
            upstream.retire()


class FileWatch:
    """Polls the config file's identity (following symlinks), so an editor's atomic rename
    and a Kubernetes ConfigMap's `..data` symlink swap are both seen."""

    def __init__(
        self, path: Path, on_change: Callable[[], Awaitable[object]], interval: float = 1.0
    ):
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self._seen = self._identity()

    def _identity(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        """Whether the file is another one (or another version) than last time."""
        now = self._identity()
        if now is None or now == self._seen:
            return False
        self._seen = now
        return True

    async def poll(self) -> bool:
        if not self.changed():
            return False
        await self.on_change()
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad reload
                log.exception("config watch failed")
