"""Routing (SPEC §3): normalization, longest segment prefix, conditions and tie-breaks."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.routing import Router, Rule, host_of, normalize, normalize_prefix, strip_prefix


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/", "/"),
        (b"/api/orders/7", "/api/orders/7"),
        (b"/a/./b/../c", "/a/c"),
        (b"/a/b/..", "/a/"),
        (b"/a/b/.", "/a/b/"),
        (b"/%7Euser/%41%62", "/~user/Ab"),
        (b"/a/%2e%2e/b", "/b"),
        (b"/a/%2E/b", "/a/b"),
        (b"/a%2fb", "/a%2Fb"),
        (b"/a/%2F../b", "/a/%2F../b"),
        (b"/x%3a%3A", "/x%3A%3A"),
        (b"/caf\xc3\xa9", "/caf%C3%A9"),
        (b"/a b", "/a%20b"),
        (b"//a//b", "//a//b"),
    ],
)
def test_normalize(raw: bytes, expected: str) -> None:
    assert normalize(raw) == expected
    assert normalize(expected.encode()) == expected


@pytest.mark.parametrize(
    "raw", [b"/..", b"/../a", b"/a/../..", b"/%2e%2e", b"/a/%2E%2E/%2e%2e/x", b"/a/b/../../../c"]
)
def test_climbing_above_root_is_a_bad_request(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        normalize(raw)


@pytest.mark.parametrize("raw", [b"/%", b"/%4", b"/%zz", b"/a%g0", b"*", b"http://x/"])
def test_malformed_paths_are_bad_requests(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        normalize(raw)


def test_prefix_normalization() -> None:
    assert normalize_prefix("/api/") == "/api"
    assert normalize_prefix("/") == "/"
    assert normalize_prefix("/%7Eu") == "/~u"


def test_strip_prefix() -> None:
    assert strip_prefix("/api/orders/7", "/api") == "/orders/7"
    assert strip_prefix("/api", "/api") == "/"
    assert strip_prefix("/apix", "/api") == "/apix"
    assert strip_prefix("/api/orders", "/api/") == "/orders"


def test_host_of() -> None:
    assert host_of("Shop.Example.com:8080") == "shop.example.com"
    assert host_of("shop.example.com.") == "shop.example.com"
    assert host_of("[::1]:8080") == "[::1]"
    assert host_of(None) is None


def rule(name: str, prefix: str, order: int, **conditions: object) -> Rule[str]:
    return Rule(name=name, prefix=prefix, target=name, order=order, **conditions)  # type: ignore[arg-type]


def no_headers(name: str) -> str | None:
    return None


def test_longest_segment_prefix_wins() -> None:
    router = Router.build(
        [rule("api", "/api", 0), rule("orders", "/api/orders", 1), rule("root", "/", 2)], "default"
    )
    assert router.match("/api/orders/7", "GET", None, no_headers) == "orders"
    assert router.match("/api/orders", "GET", None, no_headers) == "orders"
    assert router.match("/api/ordersX", "GET", None, no_headers) == "api"
    assert router.match("/other", "GET", None, no_headers) == "root"


def test_unclaimed_requests_get_the_fallback() -> None:
    router = Router.build([rule("orders", "/api/orders", 0)], "default")
    assert router.match("/", "GET", None, no_headers) == "default"
    assert router.match("/api", "GET", None, no_headers) == "default"


def test_more_conditions_win_then_file_order() -> None:
    headers = {"x-beta": "1"}
    router = Router.build(
        [
            rule("plain", "/a", 0),
            rule("first-get", "/a", 1, methods=frozenset({"GET"})),
            rule("second-get", "/a", 2, methods=frozenset({"GET"})),
            rule("beta-get", "/a", 3, methods=frozenset({"GET"}), headers=(("x-beta", "1"),)),
        ],
        "default",
    )
    assert router.match("/a", "GET", None, headers.get) == "beta-get"
    assert router.match("/a", "GET", None, no_headers) == "first-get"
    assert router.match("/a", "POST", None, no_headers) == "plain"


def test_conditions_fall_through_to_shorter_prefixes() -> None:
    router = Router.build(
        [rule("api", "/api", 0), rule("shop", "/api/orders", 1, host="shop.example.com")],
        "default",
    )
    assert router.match("/api/orders", "GET", "shop.example.com", no_headers) == "shop"
    assert router.match("/api/orders", "GET", "other", no_headers) == "api"


def test_explain_lists_the_rules_that_lost() -> None:
    router = Router.build(
        [rule("api", "/api", 0), rule("beta", "/api/orders", 1, headers=(("x-beta", "1"),))],
        "default",
    )
    chosen, losers = router.explain("/api/orders/1", "GET", None, {"x-beta": "2"}.get)
    assert chosen is not None and chosen.name == "api"
    assert [(loser.rule.name, loser.why) for loser in losers] == [
        ("beta", "header x-beta is '2', not '1'")
    ]


def test_cost_does_not_grow_with_the_number_of_routes() -> None:
    rules = [rule(f"r{i}", f"/svc{i}/items", i) for i in range(5000)]
    router = Router.build(rules, "default")
    calls = 0

    def counting(name: str) -> str | None:
        nonlocal calls
        calls += 1
        return None

    assert router.match("/svc4321/items/9", "GET", None, counting) == "r4321"
    assert router.match("/nothing/here/at/all/x/y/z", "GET", None, counting) == "default"
    # Only buckets on the path's own prefixes are looked at: no rule's condition ran.
    assert calls == 0


def test_deep_paths_are_cut_to_the_deepest_prefix() -> None:
    router = Router.build([rule("a", "/a/b", 0)], "default")
    deep = "/a/b" + "/x" * 10000
    assert router.match(deep, "GET", None, no_headers) == "a"
