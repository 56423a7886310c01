"""A bounded soak: mixed traffic through the real proxy for --minutes, with config reloads,
breaker trips and clients that go away; the proxy's RSS, open file descriptors and threads
are sampled every --sample seconds and must stay flat. Not part of `make test`.

Three upstream processes serve tests/e2e/upstream.py's app (echo, 1 MiB and chunked
downloads, uploads, drips) with a `/_soak/fail?status=503` / `/_soak/ok` switch; the proxy
runs a config with a sticky split, a breaker and a fallback on `orders` (the soak makes
`orders` fail for --fail-for seconds every --fail-every seconds), a bulkhead, a shadow and
a rewrite. Every --reload-every seconds the config file is rewritten, valid and invalid in
turn. The traffic: GET/POST, small and 1 MiB bodies both ways, streaming, clients that close
mid-response and mid-upload, and oversized heads.

The asyncio task count comes from the admin API (`/api/routes` `process.tasks`).

    .venv/bin/python bench/soak.py [--minutes 30] [--sample 10] [--workers 6]

It prints a table while it runs, writes bench/out/soak-<date>.csv, and ends with start,
after-warm-up, end and max of each series and a verdict: flat when the end value is within
+10% of the value after warm-up (medians of three samples each; plus a small absolute slack
for fds and threads), and no request failed outside the windows where `orders` was made to
fail. The exit code is 0 when flat, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
TOKEN = "soak-token"
MIB = 1 << 20
SERIES = ("rss_mib", "fds", "sockets", "threads", "tasks")
RESET_TIMEOUT = 3.0  # the breakers' reset_timeout
SLACK = {"rss_mib": 0.0, "fds": 6.0, "sockets": 6.0, "threads": 2.0, "tasks": 10.0}


# --- upstreams: the e2e test app in a process of its own ---------------------------------


def serve_upstream(name: str, port: int) -> None:
    """`soak.py --upstream NAME --port P`: tests/e2e/upstream.py's app plus a failure switch."""
    sys.path.insert(0, str(ROOT))
    import uvicorn

    from tests.e2e.upstream import Recorder, make_app

    rec = Recorder(name)
    app = make_app(rec)

    async def soak_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/_soak/"):
            query = parse_qs(scope["query_string"].decode())
            fail = scope["path"] == "/_soak/fail"
            rec.fail_status = int(query.get("status", ["503"])[0]) if fail else None
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if len(rec.requests) > 1000:  # the recorder keeps everything: keep this process flat
            rec.requests.clear()
            rec.hits.clear()
            rec.disconnects.clear()
        await app(scope, receive, send)

    uvicorn.run(
        soak_app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


# --- the config, valid and invalid ---------------------------------------------------------

CONFIG = """version: 1
legacy: monolith
admin: {{token_env: SOAK_TOKEN}}
backends:
  monolith: {{url: "http://127.0.0.1:{monolith}"}}
  orders: {{url: "http://127.0.0.1:{orders}", max_connections: 50}}
  mirror: {{url: "http://127.0.0.1:{mirror}"}}
defaults:
  timeout: {{connect: 1.0, read: 10.0, total: 30.0}}
  retry: {{attempts: 2}}
routes:
  - name: orders
    match: {{prefix: /api/orders}}
    split: {{orders: {share}, monolith: {rest}}}
    sticky: {{header: X-User}}
    fallback: monolith
    breaker: {{failure_threshold: 5, reset_timeout: {reset}}}
    bulkhead: {{max_concurrent: {bulkhead}, max_queue: 20, queue_timeout: 0.5}}
  - name: products
    match: {{prefix: /api/products}}
    backend: monolith
    shadow: {{backend: mirror, percent: 100, compare: true}}
  - name: files
    match: {{prefix: /files}}
    rewrite: {{strip_prefix: /files}}
    backend: orders
    timeout: {{read: 10.0, total: 120.0}}
    breaker: {{failure_threshold: 5, reset_timeout: {reset}}}
    bulkhead: {{max_concurrent: 30, max_queue: 30, queue_timeout: 2.0}}
"""
INVALID = [
    "  - name: broken\n    match: {prefix: /broken}\n    split: {orders: 60, monolith: 60}\n",
    "  - name: typo\n    match: {prefx: /typo}\n    backend: orders\n",
    "  - name: yaml\n    match: {prefix: /yaml\n",
    "  - name: ghost\n    match: {prefix: /ghost}\n    backend: nowhere\n",
]


@dataclass
class Ports:
    monolith: int
    orders: int
    mirror: int
    proxy: int
    admin: int


def config_text(ports: Ports, n: int) -> str:
    """The n-th config: valid when n is even (the split and bulkhead change), invalid else."""
    share = (50, 30, 70)[(n // 2) % 3]
    text = CONFIG.format(
        monolith=ports.monolith,
        orders=ports.orders,
        mirror=ports.mirror,
        share=share,
        rest=100 - share,
        bulkhead=(20, 25)[(n // 2) % 2],
        reset=RESET_TIMEOUT,
    )
    return text if n % 2 == 0 else text + INVALID[(n // 2) % len(INVALID)]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- traffic -------------------------------------------------------------------------------


RAW_KINDS = ("cut-download", "cut-upload", "oversized-head")  # resets are expected there


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    failures: int = 0  # no answer, or a 5xx outside a failure window (breaker reset included)

    def add(self, kind: str, status: int | str, failing: bool) -> None:
        self.requests += 1
        self.outcomes[f"{kind} {status}"] += 1
        if kind in RAW_KINDS:
            bad = isinstance(status, int) and status >= 500
        else:
            bad = not isinstance(status, int) or status >= 500
        if bad and not failing:
            self.failures += 1


UPLOAD = os.urandom(MIB)


async def raw_exchange(port: int, data: bytes, read: int) -> int | str:
    """Send `data`, read up to `read` bytes, close (a client that goes away)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), 5)
        got = await asyncio.wait_for(reader.read(read), 10)
        return int(got[9:12]) if got.startswith(b"HTTP/1.1 ") else "closed"
    finally:
        writer.close()


Client = httpx.AsyncClient


async def get_orders(client: Client, port: int, rng: random.Random) -> int | str:
    headers = {"X-User": f"u{rng.randrange(1000)}"}
    return (await client.get(f"/api/orders/{rng.randrange(100)}", headers=headers)).status_code


async def post_orders(client: Client, port: int, rng: random.Random) -> int | str:
    return (await client.post("/api/orders", json={"qty": rng.randrange(9)})).status_code


async def shadowed(client: Client, port: int, rng: random.Random) -> int | str:
    return (await client.get(f"/api/products/{rng.randrange(50)}")).status_code


async def download(client: Client, port: int, rng: random.Random) -> int | str:
    chunked = "&length=0" if rng.random() < 0.4 else ""  # no Content-Length: relayed chunked
    async with client.stream("GET", f"/files/big?size={MIB}{chunked}") as r:
        size = sum([len(c) async for c in r.aiter_raw()])
    return r.status_code if size == MIB or r.status_code != 200 else "short"


async def upload(client: Client, port: int, rng: random.Random) -> int | str:
    return (await client.post("/files/upload", content=UPLOAD)).status_code


async def drip(client: Client, port: int, rng: random.Random) -> int | str:
    return (await client.get("/files/drip?n=4&interval=0.05")).status_code


async def cut_download(client: Client, port: int, rng: random.Random) -> int | str:
    head = b"GET /files/big?size=8388608 HTTP/1.1\r\nHost: soak\r\n\r\n"
    return await raw_exchange(port, head, 65536)


async def cut_upload(client: Client, port: int, rng: random.Random) -> int | str:
    head = b"POST /files/upload HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n" % MIB
    return await raw_exchange(port, head + UPLOAD[: 128 * 1024], 0)


async def oversized_head(client: Client, port: int, rng: random.Random) -> int | str:
    huge = b"GET / HTTP/1.1\r\nHost: soak\r\nX-Big: " + b"h" * 70000 + b"\r\n\r\n"
    return await raw_exchange(port, huge, 1024)


ACTIONS = {  # kind: (weight, action)
    "get-orders": (35, get_orders),
    "post-orders": (10, post_orders),
    "shadowed": (15, shadowed),
    "download": (10, download),
    "upload": (8, upload),
    "drip": (6, drip),
    "cut-download": (8, cut_download),
    "cut-upload": (5, cut_upload),
    "oversized-head": (3, oversized_head),
}


async def worker(port: int, tally: Tally, state: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    kinds = list(ACTIONS)
    weights = [ACTIONS[k][0] for k in kinds]
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
    ) as client:
        while not state["stop"]:
            failing = state["failing"]
            kind = rng.choices(kinds, weights)[0]
            try:
                status = await ACTIONS[kind][1](client, port, rng)
            except (TimeoutError, httpx.HTTPError, OSError) as err:
                status = type(err).__name__
            tally.add(kind, status, failing or state["failing"])
            await asyncio.sleep(rng.uniform(0.0, 0.02))


async def chaos(ports: Ports, state: dict[str, Any], every: float, lasting: float) -> None:
    """`orders` answers 503 for `lasting` seconds every `every` seconds: its breaker opens."""
    base = f"http://127.0.0.1:{ports.orders}/_soak"
    async with httpx.AsyncClient(timeout=5) as client:
        while not state["stop"]:
            await asyncio.sleep(every)
            state["failing"] = True
            await client.post(f"{base}/fail?status=503")
            state["trips"] += 1
            await asyncio.sleep(lasting)
            await client.post(f"{base}/ok")
            # Answers under way may still be 503s, and open breakers wait out reset_timeout.
            await asyncio.sleep(RESET_TIMEOUT + 2.0)
            state["failing"] = False


async def reloads(ports: Ports, path: Path, state: dict[str, Any], every: float) -> None:
    n = 0
    while not state["stop"]:
        await asyncio.sleep(every)
        n += 1
        write_atomically(path, config_text(ports, n))
        state["reloads"][("valid" if n % 2 == 0 else "invalid")] += 1


# --- sampling ------------------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = (value.split() or [""])[0]
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return {
        "rss_mib": round(int(fields["VmRSS"]) / 1024, 1),
        "fds": len(fds),
        "sockets": sockets,
        "threads": int(fields["Threads"]),
    }


def admin_sample(admin: int) -> dict[str, Any]:
    try:
        data = httpx.get(f"http://127.0.0.1:{admin}/api/routes", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {"in_flight": "", "breaker": "", "reload": "", "tasks": ""}
    orders = next(r for r in data["routes"] if r["name"] == "orders")
    return {
        "tasks": data.get("process", {}).get("tasks", ""),
        "in_flight": sum(r["bulkhead"]["in_flight"] for r in data["routes"]),
        "breaker": orders["backends"].get("orders", {}).get("breaker", "?"),
        "reload": data["last_reload"]["result"],
    }


COLUMNS = ["t_s", *SERIES, "in_flight", "breaker", "reload", "requests", "failures", "phase"]


def row_text(row: dict[str, Any]) -> str:
    widths = [6, 8, 5, 8, 8, 6, 10, 8, 8, 9, 9, 6]
    return "  ".join(str(row.get(c, "")).rjust(w) for c, w in zip(COLUMNS, widths, strict=True))


async def sampler(
    pid: int, ports: Ports, tally: Tally, state: dict[str, Any], every: float, rows: list[Any]
) -> None:
    start = state["start"]
    while not state["stop"]:
        row = sample_row(pid, ports, tally, start, "load")
        rows.append(row)
        print(row_text(row), flush=True)
        await asyncio.sleep(every - (time.monotonic() - start) % every)


def sample_row(pid: int, ports: Ports, tally: Tally, start: float, phase: str) -> dict[str, Any]:
    row: dict[str, Any] = {"t_s": round(time.monotonic() - start)}
    row.update(proc_sample(pid))
    row.update(admin_sample(ports.admin))
    row.update(requests=tally.requests, failures=tally.failures, phase=phase)
    return row


# --- the run -------------------------------------------------------------------------------


def verdict(rows: list[dict[str, Any]], warmup: float) -> tuple[list[str], bool]:
    """Each series' after-warm-up value (median of the first three samples from `warmup` on)
    against its end value (median of the last three under load): one spike decides nothing."""
    load = [r for r in rows if r["phase"] == "load"]
    settled = [r for r in load if r["t_s"] >= warmup] or load[-1:]
    lines, flat = [], True
    for name in SERIES:
        values = [r[name] for r in load if r[name] != ""]
        if not values:
            lines.append(f"  {name:<8} not sampled")
            continue
        ref = statistics.median([r[name] for r in settled[:3] if r[name] != ""] or values[:1])
        end = statistics.median(values[-3:])
        ok = end <= ref * 1.10 + SLACK[name]
        flat &= ok
        lines.append(
            f"  {name:<8} start {values[0]:>7}  after warm-up {ref:>7}  end {end:>7}  "
            f"max {max(values):>7}  {'flat' if ok else 'GROWING'}"
        )
    return lines, flat


def breaker_opens(log: Path) -> int:
    opens = 0
    for line in log.read_text(errors="replace").splitlines():
        if '"breaker state changed"' in line and '"open"' in line:
            opens += 1
    return opens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=6, help="concurrent clients")
    parser.add_argument("--reload-every", type=float, default=30.0)
    parser.add_argument("--fail-every", type=float, default=45.0)
    parser.add_argument("--fail-for", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, help="seconds (default: 25%% of the run, 30-300)")
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream, args.port)
        return 0

    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(300.0, max(30.0, duration / 4))
    ports = Ports(*(free_port() for _ in range(5)))
    workdir = Path(tempfile.mkdtemp(prefix="strangler-soak-"))
    config_path = workdir / "strangler.yaml"
    config_path.write_text(config_text(ports, 0))
    procs: list[subprocess.Popen[bytes]] = []
    log = workdir / "proxy.log"
    try:
        for name in ("monolith", "orders", "mirror"):
            port = getattr(ports, name)
            cmd = [sys.executable, __file__, "--upstream", name, "--port", str(port)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL))
        with log.open("wb") as out:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(config_path)]
                + ["--host", "127.0.0.1", "--port", str(ports.proxy)]
                + ["--admin-host", "127.0.0.1", "--admin-port", str(ports.admin)],
                stdout=out,
                stderr=out,
                cwd=ROOT,
                env={**os.environ, "SOAK_TOKEN": TOKEN},
            )
        procs.append(proxy)
        for port in (ports.monolith, ports.orders, ports.mirror):
            wait_for(f"http://127.0.0.1:{port}/health")
        wait_for(f"http://127.0.0.1:{ports.admin}/readyz")
        rows, tally, state = asyncio.run(run(args, ports, proxy.pid, config_path, duration))
        time.sleep(3)  # idle: in-flight work done, kept-alive client connections closed
        rows.append(sample_row(proxy.pid, ports, tally, state["start"], "idle"))
        print(row_text(rows[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report(args, rows, tally, state, warmup, log, workdir)


async def run(
    args: argparse.Namespace, ports: Ports, pid: int, config_path: Path, duration: float
) -> tuple[list[dict[str, Any]], Tally, dict[str, Any]]:
    tally = Tally()
    state: dict[str, Any] = {
        "stop": False,
        "failing": False,
        "trips": 0,
        "reloads": Counter(),
        "start": time.monotonic(),
    }
    rows: list[dict[str, Any]] = []
    print(f"soak: {args.minutes:g} min, {args.workers} clients, sample every {args.sample:g} s")
    print(row_text({c: c for c in COLUMNS}))
    tasks = [
        asyncio.create_task(worker(ports.proxy, tally, state, seed)) for seed in range(args.workers)
    ]
    tasks += [
        asyncio.create_task(sampler(pid, ports, tally, state, args.sample, rows)),
        asyncio.create_task(reloads(ports, config_path, state, args.reload_every)),
        asyncio.create_task(chaos(ports, state, args.fail_every, args.fail_for)),
    ]
    done, _ = await asyncio.wait(tasks, timeout=duration, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()  # a crashed sampler, reloader or chaos task ends the soak loudly
    if time.monotonic() - state["start"] - rows[-1]["t_s"] > 1:
        rows.append(sample_row(pid, ports, tally, state["start"], "load"))
        print(row_text(rows[-1]))
    state["stop"] = True
    for task in tasks[args.workers :]:
        task.cancel()
    await asyncio.wait(tasks[: args.workers], timeout=60)
    return rows, tally, state


def report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    tally: Tally,
    state: dict[str, Any],
    warmup: float,
    log: Path,
    workdir: Path,
) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    csv_path = OUT / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines, flat = verdict(rows, warmup)
    reloads = state["reloads"]
    print()
    print(f"requests {tally.requests}, failures outside failure windows {tally.failures}")
    print("outcomes: " + json.dumps(dict(sorted(tally.outcomes.items()))))
    print(
        f"reloads written: {reloads['valid']} valid, {reloads['invalid']} invalid; "
        f"orders failure windows: {state['trips']}; breaker opens logged: {breaker_opens(log)}"
    )
    print(
        f"series (warm-up {warmup:g} s; medians of 3 samples; "
        f"flat = end <= after-warm-up x 1.10 + slack {SLACK}):"
    )
    print("\n".join(lines))
    print(f"verdict: {'FLAT' if flat and tally.failures == 0 else 'NOT FLAT'}")
    print(f"csv: {csv_path}\nproxy log: {log}\nworkdir: {workdir}")
    return 0 if flat and tally.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
