"""Paired A/B of strangler at a git revision against the working tree, under the pinning of
bench/run.py:

    python bench/ab.py [--base HEAD] [--rounds 5] [--duration 4] [--scenario demo]
    python bench/ab.py --path /bench/1m --connections 8     # MB/s of 1 MiB bodies

On a shared machine whose speed drifts by tens of percent from minute to minute, two
medians taken minutes apart say little; here the two versions (and NGINX as a yardstick)
are measured alternately, seconds apart, and each round's ratio B/A is reported with the
median of the ratios. The base revision is checked out with `git worktree` into a
temporary directory and run from there with the same interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import nginx  # noqa: E402
from bench.main import cpu_per_request, free_port, origin_and_reference  # noqa: E402
from bench.model import PROXY_CPU  # noqa: E402
from bench.strangler import ROOT, SCENARIOS, Strangler  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/ab.py", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision for A (default HEAD)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--scenario", default="demo", choices=SCENARIOS)
    p.add_argument("--path", default="/bench/1k", help="/bench/1k (default) or /bench/1m")
    p.add_argument("--connections", default="64,1", help="comma-separated loads (default 64,1)")
    args = p.parse_args(argv)
    args.loads = [int(n) for n in args.connections.split(",")]
    with tempfile.TemporaryDirectory(prefix="strangler-ab-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        base = workdir / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base],
            check=True,
            capture_output=True,
        )
        try:
            return _compare(workdir, base, args)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                check=False,
                capture_output=True,
            )


def _compare(workdir: Path, base: Path, args: argparse.Namespace) -> int:
    origin, ngx = origin_and_reference(workdir)
    running: list[Strangler | nginx.Nginx] = [origin, ngx]
    found: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        origin.start("/bench/1k")
        ngx.start("/bench/1k")
        a_dir, b_dir = workdir / "a", workdir / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        a = Strangler(a_dir, args.scenario, origin.url, free_port(), free_port(), PROXY_CPU, base)
        running.append(a.start())
        b = Strangler(b_dir, args.scenario, origin.url, free_port(), free_port(), PROXY_CPU)
        running.append(b.start())
        targets: dict[str, tuple[str, Callable[[], list[int]]]] = {
            "NGINX": (ngx.url, ngx.pids),
            f"A {args.base}": (a.url, a.pids),
            "B working tree": (b.url, b.pids),
        }
        for i in range(args.rounds):
            for conns in args.loads:
                order = list(targets.items())
                if i % 2:
                    order[1], order[2] = order[2], order[1]
                for name, (url, pids) in order:
                    found.setdefault((name, conns), []).append(
                        _measure(url + args.path, pids, conns, args.duration)
                    )
    finally:
        for proc in reversed(running):
            proc.stop()
    names = list(targets)
    size = 1024 * 1024 if args.path.endswith("1m") else 1024
    print(f"{args.rounds} rounds of {args.duration:g} s, {args.path}, {args.scenario}, medians")
    for conns in args.loads:
        print(f"\n{conns} connection(s)   req/s    CPU µs/req   p50 ms      MB/s")
        for name in names:
            runs = found[(name, conns)]
            rps, cpu, p50 = (statistics.median(r[k] for r in runs) for k in range(3))
            print(f"  {name:18} {rps:>8,.0f} {cpu:>10.1f} {p50:>10.3f} {rps * size / 1e6:>9.0f}")
        pairs = zip(found[(names[1], conns)], found[(names[2], conns)], strict=True)
        ratios = [(b[0] / a[0], b[1] / a[1], b[2] / a[2]) for a, b in pairs]
        each = ", ".join(f"{r[0]:.2f}" for r in ratios)
        print(
            f"  B/A per round: req/s {statistics.median(r[0] for r in ratios):.3f} ({each}), "
            f"CPU/req {statistics.median(r[1] for r in ratios):.3f}, "
            f"p50 {statistics.median(r[2] for r in ratios):.3f}"
        )
    return 0


def _measure(
    url: str, pids: Callable[[], list[int]], conns: int, duration: float
) -> tuple[float, float, float]:
    result, cpu = cpu_per_request(url, pids, conns, duration)
    return result.rps, cpu, result.p50_ms


if __name__ == "__main__":
    raise SystemExit(main())
