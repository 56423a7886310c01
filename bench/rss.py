"""Peak RSS of the serving process (issue 8: under 50 MiB per worker, 1,000 routes loaded).

    python bench/rss.py [--scenario routes1000] [--duration 3] [--rounds 1] [--no-pin]

Starts an NGINX origin (1 KiB and 1 MiB files) and the real `strangler run` (one worker, the
default single process, as `bench/run.py` does) with the scenario's generated config
(`bench/strangler.py`), then drives the three loads of `bench/run.py` with wrk, one after
the other: 1 connection and 64 connections on 1 KiB, 8 connections on 1 MiB. Prints, per
round (a fresh proxy each), VmRSS right after /readyz answered, VmRSS after each load,
VmHWM at the end, and the MB/s of the 1 MiB load (a rough check that a memory change did
not cost throughput; this machine is noisy). The proxy runs on CPU 0, wrk and the origin
on CPU 1, as in `bench/run.py`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import nginx, wrk  # noqa: E402
from bench.main import HEADERS, free_port, write_bodies  # noqa: E402
from bench.model import CLIENT_CPU, LOADS, PROXY_CPU  # noqa: E402
from bench.strangler import SCENARIOS, Strangler  # noqa: E402

KIB = 1024


def one_round(
    workdir: Path, origin: nginx.Nginx, scenario: str, duration: float, pin: bool
) -> dict[str, float]:
    proxy = Strangler(
        workdir, scenario, origin.url, free_port(), free_port(), PROXY_CPU if pin else None
    )
    proxy.start()
    try:
        found = {"start": proxy.rss_kib() / KIB, "start_peak": proxy.peak_rss_kib() / KIB}
        for load in LOADS:
            cmd = wrk.command(
                proxy.url + load.path,
                connections=load.connections,
                duration=duration,
                cpu=CLIENT_CPU if pin else None,
                headers=HEADERS,
            )
            result, _ = wrk.run(cmd)
            if result.non_2xx or result.socket_errors:
                print(f"warning: {load.key}: {result.non_2xx} non-2xx, errors", file=sys.stderr)
            found[load.key] = proxy.rss_kib() / KIB
            if load.body_bytes >= KIB * KIB:
                found["MB/s"] = result.rps * load.body_bytes / 1e6
        found["peak"] = proxy.peak_rss_kib() / KIB
        return found
    finally:
        proxy.stop()


def describe(scenario: str, row: dict[str, float]) -> str:
    after = ", ".join(f"{load.key} {row[load.key]:.1f}" for load in LOADS)
    return (
        f"{scenario}: start {row['start']:.1f} MiB (VmHWM {row['start_peak']:.1f}), "
        f"after {after}; peak (VmHWM) {row['peak']:.1f} MiB; 1 MiB bodies {row['MB/s']:.0f} MB/s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/rss.py", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=SCENARIOS, default="routes1000")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per load (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="fresh proxies, one after the other")
    p.add_argument("--no-pin", action="store_true", help="do not pin to CPUs 0 and 1")
    args = p.parse_args(argv)
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="strangler-rss-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        write_bodies(workdir / "www")
        port = free_port()
        config = nginx.origin_config(workdir, port, workdir / "www")
        origin = nginx.Nginx(workdir, "origin", config, port, None if args.no_pin else CLIENT_CPU)
        origin.start("/bench/1k")
        try:
            for _ in range(args.rounds):
                row = one_round(workdir, origin, args.scenario, args.duration, not args.no_pin)
                rows.append(row)
                print(describe(args.scenario, row), flush=True)
        finally:
            origin.stop()
    if len(rows) > 1:
        med = {key: statistics.median(r[key] for r in rows) for key in ("start", "peak", "MB/s")}
        print(
            f"median of {len(rows)}: start {med['start']:.1f} MiB, peak {med['peak']:.1f} MiB, "
            f"{med['MB/s']:.0f} MB/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
