"""`strangler demo`: the three processes on loopback, the shop through the proxy, Ctrl-C
stops them all. Uses the demo's fixed ports (8001, 8002, 9901) and a free proxy port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.e2e.harness import ROOT, free_port, wait_until


def test_demo_serves_the_shop_through_strangler_and_stops_on_ctrl_c() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            lines.append(line)
            if "strangler demo is running" in line or not line:
                break
        more = [proc.stdout.readline().decode() for _ in range(3)]
        assert f"http://127.0.0.1:{port}/" in more[0], lines + more
        assert "http://127.0.0.1:9901/" in more[1] and "/metrics" in more[2]
        proxy = f"http://127.0.0.1:{port}"
        orders = httpx.get(proxy + "/api/orders", timeout=5)
        assert orders.status_code == 200 and orders.json()["served_by"] == "orders"
        page = httpx.get(proxy + "/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert page.headers["x-served-by"] == "monolith"
        assert httpx.get("http://127.0.0.1:9901/readyz", timeout=5).status_code == 200
    finally:
        # Ctrl-C in a terminal reaches the whole process group.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
    assert wait_until(lambda: not _listening(8001) and not _listening(8002), 10)


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
    except httpx.HTTPError:
        return False
    return True
