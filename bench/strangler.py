"""strangler under test: the generated config of each scenario and the `strangler run`
process (one worker, pinned to a CPU, its JSON log on stderr written to a file).

Every scenario measures the route `/bench` (the origin serves /bench/1k and /bench/1m):

plain       one route to one backend (the defaults apply: retry, breaker, bulkhead)
demo        the demo's policies: a sticky cookie split 50/50 over two backends (both the
            origin), fallback to a third, retry, breaker, bulkhead; metrics and the access
            log are always on. The bulkhead admits 100 (queue 100): the demo's 20 would
            turn most of wrk's 64 connections into 503s, which is no speed measurement.
routes1000  `plain` plus 1,000 more routes /r0000 ... /r0999 (every fourth a sticky split
            with fallback, retry and breaker of its own)
busypoll    `demo` with `listen.busy_poll_us: 200` (off by default): the loop polls for
            200 µs after a write instead of sleeping, for the latency at 1 connection
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import procstat

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("plain", "demo", "routes1000", "busypoll")
BUSY_POLL_US = 200
STICKY_COOKIE = "strangler_uid"


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def config(scenario: str, origin: str) -> str:
    if scenario == "plain":
        return _plain(origin)
    if scenario == "demo":
        return _demo(origin)
    if scenario == "routes1000":
        return _plain(origin) + _many_routes(1000)
    if scenario == "busypoll":
        return _demo(origin) + f"listen: {{busy_poll_us: {BUSY_POLL_US}}}\n"
    raise ValueError(f"unknown scenario {scenario!r}")


def _plain(origin: str) -> str:
    return f"""version: 1
shutdown_grace: 2
legacy: origin
backends:
  origin: {{url: "{origin}"}}
  blue: {{url: "{origin}"}}
  green: {{url: "{origin}"}}
routes:
  - name: bench
    match: {{prefix: /bench}}
    backend: origin
"""


def _demo(origin: str) -> str:
    return f"""version: 1
shutdown_grace: 2
legacy: origin
backends:
  origin: {{url: "{origin}"}}
  blue: {{url: "{origin}"}}
  green: {{url: "{origin}"}}
defaults:
  timeout: {{connect: 1.0, read: 10.0, total: 30.0}}
routes:
  - name: bench
    match: {{prefix: /bench}}
    split: {{blue: 50, green: 50}}
    sticky: {{cookie: {STICKY_COOKIE}}}
    fallback: origin
    timeout: {{read: 5.0}}
    retry: {{attempts: 2}}
    breaker: {{failure_threshold: 3, reset_timeout: 10}}
    bulkhead: {{max_concurrent: 100, max_queue: 100, queue_timeout: 0.5}}
"""


def _many_routes(count: int) -> str:
    lines = []
    for i in range(count):
        lines.append(f"  - name: r{i:04d}\n    match: {{prefix: /r{i:04d}}}")
        if i % 4 == 0:
            lines.append(
                "    split: {blue: 25, green: 75}\n"
                f"    sticky: {{cookie: {STICKY_COOKIE}}}\n"
                "    fallback: origin\n"
                "    retry: {attempts: 3}\n"
                "    breaker: {failure_threshold: 3}"
            )
        else:
            lines.append("    backend: origin")
    return "\n".join(lines) + "\n"


class Strangler:
    """`python -m proxy run -c CFG --workers 1` under `taskset -c CPU`."""

    def __init__(
        self,
        workdir: Path,
        scenario: str,
        origin: str,
        port: int,
        admin_port: int,
        cpu: int | None,
        checkout: Path = ROOT,
    ) -> None:
        """`checkout`: the repository whose `proxy` runs (another revision's, for A/B)."""
        self.checkout = checkout
        self.scenario = scenario
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.config_path = workdir / f"strangler-{scenario}.yaml"
        self.config_path.write_text(config(scenario, origin))
        self.log_path = workdir / f"strangler-{scenario}.log"
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.command = [
            *pin,
            python(),
            "-m",
            "proxy",
            "run",
            "-c",
            str(self.config_path),
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            str(admin_port),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Strangler:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.checkout,
                env=dict(os.environ),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"strangler ({self.scenario}) exited {self.proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            try:
                with urllib.request.urlopen(self.admin + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"strangler ({self.scenario}) did not become ready")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return procstat.tree(self.pid)

    def peak_rss_kib(self) -> int:
        return procstat.peak_rss_kib(self.pid)

    def rss_kib(self) -> int:
        return procstat.status_kib(self.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
