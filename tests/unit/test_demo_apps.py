"""The demo apps: pages and APIs answer, say who served them, validate input, obey chaos."""

from __future__ import annotations

import random
import warnings
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from proxy.demo import APPS, DEFAULT_PORTS, monolith, orders
from proxy.demo.chaos import Chaos

with warnings.catch_warnings():
    # Starlette's TestClient prefers httpx2 and warns on import when it finds only httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

BOTH = ["monolith", "orders"]
GOOD_ORDER = {"customer": "ada", "items": [{"product_id": 3, "qty": 2}, {"product_id": 9}]}


def make_client(name: str, chaos: Chaos | None = None) -> TestClient:
    module = monolith if name == "monolith" else orders
    return TestClient(module.create_app(chaos=chaos))


def served_by(response: Any, name: str) -> None:
    assert response.headers["x-served-by"] == name
    if response.headers["content-type"].startswith("application/"):
        assert response.json()["served_by"] == name


def test_registry_names_both_apps_and_their_ports() -> None:
    assert set(APPS) == set(DEFAULT_PORTS) == {"monolith", "orders"}
    assert DEFAULT_PORTS == {"monolith": 8001, "orders": 8002}
    assert all(isinstance(create(), Starlette) for create in APPS.values())


def test_monolith_home_page_lists_products_and_fetches_orders() -> None:
    response = make_client("monolith").get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    served_by(response, "monolith")
    page = response.text
    assert "Legacy Shop" in page and "Cast-iron skillet" in page
    assert 'name=viewport content="width=device-width' in page.replace("'", '"')
    assert "fetch(url" in page and '"/api/orders"' in page and "/api/checkout" in page
    assert "<script src" not in page and "http://" not in page and "https://" not in page


def test_monolith_product_pages() -> None:
    client = make_client("monolith")
    listing = client.get("/products")
    assert listing.status_code == 200 and listing.text.count("class=card") == 12
    detail = client.get("/products/1")
    assert detail.status_code == 200 and "Sears like a dream." in detail.text
    missing = client.get("/products/999")
    assert missing.status_code == 404 and "No such product" in missing.text
    served_by(missing, "monolith")


def test_monolith_unknown_page_is_html_and_unknown_api_is_problem_json() -> None:
    client = make_client("monolith")
    page = client.get("/nowhere")
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    api = client.get("/api/nowhere")
    assert api.status_code == 404
    assert api.headers["content-type"] == "application/problem+json"
    served_by(api, "monolith")


def test_monolith_product_and_review_apis() -> None:
    client = make_client("monolith")
    products = client.get("/api/products")
    assert products.status_code == 200 and products.json()["count"] == 12
    served_by(products, "monolith")
    kitchen = client.get("/api/products", params={"category": "kitchen"}).json()
    assert {p["category"] for p in kitchen["products"]} == {"kitchen"}
    assert client.get("/api/products/2").json()["name"] == "Pour-over kettle"
    assert client.get("/api/products/99").status_code == 404
    reviews = client.get("/api/reviews", params={"product_id": 1})
    assert reviews.json()["count"] == 2
    served_by(reviews, "monolith")
    assert client.get("/api/reviews").json()["count"] == 7
    assert client.get("/api/reviews", params={"product_id": "x"}).status_code == 422


@pytest.mark.parametrize("name", BOTH)
def test_health(name: str) -> None:
    response = make_client(name).get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    served_by(response, name)


def test_orders_readiness() -> None:
    response = make_client("orders").get("/health/ready")
    assert response.status_code == 200 and response.json()["status"] == "ready"
    served_by(response, "orders")


@pytest.mark.parametrize("name", BOTH)
def test_order_list_says_who_and_when(name: str) -> None:
    response = make_client(name).get("/api/orders")
    assert response.status_code == 200
    served_by(response, name)
    body = response.json()
    assert body["count"] == len(body["orders"]) == 7
    assert body["generated_at"].endswith("+00:00")


def test_both_apps_hold_the_same_seed_orders() -> None:
    def without_differences(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k not in ("served_by", "generated_at")}

    legacy, extracted = make_client("monolith"), make_client("orders")
    lists = [without_differences(c.get("/api/orders").json()) for c in (legacy, extracted)]
    assert lists[0] == lists[1]
    one = [without_differences(c.get("/api/orders/1003").json()) for c in (legacy, extracted)]
    assert one[0] == one[1]
    assert one[0]["total_cents"] == 4200 + 3 * 950


@pytest.mark.parametrize("name", BOTH)
def test_missing_order_is_404_problem_json(name: str) -> None:
    client = make_client(name)
    for path in ("/api/orders/4242", "/api/orders/abc"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 404
        served_by(response, name)


@pytest.mark.parametrize("name", BOTH)
def test_wrong_method_is_405_with_allow(name: str) -> None:
    response = make_client(name).delete("/api/orders")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    served_by(response, name)


@pytest.mark.parametrize(("name", "first_id"), [("monolith", 5001), ("orders", 9001)])
def test_create_order_then_read_it(name: str, first_id: int) -> None:
    client = make_client(name)
    response = client.post("/api/orders", json=GOOD_ORDER)
    assert response.status_code == 201
    served_by(response, name)
    order = response.json()
    assert order["id"] == first_id and order["status"] == "pending"
    assert order["total_cents"] == 2 * 5900 + 950
    assert response.headers["location"] == f"/api/orders/{first_id}"
    assert client.get(f"/api/orders/{first_id}").json()["customer"] == "ada"
    assert client.get("/api/orders").json()["count"] == 8


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"items": [{"product_id": 1}]}', "customer"),
        (b'{"customer": "ada", "items": []}', "items"),
        (b'{"customer": "ada", "items": [{"product_id": 99}]}', "items[0].product_id"),
        (b'{"customer": "ada", "items": [{"product_id": 1, "qty": 0}]}', "items[0].qty"),
        (b'{"customer": "ada", "items": [{"product_id": true}]}', "items[0].product_id"),
        (b'{"customer": "ada", "items": ["x"]}', "items[0]"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-customer",
        "no-items",
        "unknown-product",
        "zero-qty",
        "bool-product",
        "item-not-object",
    ],
)
def test_bad_order_is_422_problem_json(name: str, body: bytes, field: str) -> None:
    client = make_client(name)
    headers = {"content-type": "application/json"}
    for path in ("/api/orders", "/api/checkout"):
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 422 and problem["title"].startswith("Unprocessable")
        assert field in [error["field"] for error in problem["errors"]]
        served_by(response, name)
    assert client.get("/api/orders").json()["count"] == 7


@pytest.mark.parametrize("name", BOTH)
def test_checkout_creates_a_paid_order(name: str) -> None:
    client = make_client(name)
    response = client.post("/api/checkout", json=GOOD_ORDER)
    assert response.status_code == 201
    served_by(response, name)
    body = response.json()
    assert body["order"]["status"] == "paid" and "is paid" in body["message"]
    assert client.get(f"/api/orders/{body['order']['id']}").status_code == 200


@pytest.mark.parametrize("name", BOTH)
def test_fail_rate_one_answers_503_until_reset(name: str) -> None:
    client = make_client(name)
    assert client.post("/_demo/fail", params={"rate": "1.0"}).status_code == 200
    for path in ("/api/orders", "/health"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        served_by(response, name)
    assert client.get("/_demo").json()["chaos"]["fail_rate"] == 1.0
    assert client.post("/_demo/reset").json()["chaos"]["fail_rate"] == 0.0
    assert client.get("/api/orders").status_code == 200


def test_fail_can_use_another_status() -> None:
    client = make_client("orders")
    client.post("/_demo/fail", params={"rate": "1", "status": "500"})
    assert client.get("/api/orders").status_code == 500


def test_fail_rate_is_a_fraction_of_requests() -> None:
    client = make_client("orders", Chaos(rng=random.Random(7)))
    client.post("/_demo/fail", params={"rate": "0.5"})
    statuses = [client.get("/api/orders/1001").status_code for _ in range(200)]
    assert set(statuses) == {200, 503}
    assert 60 < statuses.count(503) < 140


def test_delay_waits_before_every_answer_but_the_knobs() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    client = make_client("orders", Chaos(sleep=fake_sleep))
    assert client.post("/_demo/delay", params={"ms": "300"}).json()["chaos"]["delay_ms"] == 300
    assert client.get("/api/orders").status_code == 200
    assert client.get("/health/ready").status_code == 200
    assert slept == [0.3, 0.3]
    client.post("/_demo/reset")
    client.get("/api/orders")
    assert slept == [0.3, 0.3]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/_demo/fail", {"rate": "1.5"}),
        ("/_demo/fail", {"rate": "lots"}),
        ("/_demo/fail", {"rate": "nan"}),
        ("/_demo/fail", {"rate": "1", "status": "404"}),
        ("/_demo/delay", {"ms": "-1"}),
        ("/_demo/delay", {"ms": "soon"}),
    ],
)
def test_bad_chaos_settings_are_refused(path: str, params: dict[str, str]) -> None:
    client = make_client("orders")
    response = client.post(path, params=params)
    assert response.status_code == 422
    served_by(response, "orders")
    assert client.get("/_demo").json()["chaos"] == {
        "fail_rate": 0.0,
        "fail_status": 503,
        "delay_ms": 0,
    }
