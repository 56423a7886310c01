"""Header rules of SPEC §7 as pure functions: hop-by-hop, X-Forwarded-*, request id.

Request headers arrive from the ASGI server with lower-case names; response headers keep
the backend's case and order.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Expect is answered by our own server (100-continue); the backend gets a plain request.
# A client may not pass itself off as shadow traffic.
_NOT_FORWARDED = HOP_BY_HOP | {b"expect", b"x-request-id", b"proxy", b"x-strangler-shadow"}


def _named_by(value: bytes) -> frozenset[bytes]:
    """The names a Connection header value lists that are not dropped anyway."""
    value = value.lower()
    if value == b"keep-alive" or value == b"close":
        return frozenset()
    return frozenset(t.strip() for t in value.split(b",") if t.strip()) - _NOT_FORWARDED


def is_sane_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(0x21 <= b <= 0x7E for b in value)


class _Randomness:
    """os.urandom read 4 KiB at a time: one system call per 512 request ids, not one each.
    A forked worker starts with none, so no two processes hand out the same bytes."""

    __slots__ = ("data", "at")

    def __init__(self) -> None:
        self.data = b""
        self.at = 0

    def take8(self) -> bytes:
        at = self.at
        if at + 8 > len(self.data):
            self.data, at = os.urandom(4096), 0
        self.at = at + 8
        return self.data[at : at + 8]

    def forget(self) -> None:
        self.data, self.at = b"", 0


_randomness = _Randomness()
os.register_at_fork(after_in_child=_randomness.forget)


def new_request_id() -> str:
    return _randomness.take8().hex()


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    peer: str,
    scheme: str,
    peer_is_trusted: bool,
    request_id: str,
) -> Headers:
    """What the backend receives, Host aside (it depends on the backend: see `with_host`):
    the client's headers less hop-by-hop ones, X-Forwarded-* and X-Request-ID set. Names
    are lower case, as the ASGI server gives them."""
    out: Headers = []
    client_host: bytes | None = None
    forwarded_for: list[bytes] = []
    proto: bytes | None = None
    forwarded_host: bytes | None = None
    named: frozenset[bytes] | None = None
    for pair in headers:
        name = pair[0]
        if name == b"host":
            client_host = pair[1]
        elif name == b"x-forwarded-for":
            forwarded_for.append(pair[1])
        elif name == b"x-forwarded-proto":
            proto = pair[1]
        elif name == b"x-forwarded-host":
            forwarded_host = pair[1]
        elif name in _NOT_FORWARDED or name.startswith(b"proxy-"):
            if name == b"connection":
                named = (named or frozenset()) | _named_by(pair[1])
        else:
            out.append(pair)
    if named:
        out = [pair for pair in out if pair[0] not in named]
    if not peer_is_trusted:
        proto, forwarded_host = None, None
    forwarded_for.append(peer.encode())
    head: Headers = [
        (b"x-forwarded-for", b", ".join(forwarded_for)),
        (b"x-forwarded-proto", proto or scheme.encode()),
    ]
    if forwarded_host or client_host:
        head.append((b"x-forwarded-host", forwarded_host or client_host or b""))
    head.append((b"x-request-id", request_id.encode()))
    head += out
    return head


def with_host(headers: Headers, host: bytes | None, client_host: bytes | None) -> Headers:
    """Host first: the backend's own (`host`), or the client's when the backend preserves it."""
    chosen = host if host is not None else client_host
    return [(b"host", chosen), *headers] if chosen is not None else headers


def downstream_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The backend's response headers less hop-by-hop ones (and its X-Request-ID: ours is
    returned), order and repeats kept."""
    out: Headers = []
    named: frozenset[bytes] | None = None
    for pair in raw:
        lower = pair[0].lower()
        if lower in _NOT_FORWARDED or lower.startswith(b"proxy-"):
            if lower == b"connection":
                named = (named or frozenset()) | _named_by(pair[1])
            continue
        out.append(pair)
    if named:
        out = [pair for pair in out if pair[0].lower() not in named]
    return out


class TrustedProxies:
    """Peers whose X-Forwarded-* headers are believed; membership is cached per address."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, address: object) -> bool:
        if not self.networks or not isinstance(address, str):
            return False
        known = self._cache.get(address)
        if known is None:
            known = self._contains(address)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[address] = known
        return known

    def _contains(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client_ip(self, peer: str, forwarded_for: bytes | None) -> str:
        """The peer, or when the peer is trusted, the right-most untrusted address of
        X-Forwarded-For (the first hop that a trusted proxy saw)."""
        if not forwarded_for or peer not in self:
            return peer
        for hop in reversed(forwarded_for.decode("latin-1").split(",")):
            hop = hop.strip()
            if hop and hop not in self:
                return hop
        return peer
