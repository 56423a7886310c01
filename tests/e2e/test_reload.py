"""Hot reload through the real process (SPEC §8): by file edit in place, by an editor's atomic
rename, by a Kubernetes ConfigMap's `..data` symlink swap, by SIGHUP and by the admin API.
A failing reload changes nothing and says where; breakers whose settings did not change keep
their state; a download in flight outlives reloads, even one that removes its route; and
requests sent without pause while the config is reloaded 20 times all succeed. With
`--workers 2` every worker reloads.

Every config written here has the same size (`SIZE`), so a test can change the file without
the watcher noticing (`write_unwatched`: same inode, size and mtime) when it means to test
SIGHUP or the API alone.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Backends
from tests.e2e.harness import ProxyProcess, wait_until

TOKEN = "reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIZE = 2048
RELOAD_WAIT = 15.0  # the watcher polls every second; the machine may be busy

TEMPLATE = """version: 1
legacy: monolith
backends:
  monolith: {{url: "{monolith}"}}
  orders: {{url: "{orders}", max_connections: {pool}}}
  dead: {{url: "http://127.0.0.1:{dead}"}}
{bulk_backend}defaults:
  retry: {{attempts: 1}}
routes:
  - name: flip
    match: {{prefix: /flip}}
    split: {{{flip}}}
  - name: other
    match: {{prefix: /other}}
    backend: monolith
  - name: slow
    match: {{prefix: /slow}}
    split: {{{flip}}}
  - name: drip
    match: {{prefix: /drip}}
    split: {{{flip}}}
  - name: fragile
    match: {{prefix: /fragile}}
    backend: dead
    breaker: {{failure_threshold: {threshold}, reset_timeout: 300}}
{stream_route}"""
BULK = '  bulk: {{url: "{orders}"}}\n'
STREAM = """  - name: stream
    match: {prefix: /big}
    backend: bulk
    timeout: {read: 20, total: 300}
"""


def make(
    b: Backends,
    to: str = "orders",
    *,
    pool: int = 100,
    threshold: int = 2,
    stream: bool = True,
    invalid: bool = False,
) -> str:
    flip = "orders: 100, monolith: 0" if to == "orders" else "orders: 0, monolith: 100"
    if invalid:
        flip = "orders: 60, monolith: 30"  # sums to 90
    text = TEMPLATE.format(
        monolith=b.monolith_url,
        orders=b.orders_url,
        dead=b.dead_port,
        pool=pool,
        flip=flip,
        threshold=threshold,
        bulk_backend=BULK.format(orders=b.orders_url) if stream else "",
        stream_route=STREAM if stream else "",
    )
    assert len(text) <= SIZE
    return text + "\n" * (SIZE - len(text))


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def write_unwatched(path: Path, text: str) -> None:
    """New content, same inode, size and mtime: only SIGHUP or the API can see it."""
    st = path.stat()
    data = text.encode()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_renamed(path: Path, text: str) -> None:
    """An editor's save: a new file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def last_reload(p: ProxyProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(p.admin + "/api/routes", timeout=10).json()["last_reload"]
    return data


def wait_reload(p: ProxyProcess, since: float, result: str = "success") -> dict[str, Any]:
    """The first reload after `since` (a `last_reload.time`) that ended with `result`."""
    seen: list[dict[str, Any]] = []

    def done() -> bool:
        seen[:] = [last_reload(p)]
        return seen[0]["time"] > since and seen[0]["result"] == result

    assert wait_until(done, RELOAD_WAIT, 0.05), f"no {result} reload; last: {seen}"
    return seen[0]


def api_reload(p: ProxyProcess) -> httpx.Response:
    return httpx.post(p.admin + "/api/reload", headers=AUTH, timeout=15)


def reloads(p: ProxyProcess, result: str) -> float:
    text = httpx.get(p.admin + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "strangler_config_reloads_total" and s.labels["result"] == result:
                return s.value
    return 0.0


def served(p: ProxyProcess, path: str, n: int = 10) -> Counter[str]:
    with httpx.Client(timeout=10) as client:
        return Counter(client.get(f"{p.url}{path}{i}").json()["served_by"] for i in range(n))


def reload_lines(p: ProxyProcess) -> list[int]:
    """Where the successful reloads are in the proxy's log."""
    return [i for i, e in enumerate(p.log_lines()) if e.get("message") == "config reloaded"]


def route_names(p: ProxyProcess) -> set[str]:
    return {r["name"] for r in httpx.get(p.admin + "/api/routes", timeout=10).json()["routes"]}


def breaker(p: ProxyProcess, route: str, backend: str) -> str:
    routes = httpx.get(p.admin + "/api/routes", timeout=10).json()["routes"]
    state: str = next(r for r in routes if r["name"] == route)["backends"][backend]["breaker"]
    return state


@pytest.fixture(scope="module")
def module_proxy(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("reload")
    with ProxyProcess(make(backends), workdir, env={"STRANGLER_ADMIN_TOKEN": TOKEN}) as p:
        yield p


@pytest.fixture()
def proxy(module_proxy: ProxyProcess, backends: Backends) -> ProxyProcess:
    """The module's proxy on the base config (flip -> orders), loaded by an API reload."""
    p = module_proxy
    if p.config_path.read_text() != make(backends):
        write_unwatched(p.config_path, make(backends))
    assert api_reload(p).status_code == 200
    assert served(p, "/flip/", 2) == {"orders": 2}
    return p


# --- the five ways in ---------------------------------------------------------------------


def test_reload_on_an_edit_in_place(proxy: ProxyProcess, backends: Backends) -> None:
    p = proxy
    since = last_reload(p)["time"]
    successes = reloads(p, "success")
    inode = p.config_path.stat().st_ino
    p.config_path.write_text(make(backends, "monolith"))
    assert p.config_path.stat().st_ino == inode
    last = wait_reload(p, since)
    assert last["errors"] == [] and not last.get("initial")
    assert served(p, "/flip/") == {"monolith": 10}
    assert reloads(p, "success") >= successes + 1


def test_reload_on_an_atomic_rename(proxy: ProxyProcess, backends: Backends) -> None:
    p = proxy
    since = last_reload(p)["time"]
    successes = reloads(p, "success")
    inode = p.config_path.stat().st_ino
    write_renamed(p.config_path, make(backends, "monolith"))
    assert p.config_path.stat().st_ino != inode
    wait_reload(p, since)
    assert served(p, "/flip/") == {"monolith": 10}
    assert reloads(p, "success") == successes + 1  # one change, one reload


def test_sighup_reloads_and_the_watcher_alone_would_not(
    proxy: ProxyProcess, backends: Backends
) -> None:
    p = proxy
    assert p.proc is not None
    since = last_reload(p)["time"]
    write_unwatched(p.config_path, make(backends, "monolith"))
    time.sleep(2.5)  # more than two polls of the watcher: it sees no change
    assert last_reload(p)["time"] == since
    assert served(p, "/flip/", 3) == {"orders": 3}
    p.proc.send_signal(signal.SIGHUP)
    wait_reload(p, since)
    assert served(p, "/flip/") == {"monolith": 10}


def test_the_api_reloads_at_once(proxy: ProxyProcess, backends: Backends) -> None:
    p = proxy
    write_unwatched(p.config_path, make(backends, "monolith"))
    r = api_reload(p)
    assert r.status_code == 200 and r.json()["result"] == "success"
    assert served(p, "/flip/") == {"monolith": 10}  # no wait: it answered once it was live


@dataclass
class ConfigMap:
    """A ConfigMap volume as kubelet writes it: ..TIMESTAMP/strangler.yaml, `..data` pointing
    at the current one, `strangler.yaml -> ..data/strangler.yaml`."""

    root: Path
    versions: list[str] = field(default_factory=list)

    def publish(self, text: str) -> None:
        version = f"..2024_01_01_00_00_{len(self.versions):02d}.{os.getpid()}"
        (self.root / version).mkdir()
        (self.root / version / "strangler.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version)
        os.replace(tmp, self.root / "..data")  # the atomic swap
        if self.versions:
            old = self.root / self.versions[-1]
            (old / "strangler.yaml").unlink()
            old.rmdir()
        self.versions.append(version)


def test_reload_on_a_configmap_symlink_swap(backends: Backends, tmp_path: Path) -> None:
    cm = ConfigMap(tmp_path)
    cm.publish(make(backends, "orders"))
    (tmp_path / "strangler.yaml").symlink_to("..data/strangler.yaml")
    # ProxyProcess writes the same text through the symlink.
    p = ProxyProcess(make(backends, "orders"), tmp_path, env={"STRANGLER_ADMIN_TOKEN": TOKEN})
    with p:
        assert p.config_path.is_symlink()
        assert served(p, "/flip/", 3) == {"orders": 3}
        for to in ("monolith", "orders", "monolith"):
            since = last_reload(p)["time"]
            cm.publish(make(backends, to))
            wait_reload(p, since)
            assert served(p, "/flip/") == {to: 10}
        assert reloads(p, "success") == 3
        assert reloads(p, "failure") == 0


# --- a failing reload ------------------------------------------------------------------------


def test_a_failing_reload_changes_nothing_and_says_where(
    proxy: ProxyProcess, backends: Backends
) -> None:
    p = proxy
    since = last_reload(p)["time"]
    failures = reloads(p, "failure")
    bad = make(backends, "monolith", invalid=True)
    write_renamed(p.config_path, bad)
    last = wait_reload(p, since, "failure")
    where = f"{p.config_path}:{line_of(bad, 'orders: 60')}: routes[0].split: "
    assert [e for e in last["errors"] if e.startswith(where)], last["errors"]
    assert served(p, "/flip/") == {"orders": 10}  # the old config keeps serving
    assert route_names(p) == {"flip", "other", "slow", "drip", "fragile", "stream", "default"}
    assert reloads(p, "failure") == failures + 1
    logged = [e for e in p.log_lines() if e.get("message") == "config reload failed"]
    assert logged and any(e.startswith(where) for e in logged[-1]["errors"])

    # SIGHUP and the API fail the same way, and count.
    assert p.proc is not None
    since = last["time"]
    p.proc.send_signal(signal.SIGHUP)
    wait_reload(p, since, "failure")
    r = api_reload(p)
    assert r.status_code == 400 and any(e.startswith(where) for e in r.json()["errors"])
    assert reloads(p, "failure") == failures + 3
    assert served(p, "/flip/", 3) == {"orders": 3}

    since = last_reload(p)["time"]
    write_renamed(p.config_path, make(backends))
    assert wait_reload(p, since)["errors"] == []


# --- state kept across reloads ----------------------------------------------------------------


def test_an_open_breaker_stays_open_across_a_reload_of_other_settings(
    proxy: ProxyProcess, backends: Backends
) -> None:
    p = proxy
    assert [httpx.get(p.url + "/fragile/1", timeout=10).status_code for _ in range(3)] == [
        502,
        502,
        503,
    ]
    assert breaker(p, "fragile", "dead") == "open"

    write_unwatched(p.config_path, make(backends, "monolith", pool=50))
    assert api_reload(p).status_code == 200
    assert served(p, "/flip/", 3) == {"monolith": 3}  # the reload took effect
    assert breaker(p, "fragile", "dead") == "open"
    r = httpx.get(p.url + "/fragile/1", timeout=10)
    assert r.status_code == 503 and "breaker" in r.json()["detail"]

    # A reload that changes the breaker's own settings starts it afresh.
    write_unwatched(p.config_path, make(backends, "monolith", threshold=3))
    assert api_reload(p).status_code == 200
    assert breaker(p, "fragile", "dead") == "closed"
    assert httpx.get(p.url + "/fragile/1", timeout=10).status_code == 502


def test_a_download_in_flight_outlives_reloads_even_of_its_own_route(
    proxy: ProxyProcess, backends: Backends
) -> None:
    p = proxy
    assert p.proc is not None
    size = 48 * 1024 * 1024
    reloads_before = len(reload_lines(p))
    received = 0
    xs = 0
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", f"{p.url}/big?size={size}") as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(size)
            chunks = r.iter_raw()

            def read(n: int) -> None:
                nonlocal received, xs
                goal = received + n
                while received < goal:
                    chunk = next(chunks)
                    received += len(chunk)
                    xs += chunk.count(b"x")

            read(1 << 20)
            # 1: the API, a split change elsewhere.
            write_unwatched(p.config_path, make(backends, "monolith"))
            assert api_reload(p).status_code == 200
            read(4 << 20)
            # 2: SIGHUP, the orders pool replaced.
            since = last_reload(p)["time"]
            write_unwatched(p.config_path, make(backends, "orders", pool=50))
            p.proc.send_signal(signal.SIGHUP)
            wait_reload(p, since)
            read(4 << 20)
            # 3: the file watcher, the download's own route and backend removed.
            since = last_reload(p)["time"]
            write_renamed(p.config_path, make(backends, stream=False))
            wait_reload(p, since)
            assert "stream" not in route_names(p)
            for chunk in chunks:
                received += len(chunk)
                xs += chunk.count(b"x")
    assert received == size and xs == size
    # The download finished as a whole on its old route; a new one takes the new config.
    entry = p.wait_access(lambda e: e["route"] == "stream" and e["bytes"] == size, 10)
    assert entry["status"] == 200 and entry["backend"] == "bulk"
    # ... after the proxy had logged all three reloads.
    lines = p.log_lines()
    finished = lines.index(entry)
    assert len([i for i in reload_lines(p)[reloads_before:] if i < finished]) == 3
    r = httpx.get(f"{p.url}/big?size=10", timeout=10)
    assert r.status_code == 200 and r.content == b"x" * 10
    p.wait_access(lambda e: e["path"] == "/big" and e["bytes"] == 10 and e["route"] == "default")


# --- the measurement ------------------------------------------------------------------------


PATHS = ("/flip/N", "/other/N", "/slow/N?delay=0.03")
DRIPPED = "".join(f"chunk {i}\n" for i in range(4))
BACKENDS = ("orders", "monolith")


@dataclass
class Load:
    """Threads sending requests without pause on kept-alive connections; every answer must be
    a 200 from a real backend."""

    p: ProxyProcess
    threads: int = 3
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(30)

    def _run(self, index: int) -> None:
        """Short answers, answers that take 30 ms, and (the last thread) streamed answers of
        four chunks 30 ms apart: some are always in flight when a reload swaps the config
        and retires the orders pool."""
        paths = ("/drip/x?n=4&interval=0.03",) if index == self.threads - 1 else PATHS
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                path = paths[n % len(paths)].replace("N", f"{index}-{n}")
                n += 1
                try:
                    r = client.get(self.p.url + path)
                    if path.startswith("/drip"):
                        ok = r.status_code == 200 and r.text == DRIPPED
                    else:
                        ok = r.status_code == 200 and r.json()["served_by"] in BACKENDS
                    problem = "" if ok else f"{path}: {r.status_code} {r.text[:200]}"
                except Exception as err:  # noqa: BLE001 - every failure is the finding
                    problem = f"{path}: {type(err).__name__}: {err}"
                with self.lock:
                    self.sent += 1
                    if problem:
                        self.failures.append(problem)


def test_no_request_fails_while_the_config_is_reloaded_20_times(
    proxy: ProxyProcess, backends: Backends
) -> None:
    p = proxy
    assert p.proc is not None
    successes, failures = reloads(p, "success"), reloads(p, "failure")
    done = {"success": 0, "failure": 0}
    with Load(p) as load:
        time.sleep(0.3)
        for i in range(20):
            valid = i % 2 == 0
            to = ("monolith", "orders")[(i // 2) % 2]
            # Valid changes flip the split and replace the orders pool; invalid ones fail.
            text = make(backends, to, pool=(50, 100)[(i // 2) % 2], invalid=not valid)
            since = last_reload(p)["time"]
            write_unwatched(p.config_path, text)
            if i % 4 < 2:
                r = api_reload(p)
                assert r.status_code == (200 if valid else 400), r.text
            else:
                p.proc.send_signal(signal.SIGHUP)
                wait_reload(p, since, "success" if valid else "failure")
            done["success" if valid else "failure"] += 1
            if valid:
                assert served(p, "/flip/", 2) == {to: 2}, f"reload {i} did not take"
            time.sleep(0.15)
        time.sleep(0.3)
    sent_during = load.sent
    print(
        f"\nreload measurement: {sent_during} requests sent, 20 reloads "
        f"({done['success']} valid, {done['failure']} invalid), "
        f"{len(load.failures)} failed requests"
    )
    assert load.failures == [], load.failures[:10]
    assert sent_during >= 100, "too little traffic to measure anything"
    assert reloads(p, "success") == successes + 10
    assert reloads(p, "failure") == failures + 10


# --- two workers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers2(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("reload-workers")
    env = {"STRANGLER_ADMIN_TOKEN": TOKEN, "TMPDIR": str(workdir)}
    with ProxyProcess(make(backends), workdir, env=env, args=["--workers", "2"]) as p:
        yield p


def fresh_connections(p: ProxyProcess, path: str, n: int = 40) -> Counter[str]:
    """Who served n requests, each on a new connection, 8 at a time (the kernel spreads new
    connections over the workers)."""

    def one(i: int) -> str:
        r = httpx.get(f"{p.url}{path}{i}", timeout=15)
        assert r.status_code == 200, r.text
        served_by: str = r.json()["served_by"]
        return served_by

    with ThreadPoolExecutor(8) as pool:
        return Counter(pool.map(one, range(n)))


def flip_counts(p: ProxyProcess) -> dict[int, float]:
    """Requests of the flip route counted by each process, from its multiprocess file."""
    (directory,) = p.workdir.glob("strangler-metrics-*")
    counts: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            for s in metric.samples:
                if s.name == "strangler_requests_total" and s.labels["route"] == "flip":
                    counts[pid] = counts.get(pid, 0) + s.value
    return counts


def test_every_worker_reloads(workers2: ProxyProcess, backends: Backends) -> None:
    p = workers2
    assert p.proc is not None
    assert fresh_connections(p, "/flip/") == {"orders": 40}

    # The API: answered once both workers have the new config.
    write_unwatched(p.config_path, make(backends, "monolith"))
    assert api_reload(p).status_code == 200
    before = flip_counts(p)
    for _ in range(10):
        assert fresh_connections(p, "/flip/") == {"monolith": 40}
        after = flip_counts(p)
        if len([pid for pid in after if after[pid] > before.get(pid, 0)]) >= 2:
            break
    assert len([pid for pid in after if after[pid] > before.get(pid, 0)]) == 2, (before, after)

    # The file watcher (in the supervisor), then SIGHUP (to the supervisor).
    since = last_reload(p)["time"]
    write_renamed(p.config_path, make(backends, "orders"))
    wait_reload(p, since)
    assert wait_until(lambda: served(p, "/flip/", 1) == {"orders": 1}, 5)
    assert fresh_connections(p, "/flip/") == {"orders": 40}

    since = last_reload(p)["time"]
    write_unwatched(p.config_path, make(backends, "monolith"))
    p.proc.send_signal(signal.SIGHUP)
    wait_reload(p, since)
    assert wait_until(lambda: served(p, "/flip/", 1) == {"monolith": 1}, 5)
    assert fresh_connections(p, "/flip/") == {"monolith": 40}

    # A failing reload reaches no worker.
    write_unwatched(p.config_path, make(backends, "orders", invalid=True))
    assert api_reload(p).status_code == 400
    assert fresh_connections(p, "/flip/") == {"monolith": 40}
    assert reloads(p, "failure") == 1
    assert reloads(p, "success") == 3


def test_reloading_a_large_config_does_not_stall_requests(b: Backends, tmp_path: Path) -> None:
    """Parsing and validating 2,000 routes takes about a second: on a thread, not the loop."""
    routes = "\n".join(
        f"  - {{name: r{i:04d}, match: {{prefix: /r{i:04d}}}, backend: orders}}"
        for i in range(2000)
    )
    text = (
        f'version: 1\nlegacy: monolith\nbackends:\n  monolith: {{url: "{b.monolith_url}"}}\n'
        f'  orders: {{url: "{b.orders_url}"}}\nroutes:\n{routes}\n'
    )
    p = ProxyProcess(text, tmp_path, env={"STRANGLER_ADMIN_TOKEN": TOKEN}).start()
    try:
        worst = [0.0]
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    t0 = time.monotonic()
                    assert client.get(p.url + "/r0007/x").status_code == 200
                    worst[0] = max(worst[0], time.monotonic() - t0)

        thread = threading.Thread(target=probe)
        thread.start()
        time.sleep(0.3)
        worst[0] = 0.0
        t0 = time.monotonic()
        r = httpx.post(p.admin + "/api/reload", headers=AUTH, timeout=30)
        took = time.monotonic() - t0
        stop.set()
        thread.join(10)
        assert r.status_code == 200
        print(f"reload of 2,000 routes took {took:.2f} s; worst request meanwhile {worst[0]:.3f} s")
        assert worst[0] < took / 2, "requests waited for the reload to parse"
    finally:
        p.stop()
