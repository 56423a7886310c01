from __future__ import annotations

import asyncio
import copy
import gc
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from proxy.forward import Timeouts, Upstream
from proxy.jsonpath import compile_path, compile_paths, remove_paths
from proxy.shadow import Captured, Mirror, ShadowPolicy, compare

WAIT = 5.0
TIMEOUTS = Timeouts(connect=1.0, read=5.0, total=5.0)
JSON = [(b"Content-Type", b"application/json")]


def strip(data: Any, *paths: str) -> Any:
    return remove_paths(data, compile_paths(paths))


# ---------------------------------------------------------------------------- JSONPath


def test_dotted_member_is_removed() -> None:
    assert strip({"a": 1, "generated_at": "now"}, "$.generated_at") == {"a": 1}


def test_bracket_names_with_either_quote() -> None:
    data = {"a b": 1, "c.d": 2, "it's": 3, "keep": 4}
    assert strip(data, "$['a b']", '$["c.d"]', r"$['it\'s']") == {"keep": 4}


def test_nested_members() -> None:
    data = {"meta": {"trace": {"id": 1, "span": 2}, "v": 1}}
    assert strip(data, "$.meta.trace.id") == {"meta": {"trace": {"span": 2}, "v": 1}}


def test_index_and_negative_index() -> None:
    assert strip({"xs": [0, 1, 2, 3]}, "$.xs[1]") == {"xs": [0, 2, 3]}
    assert strip({"xs": [0, 1, 2, 3]}, "$.xs[-1]") == {"xs": [0, 1, 2]}
    assert strip([{"a": 1, "b": 2}], "$[0].a") == [{"b": 2}]


def test_wildcard_over_arrays_and_objects() -> None:
    data = {"items": [{"id": 1, "p": 5}, {"id": 2, "p": 6}], "meta": {"x": 1, "y": 2}}
    assert strip(data, "$.items[*].id", "$.meta.*") == {"items": [{"p": 5}, {"p": 6}], "meta": {}}
    assert strip({"xs": [1, 2]}, "$.xs[*]") == {"xs": []}


def test_recursive_descent_at_every_depth() -> None:
    data = {"id": 0, "a": {"id": 1, "b": [{"id": 2, "c": 3}]}, "ids": [4]}
    assert strip(data, "$..id") == {"a": {"b": [{"c": 3}]}, "ids": [4]}


def test_recursive_descent_followed_by_steps() -> None:
    data = {"items": [1, 2], "nested": {"items": [3, 4], "deeper": [{"items": [5]}]}}
    expected = {"items": [2], "nested": {"items": [4], "deeper": [{"items": []}]}}
    assert strip(data, "$..items[0]") == expected
    assert strip({"a": {"x": {"b": 1, "c": 2}}}, "$..x.b") == {"a": {"x": {"c": 2}}}


def test_paths_that_select_nothing_are_no_ops() -> None:
    data = {"a": [1, {"b": 2}], "s": "text"}
    for path in ("$.missing", "$.a[5]", "$.a.b", "$.s.x", "$.a[1].c", "$..zzz", "$.s[*]"):
        assert strip(data, path) == data


def test_input_is_never_mutated() -> None:
    data = {"items": [{"id": 1, "v": [1, 2]}], "generated_at": 1, "m": {"id": 3}}
    before = copy.deepcopy(data)
    result = strip(data, "$.generated_at", "$..id", "$.items[0].v[0]", "$.m.*")
    assert data == before
    assert result == {"items": [{"v": [2]}], "m": {}}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["id", "a", "b"]), children, max_size=3)
    ),
    max_leaves=20,
)


@given(json_values)
def test_no_path_ever_mutates_its_input(data: Any) -> None:
    before = copy.deepcopy(data)
    strip(data, "$..id", "$.a[*]", "$..b[0]", "$.*.a", "$[1]")
    assert data == before


@given(json_values)
def test_recursive_removal_leaves_no_match(data: Any) -> None:
    def has_id(node: Any) -> bool:
        if isinstance(node, dict):
            return "id" in node or any(has_id(v) for v in node.values())
        return isinstance(node, list) and any(has_id(v) for v in node)

    assert not has_id(strip(data, "$..id"))


@pytest.mark.parametrize(
    "path",
    ["a.b", "$", "$.", "$[1:2]", "$[?(@.a)]", "$['a','b']", "$['open", "$..", "$.a b", "$a"],
)
def test_unsupported_paths_are_refused_clearly(path: str) -> None:
    with pytest.raises(ValueError, match="JSONPath"):
        compile_path(path)


def test_compiled_path_keeps_its_text() -> None:
    assert str(compile_path("$.items[*].id")) == "$.items[*].id"


# ---------------------------------------------------------------------------- compare


def captured(
    body: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> Captured:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Captured(status, JSON if headers is None else headers, raw)


def test_json_match_ignoring_paths() -> None:
    ignore = compile_paths(["$.generated_at"])
    left = captured({"total": 3, "generated_at": "09:00"})
    right = captured({"generated_at": "09:01", "total": 3})
    assert compare(left, right, ignore=ignore) == ("match", "")
    assert compare(left, right)[0] == "mismatch"


def test_json_mismatch_names_paths_with_both_values() -> None:
    left = captured({"items": [{"price": 1}, {"price": 2}, {"price": 100}], "total": 103})
    right = captured({"items": [{"price": 1}, {"price": 2}, {"price": 120}], "extra": True})
    result, diff = compare(left, right)
    assert result == "mismatch"
    assert diff.splitlines() == [
        "$.items[2].price: 100 != 120",
        "$.total: missing in shadow",
        "$.extra: missing in primary",
    ]


def test_json_is_compared_as_data_not_bytes() -> None:
    left = Captured(200, JSON, b'{"a": 1, "b": [1, 2]}')
    right = Captured(200, JSON, b'{"b":[1,2],"a":1.0}')
    assert compare(left, right) == ("match", "")


def test_json_true_is_not_one() -> None:
    result, diff = compare(captured({"a": True}), captured({"a": 1}))
    assert (result, diff) == ("mismatch", "$.a: true != 1")


def test_odd_member_names_are_quoted_in_the_diff() -> None:
    _, diff = compare(captured({"a b": [1]}), captured({"a b": [2]}))
    assert diff == "$['a b'][0]: 1 != 2"


def test_status_mismatch() -> None:
    result, diff = compare(captured({"a": 1}), captured({"a": 1}, status=500))
    assert (result, diff) == ("mismatch", "status: 200 != 500")


def test_non_json_bodies_are_compared_byte_for_byte() -> None:
    html = [(b"content-type", b"text/html")]
    assert compare(captured(b"<p>hi</p>", headers=html), captured(b"<p>hi</p>", headers=html))[
        0
    ] == ("match")
    result, diff = compare(
        captured(b"<p>hello</p>", headers=html), captured(b"<p>help</p>", headers=html)
    )
    assert result == "mismatch"
    assert diff.splitlines()[0] == "body: 12 != 11 bytes, first difference at byte 6"
    assert "primary" in diff and "shadow" in diff


def test_invalid_json_falls_back_to_bytes() -> None:
    result, diff = compare(captured({"a": 1}), Captured(200, JSON, b"<html>oops</html>"))
    assert result == "mismatch"
    assert diff.startswith("body: 8 != 17 bytes, first difference at byte 0")


def test_one_body_a_prefix_of_the_other() -> None:
    _, diff = compare(captured(b"abc", headers=[]), captured(b"abcdef", headers=[]))
    assert diff.splitlines()[0] == "body: 3 != 6 bytes, first difference at byte 3"


def test_named_headers_are_compared_case_insensitively() -> None:
    left = captured({}, headers=[(b"ETag", b'"v1"'), (b"X-Other", b"a")])
    right = captured({}, headers=[(b"etag", b'"v2"'), (b"x-other", b"b")])
    result, diff = compare(left, right, compare_headers=("etag", "Cache-Control"))
    assert result == "mismatch"
    assert diff == 'header etag: "\\"v1\\"" != "\\"v2\\""'
    assert compare(left, right, compare_headers=()) == ("match", "")
    missing = captured({}, headers=[(b"etag", b'"v1"')])
    assert compare(missing, captured({}), compare_headers=("ETAG",))[1] == (
        "header etag: missing in shadow"
    )


def test_long_diffs_are_cut_short() -> None:
    result, diff = compare(captured(list(range(50))), captured(list(range(1, 51))))
    lines = diff.splitlines()
    assert result == "mismatch"
    assert len(lines) == 21
    assert lines[0] == "$[0]: 0 != 1"
    assert lines[-1] == "... and 30 more differences"


# ---------------------------------------------------------------------------- wants


class Results:
    """on_result: every (backend, result), and a queue to await them one by one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, backend: str, result: str) -> None:
        self.seen.append((backend, result))
        self.queue.put_nowait(result)

    async def next(self) -> str:
        return await asyncio.wait_for(self.queue.get(), WAIT)


def policy(
    *,
    percent: int = 100,
    methods: tuple[str, ...] = ("GET", "HEAD", "OPTIONS"),
    max_body: int = 64 * 1024,
    compare: bool = True,
    ignore: tuple[str, ...] = (),
    compare_headers: tuple[str, ...] = (),
    on_result: Callable[[str, str], None] | None = None,
    max_pending: int = 100,
    capture_limit: int = 1024 * 1024,
    rng: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.time,
) -> ShadowPolicy:
    return ShadowPolicy(
        route="orders",
        backend="orders-v2",
        percent=percent,
        methods=methods,
        max_body=max_body,
        compare=compare,
        ignore=ignore,
        compare_headers=compare_headers,
        on_result=on_result or (lambda backend, result: None),
        max_pending=max_pending,
        capture_limit=capture_limit,
        rng=rng,
        clock=clock,
    )


def test_only_listed_methods_are_shadowed() -> None:
    safe = policy()
    assert [safe.wants(m, 0) for m in ("GET", "HEAD", "OPTIONS", "POST", "PUT")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert policy(methods=("post",)).wants("POST", 10)


def test_percent_is_honoured_over_many_requests() -> None:
    thirty = policy(percent=30, rng=random.Random(1234).random)
    chosen = sum(thirty.wants("GET", 0) for _ in range(10_000))
    assert 2_800 <= chosen <= 3_200
    assert not any(policy(percent=0).wants("GET", 0) for _ in range(100))
    assert all(policy(percent=100, rng=lambda: 0.999999).wants("GET", 0) for _ in range(100))


def test_bodies_over_max_body_or_of_unknown_size_are_not_shadowed() -> None:
    small = policy(methods=("POST",), max_body=100)
    assert small.wants("POST", 100)
    assert not small.wants("POST", 101)
    assert not small.wants("POST", None)


def test_capture_limit_is_zero_without_compare() -> None:
    assert policy(compare=False).capture_limit == 0
    assert policy(capture_limit=4096).capture_limit == 4096


def test_bad_ignore_path_fails_when_the_policy_is_built() -> None:
    with pytest.raises(ValueError, match="unsupported JSONPath"):
        policy(ignore=("$.items[?(@.x)]",))


def test_settings_tell_whether_a_policy_can_be_kept() -> None:
    assert policy().settings == policy().settings
    assert policy().settings != policy(percent=50).settings


# ---------------------------------------------------------------------------- submit


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    body: bytes


@dataclass
class ShadowServer:
    url: str
    received: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    async def next(self) -> Received:
        return await asyncio.wait_for(self.received.get(), WAIT)


def lowered(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in items]


@pytest.fixture
async def server() -> AsyncIterator[ShadowServer]:
    shadow = ShadowServer(url="")

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        shadow.received.put_nowait(
            Received(request.method, request.path_qs, lowered(request.headers.items()), body)
        )
        if request.path == "/slow":
            # "sleeps 2 s", but lets the fixture end it at teardown
            try:
                await asyncio.wait_for(shadow.release.wait(), 2.0)
            except TimeoutError:
                pass
        status, answer = shadow.answers.get(request.path, (200, b'{"total": 3}'))
        return web.Response(status=status, body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    shadow.url = f"http://127.0.0.1:{port}"
    try:
        yield shadow
    finally:
        shadow.release.set()
        await runner.cleanup()


@pytest.fixture
async def upstream(server: ShadowServer) -> AsyncIterator[Upstream]:
    up = Upstream("orders-v2", server.url, max_connections=10)
    try:
        yield up
    finally:
        await up.close()


def mirror(target: str = "/orders/7", *, method: str = "GET", body: bytes | None = None) -> Mirror:
    headers = [
        (b"host", b"shop.example"),
        (b"x-request-id", b"req-1"),
        (b"x-strangler-shadow", b"0"),
        (b"accept", b"application/json"),
    ]
    return Mirror(method, target, headers, body, "req-1")


PRIMARY = Captured(200, JSON, b'{"total": 3}')


async def test_copy_arrives_marked_with_the_same_body(
    server: ShadowServer, upstream: Upstream
) -> None:
    results = Results()
    shadow = policy(methods=("POST",), on_result=results)
    request = mirror("/orders?x=1", method="POST", body=b'{"qty": 2}')
    assert shadow.submit(upstream, request, PRIMARY, TIMEOUTS)
    got = await server.next()
    assert (got.method, got.path, got.body) == ("POST", "/orders?x=1", b'{"qty": 2}')
    assert got.header("x-strangler-shadow") == ["1"]
    assert got.header("x-request-id") == ["req-1"]
    assert got.header("host") == [server.url.removeprefix("http://")]
    assert await results.next() == "match"
    assert results.seen == [("orders-v2", "match")]
    assert shadow.counts == {"match": 1, "mismatch": 0, "error": 0, "dropped": 0}


async def test_preserve_host_keeps_the_clients_host(server: ShadowServer) -> None:
    results = Results()
    shadow = policy(on_result=results)
    up = Upstream("orders-v2", server.url, max_connections=2, preserve_host=True)
    try:
        assert shadow.submit(up, mirror(), PRIMARY, TIMEOUTS)
        assert (await server.next()).header("host") == ["shop.example"]
        assert await results.next() == "match"
    finally:
        await up.close()


async def test_head_is_shadowed_and_compared_without_bodies(
    server: ShadowServer, upstream: Upstream
) -> None:
    results = Results()
    shadow = policy(on_result=results)
    assert shadow.submit(upstream, mirror(method="HEAD"), Captured(200, JSON, b""), TIMEOUTS)
    assert (await server.next()).method == "HEAD"
    assert await results.next() == "match"


async def test_without_compare_the_copy_is_sent_and_nothing_counted(
    server: ShadowServer, upstream: Upstream
) -> None:
    results = Results()
    shadow = policy(compare=False, on_result=results)
    assert shadow.submit(upstream, mirror(), PRIMARY, TIMEOUTS)
    assert (await server.next()).header("x-strangler-shadow") == ["1"]
    await asyncio.wait_for(shadow.wait_idle(), WAIT)
    assert results.seen == []
    assert shadow.counts == {"match": 0, "mismatch": 0, "error": 0, "dropped": 0}


async def test_an_uncaptured_primary_is_mirrored_but_not_compared(
    server: ShadowServer, upstream: Upstream
) -> None:
    results = Results()
    shadow = policy(on_result=results)
    assert shadow.submit(upstream, mirror(), None, TIMEOUTS)
    await server.next()
    await asyncio.wait_for(shadow.wait_idle(), WAIT)
    assert results.seen == []


async def test_a_slow_shadow_never_makes_submit_wait(
    server: ShadowServer, upstream: Upstream
) -> None:
    shadow = policy()
    started = time.perf_counter()
    assert shadow.submit(upstream, mirror("/slow"), PRIMARY, TIMEOUTS)
    assert time.perf_counter() - started < 0.5  # the shadow takes 2 s; a loaded CI, ms
    await server.next()
    assert shadow.pending == 1
    await asyncio.wait_for(shadow.close(), WAIT)


async def test_copies_beyond_max_pending_are_dropped_and_counted(
    server: ShadowServer, upstream: Upstream
) -> None:
    shadow = policy(max_pending=2)
    assert shadow.submit(upstream, mirror("/slow"), PRIMARY, TIMEOUTS)
    assert shadow.submit(upstream, mirror("/slow"), PRIMARY, TIMEOUTS)
    assert not shadow.submit(upstream, mirror("/slow"), PRIMARY, TIMEOUTS)
    assert shadow.counts["dropped"] == 1
    assert shadow.pending == 2
    await asyncio.wait_for(shadow.close(), WAIT)


async def test_an_unreachable_shadow_counts_an_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = Upstream("orders-v2", f"http://127.0.0.1:{port}", max_connections=2)
    results = Results()
    shadow = policy(on_result=results)
    try:
        assert shadow.submit(dead, mirror(), PRIMARY, TIMEOUTS)
        assert await results.next() == "error"
    finally:
        await dead.close()
    assert shadow.counts["error"] == 1
    assert shadow.recent_mismatches == []


async def test_a_shadow_timeout_counts_an_error(server: ShadowServer, upstream: Upstream) -> None:
    results = Results()
    shadow = policy(on_result=results)
    quick = Timeouts(connect=1.0, read=0.1, total=0.2)
    assert shadow.submit(upstream, mirror("/slow"), PRIMARY, quick)
    assert await results.next() == "error"


async def test_mismatch_is_kept_with_request_id_and_diff(
    server: ShadowServer, upstream: Upstream
) -> None:
    server.answers["/orders/7"] = (200, b'{"total": 4, "generated_at": "b"}')
    results = Results()
    shadow = policy(on_result=results, ignore=("$.generated_at",), clock=lambda: 1234.5)
    primary = Captured(200, JSON, b'{"total": 3, "generated_at": "a"}')
    assert shadow.submit(upstream, mirror(), primary, TIMEOUTS)
    assert await results.next() == "mismatch"
    assert shadow.recent_mismatches == [
        {
            "time": 1234.5,
            "request_id": "req-1",
            "method": "GET",
            "target": "/orders/7",
            "status": [200, 200],
            "diff": "$.total: 3 != 4",
        }
    ]


async def test_a_5xx_from_the_shadow_is_a_mismatch_not_an_error(
    server: ShadowServer, upstream: Upstream
) -> None:
    server.answers["/boom"] = (503, b'{"error": "down"}')
    results = Results()
    shadow = policy(on_result=results)
    assert shadow.submit(upstream, mirror("/boom"), PRIMARY, TIMEOUTS)
    assert await results.next() == "mismatch"
    assert shadow.recent_mismatches[0]["status"] == [200, 503]
    assert shadow.recent_mismatches[0]["diff"].startswith("status: 200 != 503")


async def test_only_the_last_mismatches_are_kept_newest_first(
    server: ShadowServer, upstream: Upstream
) -> None:
    server.answers["/x"] = (200, b"{}")
    results = Results()
    shadow = policy(on_result=results)
    for n in range(105):
        request = Mirror("GET", "/x", [], None, f"req-{n}")
        assert shadow.submit(upstream, request, PRIMARY, TIMEOUTS)
        assert await results.next() == "mismatch"
    kept = shadow.recent_mismatches
    assert len(kept) == 100
    assert (kept[0]["request_id"], kept[-1]["request_id"]) == ("req-104", "req-5")


async def test_a_shadow_body_over_the_capture_limit_is_a_mismatch(
    server: ShadowServer, upstream: Upstream
) -> None:
    server.answers["/big"] = (200, b'{"total": 3, "pad": "' + b"x" * 100 + b'"}')
    results = Results()
    shadow = policy(on_result=results, capture_limit=50)
    assert shadow.submit(upstream, mirror("/big"), PRIMARY, TIMEOUTS)
    assert await results.next() == "mismatch"
    assert "shadow longer than 50 bytes" in shadow.recent_mismatches[0]["diff"]


async def test_large_bodies_are_compared_off_the_loop(
    server: ShadowServer, upstream: Upstream
) -> None:
    big = json.dumps({"rows": list(range(20_000))}).encode()
    server.answers["/rows"] = (200, big)
    results = Results()
    shadow = policy(on_result=results)
    assert shadow.submit(upstream, mirror("/rows"), Captured(200, JSON, big), TIMEOUTS)
    assert await results.next() == "match"


async def test_a_failing_callback_never_reaches_the_loop(
    server: ShadowServer, upstream: Upstream
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def broken(backend: str, result: str) -> None:
        raise RuntimeError("metrics broke")

    shadow = policy(on_result=broken)
    try:
        assert shadow.submit(upstream, mirror(), PRIMARY, TIMEOUTS)
        await asyncio.wait_for(shadow.wait_idle(), WAIT)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert reported == []
    assert shadow.pending == 0
    assert shadow.counts["match"] == 1


async def test_close_cancels_copies_in_flight_and_refuses_new_ones(
    server: ShadowServer, upstream: Upstream
) -> None:
    results = Results()
    shadow = policy(on_result=results)
    assert shadow.submit(upstream, mirror("/slow"), PRIMARY, TIMEOUTS)
    await server.next()
    await asyncio.wait_for(shadow.close(), WAIT)
    assert shadow.pending == 0
    assert results.seen == []
    assert not shadow.submit(upstream, mirror(), PRIMARY, TIMEOUTS)
    assert shadow.counts["dropped"] == 1
