"""Routing (SPEC §3): normalize the request path, find the route by longest segment prefix.

Prefixes are indexed in a dict, so the cost of a match grows with the depth of the path
(bounded by the deepest prefix), never with the number of routes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from proxy.errors import BadRequest

T = TypeVar("T")

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# A path with none of these needs no work: no percent-encoding, no dot-segment, no byte
# outside visible ASCII, no `?` or `#` (a path cannot hold them unencoded).
_NEEDS_WORK = re.compile(rb"[^\x21-\x7e]|[%?#]|/\.")
_KEPT = frozenset(range(0x21, 0x7F)) - {ord("?"), ord("#")}


def normalize(raw_path: bytes) -> str:
    """RFC 3986 §6.2.2: decode unreserved percent-encodings, upper-case the others, then
    remove dot-segments. Raises BadRequest for a path that climbs above `/` or is malformed.
    `%2F` stays encoded, so it never splits a segment."""
    if not raw_path.startswith(b"/"):
        raise BadRequest("the request target must be an absolute path")
    if _NEEDS_WORK.search(raw_path) is None:
        return raw_path.decode("ascii")
    return _remove_dot_segments(_normalize_encoding(raw_path))


def _normalize_encoding(raw: bytes) -> str:
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte == 0x25:  # %
            pair = raw[i + 1 : i + 3].decode("latin-1")
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadRequest("malformed percent-encoding in the path")
            value = int(pair, 16)
            out.append(chr(value) if value in _UNRESERVED else "%" + pair.upper())
            i += 3
            continue
        out.append(chr(byte) if byte in _KEPT else f"%{byte:02X}")
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    last = len(segments) - 1
    out: list[str] = []
    for i, segment in enumerate(segments):
        if segment == "..":
            if not out:
                raise BadRequest("the path climbs above /")
            out.pop()
        elif segment != ".":
            out.append(segment)
            continue
        if i == last:
            out.append("")
    return "/" + "/".join(out)


@functools.lru_cache(maxsize=1024)
def normalize_prefix(prefix: str) -> str:
    """A configured prefix in the form the index uses: normalized, no trailing slash."""
    path = normalize(prefix.encode("utf-8"))
    return path.rstrip("/") or "/"


def is_segment_prefix(prefix: str, path: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def strip_prefix(path: str, prefix: str) -> str:
    """`/api/orders/7` without `/api` is `/orders/7`; without itself it is `/`. `path` is
    normalized; `prefix` is taken as configured (`/café`, `/%7Eu`) and normalized alike."""
    prefix = normalize_prefix(prefix).rstrip("/")
    if prefix and is_segment_prefix(prefix, path):
        return path[len(prefix) :] or "/"
    return path


def host_of(host_header: str | None) -> str | None:
    """The host name of a Host header: lower case, without port or trailing dot."""
    if not host_header:
        return None
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0].rstrip(".")


@dataclass(frozen=True, slots=True)
class Rule(Generic[T]):
    """One route's match conditions and what the router returns for it."""

    name: str
    prefix: str
    target: T
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    host: str | None = None
    order: int = 0

    @property
    def condition_count(self) -> int:
        return sum(1 for c in (self.methods, self.headers, self.host) if c)

    def refusal(self, method: str, host: str | None, header: Callable[[str], str | None]) -> str:
        """Why this rule does not take the request: '' when it does."""
        if self.methods is not None and method not in self.methods:
            return f"method {method} is not one of {', '.join(sorted(self.methods))}"
        if self.host is not None and host != self.host:
            return f"host {host or '(none)'} is not {self.host}"
        for name, value in self.headers:
            sent = header(name)
            if sent != value:
                return f"header {name} is {sent!r}, not {value!r}" if sent else f"no {name} header"
        return ""


@dataclass(frozen=True, slots=True)
class Loser:
    rule: Rule[object]
    why: str


@dataclass(slots=True)
class Router(Generic[T]):
    """Longest segment prefix wins; among equal prefixes, more conditions, then file order."""

    fallback: T
    _index: dict[str, list[Rule[T]]] = field(default_factory=dict)
    _depth: int = 0

    @classmethod
    def build(cls, rules: Sequence[Rule[T]], fallback: T) -> Router[T]:
        router = cls(fallback)
        for rule in rules:
            router._index.setdefault(rule.prefix, []).append(rule)
            depth = 0 if rule.prefix == "/" else rule.prefix.count("/")
            router._depth = max(router._depth, depth)
        for bucket in router._index.values():
            bucket.sort(key=lambda r: (-r.condition_count, r.order))
        return router

    def match(
        self, path: str, method: str, host: str | None, header: Callable[[str], str | None]
    ) -> T:
        for bucket in self._buckets(path):
            for rule in bucket:
                if not rule.refusal(method, host, header):
                    return rule.target
        return self.fallback

    def explain(
        self, path: str, method: str, host: str | None, header: Callable[[str], str | None]
    ) -> tuple[Rule[T] | None, list[Loser]]:
        """The rule `match` picks (None: the fallback) and the rules tried before it, with why
        each lost; the same walk as `match`."""
        losers: list[Loser] = []
        for bucket in self._buckets(path):
            for rule in bucket:
                why = rule.refusal(method, host, header)
                if not why:
                    return rule, losers
                losers.append(Loser(rule, why))  # type: ignore[arg-type]
        return None, losers

    def _buckets(self, path: str) -> Iterator[list[Rule[T]]]:
        index = self._index
        candidate = self._truncate(path).rstrip("/") or "/"
        while True:
            bucket = index.get(candidate)
            if bucket is not None:
                yield bucket
            if candidate == "/":
                return
            candidate = candidate[: candidate.rfind("/")] or "/"

    def _truncate(self, path: str) -> str:
        """The path cut after the deepest prefix's segment count: no deeper key exists."""
        end = -1
        for _ in range(self._depth + 1):
            end = path.find("/", end + 1)
            if end == -1:
                return path
        return path[:end]

    def __len__(self) -> int:
        return sum(len(b) for b in self._index.values())
