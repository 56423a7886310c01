"""Running the proxy: the main and admin servers, signals, reloads and graceful drain.

One worker runs everything in one process. With `--workers N` a supervisor process holds
the admin port, watches the config and steers N worker processes that share the main
socket (see `workers`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from proxy import logs
from proxy.admin import create_admin
from proxy.app import Holder, ProxyApp
from proxy.config import Config, Limits
from proxy.control import AdminControl
from proxy.forward import close_all
from proxy.headers import new_request_id
from proxy.health import HealthChecks
from proxy.http1 import MainServer
from proxy.logs import AccessLog, event
from proxy.metrics import Metrics
from proxy.outcome import Outcome
from proxy.reload import FileWatch, Reloader
from proxy.runtime import build
from proxy.status import snapshot

log = logging.getLogger("strangler.server")


@dataclass(frozen=True)
class Options:
    config_path: Path
    host: str
    port: int
    admin_host: str
    admin_port: int
    workers: int = 1
    log_format: str = "json"
    log_level: str = "info"
    watch_interval: float = 1.0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    sock.setblocking(False)
    return sock


# The admin port's edges. Its clients are operators, the CLI, the page and Prometheus: a
# few connections, small requests. Idle keep-alive connections close after 5 s (uvicorn's
# default, which served this port before); a stop waits 1 s for requests in flight.
ADMIN_LIMITS = Limits.model_construct(keepalive_timeout=5.0, max_connections=1000)
ADMIN_GRACE = 1.0


def admin_server(app: Any) -> MainServer:
    """The admin port's server: ours, as the main port's (no uvicorn in the process)."""
    return MainServer(app, ADMIN_LIMITS, ADMIN_GRACE)


def listening(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


class DataPlane:
    """The proxy of one process: its runtime holder, main server and health checks."""

    def __init__(self, config: Config, opts: Options, access_log: AccessLog, metrics: Metrics):
        self.holder = Holder(build(config, None, metrics, workers=opts.workers))
        self.reloader = Reloader(self.holder, opts.config_path)
        self.health = HealthChecks(metrics.set_backend_up)
        self.reloader.on_config.append(lambda cfg, rt: self.health.update(cfg, rt.upstreams))
        self.access_log = access_log
        app = ProxyApp(self.holder, access_log)
        self.main = MainServer(
            app,
            config.limits,
            config.shutdown_grace,
            self.refused,
            busy_poll=config.listen.busy_poll_us / 1e6,
        )
        self.stopping = asyncio.Event()

    def refused(self, status: int, reason: str, client: str) -> None:
        """A request our protocol answered itself (limits, framing): counted and logged
        as route none, like any request refused before routing."""
        o = Outcome(new_request_id(), "-", "-", time.monotonic(), status=status, error=reason)
        o.client_ip = client
        self.holder.current.metrics.record(o)
        self.access_log.log(o)

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.holder.current, self.holder.ready, self.health.status)

    def drain(self, reason: str) -> None:
        if self.stopping.is_set():
            self.main.force_exit = True
            return
        self.stopping.set()
        self.holder.draining = True
        grace = self.holder.current.config.shutdown_grace
        event(log, "draining", reason=reason, grace=grace)
        self.main.should_exit = True

    async def run(self, sock: socket.socket, on_ready: Callable[[], None]) -> None:
        self.health.update(self.holder.current.config, self.holder.current.upstreams)
        stores = self.holder.current.breaker_stores  # kept across reloads
        stores.start()
        task = asyncio.ensure_future(self.main.serve(sockets=[sock]))
        while not self.main.started and not task.done():
            await asyncio.sleep(0.01)
        self.holder.ready = True
        on_ready()
        await task
        self.health.stop()
        await stores.close()
        await close_shadows(self.holder.current)
        await close_all(self.holder.current.upstreams.values())


async def close_shadows(rt: Any) -> None:
    for state in rt.routes.values():
        if state.shadow is not None:
            await state.shadow.close()


async def serve(config: Config, opts: Options, access_log: AccessLog, metrics: Metrics) -> int:
    """One process: main port, admin port, reloads; returns the exit code."""
    plane = DataPlane(config, opts, access_log, metrics)
    try:
        main_sock = bind(opts.host, opts.port)
        admin_sock = bind(opts.admin_host, opts.admin_port)
    except OSError as err:
        event(log, "cannot listen", logging.ERROR, error=str(err))
        return 1
    control = AdminControl(
        plane.holder,
        plane.reloader,
        snapshots=lambda: [plane.snapshot()],
        metrics=lambda: (generate_latest(metrics.registry), CONTENT_TYPE_LATEST),
        ready=lambda: plane.holder.ready and not plane.holder.draining,
    )
    side = ControlSide(control, plane.reloader, opts, admin_sock, plane.drain)
    await plane.run(main_sock, lambda: announce(config, opts, main_sock, admin_sock))
    await side.stop()
    event(log, "strangler stopped")
    return 0


class ControlSide:
    """The admin port, the config watch and the signals: what a single process and the
    supervisor of several run alike."""

    def __init__(
        self,
        control: AdminControl,
        reloader: Reloader,
        opts: Options,
        admin_sock: socket.socket,
        drain: Callable[[str], None],
    ) -> None:
        self.admin = admin_server(create_admin(control))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, drain, sig.name)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload_async())
        )
        watch = FileWatch(opts.config_path, reloader.reload_async, opts.watch_interval)
        self._watch = asyncio.ensure_future(watch.run())
        self._admin = asyncio.ensure_future(self.admin.serve(sockets=[admin_sock]))

    async def stop(self) -> None:
        self._watch.cancel()
        self.admin.should_exit = True
        await self._admin


def announce(config: Config, opts: Options, main: socket.socket, admin: socket.socket) -> None:
    event(
        log,
        "strangler is serving",
        proxy=listening(main),
        admin=listening(admin),
        routes=len(config.routes),
        config=str(opts.config_path),
        workers=opts.workers,
    )


def run(config: Config, opts: Options) -> int:
    """`strangler run`: serve until SIGTERM/SIGINT; the process exit code."""
    if opts.workers > 1:
        from proxy.workers import supervise

        return supervise(config, opts)
    sink, access_log = logs.setup(opts.log_format, opts.log_level)
    try:
        return uvloop.run(serve(config, opts, access_log, Metrics(REGISTRY)))
    finally:
        sink.close()
