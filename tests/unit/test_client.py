from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx

from proxy.client import (
    UsageError,
    admin_base,
    format_status,
    format_time,
    parse_weights,
    set_split,
    shadow_summary,
    status,
)

ADMIN = "http://127.0.0.1:9901"
TOKEN_ENV = "STRANGLER_TEST_ADMIN_TOKEN"
TOKEN = "s3cret-token-value"

ROUTES: dict[str, Any] = {
    "routes": [
        {
            "name": "orders",
            "match": {"prefix": "/api/orders", "methods": ["GET", "POST"], "host": "shop.test"},
            "split": {"orders": 0, "monolith": 100},
            "override": {"orders": 0, "monolith": 100},
            "backends": {
                "orders": {
                    "breaker": "open",
                    "requests": 72,
                    "rps": 1.2,
                    "error_rate": 0.125,
                    "p95_ms": 340.0,
                    "up": False,
                },
                "monolith": {
                    "breaker": "closed",
                    "requests": 216,
                    "rps": 3.6,
                    "error_rate": 0.0,
                    "p95_ms": 85.5,
                    "up": True,
                },
            },
            "bulkhead": {"in_flight": 3, "queued": 2, "max_concurrent": 50},
            "shadow": {"match": 980, "mismatch": 20, "error": 3, "recent_mismatches": []},
            "fallback": None,
        },
        {
            "name": "catalog",
            "match": {"prefix": "/api/catalog"},
            "split": {"catalog": 25, "monolith": 75},
            "override": None,
            "backends": {
                "catalog": {
                    "breaker": "half-open",
                    "requests": 30,
                    "rps": 0.5,
                    "error_rate": 0.0333,
                    "p95_ms": 12.25,
                    "up": None,
                },
                "monolith": {
                    "breaker": "closed",
                    "requests": 90,
                    "rps": 1.5,
                    "error_rate": 0.0,
                    "p95_ms": 90.0,
                    "up": True,
                },
            },
            "bulkhead": {"in_flight": 0, "queued": 0, "max_concurrent": 100},
            "fallback": None,
        },
    ],
    "migrated_share": 0.375,
    "legacy": "monolith",
    "last_reload": {
        "time": 1714564800.25,
        "result": "failure",
        "errors": ["strangler.yaml:12: split must sum to 100", "strangler.yaml:20: unknown"],
    },
}


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


# --- status -------------------------------------------------------------------------------


@respx.mock
def test_status_prints_a_table_of_routes_backends_and_totals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    respx.get(f"{ADMIN}/api/routes").mock(return_value=httpx.Response(200, json=ROUTES))

    assert status(ADMIN) == 0

    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert "orders  /api/orders GET,POST host=shop.test  orders 0% / monolith 100% (override)" in (
        lines
    )
    assert "catalog  /api/catalog  catalog 25% / monolith 75%" in lines
    assert "(override)" not in out.split("catalog  /api/catalog")[1]
    orders_row = next(line for line in lines if line.split()[:1] == ["orders"] and "open" in line)
    assert orders_row.split() == ["orders", "open", "!", "1.20", "12.5", "340.0", "no"]
    half_open = next(line for line in lines if "half-open" in line)
    assert half_open.split() == ["catalog", "half-open", "0.50", "3.3", "12.2", "-"]
    assert "bulkhead 3/50 (+2 queued)" in out
    assert "bulkhead 0/100" in out and "bulkhead 0/100 (+" not in out
    assert "shadow match rate 98.0% (980 match, 20 mismatch; 3 errors)" in out
    assert out.count("shadow ") == 1  # only the route that has a shadow
    assert "migrated share: 37.5% of requests served by new services (last 60 s)" in lines
    assert (
        "last reload: 2024-05-01T12:00:00Z failure: strangler.yaml:12: split must sum to 100"
        " (+1 more)"
    ) in lines


def test_status_columns_line_up_across_routes() -> None:
    lines = format_status(ROUTES).splitlines()
    headers = [line for line in lines if line.lstrip().startswith("BACKEND")]
    assert len(headers) == 2 and headers[0] == headers[1]
    rps_end = headers[0].index("RPS") + len("RPS")
    rows = [line for line in lines if line.startswith("  ") and line.split()[0] != "BACKEND"]
    for row in (r for r in rows if "bulkhead" not in r):
        assert row[:rps_end].endswith(("0", "5")), row


def test_status_without_routes_and_a_successful_reload() -> None:
    text = format_status(
        {"routes": [], "migrated_share": 0.0, "last_reload": {"time": 0, "result": "success"}}
    )
    assert text.splitlines() == [
        "no routes",
        "",
        "migrated share: 0.0% of requests served by new services (last 60 s)",
        "last reload: 1970-01-01T00:00:00Z success",
    ]


@respx.mock
def test_status_json_passes_the_answer_through(capsys: pytest.CaptureFixture[str]) -> None:
    respx.get(f"{ADMIN}/api/routes").mock(return_value=httpx.Response(200, json=ROUTES))

    assert status(ADMIN + "/", as_json=True) == 0

    out, _ = capsys.readouterr()
    assert json.loads(out) == ROUTES


@respx.mock
def test_status_unreachable_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    route = respx.get(f"{ADMIN}/api/routes").mock(
        side_effect=httpx.ConnectError("[Errno 111] Connection refused")
    )

    assert status(ADMIN) == 1

    out, err = capsys.readouterr()
    assert route.called
    assert out == ""
    assert err == (
        f"strangler status: cannot reach the admin API at {ADMIN}: connection refused"
        " - is strangler running? (use --admin URL)\n"
    )


@respx.mock
def test_status_timeout_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    respx.get(f"{ADMIN}/api/routes").mock(side_effect=httpx.ReadTimeout("timed out"))

    assert status(ADMIN) == 1

    assert "no answer within 5 s" in capsys.readouterr().err


@respx.mock
def test_status_non_200_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    respx.get(f"{ADMIN}/api/routes").mock(return_value=httpx.Response(503, text="draining"))

    assert status(ADMIN) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"strangler status: the admin API at {ADMIN} answered 503 Service Unavailable: draining"
    )


@respx.mock
def test_status_non_json_answer_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    respx.get(f"{ADMIN}/api/routes").mock(return_value=httpx.Response(200, text="<html>"))

    assert status(ADMIN) == 1
    assert "did not answer JSON" in capsys.readouterr().err


def test_admin_base_adds_a_scheme_and_drops_the_slash() -> None:
    assert admin_base("127.0.0.1:9901/") == "http://127.0.0.1:9901"
    assert admin_base("https://admin.test/") == "https://admin.test"


def test_shadow_summary_without_comparisons() -> None:
    assert shadow_summary({"match": 0, "mismatch": 0, "error": 1}) == (
        "match rate - (0 match, 0 mismatch; 1 error)"
    )


def test_format_time_keeps_strings() -> None:
    assert format_time("2024-05-01T12:00:00Z") == "2024-05-01T12:00:00Z"
    assert format_time(None) == "-"


# --- split --------------------------------------------------------------------------------


def test_parse_weights_keeps_the_order() -> None:
    assert parse_weights(["orders=0", "monolith = 100"]) == {"orders": 0, "monolith": 100}
    assert list(parse_weights(["b=50", "a=50"])) == ["b", "a"]


@pytest.mark.parametrize(
    "items",
    [["orders"], ["orders=abc"], ["=10"], ["orders=-1"], ["orders=101"], ["a=1", "a=2"], []],
)
def test_parse_weights_refuses_malformed_items(items: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_weights(items)


@respx.mock
def test_split_posts_the_weights_with_the_token(
    token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    route = respx.post(f"{ADMIN}/api/routes/checkout/split").mock(
        return_value=httpx.Response(
            200,
            json={"route": "checkout", "split": {"orders": 0, "monolith": 100}, "override": True},
        )
    )

    assert set_split(ADMIN, "checkout", ["orders=0", "monolith=100"], TOKEN_ENV) == 0

    assert route.call_count == 1
    request = route.calls.last.request
    assert json.loads(request.content) == {"orders": 0, "monolith": 100}
    assert request.headers["Authorization"] == f"Bearer {token}"
    assert request.headers["Content-Type"] == "application/json"
    out, err = capsys.readouterr()
    assert out == "checkout: orders 0% / monolith 100% (live override until the next reload)\n"
    assert err == ""
    assert token not in out + err


@respx.mock
def test_split_clear_sends_delete(token: str, capsys: pytest.CaptureFixture[str]) -> None:
    post = respx.post(f"{ADMIN}/api/routes/checkout/split")
    delete = respx.delete(f"{ADMIN}/api/routes/checkout/split").mock(
        return_value=httpx.Response(
            200, json={"route": "checkout", "split": None, "override": False}
        )
    )

    assert set_split(ADMIN, "checkout", [], TOKEN_ENV, clear=True) == 0

    assert delete.call_count == 1 and not post.called
    assert delete.calls.last.request.headers["Authorization"] == f"Bearer {token}"
    assert delete.calls.last.request.content == b""
    assert capsys.readouterr().out == (
        "checkout: override cleared, the configured split applies again\n"
    )


@respx.mock
def test_split_clear_with_weights_is_a_usage_error(
    token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert set_split(ADMIN, "checkout", ["orders=0"], TOKEN_ENV, clear=True) == 2
    assert "--clear takes no BACKEND=PCT" in capsys.readouterr().err
    assert not respx.calls


@respx.mock
def test_split_without_token_makes_no_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    route = respx.post(f"{ADMIN}/api/routes/checkout/split")

    assert set_split(ADMIN, "checkout", ["orders=0", "monolith=100"], TOKEN_ENV) == 1

    assert not route.called and not respx.calls
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"strangler split: set ${TOKEN_ENV} to the admin token\n"


@respx.mock
@pytest.mark.parametrize("items", [["orders"], ["orders=abc"], ["orders=0", "orders=100"]])
def test_split_malformed_weights_exit_2_without_a_request(
    items: list[str], token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert set_split(ADMIN, "checkout", items, TOKEN_ENV) == 2

    assert not respx.calls
    err = capsys.readouterr().err
    assert err.startswith("strangler split: ") and err.count("\n") == 1


@respx.mock
def test_split_401_prints_the_problem_detail(
    token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    respx.post(f"{ADMIN}/api/routes/checkout/split").mock(
        return_value=httpx.Response(
            401,
            json={
                "type": "about:blank",
                "status": 401,
                "title": "Unauthorized",
                "detail": "a valid 'Authorization: Bearer TOKEN' is required",
            },
            headers={"Content-Type": "application/problem+json"},
        )
    )

    assert set_split(ADMIN, "checkout", ["orders=0", "monolith=100"], TOKEN_ENV) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "strangler split: refused: 401 Unauthorized:"
        " a valid 'Authorization: Bearer TOKEN' is required\n"
    )
    assert token not in err


@respx.mock
def test_split_400_prints_detail_and_errors(token: str, capsys: pytest.CaptureFixture[str]) -> None:
    respx.post(f"{ADMIN}/api/routes/checkout/split").mock(
        return_value=httpx.Response(
            400,
            json={
                "type": "about:blank",
                "status": 400,
                "title": "Invalid split",
                "detail": "the percentages sum to 90, not 100",
                "errors": ["orders: 40", "monolith: 50"],
            },
        )
    )

    assert set_split(ADMIN, "checkout", ["orders=40", "monolith=50"], TOKEN_ENV) == 1

    err = capsys.readouterr().err
    assert err.splitlines() == [
        "strangler split: refused: 400 Invalid split: the percentages sum to 90, not 100",
        "  orders: 40",
        "  monolith: 50",
    ]


@respx.mock
def test_split_404_names_the_route(token: str, capsys: pytest.CaptureFixture[str]) -> None:
    respx.post(f"{ADMIN}/api/routes/nope/split").mock(
        return_value=httpx.Response(
            404, json={"status": 404, "title": "Not found", "detail": "no route named 'nope'"}
        )
    )

    assert set_split(ADMIN, "nope", ["orders=0", "monolith=100"], TOKEN_ENV) == 1
    assert "404 Not found: no route named 'nope'" in capsys.readouterr().err


@respx.mock
def test_split_unreachable_exits_1(token: str, capsys: pytest.CaptureFixture[str]) -> None:
    respx.post(f"{ADMIN}/api/routes/checkout/split").mock(
        side_effect=httpx.ConnectError("[Errno 111] Connection refused")
    )

    assert set_split(ADMIN, "checkout", ["orders=0", "monolith=100"], TOKEN_ENV) == 1

    err = capsys.readouterr().err
    assert err == (
        f"strangler split: cannot reach the admin API at {ADMIN}: connection refused"
        " - is strangler running? (use --admin URL)\n"
    )
    assert token not in err


@respx.mock
def test_split_quotes_the_route_name(token: str) -> None:
    route = respx.post(f"{ADMIN}/api/routes/a%2Fb/split").mock(
        return_value=httpx.Response(200, json={"split": {"x": 100}})
    )
    assert set_split(ADMIN, "a/b", ["x=100"], TOKEN_ENV) == 0
    assert route.called
