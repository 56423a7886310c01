"""Choosing a backend (SPEC §4): sticky key -> bucket -> backend, or by weight at random.

A route's split is laid over 10,000 buckets in the order its backends are listed, with the
legacy backend last. Raising one new service's share therefore only moves buckets from
legacy to that service: a user moved at 10% is still moved at 20%.
"""

from __future__ import annotations

import hashlib
import os
import random
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

BUCKETS = 10_000
COOKIE_MAX_AGE = 30 * 24 * 3600


def bucket_of(route: str, key: str) -> int:
    """Stable across processes, machines and Python versions (not `hash()`)."""
    digest = hashlib.sha256(f"{route}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def new_sticky_key() -> str:
    return os.urandom(12).hex()


@dataclass(frozen=True, slots=True)
class Split:
    """Weights laid over the buckets: `order[i]` owns buckets below `bounds[i]`."""

    weights: Mapping[str, int]
    order: tuple[str, ...]
    bounds: tuple[int, ...]

    @classmethod
    def of(cls, weights: Mapping[str, int], legacy: str) -> Split:
        order = [b for b in weights if b != legacy and weights[b] > 0]
        if weights.get(legacy, 0) > 0:
            order.append(legacy)
        bounds: list[int] = []
        total = 0
        for backend in order:
            total += weights[backend] * BUCKETS // 100
            bounds.append(total)
        return cls(dict(weights), tuple(order), tuple(bounds))

    @property
    def single(self) -> str | None:
        return self.order[0] if len(self.order) == 1 else None

    def backend_for(self, bucket: int) -> str:
        return self.order[min(bisect_right(self.bounds, bucket), len(self.order) - 1)]

    def range_of(self, backend: str) -> tuple[int, int]:
        """The buckets [low, high) that go to `backend`."""
        if backend not in self.order:
            return (0, 0)
        i = self.order.index(backend)
        return (self.bounds[i - 1] if i else 0, self.bounds[i])


@dataclass(frozen=True, slots=True)
class Sticky:
    """Where a route's sticky key comes from: exactly one of cookie, header, client_ip."""

    cookie: str | None = None
    header: str | None = None
    client_ip: bool = False

    @property
    def source(self) -> str:
        if self.cookie:
            return f"cookie {self.cookie}"
        if self.header:
            return f"header {self.header}"
        return "client ip"


class StickySource(Protocol):
    """What the chooser reads of a request."""

    @property
    def client_ip(self) -> str: ...

    @property
    def is_secure(self) -> bool: ...

    def cookie(self, name: str) -> str | None: ...

    def header(self, name: str) -> str | None: ...


class Choice(NamedTuple):
    """One request's backend and why (a tuple: made per request, ~4x cheaper than a frozen
    dataclass, and as immutable)."""

    backend: str
    reason: str
    bucket: int | None = None
    sticky_key: str | None = None
    set_cookie: bytes | None = None  # a Set-Cookie value for a new sticky key


class Chooser:
    """Picks a backend for one request of a route; explain and the request path share it."""

    __slots__ = ("route", "sticky", "_random", "_by_key", "_by_weight")

    def __init__(
        self, route: str, sticky: Sticky | None, rng: Callable[[], float] = random.random
    ) -> None:
        self.route = route
        self.sticky = sticky
        self._random = rng
        # The reasons, formatted once rather than per request.
        source = sticky.source if sticky is not None else ""
        self._by_key = f"sticky {source}"
        self._by_weight = f"by weight, no {source}" if sticky else "by weight, no sticky key"

    def choose(self, split: Split, request: StickySource) -> Choice:
        sticky = self.sticky
        if sticky is None:
            only = split.single
            if only is not None:
                return Choice(only, "only backend")
            bucket = int(self._random() * BUCKETS)
            return Choice(split.backend_for(bucket), self._by_weight, bucket)
        if sticky.cookie:
            key = request.cookie(sticky.cookie)
        elif sticky.header:
            key = request.header(sticky.header)
        else:
            key = request.client_ip
        if key:
            bucket = bucket_of(self.route, key)
            return Choice(split.backend_for(bucket), self._by_key, bucket, key)
        if sticky.cookie:
            key = new_sticky_key()
            bucket = bucket_of(self.route, key)
            return Choice(
                split.backend_for(bucket),
                f"new sticky key, cookie {sticky.cookie} set",
                bucket,
                key,
                set_cookie_value(sticky.cookie, key, secure=request.is_secure),
            )
        bucket = int(self._random() * BUCKETS)
        return Choice(split.backend_for(bucket), self._by_weight, bucket)


def set_cookie_value(name: str, key: str, *, secure: bool) -> bytes:
    flags = f"; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax"
    return f"{name}={key}{flags}{'; Secure' if secure else ''}".encode()


def moved_share(old: Split, new: Split) -> dict[tuple[str, str], float]:
    """Of all sticky users, the share that moves from one backend to another: bucket by bucket,
    so it is exact, not guessed."""
    moves: dict[tuple[str, str], int] = {}
    edges = sorted({0, BUCKETS, *old.bounds, *new.bounds})
    for low, high in zip(edges, edges[1:], strict=False):
        if low >= BUCKETS or high <= low:
            continue
        before, after = old.backend_for(low), new.backend_for(low)
        if before != after:
            moves[(before, after)] = moves.get((before, after), 0) + (high - low)
    return {pair: count / BUCKETS for pair, count in moves.items()}
