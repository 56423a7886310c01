"""Hot reload without a network (SPEC §8): `Reloader` swaps the snapshot only for a valid file
and keeps the state whose settings did not change; `FileWatch` sees an in-place edit, an
editor's atomic rename and a Kubernetes ConfigMap's `..data` symlink swap."""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.exceptions import StarletteDeprecationWarning

from proxy.admin import create_admin
from proxy.app import Holder
from proxy.config import Config
from proxy.loader import load
from proxy.metrics import Metrics
from proxy.reload import FileWatch, Reloader
from proxy.runtime import Runtime, build
from proxy.server import Options
from proxy.workers import Supervisor

BASE = """version: 1
legacy: monolith
backends:
  monolith: {{url: "http://127.0.0.1:1"}}
  orders: {{url: "http://127.0.0.1:2", max_connections: {pool}}}
routes:
  - name: orders
    match: {{prefix: /api/orders}}
    split: {{orders: {pct}, monolith: {rest}}}
    breaker: {{failure_threshold: {threshold}}}
  - name: checkout
    match: {{prefix: /checkout}}
    backend: orders
"""


def text(pct: int = 25, threshold: int = 3, pool: int = 100) -> str:
    return BASE.format(pct=pct, rest=100 - pct, threshold=threshold, pool=pool)


def reloads(m: Metrics, result: str) -> float:
    return m.registry.get_sample_value("strangler_config_reloads_total", {"result": result}) or 0


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Reloader, Path, Metrics]:
    path = tmp_path / "strangler.yaml"
    path.write_text(text())
    metrics = Metrics(CollectorRegistry())
    holder = Holder(build(load(path), None, metrics))
    return Reloader(holder, path), path, metrics


def test_a_valid_reload_swaps_and_keeps_unchanged_state(
    setup: tuple[Reloader, Path, Metrics],
) -> None:
    reloader, path, metrics = setup
    old = reloader.holder.current
    orders_breaker = old.routes["orders"].breaker("orders")
    checkout_breaker = old.routes["checkout"].breaker("orders")
    seen: list[tuple[Config, Runtime]] = []
    reloader.on_config.append(lambda cfg, rt: seen.append((cfg, rt)))

    path.write_text(text(pct=60, threshold=5))
    result = reloader.reload()

    new = reloader.holder.current
    assert result.result == "success" and result.errors == () and not result.initial
    assert reloader.last is result
    assert new is not old
    assert dict(new.routes["orders"].split.weights) == {"orders": 60, "monolith": 40}
    # The orders breaker's settings changed: a fresh one. Checkout's did not: the same object.
    assert new.routes["orders"].breaker("orders") is not orders_breaker
    assert new.routes["checkout"].breaker("orders") is checkout_breaker
    assert new.routes["checkout"].bulkhead is old.routes["checkout"].bulkhead
    assert new.upstreams["orders"] is old.upstreams["orders"]  # pool settings unchanged
    assert seen == [(new.config, new)]
    assert reloads(metrics, "success") == 1 and reloads(metrics, "failure") == 0
    assert metrics.registry.get_sample_value(
        "strangler_split_percent", {"route": "orders", "backend": "orders"}
    ) == (60.0)


def test_an_invalid_file_changes_nothing_and_says_where(
    setup: tuple[Reloader, Path, Metrics],
) -> None:
    reloader, path, metrics = setup
    old = reloader.holder.current
    called: list[object] = []
    reloader.on_config.append(lambda cfg, rt: called.append(cfg))
    path.write_text(text(pct=60).replace("monolith: 40", "monolith: 30"))

    result = reloader.reload()

    assert reloader.holder.current is old
    assert result.result == "failure"
    assert result.errors == (f"{path}:9: routes[0].split: percentages sum to 90, not 100",)
    assert reloader.last.as_dict()["errors"] == list(result.errors)
    assert called == []
    assert reloads(metrics, "failure") == 1 and reloads(metrics, "success") == 0


def test_a_missing_file_is_a_failure_too(setup: tuple[Reloader, Path, Metrics]) -> None:
    reloader, path, metrics = setup
    old = reloader.holder.current
    path.unlink()
    result = reloader.reload()
    assert result.result == "failure" and result.errors[0].startswith(f"{path}:0: ")
    assert reloader.holder.current is old


def test_an_override_lasts_until_the_next_reload_but_not_a_failed_one(
    setup: tuple[Reloader, Path, Metrics],
) -> None:
    reloader, path, _ = setup
    told: list[tuple[str, Any]] = []
    reloader.on_split.append(lambda route, weights: told.append((route, weights)))
    reloader.set_split("orders", {"orders": 0, "monolith": 100})
    assert told == [("orders", {"orders": 0, "monolith": 100})]
    assert dict(reloader.holder.current.routes["orders"].override or {}) == {
        "orders": 0,
        "monolith": 100,
    }

    path.write_text("version: 1\nlegacy: nope\n")
    assert reloader.reload().result == "failure"
    assert reloader.holder.current.routes["orders"].override is not None

    path.write_text(text())
    assert reloader.reload().result == "success"
    state = reloader.holder.current.routes["orders"]
    assert state.override is None
    assert dict(state.split.weights) == {"orders": 25, "monolith": 75}


def test_removing_an_override(setup: tuple[Reloader, Path, Metrics]) -> None:
    reloader, _, metrics = setup
    reloader.set_split("orders", {"orders": 100, "monolith": 0})
    assert metrics.registry.get_sample_value(
        "strangler_split_percent", {"route": "orders", "backend": "orders"}
    ) == (100.0)
    reloader.set_split("orders", None)
    assert reloader.holder.current.routes["orders"].override is None
    assert metrics.registry.get_sample_value(
        "strangler_split_percent", {"route": "orders", "backend": "orders"}
    ) == (25.0)


async def test_a_retired_pool_closes_after_its_last_user(
    setup: tuple[Reloader, Path, Metrics],
) -> None:
    reloader, path, _ = setup
    old_pool = reloader.holder.current.upstreams["orders"]
    kept_pool = reloader.holder.current.upstreams["monolith"]
    closed: list[str] = []

    async def close() -> None:
        closed.append("orders")

    old_pool.close = close  # type: ignore[method-assign]
    old_pool.acquire()  # a request is still streaming from it
    path.write_text(text(pool=50))
    assert reloader.reload().result == "success"

    assert reloader.holder.current.upstreams["orders"] is not old_pool
    assert reloader.holder.current.upstreams["monolith"] is kept_pool
    assert old_pool.retired
    await asyncio.sleep(0.2)
    assert closed == [], "closed under a request in flight"
    old_pool.release()
    for _ in range(60):
        if closed:
            break
        await asyncio.sleep(0.05)
    assert closed == ["orders"]


# --- FileWatch -------------------------------------------------------------------------------


class Calls:
    def __init__(self) -> None:
        self.n = 0

    async def __call__(self) -> None:
        self.n += 1


def poll(watch: FileWatch) -> bool:
    return asyncio.run(watch.poll())


def test_watch_ignores_an_untouched_file(tmp_path: Path) -> None:
    path = tmp_path / "strangler.yaml"
    path.write_text(text())
    calls = Calls()
    watch = FileWatch(path, calls)
    assert not poll(watch) and not poll(watch)
    assert calls.n == 0


def test_watch_sees_an_edit_in_place(tmp_path: Path) -> None:
    path = tmp_path / "strangler.yaml"
    path.write_text(text())
    calls = Calls()
    watch = FileWatch(path, calls)
    inode = path.stat().st_ino
    path.write_text(text(pct=100))
    assert path.stat().st_ino == inode
    assert poll(watch) and calls.n == 1
    assert not poll(watch) and calls.n == 1  # once per change


def test_watch_sees_an_atomic_rename_even_of_the_same_size(tmp_path: Path) -> None:
    path = tmp_path / "strangler.yaml"
    path.write_text(text(pct=25))
    calls = Calls()
    watch = FileWatch(path, calls)
    before = path.stat()
    tmp = tmp_path / ".strangler.yaml.swp"
    tmp.write_text(text(pct=35))
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))  # only the inode differs
    os.replace(tmp, path)
    assert path.stat().st_size == before.st_size
    assert poll(watch) and calls.n == 1


def configmap(root: Path, version: str, body: str) -> None:
    """Kubelet's layout: ..VERSION/strangler.yaml, ..data -> ..VERSION, swapped atomically."""
    target = root / f"..{version}"
    target.mkdir()
    (target / "strangler.yaml").write_text(body)
    tmp = root / "..data_tmp"
    tmp.symlink_to(target.name)
    os.replace(tmp, root / "..data")


def test_watch_sees_a_configmap_symlink_swap(tmp_path: Path) -> None:
    configmap(tmp_path, "2024_01_01_00_00_00.1", text(pct=25))
    path = tmp_path / "strangler.yaml"
    path.symlink_to("..data/strangler.yaml")
    calls = Calls()
    watch = FileWatch(path, calls)
    assert not poll(watch)
    configmap(tmp_path, "2024_01_01_00_01_00.2", text(pct=35))  # same size
    assert path.is_symlink() and load(path).routes[0].weights["orders"] == 35
    assert poll(watch) and calls.n == 1
    assert not poll(watch)


def test_watch_waits_out_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "strangler.yaml"
    path.write_text(text())
    calls = Calls()
    watch = FileWatch(path, calls)
    path.unlink()
    assert not poll(watch) and calls.n == 0
    path.write_text(text(pct=50))
    assert poll(watch) and calls.n == 1


async def test_the_watch_outlives_a_failing_callback(tmp_path: Path) -> None:
    path = tmp_path / "strangler.yaml"
    path.write_text(text())
    calls: list[int] = []

    def on_change() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("a bad reload")

    watch = FileWatch(path, on_change, interval=0.02)
    task = asyncio.ensure_future(watch.run())
    try:
        path.write_text(text(pct=50))
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.02)
        path.write_text(text(pct=100))
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert calls == [0, 1]


# --- an admin change is answered once it is live everywhere ----------------------------------


class FakeProcess:
    def __init__(self, alive: bool = True) -> None:
        self.alive = alive

    def is_alive(self) -> bool:
        return self.alive


async def test_the_supervisor_settles_when_every_live_worker_applied(tmp_path: Path) -> None:
    path = tmp_path / "strangler.yaml"
    path.write_text(text())
    opts = Options(path, "127.0.0.1", 0, "127.0.0.1", 0, workers=2)
    sup = Supervisor(load(path), opts)
    for worker in sup.workers:
        worker.process = FakeProcess()  # type: ignore[assignment]
        worker.channel = object()  # type: ignore[assignment]
    sup._broadcast = lambda message: setattr(sup, "generation", sup.generation + 1)  # type: ignore[method-assign]

    sup.reloader.set_split("orders", {"orders": 0, "monolith": 100})  # generation 1
    sup.workers[0].applied = 1
    waiting = asyncio.ensure_future(sup.settle(timeout=5))
    await asyncio.sleep(0.1)
    assert not waiting.done(), "answered before the second worker applied the change"
    sup.workers[1].applied = 1
    await asyncio.wait_for(waiting, 1)

    # A dead worker is not waited for; a hung one only up to the bound.
    sup.reloader.set_split("orders", None)  # generation 2
    sup.workers[0].applied = 2
    sup.workers[1].process = FakeProcess(alive=False)  # type: ignore[assignment]
    await asyncio.wait_for(sup.settle(timeout=5), 1)
    sup.workers[1].process = FakeProcess()  # type: ignore[assignment]
    started = asyncio.get_running_loop().time()
    await sup.settle(timeout=0.3)
    assert 0.25 < asyncio.get_running_loop().time() - started < 2


def test_the_admin_api_answers_a_change_only_once_it_is_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with warnings.catch_warnings():
        # Starlette's TestClient prefers httpx2 and warns on import when it finds only httpx.
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from starlette.testclient import TestClient

    steps: list[str] = []

    class Control:
        token_env = "STRANGLER_UNIT_RELOAD_TOKEN"

        def set_split(self, route: str, weights: Any) -> None:
            steps.append(f"split {route} {weights}")

        async def reload(self) -> dict[str, Any]:
            steps.append("reload")
            return {"result": "success", "errors": []}

        async def settle(self) -> None:
            steps.append("settled")

    monkeypatch.setenv("STRANGLER_UNIT_RELOAD_TOKEN", "t")
    client = TestClient(create_admin(Control()))  # type: ignore[arg-type]
    auth = {"Authorization": "Bearer t"}
    assert client.post("/api/reload", headers=auth).status_code == 200
    r = client.post("/api/routes/orders/split", json={"orders": 100}, headers=auth)
    assert r.status_code == 200
    assert client.delete("/api/routes/orders/split", headers=auth).status_code == 200
    # JSON null is not "remove the override": that is DELETE.
    r = client.post("/api/routes/orders/split", content=b"null", headers=auth)
    assert r.status_code == 400
    assert steps == [
        "reload",
        "settled",
        "split orders {'orders': 100}",
        "settled",
        "split orders None",
        "settled",
    ]
