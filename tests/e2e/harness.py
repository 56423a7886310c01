"""Real servers for end-to-end tests: upstream apps on uvicorn in a thread of the test
process, and the real `strangler run` process. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class UpstreamServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, app: Any, port: int | None = None, **uvicorn_kwargs: Any) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            lifespan="off",
            access_log=False,
            **uvicorn_kwargs,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> UpstreamServer:
        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._server.serve())
            finally:
                self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not wait_until(lambda: self._server.started, 10):
            raise RuntimeError(f"upstream on :{self.port} did not start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxyProcess:
    """`python -m proxy run` on free ports with a config written to `workdir`."""

    def __init__(
        self,
        config: str,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        name: str = "strangler.yaml",
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / name
        self.config_path.write_text(config)
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.env = {**os.environ, **(env or {})}
        self.args = args or []
        self.log_path = workdir / f"proxy-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "proxy",
            "run",
            "-c",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            str(self.admin_port),
            *self.args,
        ]

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
        )
        try:
            ready = wait_until(self.is_ready, timeout, 0.05)
        except RuntimeError:
            self.stop()
            raise
        if not ready:
            self.stop()
            raise RuntimeError(f"proxy did not become ready:\n{self.log_text()}")
        return self

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            return httpx.get(self.admin + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def access_log(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("type") == "access"]

    def wait_access(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5
    ) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def look() -> bool:
            found[:] = [e for e in self.access_log() if predicate(e)]
            return bool(found)

        if not wait_until(look, timeout, 0.05):
            raise AssertionError(f"no matching access log line in:\n{self.log_text()[-3000:]}")
        return found[-1]

    def rss_kib(self) -> int:
        assert self.proc is not None
        return _status_field(self.proc.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        return _status_field(self.proc.pid, "VmHWM")

    def reset_peak_rss(self) -> None:
        """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
        assert self.proc is not None
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def config(backends: dict[str, str], routes: str = "routes: []", extra: str = "") -> str:
    """A config with `backends` (name -> url), the first as legacy."""
    lines = ["version: 1", f"legacy: {next(iter(backends))}", "backends:"]
    for name, url in backends.items():
        lines.append(f"  {name}: {{url: {url}}}")
    return "\n".join(lines) + "\n" + extra + "\n" + routes + "\n"


def raw_request(
    port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True
) -> bytes:
    """Send raw bytes; return everything the server sends until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def iter_lines(text: str) -> Iterator[str]:
    yield from text.splitlines()
