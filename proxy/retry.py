"""Retry policy (SPEC §5), without I/O: which requests may be replayed, which failures are
retried, the jittered backoff before each retry, and the per-route retry budget.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["REPLAYABLE_METHODS", "RetryBudget", "RetryOn", "backoff", "is_replayable", "retries_on"]

REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_CAUSES = frozenset({"connect", "timeout"})
_SERVER_ERRORS = frozenset(range(500, 600))


def is_replayable(method: str, has_idempotency_key: bool) -> bool:
    """Whether a request may be sent twice. Methods are case-sensitive (RFC 9110 §9.1)."""
    return has_idempotency_key or method in REPLAYABLE_METHODS


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number `attempt` (1-based): full jitter over
    [0, min(cap, base * 2**(attempt-1))).
    """
    if attempt < 1:
        raise ValueError("attempt counts retries from 1")
    # Past 2**62 the product is over any sane cap anyway, and 2**1024 overflows a float.
    ceiling = cap if attempt > 63 else min(cap, base * (1 << (attempt - 1)))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class RetryOn:
    """The failures a route retries, built once from `retry.on`; `cause in retry_on` is a
    set lookup. A cause is "connect", "timeout" or the int status of the answer.
    """

    causes: frozenset[str | int]

    @classmethod
    def of(cls, on: Iterable[str | int]) -> RetryOn:
        causes: set[str | int] = set()
        for item in on:
            if isinstance(item, int):
                causes.add(item)
            elif item.isdigit():
                causes.add(int(item))
            elif item.lower() == "5xx":
                causes |= _SERVER_ERRORS
            elif item.lower() in _CAUSES:
                causes.add(item.lower())
            else:
                raise ValueError(f"{item!r} is not connect, timeout, 5xx or an HTTP status")
        return cls(frozenset(causes))

    def __contains__(self, cause: object) -> bool:
        return cause in self.causes


def retries_on(cause: str | int, on: RetryOn | Iterable[str | int]) -> bool:
    """Whether `cause` is one of `on`; pass a prebuilt RetryOn on the request path."""
    retry_on = on if isinstance(on, RetryOn) else RetryOn.of(on)
    return cause in retry_on.causes


class RetryBudget:
    """Retries over the last `window` seconds may not reach max(min_retries, ratio * requests
    in the window), so retries cannot multiply load during an outage.

    The window is a ring of 1-second buckets: it spans the current second and the
    ceil(window) - 1 before it. Not thread-safe: one per route per event loop.
    """

    __slots__ = (
        "_ratio",
        "_ppm",
        "_min_retries",
        "_window",
        "_clock",
        "_size",
        "_requests",
        "_retries",
        "_total_requests",
        "_total_retries",
        "_head",
    )

    def __init__(
        self,
        ratio: float,
        *,
        min_retries: int = 10,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_retries < 0 or window <= 0:
            raise ValueError("need ratio >= 0, min_retries >= 0, window > 0")
        self._ratio = ratio
        # In parts per million, so the check is exact integers (in floats 0.07 * 100 > 7).
        self._ppm = round(ratio * 1_000_000)
        self._min_retries = min_retries
        self._window = window
        self._clock = clock
        self._size = math.ceil(window)
        self._requests = [0] * self._size
        self._retries = [0] * self._size
        self._total_requests = 0
        self._total_retries = 0
        self._head = math.floor(clock())

    @property
    def settings(self) -> tuple[float, int, float]:
        return (self._ratio, self._min_retries, self._window)

    @property
    def requests(self) -> int:
        """First attempts in the window."""
        self._advance()
        return self._total_requests

    @property
    def retries(self) -> int:
        """Retries spent in the window."""
        self._advance()
        return self._total_retries

    def record_request(self) -> None:
        """Count a request (its first attempt; retries are not requests)."""
        index = self._advance()
        self._requests[index] += 1
        self._total_requests += 1

    def try_spend(self) -> bool:
        """True, and counts the retry, when the budget allows one more."""
        index = self._advance()
        retries = self._total_retries
        if retries >= self._min_retries and retries * 1_000_000 >= self._ppm * self._total_requests:
            return False
        self._retries[index] += 1
        self._total_retries = retries + 1
        return True

    def _advance(self) -> int:
        """Moves the ring to the current second, emptying the buckets that fell out of the
        window; returns the current bucket's index.
        """
        now = math.floor(self._clock())
        head = self._head
        if now > head:
            size = self._size
            if now - head >= size:
                self._requests = [0] * size
                self._retries = [0] * size
                self._total_requests = self._total_retries = 0
            else:
                for second in range(head + 1, now + 1):
                    i = second % size
                    self._total_requests -= self._requests[i]
                    self._total_retries -= self._retries[i]
                    self._requests[i] = self._retries[i] = 0
            self._head = head = now
        # A clock that steps back counts in the newest bucket rather than corrupting the ring.
        return head % self._size
