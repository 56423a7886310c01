"""Where strangler's time goes: py-spy on one worker under wrk load.

    .venv/bin/pip install py-spy        # a tool for you, not a dependency of the project
    python bench/profile.py [--scenario demo] [--connections 64] [--duration 15]

Starts the origin NGINX (CPU 1) and strangler with the scenario's config (CPU 0, one
worker), drives /bench/1k with wrk from CPU 1, samples the worker with `py-spy record
--nonblocking` (also on CPU 1, so the proxy is not paused or crowded), and prints the
hottest functions by self time, by inclusive time and by package. The raw stacks are kept
for a flame graph (`--raw FILE`; e.g. speedscope or flamegraph.pl read them).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import nginx, wrk  # noqa: E402
from bench.main import HEADERS, free_port, write_bodies  # noqa: E402
from bench.model import CLIENT_CPU, PROXY_CPU  # noqa: E402
from bench.strangler import SCENARIOS, Strangler  # noqa: E402

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> tuple[str, str]:
    """`send (aiohttp/client.py:123)` -> ("aiohttp/client.py", "send")."""
    found = _FRAME.match(frame.strip())
    if found is None:
        return ("?", frame.strip())
    return (_short(found["file"]), found["func"])


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


_CLIENT = ("aiohttp", "yarl", "multidict", "aiohappyeyeballs", "propcache")
_ENTRY = ("proxy/server.py", "proxy/cli.py", "proxy/__main__.py")
LOOP = "event loop, syscalls, asyncio (uvloop's C code, no Python frame of ours)"


def stage(file: str) -> str | None:
    """The part of the request path a file belongs to; None for the standard library and
    the entry frames under every stack (server.run, cli.main)."""
    top = file.split("/", 1)[0]
    if top in _CLIENT or file in ("proxy/forward.py", "proxy/pool.py"):
        return "upstream client (pool.py, forward.py)"
    if top in ("uvicorn", "httptools") or file == "proxy/http1.py":
        return "server (http1.py)"
    if file == "proxy/logs.py":
        return "access log (logs.py, json)"
    if top == "prometheus_client" or file in ("proxy/metrics.py", "proxy/stats.py"):
        return "metrics (metrics.py, stats.py, prometheus_client)"
    if file.startswith("proxy/") and file not in _ENTRY:
        return "pipeline and policies: " + file.removeprefix("proxy/")
    if top == "pybreaker":
        return "pipeline and policies: breaker.py"
    return None


def stage_of(frames: list[tuple[str, str]]) -> str:
    """A sample's stage: that of its frame nearest the leaf that is not the standard
    library (json under logs.py is the access log's, a socket write under the server's send
    is the server's)."""
    for file, _ in reversed(frames):
        found = stage(file)
        if found is not None:
            return found
    return LOOP


def summarize(raw: str, top: int = 25) -> str:
    """Self, inclusive and per-package sample shares of py-spy's raw (collapsed) stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    detail: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        thread = next((p for p in parts if p.startswith("thread ")), "thread ?").split(": ")[-1]
        frames = [frame_name(p) for p in parts if not p.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        threads[thread] += count
        file, func = frames[-1]
        self_time[f"{func} ({file})"] += count
        where = stage_of(frames)
        stages[where.split(":")[0]] += count
        if ":" in where:
            detail[where.split(": ")[1]] += count
        for name in {f"{fn} ({fl})" for fl, fn in frames}:
            inclusive[name] += count
    if not total:
        return "no samples"

    def block(title: str, counter: Counter[str], n: int) -> list[str]:
        lines = [title]
        for name, count in counter.most_common(n):
            lines.append(f"  {count / total * 100:5.1f}%  {name}")
        return lines

    out = [f"{total} samples"]
    out += block("threads (without --gil, a thread in a blocking write counts too):", threads, 5)
    out += block(
        "by stage (the frame nearest the leaf that is not the standard library):", stages, 10
    )
    out += block("pipeline and policies, by module:", detail, 15)
    out += block("self time by function:", self_time, top)
    out += block(
        "inclusive time by function (lower bounds: a coroutine step resumed from uvloop's C code "
        "lacks the frames under it):",
        inclusive,
        top + 15,
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/profile.py", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=SCENARIOS, default="demo")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--path", default="/bench/1k")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--raw", type=Path, help="keep py-spy's raw stacks in this file")
    p.add_argument("--gil", action="store_true", help="only samples that hold the GIL")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is missing: .venv/bin/pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="strangler-profile-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        write_bodies(workdir / "www")
        port = free_port()
        origin = nginx.Nginx(
            workdir, "origin", nginx.origin_config(workdir, port, workdir / "www"), port, CLIENT_CPU
        )
        proxy = Strangler(workdir, args.scenario, origin.url, free_port(), free_port(), PROXY_CPU)
        raw_path = args.raw or workdir / "stacks.txt"
        try:
            origin.start("/bench/1k")
            proxy.start()
            url = proxy.url + args.path
            warm = wrk.command(url, connections=args.connections, duration=2, cpu=CLIENT_CPU)
            wrk.run(warm)
            load = subprocess.Popen(
                wrk.command(
                    url,
                    connections=args.connections,
                    duration=args.duration + 2,
                    cpu=CLIENT_CPU,
                    headers=HEADERS,
                ),
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1)
            subprocess.run(
                ["taskset", "-c", str(CLIENT_CPU), spy, "record", "--nonblocking", "--threads"]
                + (["--gil"] if args.gil else [])
                + ["--rate", str(args.rate), "--duration", str(round(args.duration))]
                + ["--format", "raw", "--output", str(raw_path), "--pid", str(proxy.pid)],
                check=True,
                capture_output=True,
            )
            out, _ = load.communicate(timeout=args.duration + 30)
            result = wrk.parse(out)
            print(
                f"{args.scenario}, {args.connections} connections, {args.path}: "
                f"{result.rps:.0f} req/s while sampled (py-spy costs the proxy a little)"
            )
            print(summarize(raw_path.read_text()))
        finally:
            proxy.stop()
            origin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
