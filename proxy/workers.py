"""`--workers N`: a supervisor process and N worker processes sharing the main socket.

The supervisor owns the admin port, the config file (watch, SIGHUP, admin reloads) and the
split overrides: it validates a change once and sends it to every worker. Workers serve
the main port and report their live state every second; the admin port shows the merged
view, and /metrics aggregates every worker through prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the CLI before prometheus_client is imported). A worker
that dies is replaced with the current config and overrides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from proxy import logs
from proxy.app import Holder
from proxy.config import Config
from proxy.control import AdminControl
from proxy.logs import AccessLog, event
from proxy.metrics import Metrics
from proxy.reload import Reloader
from proxy.runtime import build
from proxy.server import ControlSide, DataPlane, Options, announce, bind

log = logging.getLogger("strangler.workers")

REPORT_EVERY = 1.0
SETTLE_TIMEOUT = 5.0  # an admin change waits at most this long for the workers to apply it
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# --- worker side ---------------------------------------------------------------------


def worker_main(config: Config, opts: Options, sock: socket.socket, conn: Connection) -> None:
    sink, access_log = logs.setup(opts.log_format, opts.log_level)
    try:
        uvloop.run(_worker(config, opts, sock, conn, access_log))
    finally:
        sink.close()


async def _worker(
    config: Config, opts: Options, sock: socket.socket, conn: Connection, access_log: AccessLog
) -> None:
    plane = DataPlane(config, opts, access_log, Metrics())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plane.drain, sig.name)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor reloads
    channel = _Channel(conn)

    def on_message() -> None:
        message = channel.receive()
        if message is None:
            plane.drain("supervisor gone")
            return
        kind, *args, generation = message
        if kind == "config":
            plane.reloader.apply(args[0])
        elif kind == "split":
            plane.reloader.set_split(args[0], args[1])
        # Tell the supervisor this change is live here: the admin API answers once every
        # worker says so, so traffic follows a kill switch as soon as `strangler split` returns.
        asyncio.ensure_future(channel.send(("applied", generation)))

    loop.add_reader(conn.fileno(), on_message)
    reporter = asyncio.ensure_future(_report(plane, channel))
    try:
        await plane.run(sock, lambda: None)
    finally:
        reporter.cancel()
        loop.remove_reader(conn.fileno())


async def _report(plane: DataPlane, channel: _Channel) -> None:
    while True:
        await channel.send(("state", plane.snapshot()))
        await asyncio.sleep(REPORT_EVERY)


class _Channel:
    """A pipe end: reads when the loop says it is readable, writes on a thread so a full
    pipe never blocks the loop; one write at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = asyncio.Lock()

    def receive(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    async def send(self, message: Any) -> bool:
        async with self._lock:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.conn.send, message)
            except (OSError, ValueError):
                return False
        return True


# --- supervisor side -------------------------------------------------------------------


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.channel: _Channel | None = None
        self.state: dict[str, Any] | None = None
        self.started = 0.0
        self.applied = 0  # the last change (generation) this worker has made live

    @property
    def ready(self) -> bool:
        return bool(self.state and self.state["ready"]) and self.alive

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class Supervisor:
    def __init__(self, config: Config, opts: Options) -> None:
        self.opts = opts
        self.metrics = Metrics()
        self.holder = Holder(build(config, None, self.metrics))
        self.reloader = Reloader(self.holder, opts.config_path)
        self.reloader.on_config.append(lambda cfg, rt: self._broadcast(("config", cfg)))
        self.reloader.on_split.append(lambda r, w: self._broadcast(("split", r, w)))
        self.workers = [_Worker(i) for i in range(opts.workers)]
        self.context = multiprocessing.get_context("spawn")
        self.sock: socket.socket | None = None
        self.stopping = False
        self.generation = 0  # changes sent to the workers so far

    def spawn(self, worker: _Worker) -> None:
        assert self.sock is not None
        parent, child = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker_main,
            args=(self.holder.current.config, self.opts, self.sock, child),
            name=f"strangler-worker-{worker.index}",
            daemon=False,
        )
        process.start()
        child.close()
        worker.process, worker.channel, worker.state = process, _Channel(parent), None
        worker.started = time.monotonic()
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._on_message, worker)
        # It starts with the current config; the live overrides follow.
        overrides = [
            ("split", route, dict(state.override), self.generation)
            for route, state in self.holder.current.routes.items()
            if state.override is not None
        ]
        worker.applied = 0 if overrides else self.generation
        for message in overrides:
            asyncio.ensure_future(worker.channel.send(message))

    def _on_message(self, worker: _Worker) -> None:
        assert worker.channel is not None
        message = worker.channel.receive()
        if message is None:
            asyncio.get_running_loop().remove_reader(worker.channel.conn.fileno())
            return
        if message[0] == "state":
            worker.state = message[1]
        elif message[0] == "applied":
            worker.applied = max(worker.applied, message[1])

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        self.generation += 1
        for worker in self.workers:
            if worker.channel is not None and worker.alive:
                asyncio.ensure_future(worker.channel.send((*message, self.generation)))

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait (bounded) until every live worker has made the changes sent so far live."""
        target = self.generation
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(w.applied >= target for w in self.workers if w.alive and w.channel):
                return
            await asyncio.sleep(0.005)
        event(log, "workers are slow to apply a change", logging.WARNING, generation=target)

    def snapshots(self) -> list[dict[str, Any]]:
        return [w.state for w in self.workers if w.state is not None and w.alive]

    def is_ready(self) -> bool:
        return not self.stopping and all(w.ready for w in self.workers)

    def drain(self, reason: str) -> None:
        if self.stopping:
            for worker in self.workers:
                if worker.alive and worker.process is not None and worker.process.pid:
                    os.kill(worker.process.pid, signal.SIGKILL)
            return
        self.stopping = True
        self.holder.draining = True
        event(log, "draining", reason=reason, grace=self.holder.current.config.shutdown_grace)
        for worker in self.workers:
            if worker.alive and worker.process is not None and worker.process.pid:
                os.kill(worker.process.pid, signal.SIGTERM)

    async def watch_workers(self) -> None:
        """Replace a worker that died while serving; return once all have exited after a
        drain."""
        while True:
            await asyncio.sleep(0.2)
            for worker in self.workers:
                if worker.alive or worker.process is None:
                    continue
                self._bury(worker)
                if not self.stopping:
                    event(log, "worker died: replacing it", logging.ERROR, worker=worker.index)
                    self.spawn(worker)
            if self.stopping and not any(w.alive for w in self.workers):
                return

    def _bury(self, worker: _Worker) -> None:
        assert worker.process is not None and worker.channel is not None
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.channel.conn.fileno())
        worker.channel.conn.close()
        if worker.process.pid is not None:
            prom_multiprocess.mark_process_dead(worker.process.pid)  # type: ignore[no-untyped-call]
        worker.process.join(0)
        worker.process = None
        worker.state = None

    def collect_metrics(self) -> tuple[bytes, str]:
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST


def supervise(config: Config, opts: Options) -> int:
    sink, _ = logs.setup(opts.log_format, opts.log_level)
    try:
        return uvloop.run(_supervise(config, opts))
    finally:
        directory = os.environ.get(MULTIPROC_ENV)
        if directory and os.path.basename(directory).startswith("strangler-metrics-"):
            shutil.rmtree(directory, ignore_errors=True)
        sink.close()


async def _supervise(config: Config, opts: Options) -> int:
    sup = Supervisor(config, opts)
    try:
        sup.sock = bind(opts.host, opts.port)
        admin_sock = bind(opts.admin_host, opts.admin_port)
    except OSError as err:
        event(log, "cannot listen", logging.ERROR, error=str(err))
        return 1
    control = AdminControl(
        sup.holder,
        sup.reloader,
        snapshots=sup.snapshots,
        metrics=sup.collect_metrics,
        ready=sup.is_ready,
        settle=sup.settle,
    )
    side = ControlSide(control, sup.reloader, opts, admin_sock, sup.drain)
    for worker in sup.workers:
        sup.spawn(worker)
    announce(config, opts, sup.sock, admin_sock)
    await sup.watch_workers()
    await side.stop()
    sup.sock.close()
    event(log, "strangler stopped")
    return 0
