"""What a benchmark run measured: loads, samples, targets, and the run as a whole."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from bench.wrk import WrkResult

PROXY_CPU, CLIENT_CPU = 0, 1
MIB = 1024 * 1024


@dataclass(frozen=True)
class Load:
    key: str
    path: str
    connections: int
    body_bytes: int


LOADS = (
    Load("c1", "/bench/1k", 1, 1024),
    Load("c64", "/bench/1k", 64, 1024),
    Load("c8_1m", "/bench/1m", 8, MIB),
)


@dataclass(frozen=True)
class Sample:
    """One wrk run against one target, and what the proxy's CPUs did meanwhile."""

    result: WrkResult
    proxy_cpu_s: float | None
    wall_s: float
    cpu_busy: dict[int, float]

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.proxy_cpu_s is None or not self.result.requests:
            return None
        return self.proxy_cpu_s / self.result.requests * 1e6

    @property
    def proxy_busy(self) -> float | None:
        return None if self.proxy_cpu_s is None else self.proxy_cpu_s / self.wall_s

    @property
    def foreign_busy(self) -> float:
        """CPU 0's load that was not the proxy under test (other work on the machine)."""
        return max(0.0, self.cpu_busy.get(PROXY_CPU, 0.0) - (self.proxy_busy or 0.0))


@dataclass
class Target:
    name: str
    url: str
    pids: Callable[[], list[int]] | None  # the proxy's processes; None: direct to origin
    peak_rss_kib: Callable[[], int] | None
    rss_start_kib: int | None = None  # right after it became ready, before any load
    samples: dict[str, list[Sample]] = field(default_factory=dict)


@dataclass
class Run:
    args: argparse.Namespace
    targets: list[Target]
    commands: list[str]
    foundation: dict[str, WrkResult]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    started: datetime
    elapsed_s: float
    machine: dict[str, str]
    versions: dict[str, str]
    rss_kib: dict[str, int]
    configs: dict[str, str]  # file name -> the generated NGINX or strangler config
    # scenario -> user-space instructions per request (callgrind, bench/instr.py): empty
    # when not counted (--no-instructions, or valgrind missing)
    instructions: dict[str, float] = field(default_factory=dict)
