"""Shared real servers: two upstreams (monolith, orders) and one proxy in front of them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ProxyProcess, UpstreamServer, free_port
from tests.e2e.upstream import Recorder, make_app


def blackhole() -> tuple[list[socket.socket], int]:
    """A port whose accept queue is full: new connections hang in SYN-SENT (connect timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = [listener]
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    return held, port


class Backends:
    def __init__(self) -> None:
        self.monolith = Recorder("monolith")
        self.orders = Recorder("orders")
        self.servers = [
            UpstreamServer(make_app(self.monolith)),
            UpstreamServer(make_app(self.orders)),
        ]
        self.dead_port = free_port()
        self.blackhole, self.blackhole_port = blackhole()

    @property
    def monolith_url(self) -> str:
        return self.servers[0].url

    @property
    def orders_url(self) -> str:
        return self.servers[1].url

    def reset(self) -> None:
        self.monolith.reset()
        self.orders.reset()


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    b = Backends()
    for server in b.servers:
        server.start()
    yield b
    for server in b.servers:
        server.stop()
    for sock in b.blackhole:
        sock.close()


MAIN_ROUTES = """
routes:
  - name: orders
    match: {prefix: /api/orders}
    backend: orders
  - name: orders-beta
    match: {prefix: /api/orders, headers: {X-Beta: "1"}}
    backend: monolith
  - name: orders-writes
    match: {prefix: /api/orders, methods: [DELETE]}
    backend: monolith
  - name: shop-host
    match: {prefix: /hosted, host: shop.example.com}
    backend: orders
  - name: svc
    match: {prefix: /svc/orders}
    rewrite: {strip_prefix: /svc}
    backend: orders
  - name: based
    match: {prefix: /based}
    backend: orders_base
  - name: preserved
    match: {prefix: /preserved}
    backend: preserved
  - name: stream
    match: {prefix: /big}
    backend: orders
    timeout: {read: 5, total: 120}
  - name: dead
    match: {prefix: /dead}
    backend: dead
  - name: total-slow
    match: {prefix: /slow/total}
    backend: orders
    timeout: {read: 5, total: 1}
  - name: patient
    match: {prefix: /slow/patient}
    backend: orders
    timeout: {read: 30, total: 60}
  - name: blackhole-fallback
    match: {prefix: /blackhole/fallback}
    backend: blackhole
    fallback: monolith
    timeout: {connect: 0.5}
  - name: blackhole
    match: {prefix: /blackhole}
    backend: blackhole
    timeout: {connect: 0.5}
  - name: slow
    match: {prefix: /slow}
    backend: orders
    timeout: {read: 0.5, total: 10}
    retry: {attempts: 1}
  - name: total
    match: {prefix: /drip}
    backend: orders
    timeout: {read: 5, total: 1.5}
  - name: limited
    match: {prefix: /upload/limited}
    backend: orders
    max_body: 1KiB
  - name: upload
    match: {prefix: /upload}
    backend: orders
    timeout: {read: 10, total: 120}
"""


def main_config(b: Backends) -> str:
    return f"""
version: 1
legacy: monolith
trusted_proxies: [10.0.0.0/8]
backends:
  monolith: {{url: "{b.monolith_url}"}}
  orders: {{url: "{b.orders_url}"}}
  orders_base: {{url: "{b.orders_url}/base"}}
  preserved: {{url: "{b.orders_url}", preserve_host: true}}
  dead: {{url: "http://127.0.0.1:{b.dead_port}"}}
  blackhole: {{url: "http://127.0.0.1:{b.blackhole_port}"}}
defaults:
  retry: {{attempts: 1}}
{MAIN_ROUTES}
"""


@pytest.fixture(scope="session")
def proxy(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir: Path = tmp_path_factory.mktemp("proxy")
    with ProxyProcess(main_config(backends), workdir) as p:
        yield p


@pytest.fixture()
def b(backends: Backends) -> Backends:
    backends.reset()
    return backends
