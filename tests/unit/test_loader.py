"""proxy.loader: every error of a file in one run, each with its line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import Config, Timeout
from proxy.loader import ConfigError, ConfigIssue, load, load_text, route_table

REPO = Path(__file__).resolve().parents[2]

# Five lines; anything appended starts on line 6.
BASE = """\
version: 1
legacy: monolith
backends:
  monolith: {url: "http://127.0.0.1:8001"}
  orders: {url: "http://127.0.0.1:8002"}
"""


def issues_of(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_text(textwrap.dedent(text), "bad.yaml")
    return [(issue.line, issue.key, issue.message) for issue in info.value.issues]


def where(text: str) -> list[tuple[int, str]]:
    return [(line, key) for line, key, _ in issues_of(text)]


def valid(text: str) -> Config:
    return load_text(textwrap.dedent(text), "good.yaml")


def test_issue_prints_file_line_key_and_message() -> None:
    assert (
        str(ConfigIssue("a.yaml", 7, "routes[0].split", "bad")) == "a.yaml:7: routes[0].split: bad"
    )
    assert str(ConfigIssue("a.yaml", 1, "", "empty")) == "a.yaml:1: empty"


def test_config_error_lists_issues_by_line() -> None:
    error = ConfigError([ConfigIssue("f", 9, "b", "two"), ConfigIssue("f", 2, "a", "one")])
    assert [issue.line for issue in error.issues] == [2, 9]
    assert str(error) == "f:2: a: one\nf:9: b: two"


def test_every_error_of_a_file_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent("""\
            version: 1
            legacy: monolit
            backends:
              monolith: {url: "ftp://127.0.0.1:8001"}
              orders: {url: "http://127.0.0.1:8002", max_connections: 0}
            defaults:
              timout: {read: 5}
            routes:
              - name: orders
                match: {prefix: /api/orders}
                split: {orders: 30, monolith: 60}
                sticky: {cookie: sid}
              - name: orders
                match: {prefix: /api/orders/}
                backend: ordrs
                rewrite: {strip_prefix: /ap}
                max_body: 10XB
            """)
    )
    with pytest.raises(ConfigError) as info:
        load(path)
    assert [(i.line, i.key) for i in info.value.issues] == [
        (2, "legacy"),
        (4, "backends.monolith.url"),
        (5, "backends.orders.max_connections"),
        (7, "defaults.timout"),
        (11, "routes[0].split"),
        (13, "routes[1].name"),
        (14, "routes[1].match"),
        (15, "routes[1].backend"),
        (16, "routes[1].rewrite.strip_prefix"),
        (17, "routes[1].max_body"),
    ]
    assert all(str(i).startswith(f"{path}:{i.line}: {i.key}: ") for i in info.value.issues)


def test_unknown_key_suggests_the_closest_field() -> None:
    issues = issues_of(
        BASE
        + """\
defaults:
  timout: {read: 5}
routes:
  - name: orders
    match: {prefix: /api/orders, methds: [GET]}
    splt: {orders: 100}
"""
    )
    assert issues == [
        (7, "defaults.timout", "unknown key 'timout' (did you mean 'timeout'?)"),
        (10, "routes[0].match.methds", "unknown key 'methds' (did you mean 'methods'?)"),
        (11, "routes[0].splt", "unknown key 'splt' (did you mean 'split'?)"),
    ]


def test_unknown_key_in_a_backend_suggests_a_backend_field() -> None:
    issues = issues_of(BASE + "  api: {urll: 'http://127.0.0.1:8003'}\n")
    assert issues == [
        (6, "backends.api", "missing required key 'url'"),
        (6, "backends.api.urll", "unknown key 'urll' (did you mean 'url'?)"),
    ]


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    issues = issues_of(BASE + "listen: {zzz: 1}\n")
    assert issues == [(6, "listen.zzz", "unknown key 'zzz' (valid keys: host, port, busy_poll_us)")]


def test_busy_poll_is_bounded_microseconds() -> None:
    assert load_text(BASE + "listen: {busy_poll_us: 150}\n", "c.yaml").listen.busy_poll_us == 150
    (issue,) = issues_of(BASE + "listen: {busy_poll_us: -1}\n")
    assert issue[:2] == (6, "listen.busy_poll_us")
    (issue,) = issues_of(BASE + "listen: {busy_poll_us: 20000}\n")
    assert issue[:2] == (6, "listen.busy_poll_us")


def test_missing_required_keys() -> None:
    issues = issues_of(
        BASE
        + """\
routes:
  - match: {prefix: /a}
    backend: orders
"""
    )
    assert issues == [(7, "routes[0]", "missing required key 'name'")]
    assert issues_of("version: 1\nlegacy: monolith\n") == [
        (1, "", "missing required key 'backends'")
    ]


def test_split_that_does_not_sum_to_100() -> None:
    issues = issues_of(
        BASE
        + """\
routes:
  - name: orders
    match: {prefix: /api/orders}
    split:
      orders: 10
      monolith: 80
"""
    )
    assert issues == [(9, "routes[0].split", "percentages sum to 90, not 100")]


def test_split_percentages_are_integers_from_0_to_100() -> None:
    issues = issues_of(
        BASE
        + """\
routes:
  - name: orders
    match: {prefix: /api/orders}
    split:
      orders: 12.5
      monolith: true
  - name: more
    match: {prefix: /more}
    split: {orders: 150, monolith: -50}
"""
    )
    assert issues == [
        (10, "routes[0].split.orders", "must be an integer percentage from 0 to 100, not 12.5"),
        (11, "routes[0].split.monolith", "must be an integer percentage from 0 to 100, not true"),
        (14, "routes[1].split.orders", "must be an integer percentage from 0 to 100, not 150"),
        (14, "routes[1].split.monolith", "must be an integer percentage from 0 to 100, not -50"),
    ]


def test_backends_that_are_not_declared() -> None:
    issues = issues_of(
        """\
version: 1
legacy: monolit
backends:
  monolith: {url: "http://127.0.0.1:8001"}
  orders: {url: "http://127.0.0.1:8002"}
routes:
  - name: a
    match: {prefix: /a}
    split: {ordres: 50, monolith: 50}
    fallback: legacy
    shadow: {backend: orderz}
  - name: b
    match: {prefix: /b}
    backend: payments
"""
    )
    undeclared = "backend {!r} is not declared in backends ({})"
    assert issues == [
        (2, "legacy", undeclared.format("monolit", "did you mean 'monolith'?")),
        (9, "routes[0].split.ordres", undeclared.format("ordres", "did you mean 'orders'?")),
        (10, "routes[0].fallback", undeclared.format("legacy", "declared: monolith, orders")),
        (11, "routes[0].shadow.backend", undeclared.format("orderz", "did you mean 'orders'?")),
        (14, "routes[1].backend", undeclared.format("payments", "declared: monolith, orders")),
    ]


def test_two_routes_with_the_same_name() -> None:
    issues = issues_of(
        BASE
        + """\
routes:
  - {name: orders, match: {prefix: /a}, backend: orders}
  - {name: orders, match: {prefix: /b}, backend: orders}
"""
    )
    assert issues == [
        (8, "routes[1].name", "route name 'orders' is already used by routes[0] (line 7)")
    ]


def test_two_routes_with_the_same_match() -> None:
    issues = issues_of(
        BASE
        + """\
routes:
  - {name: a, match: {prefix: /api/, methods: [get, POST], headers: {X-Beta: "1"}}, backend: orders}
  - {name: b, match: {prefix: /api, methods: [POST, GET], headers: {x-beta: "1"}}, backend: orders}
  - {name: c, match: {prefix: /api, methods: [POST, GET], host: shop.example.com}, backend: orders}
  - {name: d, match: {prefix: /api, methods: [POST, GET], host: Shop.Example.com.}, backend: orders}
"""
    )
    assert [(line, key) for line, key, _ in issues] == [
        (8, "routes[1].match"),
        (10, "routes[3].match"),
    ]
    assert issues[0][2] == "same match as routes[0] (line 7): only the first can ever be chosen"


def test_strip_prefix_must_be_a_segment_prefix_of_the_match() -> None:
    routes = """\
routes:
  - {name: a, match: {prefix: /api/orders}, backend: orders, rewrite: {strip_prefix: /api}}
  - {name: b, match: {prefix: /api/b}, backend: orders, rewrite: {strip_prefix: /api/b/}}
  - {name: c, match: {prefix: /api/c}, backend: orders, rewrite: {strip_prefix: /ap}}
  - {name: d, match: {prefix: /api/d}, backend: orders, rewrite: {strip_prefix: /other}}
"""
    issues = issues_of(BASE + routes)
    assert [(line, key) for line, key, _ in issues] == [
        (9, "routes[2].rewrite.strip_prefix"),
        (10, "routes[3].rewrite.strip_prefix"),
    ]
    assert issues[0][2] == "'/ap' is not a whole-segment prefix of match.prefix '/api/c'"


def test_url_must_be_absolute_http() -> None:
    issues = issues_of(BASE + "  api: {url: 'ftp://127.0.0.1/'}\n  web: {url: /relative}\n")
    assert where(BASE + "  api: {url: 'ftp://127.0.0.1/'}\n") == [(6, "backends.api.url")]
    assert [message for _, _, message in issues] == [
        "'ftp://127.0.0.1/' is not an absolute http(s) URL",
        "'/relative' is not an absolute http(s) URL",
    ]


def test_values_that_must_be_positive() -> None:
    issues = issues_of(
        BASE
        + """\
  api:
    url: http://127.0.0.1:8003
    max_connections: 0
    health: {interval: 0}
defaults:
  timeout: {read: 0}
  breaker: {failure_threshold: -1}
  bulkhead: {max_concurrent: 0, max_queue: -1}
"""
    )
    assert issues == [
        (8, "backends.api.max_connections", "must be greater than 0, not 0"),
        (9, "backends.api.health.interval", "must be greater than 0, not 0"),
        (11, "defaults.timeout.read", "must be greater than 0, not 0"),
        (12, "defaults.breaker.failure_threshold", "must be greater than 0, not -1"),
        (13, "defaults.bulkhead.max_concurrent", "must be greater than 0, not 0"),
        (13, "defaults.bulkhead.max_queue", "must be greater than or equal to 0, not -1"),
    ]


def test_max_queue_zero_means_no_queue() -> None:
    assert valid(BASE + "defaults: {bulkhead: {max_queue: 0}}\n").defaults.bulkhead.max_queue == 0


def test_split_and_backend_are_exclusive() -> None:
    issues = issues_of(
        BASE
        + """\
routes:
  - {name: a, match: {prefix: /a}, backend: orders, split: {orders: 100}}
  - {name: b, match: {prefix: /b}}
"""
    )
    message = "set either split or backend (one of them, not both)"
    assert issues == [(7, "routes[0]", message), (8, "routes[1]", message)]


def test_yaml_syntax_error_names_its_line() -> None:
    issues = issues_of(BASE + "routes:\n  - name: a\n   match: {prefix: /a}\n")
    assert len(issues) == 1
    assert issues[0][0] == 8
    assert issues[0][2].startswith("YAML syntax error: ")
    assert issues_of("version: 1\nbackends: {a: {url: x}\nlegacy: a\n")[0][0] == 3


def test_duplicate_keys_are_an_error() -> None:
    issues = issues_of(BASE + "legacy: orders\n")
    assert issues == [(6, "legacy", "duplicate key (first at line 2)")]


def test_an_empty_file_or_a_non_mapping_is_refused() -> None:
    assert issues_of("") == [(1, "", "the file is empty: a config starts with `version: 1`")]
    assert issues_of("# only a comment\n")[0][0] == 1
    assert issues_of("- version: 1\n") == [
        (1, "", "the top level must be a mapping of keys, not a list")
    ]


def test_a_character_yaml_refuses_names_its_line() -> None:
    assert issues_of(BASE + "routes: [\x07]\n") == [
        (6, "", "a character YAML does not allow: #x0007")
    ]


def test_anchors_and_merge_keys_work_and_explicit_keys_win() -> None:
    config = valid(
        BASE
        + """  api:
    <<: &pool {url: "http://127.0.0.1:8003", max_connections: 7}
    url: http://127.0.0.1:8004
  web: *pool
"""
    )
    assert config.backends["api"].url == "http://127.0.0.1:8004"
    assert config.backends["api"].max_connections == 7
    assert config.backends["web"].url == "http://127.0.0.1:8003"


def test_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.yaml")
    (issue,) = info.value.issues
    assert issue.line == 0
    assert issue.message == "cannot read the file: No such file or directory"
    assert str(issue).startswith(f"{tmp_path / 'missing.yaml'}:0: ")


def test_a_value_yaml_cannot_construct_is_reported_once() -> None:
    issues = issues_of(BASE.replace("legacy: monolith", "legacy: !custom monolith"))
    assert [(line, key) for line, key, _ in issues] == [(2, "legacy")]


def test_retry_on_is_a_key_not_a_yaml_boolean() -> None:
    config = valid(BASE + "defaults: {retry: {on: [connect, 500]}}\n")
    assert config.defaults.retry.on == ("connect", 500)


def test_an_unquoted_header_value_is_told_to_be_quoted() -> None:
    issues = issues_of(
        BASE
        + "routes:\n  - {name: a, match: {prefix: /a, headers: {X-Beta: 1}}, backend: orders}\n"
    )
    assert issues == [(7, "routes[0].match.headers.X-Beta", 'must be a string: quote it, "1"')]


def test_sizes() -> None:
    route = "routes:\n  - {name: a, match: {prefix: /a}, backend: orders, max_body: 64KiB}\n"
    config = valid(BASE + "defaults: {max_body: 10MiB}\n" + route)
    assert config.defaults.max_body == 10 * 1024 * 1024 == 10485760
    assert config.routes[0].max_body == 65536
    issues = issues_of(BASE + "defaults: {max_body: 10 parsecs}\n")
    assert [(line, key) for line, key, _ in issues] == [(6, "defaults.max_body")]
    assert "is not a size" in issues[0][2]


def test_defaults_are_merged_into_a_route() -> None:
    config = valid(
        BASE
        + """\
defaults:
  timeout: {connect: 2.0, read: 30.0, total: 40.0}
routes:
  - {name: a, match: {prefix: /a}, backend: orders, timeout: {read: 5.0}}
"""
    )
    route_timeout = config.routes[0].timeout
    assert route_timeout is not None
    merged = route_timeout.merged_over(config.defaults.timeout)
    assert merged == Timeout(connect=2.0, read=5.0, total=40.0)
    assert "read 5s, total 40s" in route_table(config)


def test_routes_empty_and_defaults_omitted_are_valid() -> None:
    config = valid(BASE + "routes: []\n")
    assert config.routes == ()
    assert config.defaults.timeout == Timeout()
    assert valid(BASE).legacy == "monolith"


def test_the_example_config_validates() -> None:
    config = load(REPO / "config" / "strangler.yaml")
    assert config.legacy == "monolith"
    assert config.routes[0].weights == {"orders": 25, "monolith": 75}


def test_route_table_lists_routes_in_match_order_then_default() -> None:
    config = valid(
        BASE
        + """\
defaults: {max_body: 1MiB}
routes:
  - {name: short, match: {prefix: /api}, backend: orders}
  - {name: plain, match: {prefix: /api/orders}, split: {orders: 25, monolith: 75}}
  - name: beta
    match: {prefix: /api/orders/, methods: [GET], headers: {X-Beta: "1"}}
    backend: orders
    sticky: {header: X-User-Id}
    fallback: monolith
    retry: {attempts: 4}
    shadow: {backend: monolith, percent: 10, compare: true}
"""
    )
    table = route_table(config)
    lines = table.splitlines()
    names = [line.split()[0] for line in lines[2:] if not line.startswith(" ")]
    assert names == ["beta", "plain", "short", "default"]
    assert lines[0].split() == ["route", "match", "split", "sticky", "policies"]
    assert all(len(line) <= 120 for line in lines)
    assert "/api/orders GET X-Beta=1" in table
    assert "orders 25% / monolith 75%" in table
    assert "header X-User-Id" in table
    (default,) = [line for line in lines if line.startswith("default ")]
    assert default.split()[:3] == ["default", "/", "->"] and "-> monolith" in default
    flat = " ".join(table.split())
    assert "4 attempts" in flat
    assert "fallback monolith" in flat
    assert "shadow monolith 10% compared" in flat
    assert "max_body 1MiB" in flat


def test_lone_surrogates_are_reported_with_their_line_whatever_the_yaml_parser() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text("version: 1\nlegacy: \ud800\n", "s.yaml")
    assert any(i.line == 2 and "#xd800" in i.message for i in caught.value.issues)
