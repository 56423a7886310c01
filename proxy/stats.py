"""Per (route, backend) rates over the last minute, for the migration page and /api/routes:
requests per second, error rate and p95 latency, from 60 one-second buckets."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW = 60
# Latency buckets: upper bounds from 0.5 ms doubling-ish up to 64 s (log scale, 4 per octave).
_EDGES = tuple(0.0005 * 2 ** (i / 4) for i in range(0, 4 * 17 + 1))


def _bucket_of(seconds: float) -> int:
    if seconds <= _EDGES[0]:
        return 0
    i = math.ceil(4 * math.log2(seconds / 0.0005))
    return min(i, len(_EDGES) - 1)


@dataclass(slots=True)
class _Second:
    second: int = -1
    requests: int = 0
    errors: int = 0
    latency: dict[int, int] = field(default_factory=dict)


class Series:
    """One (route, backend)'s ring of seconds."""

    __slots__ = ("_ring", "_clock")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._ring = [_Second() for _ in range(WINDOW)]
        self._clock = clock

    def add(self, is_error: bool, seconds: float) -> None:
        now = int(self._clock())
        slot = self._ring[now % WINDOW]
        if slot.second != now:
            slot.second, slot.requests, slot.errors = now, 0, 0
            slot.latency.clear()
        slot.requests += 1
        if is_error:
            slot.errors += 1
        b = _bucket_of(seconds)
        slot.latency[b] = slot.latency.get(b, 0) + 1

    def raw(self) -> tuple[int, int, dict[int, int]]:
        """Requests, errors and the latency histogram of the live window: mergeable."""
        now = int(self._clock())
        requests = errors = 0
        merged: dict[int, int] = {}
        for s in self._ring:
            if now - WINDOW < s.second <= now:
                requests += s.requests
                errors += s.errors
                for b, n in s.latency.items():
                    merged[b] = merged.get(b, 0) + n
        return requests, errors, merged


def summarize(
    requests: int, errors: int, histogram: dict[int, int], span: float = WINDOW
) -> dict[str, float]:
    """Rates over `span` seconds: the window, or less while the process is younger."""
    return {
        "requests": requests,
        "rps": round(requests / max(1.0, min(span, WINDOW)), 3),
        "error_rate": round(errors / requests, 4) if requests else 0.0,
        "p95_ms": round(_quantile(histogram, requests, 0.95) * 1000, 2),
    }


def _quantile(histogram: dict[int, int], total: int, q: float) -> float:
    if not total:
        return 0.0
    rank = math.ceil(q * total)
    seen = 0
    for b in sorted(histogram):
        seen += histogram[b]
        if seen >= rank:
            return _EDGES[b]
    return _EDGES[-1]


class Window:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._series: dict[tuple[str, str], Series] = {}
        self._started = clock()

    @property
    def span(self) -> float:
        """Seconds the window covers: its full length, or the time since it started."""
        return min(float(WINDOW), self._clock() - self._started)

    def add(self, route: str, backend: str, status: int, seconds: float) -> None:
        self.series(route, backend).add(status >= 500, seconds)

    def series(self, route: str, backend: str) -> Series:
        """(route, backend)'s ring, made on first use; a caller may keep it."""
        key = (route, backend)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Series(self._clock)
        return series

    def raw(self) -> list[tuple[str, str, int, int, dict[int, int]]]:
        """Each (route, backend) with its window's requests, errors and latency histogram."""
        rows = []
        for (route, backend), series in self._series.items():
            requests, errors, histogram = series.raw()
            if requests:
                rows.append((route, backend, requests, errors, histogram))
        return rows
