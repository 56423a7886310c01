"""Running wrk, pinned to a CPU, and reading its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


class WrkError(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    non_2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def command(
    url: str,
    *,
    connections: int,
    duration: float,
    cpu: int | None,
    headers: tuple[str, ...] = (),
    threads: int = 1,
) -> list[str]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    extra = [arg for header in headers for arg in ("-H", header)]
    return [
        *pin,
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        *extra,
        url,
    ]


def run(cmd: list[str]) -> tuple[WrkResult, str]:
    """Run wrk; its parsed result and its raw output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise WrkError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr or done.stdout}")
    return parse(done.stdout), done.stdout


def parse(output: str) -> WrkResult:
    total = _TOTAL.search(output)
    if total is None:
        raise WrkError(f"no request count in wrk's output:\n{output}")
    percentiles = {p: float(v) * _UNITS_S[u] * 1000 for p, v, u in _PERCENTILE.findall(output)}
    errors = _SOCKET_ERRORS.search(output)
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNITS_S[total.group(3)],
        p50_ms=percentiles.get("50", float("nan")),
        p99_ms=percentiles.get("99", float("nan")),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )
