"""SPEC §1 `run` and `check` and §8 health through the real process: exit codes, config
sources, graceful drain on SIGTERM, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Backends
from tests.e2e.harness import ROOT, ProxyProcess, config, free_port, wait_until

BAD = """version: 1
legacy: monolit
backends:
  monolith: {url: "ftp://x"}
routes:
  - name: a
    match: {prefix: /a}
    splt: {monolith: 100}
"""


def strangler(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_run_with_an_invalid_config_exits_2_listing_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    done = strangler(
        "run", "-c", str(bad), "--port", str(free_port()), "--admin-port", str(free_port())
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert f"{bad}:2: legacy:" in lines[0]
    assert any(f"{bad}:4: backends.monolith.url:" in line for line in lines)
    assert any(
        f"{bad}:8: routes[0].splt: unknown key 'splt' (did you mean 'split'?)" in line
        for line in lines
    )


def test_check_prints_the_route_table_or_the_errors(tmp_path: Path) -> None:
    good = strangler("check", "config/demo.yaml")
    assert good.returncode == 0
    assert "orders" in good.stdout and "checkout" in good.stdout and "default" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    failed = strangler("check", str(bad))
    assert failed.returncode == 2 and failed.stdout == ""
    assert len(failed.stderr.strip().splitlines()) >= 3


def test_strangler_config_env_is_the_default_file(backends: Backends, tmp_path: Path) -> None:
    path = tmp_path / "from-env.yaml"
    path.write_text(config({"monolith": backends.monolith_url}))
    p = ProxyProcess(path.read_text(), tmp_path, env={"STRANGLER_CONFIG": str(path)})
    p.command = lambda: [  # type: ignore[method-assign]
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--port",
        str(p.port),
        "--admin-port",
        str(p.admin_port),
    ]
    with p:
        assert httpx.get(p.url + "/anything", timeout=5).json()["served_by"] == "monolith"


def test_healthz_and_readyz(proxy: ProxyProcess) -> None:
    assert httpx.get(proxy.admin + "/healthz", timeout=5).status_code == 200
    assert httpx.get(proxy.admin + "/readyz", timeout=5).status_code == 200


def test_sigterm_drains_in_flight_requests_then_exits_0(b: Backends, tmp_path: Path) -> None:
    text = config(
        {"monolith": b.monolith_url, "orders": b.orders_url},
        "routes:\n  - {name: slow, match: {prefix: /slow}, backend: orders}\n",
        "shutdown_grace: 10\n",
    )
    p = ProxyProcess(text, tmp_path).start()
    results: dict[str, object] = {}

    def slow_request() -> None:
        try:
            results["reply"] = httpx.get(p.url + "/slow?delay=1.5", timeout=10)
        except httpx.HTTPError as err:  # pragma: no cover - reported by the assert below
            results["error"] = err

    worker = threading.Thread(target=slow_request)
    worker.start()
    assert b.orders.event("slow-started").wait(5)
    assert p.proc is not None
    p.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _status(p.admin + "/readyz") in (503, None), 5)
    assert wait_until(lambda: _refused(p.port), 5), "new connections must be refused while draining"
    worker.join(10)
    reply = results.get("reply")
    assert isinstance(reply, httpx.Response) and reply.status_code == 200, results
    assert p.proc.wait(15) == 0
    p.stop()


def test_drain_is_bounded_by_shutdown_grace(b: Backends, tmp_path: Path) -> None:
    text = config(
        {"monolith": b.monolith_url, "orders": b.orders_url},
        "routes:\n  - {name: slow, match: {prefix: /slow}, backend: orders,\n"
        "     timeout: {read: 60, total: 60}}\n",
        "shutdown_grace: 1\n",
    )
    p = ProxyProcess(text, tmp_path).start()
    worker = threading.Thread(target=lambda: _quiet_get(p.url + "/slow?delay=30"))
    worker.start()
    assert b.orders.event("slow-started").wait(5)
    assert p.proc is not None
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    assert time.monotonic() - t0 < 5
    worker.join(10)
    p.stop()


def test_text_log_format(b: Backends, tmp_path: Path) -> None:
    p = ProxyProcess(config({"monolith": b.monolith_url}), tmp_path, args=["--log-format", "text"])
    with p:
        r = httpx.get(p.url + "/hello", timeout=5)
        rid = r.headers["x-request-id"]
        assert wait_until(lambda: f"id={rid}" in p.log_text(), 5)
    line = next(x for x in p.log_text().splitlines() if f"id={rid}" in x)
    assert " 200 GET /hello route=default backend=monolith " in line
    assert not line.startswith("{")


@pytest.mark.parametrize("workers", [2])
def test_several_workers_serve_and_drain(b: Backends, tmp_path: Path, workers: int) -> None:
    p = ProxyProcess(
        config({"monolith": b.monolith_url}), tmp_path, args=["--workers", str(workers)]
    )
    with p:
        replies = [httpx.get(p.url + f"/w/{i}", timeout=5) for i in range(20)]
        assert all(r.json()["served_by"] == "monolith" for r in replies)
        assert httpx.get(p.admin + "/readyz", timeout=5).status_code == 200
    assert p.proc is not None and p.proc.returncode == 0


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return None


def _refused(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def _quiet_get(url: str) -> None:
    try:
        httpx.get(url, timeout=20)
    except httpx.HTTPError:
        pass


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_polling_serves_and_stops_once_traffic_does(b: Backends, tmp_path: Path) -> None:
    """`listen.busy_poll_us`: the loop polls for a while after each write instead of
    sleeping, and only then: an idle proxy spends no CPU on it."""
    text = config({"monolith": b.monolith_url}, extra="listen: {busy_poll_us: 2000}")
    with ProxyProcess(text, tmp_path) as p, httpx.Client(base_url=p.url, timeout=5) as client:
        assert p.proc is not None
        for n in range(200):
            assert client.get(f"/hello/{n}").status_code == 200
        time.sleep(0.2)  # past the 2 ms of polling after the last write
        before = _cpu_seconds(p.proc.pid)
        time.sleep(1.0)
        assert _cpu_seconds(p.proc.pid) - before < 0.2  # polling would be ~1 s
