"""proxy.diff: what a config change does, with the share of users that moves counted exactly."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from proxy.config import Config
from proxy.diff import diff, render
from proxy.loader import load_text

BACKENDS = """\
version: 1
legacy: monolith
backends:
  monolith: {url: "http://127.0.0.1:8001"}
  orders: {url: "http://127.0.0.1:8002"}
  payments: {url: "http://127.0.0.1:8003"}
"""


def config(routes: str, head: str = "") -> Config:
    text = (
        BACKENDS
        + textwrap.dedent(head)
        + "routes:\n"
        + textwrap.indent(textwrap.dedent(routes), "  ")
    )
    return load_text(text, "x.yaml")


def sticky_orders(split: str, name: str = "orders", sticky: str = "{cookie: sid}") -> Config:
    return config(
        f"""\
        - name: {name}
          match: {{prefix: /api/orders}}
          split: {split}
          sticky: {sticky}
        """
    )


def only_changed(changes: dict[str, Any]) -> dict[str, Any]:
    [entry] = changes["routes"]["changed"]
    assert isinstance(entry, dict)
    return entry


def test_raising_a_share_moves_users_from_legacy_only() -> None:
    changes = diff(
        sticky_orders("{orders: 10, monolith: 90}"), sticky_orders("{orders: 25, monolith: 75}")
    )
    split = only_changed(changes)["split"]
    assert changes["changed"] is True
    assert split["moves"] == [{"from": "monolith", "to": "orders", "share": 0.15}]
    assert split["basis"] == "users"
    assert split["expected"] is False
    assert split["warnings"] == []
    assert split["buckets"] == {
        "old": {"orders": [0, 1000], "monolith": [1000, 10000]},
        "new": {"orders": [0, 2500], "monolith": [2500, 10000]},
    }
    assert "orders: 10% -> 25%, 15% of users move monolith -> orders" in render(changes)


def test_lowering_a_share_warns_users_go_back_to_legacy() -> None:
    changes = diff(
        sticky_orders("{orders: 25, monolith: 75}"), sticky_orders("{orders: 10, monolith: 90}")
    )
    split = only_changed(changes)["split"]
    assert split["moves"] == [{"from": "orders", "to": "monolith", "share": 0.15}]
    assert split["warnings"] == ["15% of users move back to legacy (orders -> monolith)"]
    text = render(changes)
    assert "orders: 25% -> 10%, 15% of users move orders -> monolith" in text
    assert "WARNING: 15% of users move back to legacy (orders -> monolith)" in text


def test_two_new_services_exact_shares_and_warning_between_them() -> None:
    old = sticky_orders("{orders: 20, payments: 10, monolith: 70}")
    new = sticky_orders("{orders: 10, payments: 20, monolith: 70}")
    split = only_changed(diff(old, new))["split"]
    # orders [0, 2000) payments [2000, 3000) -> orders [0, 1000) payments [1000, 3000)
    assert split["moves"] == [{"from": "orders", "to": "payments", "share": 0.1}]
    assert split["warnings"] == ["10% of users move between new services (orders -> payments)"]
    assert (
        "orders: orders 20% / payments 10% / monolith 70% -> orders 10% / payments 20% / "
        "monolith 70%, 10% of users move orders -> payments"
    ) in render(diff(old, new))


def test_several_moves_are_counted_bucket_by_bucket_and_joined() -> None:
    old = sticky_orders("{orders: 30, payments: 10, monolith: 60}")
    new = sticky_orders("{orders: 10, payments: 50, monolith: 40}")
    split = only_changed(diff(old, new))["split"]
    # orders [0,3000) payments [3000,4000) -> orders [0,1000) payments [1000,6000)
    assert split["moves"] == [
        {"from": "orders", "to": "payments", "share": 0.2},
        {"from": "monolith", "to": "payments", "share": 0.2},
    ]
    assert "20% of users move orders -> payments; 20% of users move monolith -> payments" in render(
        diff(old, new)
    )


def test_reordering_a_sticky_split_moves_users_even_with_the_same_weights() -> None:
    old = sticky_orders("{orders: 20, payments: 10, monolith: 70}")
    new = sticky_orders("{payments: 10, orders: 20, monolith: 70}")
    split = only_changed(diff(old, new))["split"]
    assert split["moves"] == [
        {"from": "orders", "to": "payments", "share": 0.1},
        {"from": "payments", "to": "orders", "share": 0.1},
    ]
    assert "(unchanged)" in render(diff(old, new))


def test_without_sticky_the_shares_are_of_requests() -> None:
    def route(split: str) -> Config:
        return config(f"- {{name: orders, match: {{prefix: /api/orders}}, split: {split}}}\n")

    changes = diff(route("{orders: 10, monolith: 90}"), route("{orders: 25, monolith: 75}"))
    split = only_changed(changes)["split"]
    assert split["basis"] == "requests"
    assert split["notes"] == [
        "no sticky: each request is placed at random, so shares are of requests, not users"
    ]
    assert "orders: 10% -> 25%, 15% of requests move monolith -> orders" in render(changes)
    # Without sticky, the order of the backends changes nothing.
    same = diff(
        route("{orders: 10, payments: 10, monolith: 80}"),
        route("{payments: 10, orders: 10, monolith: 80}"),
    )
    assert same["changed"] is False


def test_sticky_source_change_rebuckets_everyone() -> None:
    old = sticky_orders("{orders: 10, monolith: 90}", sticky="{cookie: sid}")
    new = sticky_orders("{orders: 10, monolith: 90}", sticky="{header: X-User-Id}")
    entry = only_changed(diff(old, new))
    split = entry["split"]
    assert "sticky: cookie sid -> header X-User-Id" in entry["changes"]
    assert split["expected"] is True
    assert split["moves"] == [
        {"from": "orders", "to": "monolith", "share": 0.09},
        {"from": "monolith", "to": "orders", "share": 0.09},
    ]
    assert split["warnings"][0] == (
        "sticky key changes (cookie sid -> header X-User-Id): every user is re-bucketed; "
        "about 18% of users land on another backend"
    )
    assert "about 9% of users move back to legacy (orders -> monolith)" in split["warnings"]
    # The header name's case does not change the key.
    same = sticky_orders("{orders: 10, monolith: 90}", sticky="{header: x-user-id}")
    assert diff(new, same)["changed"] is False


def test_sticky_removed_is_a_warning() -> None:
    old = sticky_orders("{orders: 10, monolith: 90}")
    new = config(
        "- {name: orders, match: {prefix: /api/orders}, split: {orders: 10, monolith: 90}}\n"
    )
    split = only_changed(diff(old, new))["split"]
    assert split["moves"] == []
    assert split["warnings"] == [
        "sticky removed: users no longer stay on one backend, each request is placed at random"
    ]


def test_legacy_change_lays_each_side_out_with_its_own_legacy() -> None:
    old = sticky_orders("{orders: 10, monolith: 90}")
    new = load_text(
        BACKENDS.replace("legacy: monolith", "legacy: orders")
        + "routes:\n  - {name: orders, match: {prefix: /api/orders}, "
        "split: {orders: 10, monolith: 90}, sticky: {cookie: sid}}\n",
        "x.yaml",
    )
    changes = diff(old, new)
    assert changes["legacy"] == {"old": "monolith", "new": "orders"}
    split = only_changed(changes)["split"]
    assert split["buckets"]["new"] == {"monolith": [0, 9000], "orders": [9000, 10000]}
    assert split["moves"] == [
        {"from": "orders", "to": "monolith", "share": 0.1},
        {"from": "monolith", "to": "orders", "share": 0.1},
    ]


def test_policy_change_in_defaults_shows_on_every_route_it_reaches() -> None:
    routes = """\
        - {name: orders, match: {prefix: /api/orders}, backend: orders}
        - {name: pay, match: {prefix: /api/pay}, backend: payments, timeout: {read: 3.0}}
        - {name: cart, match: {prefix: /api/cart}, backend: orders, timeout: {read: 2.0}}
        """
    old = config(routes, "defaults: {timeout: {read: 10.0}}\n")
    new = config(routes.replace("read: 2.0", "read: 4.0"), "defaults: {timeout: {read: 5.0}}\n")
    changes = diff(old, new)
    assert changes["defaults"] == ["timeout.read: 10.0 -> 5.0"]
    by_route = {e["route"]: e["changes"] for e in changes["routes"]["changed"]}
    assert by_route == {
        "orders": ["timeout.read: 10.0 -> 5.0 (from defaults)"],
        "cart": ["timeout.read: 2.0 -> 4.0 (effective, after defaults)"],
    }
    text = render(changes)
    assert "  orders:\n    timeout.read: 10.0 -> 5.0 (from defaults)" in text
    assert "Defaults (every route that does not set its own):\n  timeout.read: 10.0 -> 5.0" in text


def test_moving_a_value_from_defaults_into_the_route_changes_nothing() -> None:
    old = config(
        "- {name: orders, match: {prefix: /api/orders}, backend: orders}\n",
        "defaults: {retry: {attempts: 3}}\n",
    )
    new = config(
        "- {name: orders, match: {prefix: /api/orders}, split: {orders: 100}, "
        "retry: {attempts: 3}}\n"
    )
    changes = diff(old, new)
    assert changes["defaults"] == ["retry.attempts: 3 -> 2"]
    assert changes["routes"]["changed"] == []


def test_match_and_route_settings_are_compared() -> None:
    old = config("- {name: orders, match: {prefix: /api/orders}, backend: orders}\n")
    new = config(
        "- {name: orders, match: {prefix: /api/order, methods: [get]}, backend: orders, "
        "fallback: monolith, max_body: 1MiB}\n"
    )
    assert only_changed(diff(old, new))["changes"] == [
        "match.prefix: /api/orders -> /api/order",
        "match.methods: (none) -> [GET]",
        "fallback: (none) -> monolith",
        "max_body: (none) -> 1MiB (effective, after defaults)",
    ]


def test_added_and_removed_routes_say_where_their_requests_go() -> None:
    old = config(
        """\
        - {name: orders, match: {prefix: /api/orders}, backend: orders}
        - {name: pay, match: {prefix: /api/pay}, backend: payments}
        """
    )
    new = config(
        """\
        - {name: orders, match: {prefix: /api/orders}, backend: orders}
        - {name: export, match: {prefix: /api/orders/export}, backend: monolith}
        """
    )
    changes = diff(old, new)
    [added] = changes["routes"]["added"]
    [removed] = changes["routes"]["removed"]
    assert added["route"] == "export"
    assert added["was"] == {"route": "orders", "split": {"orders": 100}}
    assert added["warnings"] == [
        "requests to /api/orders/export now go back to legacy monolith (they reached orders 100%)"
    ]
    assert removed["route"] == "pay"
    assert removed["now"] == {"route": "default", "split": {"monolith": 100}}
    assert changes["routes"]["renamed"] == []
    text = render(changes)
    assert "Routes added:\n  + export: /api/orders/export -> monolith 100%" in text
    assert "Routes removed:\n  - pay: /api/pay -> payments 100%" in text
    assert "WARNING: requests to /api/pay now go back to legacy monolith" in text


def test_a_renamed_route_is_removed_plus_added_and_rebuckets_its_users() -> None:
    old = sticky_orders("{orders: 50, monolith: 50}", name="orders")
    new = sticky_orders("{orders: 50, monolith: 50}", name="orders-v2")
    changes = diff(old, new)
    assert [e["route"] for e in changes["routes"]["removed"]] == ["orders"]
    assert [e["route"] for e in changes["routes"]["added"]] == ["orders-v2"]
    [renamed] = changes["routes"]["renamed"]
    assert (renamed["from"], renamed["to"]) == ("orders", "orders-v2")
    assert renamed["warnings"] == [
        "route orders renamed to orders-v2: sticky buckets are keyed by route name, so all its "
        "users are re-bucketed; about 50% of users land on another backend"
    ]


def test_route_order_matters_among_equal_prefixes() -> None:
    a = "- {name: a, match: {prefix: /x, methods: [GET]}, backend: orders}\n"
    b = "- {name: b, match: {prefix: /x, host: shop.example}, backend: monolith}\n"
    changes = diff(config(a + b), config(b + a))
    assert only_changed(changes)["changes"] == [
        "order: now before route a (same prefix /x and as many conditions: the earlier in the "
        "file wins)"
    ]


def test_backends_and_other_settings() -> None:
    route = "- {name: orders, match: {prefix: /api/orders}, backend: orders}\n"
    old = config(route)
    text = (
        BACKENDS.replace('8002"}', '8012", max_connections: 5}').replace(
            '  payments: {url: "http://127.0.0.1:8003"}\n', ""
        )
        + "listen: {port: 8081}\ntrusted_proxies: [10.0.0.0/8]\nroutes:\n  "
        + route
    )
    changes = diff(old, load_text(text, "x.yaml"))
    assert changes["backends"] == {
        "added": [],
        "removed": [{"backend": "payments", "url": "http://127.0.0.1:8003"}],
        "changed": [
            {
                "backend": "orders",
                "changes": [
                    "url: http://127.0.0.1:8002 -> http://127.0.0.1:8012",
                    "max_connections: 100 -> 5",
                ],
            }
        ],
    }
    assert changes["other"] == ["listen.port: 8080 -> 8081", "trusted_proxies: [] -> [10.0.0.0/8]"]
    assert changes["routes"]["changed"] == []


def test_identical_configs_do_not_change() -> None:
    old = sticky_orders("{orders: 10, monolith: 90}")
    changes = diff(old, sticky_orders("{orders: 10, monolith: 90}"))
    assert changes["changed"] is False
    assert render(changes) == "No changes."
    json.dumps(changes)


def test_render_report_lines() -> None:
    old = sticky_orders("{orders: 25, monolith: 75}")
    new = sticky_orders("{orders: 10, monolith: 90}")
    changes = diff(old, new)
    json.dumps(changes)
    assert render(changes).splitlines() == [
        "strangler diff: routes: 1 changed; 1 warning(s)",
        "",
        "Routes changed:",
        "  orders: 25% -> 10%, 15% of users move orders -> monolith",
        "    WARNING: 15% of users move back to legacy (orders -> monolith)",
    ]


def test_fractional_shares_have_one_decimal() -> None:
    old = sticky_orders("{orders: 15, monolith: 85}", sticky="{cookie: a}")
    new = sticky_orders("{orders: 25, monolith: 75}", sticky="{cookie: b}")
    # 15% x 75% = 11.25% and 85% x 25% = 21.25%, expected when every user is re-bucketed
    text = render(diff(old, new))
    assert (
        "orders: 15% -> 25%, about 11.2% of users move orders -> monolith; "
        "about 21.2% of users move monolith -> orders"
    ) in text
