"""Kill the extracted service under load and watch the proxy keep the site up.

The real proxy runs config/demo.yaml (the `orders` route: breaker, retry, fallback to the
monolith) in front of the two real demo apps, each in its own process on free ports. A
client sends ~50 requests/s for 20 s (open loop: every 20 ms, whatever the answers do);
the orders process is SIGKILLed after 5 s and started again after 12 s. The report says
what the clients saw before and after the breaker opened, how many connections the proxy
tried to the dead service, and how long the breaker took to close once it was back.

    .venv/bin/python bench/kill_orders.py [--rate 50] [--duration 20] [--kill 5] [--restart 12]
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = [sys.executable, "-m", "proxy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float = 20.0) -> float:
    """Polls `url` until it answers 200; returns the time.time() it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return time.time()
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def demo_app(name: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [*PYTHON, "demo", name, "--port", str(port)], stdout=out, stderr=out, cwd=ROOT
    )


def proxy_config(orders: int, monolith: int, port: int, admin: int) -> dict[str, Any]:
    """config/demo.yaml with the ports of this run."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    config["listen"] = {"host": "127.0.0.1", "port": port}
    config["admin"] = {"host": "127.0.0.1", "port": admin}
    config["backends"]["monolith"]["url"] = f"http://127.0.0.1:{monolith}"
    config["backends"]["orders"]["url"] = f"http://127.0.0.1:{orders}"
    return config


@dataclass
class Result:
    sent: float  # seconds since the start of the load
    status: int  # 0: no answer (client error)
    served_by: str


async def one(client: httpx.AsyncClient, i: int, start: float) -> Result:
    sent = time.time() - start
    try:
        if i % 10 == 9:  # every tenth request places an order
            order = {"customer": "ada", "items": [{"product_id": 1, "qty": 1}]}
            r = await client.post("/api/orders", json=order)
        else:
            r = await client.get("/api/orders" if i % 2 else f"/api/orders/{1001 + i % 6}")
    except httpx.HTTPError:
        return Result(sent, 0, "-")
    return Result(sent, r.status_code, r.headers.get("x-served-by", "proxy"))


async def load(base: str, rate: float, duration: float, start: float) -> list[Result]:
    tasks = []
    async with httpx.AsyncClient(base_url=base, timeout=15) as client:
        for i in range(int(rate * duration)):
            delay = start + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, i, start)))
        return list(await asyncio.gather(*tasks))


async def chaos(
    procs: dict[str, subprocess.Popen[bytes]], port: int, log: Path, kill: float, restart: float
) -> dict[str, float]:
    """Kills orders at `kill` s, starts it again at `restart` s; returns when things happened."""
    start = time.time()
    marks: dict[str, float] = {}
    await asyncio.sleep(kill)
    procs["orders"].send_signal(signal.SIGKILL)
    procs["orders"].wait()
    marks["killed"] = time.time()
    await asyncio.sleep(max(0.0, start + restart - time.time()))
    marks["restarted"] = time.time()
    procs["orders"] = demo_app("orders", port, log)
    marks["back"] = await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/health", 20)
    return marks


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def wall(iso: str) -> float:
    """The proxy log's `2026-01-02T03:04:05.678Z` as time.time()."""
    head, ms = iso.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


def transitions(log: Path) -> list[tuple[float, str]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == "breaker state changed" and entry.get("route") == "orders":
            if entry.get("backend") == "orders":
                found.append((wall(entry["time"]), entry["state"]))
    return found


def phase_counts(results: list[Result], since: float, until: float) -> str:
    picked = [r for r in results if since <= r.sent < until]
    counts = Counter(f"{r.status} {r.served_by}" for r in picked)
    errors = sum(1 for r in picked if r.status >= 500 or r.status == 0)
    body = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
    return f"{len(picked):4d} requests, {errors} 5xx/failed  [{body}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--kill", type=float, default=5.0)
    parser.add_argument("--restart", type=float, default=12.0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kill-orders-"))
    orders_port, monolith_port, port, admin = (free_port() for _ in range(4))
    config = proxy_config(orders_port, monolith_port, port, admin)
    config_path = workdir / "strangler.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    apps_log, proxy_log = workdir / "apps.log", workdir / "proxy.log"
    route = next(r for r in config["routes"] if r["name"] == "orders")

    procs = {
        "monolith": demo_app("monolith", monolith_port, apps_log),
        "orders": demo_app("orders", orders_port, apps_log),
    }
    with proxy_log.open("wb") as out:
        procs["proxy"] = subprocess.Popen(
            [*PYTHON, "run", "-c", str(config_path)],
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env={**os.environ, "STRANGLER_ADMIN_TOKEN": "bench"},
        )
    try:
        wait_for(f"http://127.0.0.1:{monolith_port}/health")
        wait_for(f"http://127.0.0.1:{orders_port}/health")
        wait_for(f"http://127.0.0.1:{admin}/readyz")
        httpx.get(f"http://127.0.0.1:{port}/api/orders", timeout=5)  # warm the pools
        before = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text

        async def run() -> tuple[list[Result], dict[str, float], float]:
            start = time.time() + 0.2
            marks_task = asyncio.create_task(
                chaos(procs, orders_port, apps_log, args.kill + 0.2, args.restart + 0.2)
            )
            results = await load(f"http://127.0.0.1:{port}", args.rate, args.duration, start)
            return results, await marks_task, start

        results, marks, start = asyncio.run(run())
        time.sleep(0.5)
        after = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def delta(name: str, **labels: str) -> int:
        return int(metric(after, name, **labels) - metric(before, name, **labels))

    rel = {k: v - start for k, v in marks.items()}
    changes = [(t - start, state) for t, state in transitions(proxy_log) if t >= start]
    opened = next((t for t, s in changes if s == "open"), None)
    closed = next(
        (t for t, s in changes if s == "closed" and opened is not None and t > opened), None
    )
    end = args.duration + 1

    print(f"kill_orders: {len(results)} requests at {args.rate:g}/s for {args.duration:g} s")
    print(f"route orders: {json.dumps({k: route[k] for k in ('retry', 'breaker', 'fallback')})}")
    print(f"  orders SIGKILLed        at {rel['killed']:6.2f} s")
    print(
        f"  orders restarted        at {rel['restarted']:6.2f} s, answering at {rel['back']:6.2f} s"
    )
    for t, state in changes:
        print(f"  breaker -> {state:<10}  at {t:6.2f} s")
    print("status counts the clients saw (status served-by), by when the request was sent:")
    print(f"  before the kill          {phase_counts(results, 0, rel['killed'])}")
    if opened is not None:
        print(f"  kill -> breaker open     {phase_counts(results, rel['killed'], opened)}")
        print(f"  breaker open -> closed   {phase_counts(results, opened, closed or end)}")
        if closed is not None:
            print(f"  after it closed          {phase_counts(results, closed, end)}")
    labels = {"route": "orders", "backend": "orders"}
    print("proxy counters over the run:")
    print(
        f"  connection attempts to the dead service (upstream_failures connect): "
        f"{delta('strangler_upstream_failures_total', reason='connect', **labels)}"
    )
    other = {
        r: delta("strangler_upstream_failures_total", reason=r, **labels)
        for r in ("timeout", "status", "protocol")
    }
    print(f"  other upstream failures: {other}")
    print(
        f"  retries: {delta('strangler_retries_total', **labels)}, "
        f"breaker rejections: {delta('strangler_breaker_rejections_total', **labels)}, "
        f"fallbacks to monolith: "
        f"{delta('strangler_fallbacks_total', fallback='monolith', **labels)}"
    )
    if closed is not None and opened is not None:
        print(
            f"breaker closed {closed - rel['back']:.2f} s after orders answered again "
            f"({closed - opened:.2f} s after it opened; reset_timeout "
            f"{route['breaker']['reset_timeout']} s)"
        )
    else:
        print("breaker did not close during the run")
    fivexx = sum(
        1 for r in results if r.sent >= (opened or end) and (r.status >= 500 or not r.status)
    )
    print(f"5xx or failed requests sent after the breaker opened: {fivexx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
