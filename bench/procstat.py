"""What the kernel says about a process and the CPUs: CPU time, peak RSS, per-CPU load."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (an NGINX master and its workers)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.extend(tree(int(child)))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of each process (all its threads), summed."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_kib(pid: int) -> int:
    return status_kib(pid, "VmHWM")


@dataclass(frozen=True)
class CpuTimes:
    """Jiffies per CPU from /proc/stat: (busy, total). Busy leaves out idle, iowait and
    steal (time the hypervisor gave to another guest)."""

    per_cpu: dict[int, tuple[int, int]]

    @classmethod
    def now(cls) -> CpuTimes:
        per_cpu: dict[int, tuple[int, int]] = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            numbers = [int(v) for v in values[:8]]
            not_busy = numbers[3] + numbers[4] + numbers[7]  # idle, iowait, steal
            per_cpu[int(name[3:])] = (sum(numbers) - not_busy, sum(numbers))
        return cls(per_cpu)

    def busy_since(self, before: CpuTimes) -> dict[int, float]:
        """The share of each CPU that was busy between `before` and this sample, 0..1."""
        shares: dict[int, float] = {}
        for cpu, (busy, total) in self.per_cpu.items():
            busy0, total0 = before.per_cpu.get(cpu, (0, 0))
            shares[cpu] = (busy - busy0) / (total - total0) if total > total0 else 0.0
        return shares


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen
