"""Backends that break HTTP itself (Hardening, part 5), through the real `strangler run`
process in front of `broken.BrokenBackend`, which misbehaves byte by byte.

For every fault the client gets a clean problem+json 502/504 (before any byte of the answer
went out) or a broken connection, never a hang and never a cut-short body presented as
complete; `strangler_upstream_failures_total` counts it once with its reason; the backend saw
the request once; the connection it came on is never used again, and the next request
through the same pool is answered correctly. Then 10,000 faults must leak no file
descriptor, thread, memory or backend connection.

These tests look only at the wire (what the client gets, what the backend saw, /metrics):
they hold for any upstream client behind `proxy.forward`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.broken import POISON_BODY, BrokenBackend
from tests.e2e.harness import ProxyProcess, wait_until

ROUTE = "faulty"
CLIENT_TIMEOUT = 15.0  # far above the route's total timeout (2 s): a hang fails, not waits
BROKEN = "broken"  # the client's connection broke: httpx saw an incomplete answer
# What a client sees when the proxy breaks the connection under it.
BROKEN_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
MAX_CONNECTIONS = 16


def broken_config(url: str) -> str:
    return f"""
version: 1
legacy: broken
backends:
  broken: {{url: "{url}", max_connections: {MAX_CONNECTIONS}}}
routes:
  - name: {ROUTE}
    match: {{prefix: /}}
    backend: broken
    timeout: {{connect: 1, read: 1, total: 2}}
    retry: {{attempts: 1}}
    breaker: {{failure_threshold: 1000000000}}
"""


@pytest.fixture(scope="module")
def broken() -> Iterator[BrokenBackend]:
    with BrokenBackend() as backend:
        yield backend


@pytest.fixture(scope="module")
def bproxy(
    broken: BrokenBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir: Path = tmp_path_factory.mktemp("broken")
    with ProxyProcess(broken_config(broken.url), workdir) as p:
        yield p


# --- helpers ---------------------------------------------------------------------------------

_SERIES = re.compile(r"^strangler_upstream_failures_total\{([^}]*)\} (\S+)$", re.M)


def failures(p: ProxyProcess) -> Counter[str]:
    """strangler_upstream_failures_total of the route, by reason."""
    text = httpx.get(p.admin + "/metrics", timeout=5).text
    counts: Counter[str] = Counter()
    for labels, value in _SERIES.findall(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("route") == ROUTE and found.get("backend") == "broken":
            counts[found["reason"]] += int(float(value))
    return counts


def outcome(client: httpx.Client, method: str, url: str, **kwargs: object) -> httpx.Response | str:
    """The whole answer, or BROKEN when the connection broke before it was complete."""
    try:
        return client.request(method, url, **kwargs)  # type: ignore[arg-type]
    except BROKEN_ERRORS:
        return BROKEN


def fetch(
    p: ProxyProcess, path: str, method: str = "GET", **kwargs: object
) -> httpx.Response | str:
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        return outcome(client, method, p.url + path, **kwargs)


def assert_problem(r: httpx.Response | str, status: int) -> None:
    assert isinstance(r, httpx.Response), f"expected a {status} problem, the connection broke"
    assert r.status_code == status, (r.status_code, r.headers, r.content[:200])
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["route"] == ROUTE
    assert body["request_id"] == r.headers["x-request-id"]


def assert_pool_healthy(p: ProxyProcess) -> None:
    """A request after a fault is answered correctly, by a correct answer of its own."""
    r = fetch(p, "/ok")
    assert isinstance(r, httpx.Response) and r.status_code == 200, r
    assert r.content.startswith(b"ok conn="), r.content
    assert POISON_BODY not in r.content and "x-poison" not in r.headers


def failure_delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after.keys() | before.keys() if after[k] != before[k]}


# --- one fault at a time ------------------------------------------------------------------

HEAD_FAULTS = [
    "/reset-in-headers",
    "/close-in-headers",
    "/bad-header?v=nocolon",
    "/bad-header?v=space",
    "/bad-header?v=ctl",
    "/bad-header?v=nul",
    "/bad-header?v=cr",
    "/bad-header?v=del",
    "/bad-header?v=two-lengths",
    "/bad-header?v=cl-te",
    "/bad-header?v=bad-length",
    "/bad-header?v=te-gzip",
    "/bad-header?v=te-identity",
    "/huge-header?v=value",
    "/huge-header?v=many",
    "/bad-status?v=abc",
    "/bad-status?v=foo",
    "/bad-status?v=none",
    "/bad-status?v=600",
    "/bad-status?v=099",
    "/bad-status?v=101",
]
# Body faults: a 502 if the proxy saw the fault before it started answering, else a broken
# connection (the head already went out).
BODY_FAULTS = [
    "/short-body",
    "/short-body?size=1000000",
    "/long-body",
    "/long-body?extra=garbage",
    "/chunked-bad",
    "/chunked-truncated",
]
TIMEOUT_FAULTS = ["/never", "/slow-headers"]
# The body stops coming: a 504 when it is small enough to be read before the head goes out.
STALL_FAULTS = ["/short-body?then=stall", "/short-body?size=1000000&then=stall"]


def check_fault(
    p: ProxyProcess, broken: BrokenBackend, path: str, allowed: set[object], reason: str
) -> None:
    route_path = path.split("?")[0]
    before, hits = failures(p), broken.hits(route_path)
    t0 = time.monotonic()
    r = fetch(p, path)
    elapsed = time.monotonic() - t0
    kind = r if r == BROKEN else r.status_code  # type: ignore[union-attr]
    assert kind in allowed, f"{path}: got {kind} ({getattr(r, 'content', b'')[:200]!r})"
    if kind != BROKEN:
        assert_problem(r, kind)  # type: ignore[arg-type]
    assert elapsed < 2 + 3, f"{path} took {elapsed:.1f} s"  # the total timeout and a margin
    assert broken.hits(route_path) == hits + 1, "the request reached the backend more than once"
    assert wait_until(lambda: failure_delta(before, failures(p)) == {reason: 1}, 5), failure_delta(
        before, failures(p)
    )
    conn = broken.last_connection(route_path)
    assert_pool_healthy(p)
    assert broken.served(conn)[-1] == route_path, "a connection was reused after a fault"
    assert wait_until(lambda: conn not in broken.live, 5), "the proxy kept a faulty connection"


@pytest.mark.parametrize("path", HEAD_FAULTS)
def test_a_broken_head_is_a_clean_502(
    bproxy: ProxyProcess, broken: BrokenBackend, path: str
) -> None:
    check_fault(bproxy, broken, path, {502}, "protocol")


@pytest.mark.parametrize("path", BODY_FAULTS)
def test_a_broken_body_is_a_502_or_a_broken_connection(
    bproxy: ProxyProcess, broken: BrokenBackend, path: str
) -> None:
    check_fault(bproxy, broken, path, {502, BROKEN}, "protocol")


@pytest.mark.parametrize("path", TIMEOUT_FAULTS)
def test_a_backend_that_never_finishes_its_head_is_a_504(
    bproxy: ProxyProcess, broken: BrokenBackend, path: str
) -> None:
    check_fault(bproxy, broken, path, {504}, "timeout")


@pytest.mark.parametrize("path", STALL_FAULTS)
def test_a_body_that_stops_coming_is_a_504_or_a_broken_connection(
    bproxy: ProxyProcess, broken: BrokenBackend, path: str
) -> None:
    check_fault(bproxy, broken, path, {504, BROKEN}, "timeout")


def test_a_small_body_cut_short_never_goes_out_as_complete(
    bproxy: ProxyProcess, broken: BrokenBackend
) -> None:
    """Content-Length 1000, 500 sent: small enough to be checked before the head goes out."""
    assert_problem(fetch(bproxy, "/short-body"), 502)


def test_a_big_body_cut_short_breaks_the_client_connection(
    bproxy: ProxyProcess, broken: BrokenBackend
) -> None:
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            with client.stream("GET", bproxy.url + "/short-body?size=1000000") as r:
                assert r.status_code == 200 and r.headers["content-length"] == "1000000"
                for _ in r.iter_raw():
                    pass


def test_bare_lf_line_ends_are_read_or_refused(bproxy: ProxyProcess, broken: BrokenBackend) -> None:
    """RFC 9112 §2.2 lets a recipient take a bare LF as a line end: the whole answer, as the
    backend framed it, or a clean 502; never anything in between."""
    before = failures(bproxy)
    r = fetch(bproxy, "/bad-header?v=lf")
    assert isinstance(r, httpx.Response)
    if r.status_code == 200:
        assert r.content == b"ok"
        assert failure_delta(before, failures(bproxy)) == {}
    else:
        assert_problem(r, 502)
        assert wait_until(lambda: failure_delta(before, failures(bproxy)) == {"protocol": 1}, 5)
    assert_pool_healthy(bproxy)


def test_a_head_answer_with_a_body_never_leaks_into_the_next_answer(
    bproxy: ProxyProcess, broken: BrokenBackend
) -> None:
    """A HEAD answered with a body (the backend's `/ok` always sends one): the head alone or
    a clean 502; the body bytes never answer the next request on that connection."""
    r = fetch(bproxy, "/ok", "HEAD")
    assert isinstance(r, httpx.Response) and r.status_code in (200, 502)
    assert r.content == b""
    conn = broken.last_connection("/ok")
    carried = len(broken.served(conn))
    for _ in range(MAX_CONNECTIONS + 4):
        assert_pool_healthy(bproxy)
    assert len(broken.served(conn)) == carried, "the HEAD's connection was used again"


@pytest.mark.parametrize("extra", ["poison", "garbage"])
def test_bytes_after_the_declared_length_never_answer_the_next_request(
    bproxy: ProxyProcess, broken: BrokenBackend, extra: str
) -> None:
    """Content-Length 100, then 100 bytes more (a whole second answer, or garbage) once the
    first answer is over and its connection sits in the pool. The answer as declared goes
    out; the extra bytes must never reach anyone: the connection is dropped, not reused."""
    r = fetch(bproxy, f"/long-body?delay=0.2&extra={extra}")
    assert isinstance(r, httpx.Response) and r.status_code == 200
    assert r.content == b"L" * 100
    conn = broken.last_connection("/long-body")
    time.sleep(0.5)  # the extra bytes have arrived on the idle connection
    # Sequential requests rotate through every idle connection of the pool.
    for _ in range(MAX_CONNECTIONS + 4):
        assert_pool_healthy(bproxy)
    assert broken.served(conn)[-1] == "/long-body"
    assert wait_until(lambda: conn not in broken.live, 5)


# --- answers before the request body was read -------------------------------------------


def upload(mib: int) -> Iterator[bytes]:
    chunk = b"u" * (1 << 20)
    for _ in range(mib):
        yield chunk


@pytest.mark.parametrize("status", [413, 200])
def test_an_early_answer_reaches_the_client_while_it_uploads(
    bproxy: ProxyProcess, broken: BrokenBackend, status: int
) -> None:
    """The backend answers before reading a 32 MiB upload, then reads it: its answer is
    relayed as is, and the client's upload does not hang."""
    before = failures(bproxy)
    t0 = time.monotonic()
    r = fetch(bproxy, f"/early-answer?status={status}&then=drain", "POST", content=upload(32))
    assert time.monotonic() - t0 < 10
    assert isinstance(r, httpx.Response), "the connection broke"
    assert r.status_code == status and r.content == b"early %d" % status
    assert failure_delta(before, failures(bproxy)) == {}
    assert_pool_healthy(bproxy)


def test_an_early_answer_then_close_is_relayed_or_a_clean_502(
    bproxy: ProxyProcess, broken: BrokenBackend
) -> None:
    """The backend answers 413 and closes without reading: its kernel resets the connection,
    which can beat the answer. The client gets the 413, a clean 502 counted as protocol, or
    (when the proxy answers while it still uploads) a broken connection; never a hang."""
    before = failures(bproxy)
    t0 = time.monotonic()
    r = fetch(bproxy, "/early-answer?status=413&then=close", "POST", content=upload(32))
    assert time.monotonic() - t0 < 10
    if isinstance(r, httpx.Response) and r.status_code == 413:
        assert r.content == b"early 413"
        assert failure_delta(before, failures(bproxy)) == {}
    else:
        if r != BROKEN:
            assert_problem(r, 502)
        assert wait_until(lambda: failure_delta(before, failures(bproxy)) == {"protocol": 1}, 5)
    assert_pool_healthy(bproxy)


def test_a_backend_that_never_reads_the_upload_is_a_504_within_the_total_timeout(
    bproxy: ProxyProcess, broken: BrokenBackend
) -> None:
    before = failures(bproxy)
    t0 = time.monotonic()
    r = fetch(bproxy, "/never?read=0&hold=6", "POST", content=upload(64))
    elapsed = time.monotonic() - t0
    assert elapsed < 2 + 3, f"took {elapsed:.1f} s"
    if r != BROKEN:  # the proxy may answer while the client still uploads
        assert_problem(r, 504)
    assert wait_until(lambda: failure_delta(before, failures(bproxy)) == {"timeout": 1}, 5)
    assert_pool_healthy(bproxy)


# --- 10,000 faults ----------------------------------------------------------------------------

# The fast faults, each with what the client may get (the slow ones would only add time).
VOLUME = [
    ("GET", "/reset-in-headers?delay=0", {502}),
    ("GET", "/close-in-headers?delay=0", {502}),
    ("GET", "/bad-header?v=nocolon", {502}),
    ("GET", "/bad-header?v=ctl", {502}),
    ("GET", "/bad-status?v=abc", {502}),
    ("GET", "/bad-status?v=600", {502}),
    ("GET", "/short-body", {502}),
    ("GET", "/short-body?size=200000", {BROKEN}),
    ("GET", "/long-body", {502}),
    ("GET", "/long-body?extra=garbage", {502}),
    ("GET", "/chunked-bad", {502, BROKEN}),
    ("GET", "/chunked-truncated", {502, BROKEN}),
    ("POST", "/early-answer?then=drain", {413}),
]
EARLY_BODY = b"e" * (256 * 1024)  # more than the proxy holds for replay: it streams
THREADS = 8


def run_faults(p: ProxyProcess, total: int) -> Counter[str]:
    """`total` faulty requests from THREADS clients with keep-alive; what they got, by kind."""
    kinds: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(index: int) -> None:
        mine: Counter[str] = Counter()
        with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
            for i in range(index, total, THREADS):
                method, path, allowed = VOLUME[i % len(VOLUME)]
                body = EARLY_BODY if method == "POST" else None
                r = outcome(client, method, p.url + path, content=body)
                kind = r if r == BROKEN else r.status_code  # type: ignore[union-attr]
                assert kind in allowed, f"{path}: {kind}"
                mine[str(kind)] += 1
        with lock:
            kinds.update(mine)

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(worker, i) for i in range(THREADS)]:
            future.result()
    return kinds


def process_counts(p: ProxyProcess) -> dict[str, int]:
    assert p.proc is not None
    pid = p.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return {
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
    }


def settle(broken: BrokenBackend) -> int:
    """2 s after the last request only idle pooled connections (at most one per client
    thread) are still open at the backend; their number."""
    time.sleep(2)
    assert wait_until(lambda: broken.open <= THREADS, 3), f"{broken.open} backend connections"
    return broken.open


def test_ten_thousand_faults_leak_nothing(bproxy: ProxyProcess, broken: BrokenBackend) -> None:
    run_faults(bproxy, 500)  # warm-up: pools, buffers, caches and metric series exist
    idle_before = settle(broken)
    base, before = process_counts(bproxy), failures(bproxy)
    t0 = time.monotonic()
    kinds = run_faults(bproxy, 10_000)
    took = time.monotonic() - t0
    idle_after = settle(broken)
    after = process_counts(bproxy)
    print(
        f"\n10,000 faults in {took:.1f} s: {dict(kinds)}; proxy before {base}, after {after};"
        f" backend connections open before {idle_before}, after {idle_after}"
    )
    assert sum(kinds.values()) == 10_000
    # Every fault but the relayed early answers is counted, once, as a protocol failure.
    assert failure_delta(before, failures(bproxy)) == {"protocol": 10_000 - kinds["413"]}
    assert after["fds"] <= base["fds"] + THREADS, (base, after)
    assert after["rss_kib"] - base["rss_kib"] < 20 * 1024, (base, after)
    assert after["threads"] <= base["threads"] + 2, (base, after)
    assert_pool_healthy(bproxy)
