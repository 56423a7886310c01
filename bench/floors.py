"""Floors under strangler's cost per request, under the same pinning as bench/run.py:

    python bench/floors.py [--runs 3] [--duration 5]

NGINX as a proxy; uvicorn (httptools, uvloop) answering 1 KiB itself; the same bare app
relaying to the origin with one aiohttp session, and with strangler's own client
(proxy.pool); strangler's own main-port server (proxy.http1) answering itself and relaying
through proxy.pool (bench/floor_server.py); strangler with the demo policies.
The differences split strangler's CPU time per request into the server's share, the
client's and the rest (pipeline, policies, log, metrics).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import nginx, procstat  # noqa: E402
from bench.main import cpu_per_request, free_port, origin_and_reference  # noqa: E402
from bench.model import PROXY_CPU  # noqa: E402
from bench.strangler import ROOT, Strangler, python  # noqa: E402


class Bare:
    """`uvicorn bench.floor_apps:APP` (or, with `own`, bench/floor_server.py) on CPU 0, one
    process."""

    def __init__(self, app: str, origin: str, own: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if own:
            cmd = [python(), str(ROOT / "bench" / "floor_server.py"), app, str(self.port)]
        else:
            cmd = [python(), "-m", "uvicorn", f"bench.floor_apps:{app}", "--port", str(self.port)]
            cmd += ["--loop", "uvloop", "--http", "httptools", "--lifespan", "off"]
            cmd += ["--no-access-log", "--log-level", "warning"]
        env = {**os.environ, "FLOOR_ORIGIN": origin, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(["taskset", "-c", str(PROXY_CPU), *cmd], env=env, cwd=ROOT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/bench/1k", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"uvicorn {app} did not start")

    def pids(self) -> list[int]:
        return procstat.tree(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/floors.py", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="strangler-floors-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        origin, ngx = origin_and_reference(workdir)
        running: list[Bare | Strangler | nginx.Nginx] = [origin, ngx]
        try:
            origin.start("/bench/1k")
            ngx.start("/bench/1k")
            demo = Strangler(workdir, "demo", origin.url, free_port(), free_port(), PROXY_CPU)
            running.append(demo.start())
            local, forward = Bare("local", origin.url), Bare("forward", origin.url)
            pooled = Bare("pooled", origin.url)
            running += [local, forward, pooled]
            own_local = Bare("local", origin.url, own=True)
            own_pooled = Bare("pooled", origin.url, own=True)
            running += [own_local, own_pooled]
            targets = {
                "NGINX proxy": (ngx.url, ngx.pids),
                "uvicorn alone (answers itself)": (local.url, local.pids),
                "uvicorn + aiohttp relay": (forward.url, forward.pids),
                "uvicorn + own client relay": (pooled.url, pooled.pids),
                "own server alone (answers itself)": (own_local.url, own_local.pids),
                "own server + own client relay": (own_pooled.url, own_pooled.pids),
                "strangler, demo policies": (demo.url, demo.pids),
            }
            found: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for _ in range(args.runs):
                for conns in (64, 1):
                    for name, (url, pids) in targets.items():
                        found.setdefault((name, conns), []).append(
                            _measure(url + "/bench/1k", pids, conns, args.duration)
                        )
        finally:
            for proc in reversed(running):
                proc.stop()
    print(f"medians of {args.runs} runs of {args.duration:g} s, 1 KiB, proxy on CPU {PROXY_CPU}")
    print(f"{'':34} {'req/s c64':>10} {'µs/req c64':>11} {'req/s c1':>9} {'µs/req c1':>10}")
    for name in targets:
        cells = []
        for conns in (64, 1):
            rps = statistics.median(r for r, _ in found[(name, conns)])
            cpu = statistics.median(c for _, c in found[(name, conns)])
            cells.append(f"{rps:>10,.0f} {cpu:>10.1f}")
        print(f"{name:34} {cells[0]} {cells[1]}")
    return 0


def _measure(
    url: str, pids: Callable[[], list[int]], conns: int, duration: float
) -> tuple[float, float]:
    result, cpu = cpu_per_request(url, pids, conns, duration)
    return result.rps, cpu


if __name__ == "__main__":
    raise SystemExit(main())
