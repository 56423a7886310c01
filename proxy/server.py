"""Running the proxy: the main and admin servers, signals, reloads and graceful drain.

One worker runs everything in one process. With `--workers N` a supervisor process holds
the admin port, watches the config and steers N worker processes that share the main
socket (see `workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from prometheus_client import REGISTRY

from proxy import logs
from proxy.admin import create_admin
from proxy.app import Holder, ProxyApp
from proxy.config import Config
from proxy.control import LocalControl
from proxy.forward import close_all
from proxy.logs import AccessLog, event
from proxy.metrics import Metrics
from proxy.reload import FileWatch, Reloader
from proxy.runtime import build

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


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: ours drains and reloads."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    sock.setblocking(False)
    return sock


def main_server_config(app: Any, config: Config) -> uvicorn.Config:
    limits = config.limits
    return uvicorn.Config(
        app,
        http="httptools",
        ws="websockets",
        lifespan="off",
        loop="none",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_keep_alive=int(limits.keepalive_timeout),
        timeout_graceful_shutdown=int(config.shutdown_grace),
        limit_concurrency=limits.max_connections,
        ws_max_size=16 * 1024 * 1024,
    )


def admin_server_config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",
        loop="none",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=1,
    )


def listening(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


async def serve(config: Config, opts: Options, access_log: AccessLog, metrics: Metrics) -> int:
    """One process: main port, admin port, reloads; returns the exit code."""
    holder = Holder(build(config, None, metrics))
    reloader = Reloader(holder, opts.config_path)
    try:
        main_sock = bind(opts.host, opts.port)
        admin_sock = bind(opts.admin_host, opts.admin_port)
    except OSError as err:
        event(log, "cannot listen", logging.ERROR, error=str(err))
        return 1
    main = _Server(main_server_config(ProxyApp(holder, access_log), config))
    control = LocalControl(holder, reloader, metrics.registry)
    admin = _Server(admin_server_config(create_admin(control)))
    stopping = asyncio.Event()
    _install_signals(holder, main, stopping, reloader)
    watch = FileWatch(opts.config_path, reloader.reload, opts.watch_interval)
    watch_task = asyncio.ensure_future(watch.run())
    admin_task = asyncio.ensure_future(admin.serve(sockets=[admin_sock]))
    main_task = asyncio.ensure_future(main.serve(sockets=[main_sock]))
    await _started(main, main_task)
    holder.ready = True
    event(
        log,
        "strangler is serving",
        proxy=listening(main_sock),
        admin=listening(admin_sock),
        routes=len(config.routes),
        config=str(opts.config_path),
    )
    await main_task
    watch_task.cancel()
    admin.should_exit = True
    await admin_task
    await close_all(holder.current.upstreams.values())
    event(log, "strangler stopped")
    return 0


async def _started(server: uvicorn.Server, task: asyncio.Future[Any]) -> None:
    while not server.started and not task.done():
        await asyncio.sleep(0.01)


def _install_signals(
    holder: Holder, main: uvicorn.Server, stopping: asyncio.Event, reloader: Reloader
) -> None:
    loop = asyncio.get_running_loop()

    def drain(sig: signal.Signals) -> None:
        if stopping.is_set():
            if sig == signal.SIGINT:
                main.force_exit = True
            return
        stopping.set()
        holder.draining = True
        event(log, "draining", signal=sig.name, grace=holder.current.config.shutdown_grace)
        main.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain, sig)
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)


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
