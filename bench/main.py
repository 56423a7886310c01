"""`bench/run.py`: strangler against direct-to-origin and NGINX as a proxy, in one run.

Pinning: the proxy under test (NGINX proxy or strangler, one worker) on CPU 0; wrk and the
origin NGINX on CPU 1. Every target is measured under every load `--runs` times, the runs
interleaved (run 1 of every target, then run 2, ...) so that the machine's drifting load
spreads over all of them; the report takes medians and divides by NGINX's.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench import nginx, procstat, report, wrk
from bench.model import CLIENT_CPU, LOADS, PROXY_CPU, Load, Run, Sample, Target
from bench.strangler import SCENARIOS, STICKY_COOKIE, Strangler, python

ROOT = Path(__file__).resolve().parents[1]
HEADERS = (f"Cookie: {STICKY_COOKIE}=bench-user-1",)
INSTR_REQUESTS = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py", description="strangler vs direct vs NGINX, ratios to NGINX"
    )
    p.add_argument("--quick", action="store_true", help="1 run of 3 s per measurement")
    p.add_argument("--runs", type=int, help="repetitions of each measurement (default 3)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=(*SCENARIOS, "foundation"),
        default=[*SCENARIOS, "foundation"],
        help="strangler configs to measure; foundation: the quick wrk -c64 line",
    )
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("--no-deps", action="store_true", help="do not run bench/deps.sh")
    p.add_argument(
        "--no-instructions",
        action="store_true",
        help="skip the instruction counts (callgrind, ~15 s per scenario)",
    )
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = 1.0 if args.quick else 2.0
    return args


def ensure_tools(skip_deps: bool) -> None:
    if not skip_deps:
        subprocess.run(["bash", str(ROOT / "bench" / "deps.sh")], check=True)
    missing = [
        tool
        for tool in ("wrk", "taskset")
        if subprocess.run(["which", tool], capture_output=True).returncode
    ]
    nginx.binary()
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (bench/deps.sh installs them)")
    if len(procstat.CpuTimes.now().per_cpu) < 2:
        print("warning: fewer than 2 CPUs: the proxy and wrk share one", file=sys.stderr)


def write_bodies(root: Path) -> None:
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "1k").write_bytes(b"x" * 1024)
    (root / "bench" / "1m").write_bytes(b"y" * (1024 * 1024))


def origin_and_reference(workdir: Path) -> tuple[nginx.Nginx, nginx.Nginx]:
    """The NGINX origin (1 KiB and 1 MiB bodies from workdir/www, on the client's CPU) and
    NGINX as a proxy in front of it (the reference, on the proxy's CPU); not started."""
    www = workdir / "www"
    write_bodies(www)
    origin_port, proxy_port = free_port(), free_port()
    origin = nginx.Nginx(
        workdir, "origin", nginx.origin_config(workdir, origin_port, www), origin_port, CLIENT_CPU
    )
    reference = nginx.Nginx(
        workdir,
        "proxy",
        nginx.proxy_config(workdir, proxy_port, origin_port),
        proxy_port,
        PROXY_CPU,
    )
    return origin, reference


def measure(target: Target, load: Load, duration: float, log: list[str]) -> Sample:
    cmd = wrk.command(
        target.url + load.path,
        connections=load.connections,
        duration=duration,
        cpu=CLIENT_CPU,
        headers=HEADERS,
    )
    line = f"{shlex.join(cmd)}  # {target.name}"
    if line not in log:
        log.append(line)
    pids = target.pids() if target.pids else None
    cpu0 = procstat.cpu_seconds(pids) if pids else None
    times0, t0 = procstat.CpuTimes.now(), time.monotonic()
    result, _ = wrk.run(cmd)
    wall = time.monotonic() - t0
    busy = procstat.CpuTimes.now().busy_since(times0)
    cpu = procstat.cpu_seconds(pids) - cpu0 if pids and cpu0 is not None else None
    return Sample(result, cpu, wall, busy)


def cpu_per_request(
    url: str, pids: Callable[[], list[int]], connections: int, duration: float
) -> tuple[wrk.WrkResult, float]:
    """One pinned wrk run against `url`; its result and the CPU µs per request that the
    processes `pids()` spent on it."""
    before = procstat.cpu_seconds(pids())
    cmd = wrk.command(
        url, connections=connections, duration=duration, cpu=CLIENT_CPU, headers=HEADERS
    )
    result, _ = wrk.run(cmd)
    cpu = procstat.cpu_seconds(pids()) - before
    return result, cpu / max(1, result.requests) * 1e6


def warm_up(target: Target, duration: float) -> None:
    for load in LOADS[1:]:
        cmd = wrk.command(
            target.url + load.path,
            connections=load.connections,
            duration=duration,
            cpu=CLIENT_CPU,
            headers=HEADERS,
        )
        wrk.run(cmd)


def foundation_line(
    targets: dict[str, Target], duration: float, log: list[str]
) -> dict[str, wrk.WrkResult]:
    """The Foundation issue's quick check: wrk -c64 through strangler (plain, 1 worker) next
    to the same run directly against the origin."""
    found: dict[str, wrk.WrkResult] = {}
    for name in ("direct", "plain"):
        cmd = wrk.command(
            targets[name].url + "/bench/1k", connections=64, duration=duration, cpu=CLIENT_CPU
        )
        log.append(f"{shlex.join(cmd)}  # quick check, {name}")
        found[name], _ = wrk.run(cmd)
        print(f"foundation {name:>8}: {found[name].rps:10.0f} req/s", flush=True)
    return found


def count_instructions(scenarios: list[str], log: list[str]) -> dict[str, float]:
    """Each scenario's user-space instructions per request under callgrind (bench/instr.py):
    repeatable where the timings above are not. Skipped, with a note, without valgrind."""
    from bench import instr

    if shutil.which("valgrind") is None:
        print("valgrind missing: no instruction counts", file=sys.stderr)
        return {}
    found: dict[str, float] = {}
    for scenario in scenarios:
        found[scenario] = instr.measure(ROOT, scenario, "/bench/1k", 1, INSTR_REQUESTS)
        log.append(
            f"python bench/instr.py --scenario {scenario} --connections 1 "
            f"--requests {INSTR_REQUESTS}  # {found[scenario]:,.0f} instructions per request"
        )
        print(f"instructions {scenario:>10}: {found[scenario]:12,.0f} per request", flush=True)
    return found


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    total = next(
        (
            ln.split()[1]
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        ),
        "?",
    )
    return {
        "nproc": nproc,
        "cpu": model,
        "kernel": platform.release(),
        "os": _os_name(),
        "memory": f"{int(total) // 1024} MiB" if total.isdigit() else total,
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("uvicorn", "httptools", "uvloop", "aiohttp", "strangler-proxy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "-"
    found["nginx"] = nginx.version()
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    found["wrk"] = (done.stdout + done.stderr).split("[", 1)[0].replace("wrk", "").strip()
    return found


def strangler_version_info() -> dict[str, str]:
    """Versions as the proxy's own interpreter sees them (the venv, not this one)."""
    code = (
        "import platform, json\nfrom importlib import metadata as m\n"
        "d={'python': platform.python_version()}\n"
        "for n in ('uvicorn','httptools','uvloop','aiohttp','strangler-proxy'):\n"
        "    try: d[n]=m.version(n)\n    except Exception: d[n]='-'\nprint(json.dumps(d))"
    )
    done = subprocess.run([python(), "-c", code], capture_output=True, text=True, check=False)
    try:
        return dict(json.loads(done.stdout))
    except ValueError:
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(args.no_deps)
    started, t0 = datetime.now(UTC), time.monotonic()
    load_before = procstat.load_average()
    commands: list[str] = []
    scenarios = [s for s in SCENARIOS if s in args.scenarios]
    if "foundation" in args.scenarios and "plain" not in scenarios:
        scenarios.insert(0, "plain")
    with tempfile.TemporaryDirectory(prefix="strangler-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        origin, ngx = origin_and_reference(workdir)
        stranglers = [
            Strangler(workdir, s, origin.url, free_port(), free_port(), PROXY_CPU)
            for s in scenarios
        ]
        commands += [
            f"{shlex.join(origin.command)}  # origin",
            f"{shlex.join(ngx.command)}  # nginx",
        ]
        commands += [f"{shlex.join(s.command)}  # {s.scenario}" for s in stranglers]
        try:
            origin.start("/bench/1k")
            ngx.start("/bench/1k")
            for s in stranglers:
                s.start()
            targets = [
                Target("direct", origin.url, None, None),
                Target("nginx", ngx.url, ngx.pids, ngx.worker_peak_rss_kib, ngx.worker_rss_kib()),
                *(
                    Target(s.scenario, s.url, s.pids, s.peak_rss_kib, s.rss_kib())
                    for s in stranglers
                ),
            ]
            by_name = {t.name: t for t in targets}
            for t in targets:
                warm_up(t, args.warmup)
            foundation = (
                foundation_line(by_name, args.duration, commands)
                if "foundation" in args.scenarios
                else {}
            )
            measured = [t for t in targets if t.name in ("direct", "nginx", *args.scenarios)]
            for run in range(1, args.runs + 1):
                for load in LOADS:
                    for t in measured:
                        sample = measure(t, load, args.duration, commands)
                        t.samples.setdefault(load.key, []).append(sample)
                        print(report.progress_line(run, load.key, t.name, sample), flush=True)
            rss = {t.name: t.peak_rss_kib() for t in measured if t.peak_rss_kib is not None}
            configs = {
                path.name: path.read_text()
                for path in [ngx.config_path, origin.config_path]
                + [s.config_path for s in stranglers if s.scenario != "routes1000"]
            }
        finally:
            for s in stranglers:
                s.stop()
            ngx.stop()
            origin.stop()
    instructions = {} if args.no_instructions else count_instructions(scenarios, commands)
    result = Run(
        args=args,
        targets=measured,
        commands=commands,
        foundation=foundation,
        load_before=load_before,
        load_after=procstat.load_average(),
        started=started,
        elapsed_s=time.monotonic() - t0,
        machine=machine(),
        versions={**versions(), **strangler_version_info()},
        rss_kib=rss,
        configs=configs,
        instructions=instructions,
    )
    text = report.markdown(result)
    print(report.table(result))
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0
