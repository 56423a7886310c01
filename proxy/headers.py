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


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop too."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _is_hop(name: bytes, named: frozenset[bytes]) -> bool:
    return name in _NOT_FORWARDED or name.startswith(b"proxy-") or name in named


def is_sane_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(0x21 <= b <= 0x7E for b in value)


def new_request_id() -> str:
    return os.urandom(8).hex()


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    peer: str,
    scheme: str,
    peer_is_trusted: bool,
    request_id: str,
) -> Headers:
    """What the backend receives, Host aside (it depends on the backend: see `with_host`):
    the client's headers less hop-by-hop ones, X-Forwarded-* and X-Request-ID set."""
    headers = list(headers)
    named = connection_tokens(headers)
    out: Headers = []
    client_host: bytes | None = None
    forwarded_for: list[bytes] = []
    proto: bytes | None = None
    forwarded_host: bytes | None = None
    for name, value in headers:
        if name == b"host":
            client_host = value
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
        elif name == b"x-forwarded-proto":
            proto = value
        elif name == b"x-forwarded-host":
            forwarded_host = value
        elif not _is_hop(name, named):
            out.append((name, value))
    if not peer_is_trusted:
        proto, forwarded_host = None, None
    forwarded_for.append(peer.encode())
    head: Headers = [(b"x-forwarded-for", b", ".join(forwarded_for))]
    head.append((b"x-forwarded-proto", proto or scheme.encode()))
    if forwarded_host or client_host:
        head.append((b"x-forwarded-host", forwarded_host or client_host or b""))
    head.append((b"x-request-id", request_id.encode()))
    return head + out


def with_host(headers: Headers, host: bytes | None, client_host: bytes | None) -> Headers:
    """Host first: the backend's own (`host`), or the client's when the backend preserves it."""
    chosen = host if host is not None else client_host
    return [(b"host", chosen), *headers] if chosen is not None else headers


def downstream_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The backend's response headers less hop-by-hop ones, order and repeats kept."""
    raw = list(raw)
    named = connection_tokens(raw)
    return [
        (name, value)
        for name, value in raw
        if not _is_hop(name.lower(), named) and name.lower() != b"x-request-id"
    ]


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
