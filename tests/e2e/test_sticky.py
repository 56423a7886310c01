"""SPEC §4 through the real process: sticky keys from a cookie, a header or the client
address, the cookie the proxy sets, the share of keyless requests, a ramp by reload, and the
same key choosing the same backend in separate processes and after a restart."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.split import Split, bucket_of
from tests.e2e.harness import ProxyProcess, UpstreamServer

TOKEN = "sticky-test-token"
NAMES = ("monolith", "orders", "payments")


def served_by_app(name: str) -> Any:
    """The smallest backend: an empty 200 that says who answered."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-served-by", name.encode()), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    return app


def routes(ramp: int) -> str:
    return f"""
routes:
  - name: cookie
    match: {{prefix: /c}}
    split: {{monolith: 50, orders: 50}}
    sticky: {{cookie: sid}}
  - name: header
    match: {{prefix: /h}}
    split: {{monolith: 50, orders: 30, payments: 20}}
    sticky: {{header: X-User-Id}}
  - name: ip
    match: {{prefix: /ip}}
    split: {{monolith: 50, orders: 50}}
    sticky: {{client_ip: true}}
  - name: weight
    match: {{prefix: /w}}
    split: {{monolith: 60, orders: 25, payments: 15}}
  - name: ramp
    match: {{prefix: /r}}
    split: {{monolith: {100 - ramp}, orders: {ramp}}}
    sticky: {{header: X-User-Id}}
"""


def make_config(urls: dict[str, str], *, trusted: bool, ramp: int = 10) -> str:
    head = ["version: 1", "legacy: monolith"]
    if trusted:
        head.append("trusted_proxies: [127.0.0.0/8]")
    head.append("backends:")
    head += [f'  {name}: {{url: "{url}"}}' for name, url in urls.items()]
    return "\n".join(head) + "\n" + routes(ramp)


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    servers = {name: UpstreamServer(served_by_app(name)).start() for name in NAMES}
    yield {name: s.url for name, s in servers.items()}
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def trusted(
    urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy that believes X-Forwarded-* from loopback peers."""
    workdir: Path = tmp_path_factory.mktemp("sticky-trusted")
    with ProxyProcess(
        make_config(urls, trusted=True), workdir, env={"STRANGLER_ADMIN_TOKEN": TOKEN}
    ) as p:
        yield p


@pytest.fixture(scope="module")
def untrusted(
    urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The same routes, but no trusted proxies: the peer address is the client address."""
    workdir: Path = tmp_path_factory.mktemp("sticky-untrusted")
    with ProxyProcess(make_config(urls, trusted=False), workdir) as p:
        yield p


def expected(route: str, weights: dict[str, int], key: str) -> str:
    """Where SPEC §4 says a key goes: its bucket laid over the split, legacy last."""
    return Split.of(weights, "monolith").backend_for(bucket_of(route, key))


def served_by(client: httpx.Client, url: str, **kw: Any) -> str:
    reply = client.get(url, **kw)
    assert reply.status_code == 200, reply.text
    return reply.headers["x-served-by"]


def cookie_attrs(set_cookie: str) -> tuple[str, str, dict[str, str]]:
    first, *rest = [part.strip() for part in set_cookie.split(";")]
    name, _, value = first.partition("=")
    attrs = {}
    for part in rest:
        key, _, val = part.partition("=")
        attrs[key.lower()] = val
    return name, value, attrs


# ---------------------------------------------------------------------------- cookie


def test_cookie_stickiness(trusted: ProxyProcess) -> None:
    seen_backends: Counter[str] = Counter()
    seen_keys: set[str] = set()
    for _ in range(16):
        with httpx.Client(base_url=trusted.url, timeout=10) as client:  # a new client
            first = client.get("/c/page")
            assert first.status_code == 200
            name, key, _ = cookie_attrs(first.headers["set-cookie"])
            assert name == "sid" and key and key not in seen_keys
            seen_keys.add(key)
            backend = first.headers["x-served-by"]
            assert backend == expected("cookie", {"monolith": 50, "orders": 50}, key)
            seen_backends[backend] += 1
            assert client.cookies.get("sid") == key  # the client keeps it
            for _ in range(50):
                later = client.get("/c/page")
                assert later.headers["x-served-by"] == backend
                assert "set-cookie" not in later.headers  # a known key is not set again
    # 16 new users at 50/50: both backends serve someone (fails with probability 2**-15)
    assert set(seen_backends) == {"monolith", "orders"}, seen_backends


def test_cookie_sent_by_hand_is_honoured(trusted: ProxyProcess) -> None:
    with httpx.Client(base_url=trusted.url, timeout=10) as client:
        for key in ("alice", "bob", "carol", "dave", "erin", "frank"):
            reply = client.get("/c/x", headers={"Cookie": f"other=1; sid={key}"})
            assert reply.headers["x-served-by"] == expected(
                "cookie", {"monolith": 50, "orders": 50}, key
            )
            assert "set-cookie" not in reply.headers


def test_set_cookie_attributes(trusted: ProxyProcess) -> None:
    reply = httpx.get(trusted.url + "/c/attrs", timeout=10)
    name, key, attrs = cookie_attrs(reply.headers["set-cookie"])
    assert name == "sid" and len(key) >= 16
    assert attrs == {"path": "/", "max-age": "2592000", "httponly": "", "samesite": "Lax"}


def test_secure_flag_only_for_https_from_a_trusted_peer(
    trusted: ProxyProcess, untrusted: ProxyProcess
) -> None:
    https = {"X-Forwarded-Proto": "https"}
    from_trusted = httpx.get(trusted.url + "/c/s", headers=https, timeout=10)
    assert "secure" in cookie_attrs(from_trusted.headers["set-cookie"])[2]
    plain = httpx.get(trusted.url + "/c/s", headers={"X-Forwarded-Proto": "http"}, timeout=10)
    assert "secure" not in cookie_attrs(plain.headers["set-cookie"])[2]
    no_proto = httpx.get(trusted.url + "/c/s", timeout=10)
    assert "secure" not in cookie_attrs(no_proto.headers["set-cookie"])[2]
    forged = httpx.get(untrusted.url + "/c/s", headers=https, timeout=10)
    assert "secure" not in cookie_attrs(forged.headers["set-cookie"])[2]


# ---------------------------------------------------------------------------- header, client ip


def test_header_sticky_three_backends(trusted: ProxyProcess) -> None:
    weights = {"monolith": 50, "orders": 30, "payments": 20}
    got: Counter[str] = Counter()
    with httpx.Client(base_url=trusted.url, timeout=10) as client:
        for n in range(300):
            key = f"user-{n}"
            backend = served_by(client, "/h/x", headers={"X-User-Id": key})
            assert backend == expected("header", weights, key), key
            got[backend] += 1
            # and again: the same key, the same backend
            assert served_by(client, "/h/y", headers={"X-User-Id": key}) == backend
            assert "set-cookie" not in client.get("/h/z", headers={"X-User-Id": key}).headers
    assert set(got) == set(NAMES)


def test_client_ip_sticky_with_and_without_a_trusted_forwarder(
    trusted: ProxyProcess, untrusted: ProxyProcess
) -> None:
    weights = {"monolith": 50, "orders": 50}
    through_trusted: Counter[str] = Counter()
    through_untrusted: Counter[str] = Counter()
    with (
        httpx.Client(base_url=trusted.url, timeout=10) as a,
        httpx.Client(base_url=untrusted.url, timeout=10) as b,
    ):
        for n in range(1, 61):
            address = f"198.51.100.{n}"
            xff = {"X-Forwarded-For": address}
            backend = served_by(a, "/ip/x", headers=xff)
            # the peer 127.0.0.1 is trusted: the client is the address it forwarded for
            assert backend == expected("ip", weights, address), address
            through_trusted[backend] += 1
            # a forwarder's own chain: the right-most address not trusted is the client
            chained = {"X-Forwarded-For": f"203.0.113.9, {address}, 127.0.0.5"}
            assert served_by(a, "/ip/x", headers=chained) == backend
            # not trusted: X-Forwarded-For is ignored, the peer is the client
            through_untrusted[served_by(b, "/ip/x", headers=xff)] += 1
        # no X-Forwarded-For at all: the peer address on both
        peer = expected("ip", weights, "127.0.0.1")
        assert served_by(a, "/ip/x") == peer
    assert set(through_trusted) == {"monolith", "orders"}
    assert through_untrusted == {peer: 60}


# ---------------------------------------------------------------------------- shares


def test_keyless_requests_follow_the_weights_within_two_points(trusted: ProxyProcess) -> None:
    weights = {"monolith": 60, "orders": 25, "payments": 15}
    n = 10_000
    counts: Counter[str] = Counter()
    started = time.monotonic()
    with httpx.Client(base_url=trusted.url, timeout=10) as client:
        for _ in range(n):
            counts[client.get("/w/x").headers["x-served-by"]] += 1
    elapsed = time.monotonic() - started
    print(f"\n{n} requests through the proxy in {elapsed:.1f} s: {dict(counts)}")
    assert sum(counts.values()) == n
    for backend, weight in weights.items():
        share = counts[backend] * 100 / n
        assert abs(share - weight) <= 2, (backend, share, counts)


def test_keyless_requests_on_a_header_route_follow_the_weights(trusted: ProxyProcess) -> None:
    weights = {"monolith": 50, "orders": 30, "payments": 20}
    n = 3000
    counts: Counter[str] = Counter()
    with httpx.Client(base_url=trusted.url, timeout=10) as client:
        for _ in range(n):
            counts[client.get("/h/nokey").headers["x-served-by"]] += 1
    for backend, weight in weights.items():
        # 3000 draws: 4 points is over 4.5 standard deviations for every weight here
        assert abs(counts[backend] * 100 / n - weight) <= 4, counts


# ---------------------------------------------------------------------------- ramp, processes


def reload_to(p: ProxyProcess, text: str) -> None:
    p.config_path.write_text(text)
    reply = httpx.post(
        p.admin + "/api/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["result"] == "success"


def ramp_split(p: ProxyProcess) -> dict[str, int]:
    routes = httpx.get(p.admin + "/api/routes", timeout=10).json()["routes"]
    return next(r["split"] for r in routes if r["name"] == "ramp")


def test_reload_from_10_to_20_keeps_every_moved_user(
    trusted: ProxyProcess, urls: dict[str, str]
) -> None:
    keys = [f"ramp-{n}" for n in range(2000)]

    def placements() -> dict[str, str]:
        with httpx.Client(base_url=trusted.url, timeout=10) as client:
            return {k: served_by(client, "/r/x", headers={"X-User-Id": k}) for k in keys}

    assert ramp_split(trusted) == {"monolith": 90, "orders": 10}
    before = placements()
    try:
        reload_to(trusted, make_config(urls, trusted=True, ramp=20))
        assert ramp_split(trusted) == {"monolith": 80, "orders": 20}
        after = placements()
    finally:
        reload_to(trusted, make_config(urls, trusted=True, ramp=10))
    moved_at_10 = {k for k, b in before.items() if b == "orders"}
    moved_at_20 = {k for k, b in after.items() if b == "orders"}
    assert moved_at_10 <= moved_at_20  # every user moved at 10% is still moved at 20%
    assert not any(before[k] == "orders" and after[k] == "monolith" for k in keys)
    for k in keys:
        assert before[k] == expected("ramp", {"monolith": 90, "orders": 10}, k)
        assert after[k] == expected("ramp", {"monolith": 80, "orders": 20}, k)
    assert abs(len(moved_at_10) / len(keys) - 0.10) < 0.03
    assert abs(len(moved_at_20) / len(keys) - 0.20) < 0.03
    newly = moved_at_20 - moved_at_10
    assert newly and all(before[k] == "monolith" for k in newly)


def test_same_key_same_backend_in_two_processes_and_after_a_restart(
    trusted: ProxyProcess, untrusted: ProxyProcess
) -> None:
    keys = [f"proc-{n}" for n in range(200)]

    def placements(p: ProxyProcess) -> dict[str, str]:
        with httpx.Client(base_url=p.url, timeout=10) as client:
            return {k: served_by(client, "/h/x", headers={"X-User-Id": k}) for k in keys}

    first = placements(trusted)
    second = placements(untrusted)
    assert first == second
    untrusted.stop()
    untrusted.start()
    assert placements(untrusted) == first
    assert len(set(first.values())) == 3
