"""The Legacy Shop's data and order rules, shared by both demo apps as if by one database.

Both apps start from the same catalogue and the same seed orders, so a shadow comparison
between them matches except on the keys that differ on purpose: `served_by` (which app
answered) and `generated_at` (when an order list was made). Orders created at run time get
ids from a range of each app's own, so one id never names two different orders.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypedDict

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class Product(TypedDict):
    id: int
    name: str
    category: str
    price_cents: int
    description: str


class Review(TypedDict):
    id: int
    product_id: int
    author: str
    rating: int
    text: str


class OrderItem(TypedDict):
    product_id: int
    name: str
    qty: int
    price_cents: int


class Order(TypedDict):
    id: int
    customer: str
    status: str
    items: list[OrderItem]
    total_cents: int
    created_at: str


_CATALOGUE = (
    ("Cast-iron skillet", "kitchen", 3490, "Pre-seasoned, 26 cm, outlives its owner."),
    ("Pour-over kettle", "kitchen", 4200, "Gooseneck spout, 1 litre, any hob."),
    ("Chef's knife", "kitchen", 5900, "20 cm carbon steel; keep it dry."),
    ("Linen tea towels", "kitchen", 1250, "Set of three, stonewashed."),
    ("Wool blanket", "home", 8900, "Merino, 130 x 180 cm, moth-proofed."),
    ("Desk lamp", "home", 6400, "Warm LED, dimmable, steel arm."),
    ("Ceramic planter", "home", 2300, "18 cm, drainage hole and saucer."),
    ("Scented candle", "home", 1800, "Cedar and fig, 40 hours."),
    ("Notebook", "paper", 950, "A5 dot grid, 192 pages, lies flat."),
    ("Fountain pen", "paper", 3200, "Steel nib, converter included."),
    ("Wall calendar", "paper", 1500, "Twelve riso prints, one per month."),
    ("Postcard set", "paper", 700, "Ten city views from the archive."),
)
PRODUCTS: Mapping[int, Product] = {
    n: Product(id=n, name=name, category=cat, price_cents=price, description=text)
    for n, (name, cat, price, text) in enumerate(_CATALOGUE, start=1)
}
REVIEWS: tuple[Review, ...] = (
    Review(id=1, product_id=1, author="ada", rating=5, text="Sears like a dream."),
    Review(id=2, product_id=1, author="linus", rating=4, text="Heavy, as it should be."),
    Review(id=3, product_id=2, author="grace", rating=5, text="Precise pour every morning."),
    Review(id=4, product_id=5, author="alan", rating=5, text="Warm and not itchy."),
    Review(id=5, product_id=6, author="barbara", rating=3, text="Nice light, wobbly base."),
    Review(id=6, product_id=9, author="ken", rating=4, text="Paper takes ink well."),
    Review(id=7, product_id=10, author="ada", rating=5, text="Writes first time."),
)
_SEED_ORDERS = (
    (1001, "ada", "delivered", ((1, 1), (4, 2)), "2024-05-02T09:14:00+00:00"),
    (1002, "linus", "delivered", ((3, 1),), "2024-05-03T17:40:00+00:00"),
    (1003, "grace", "shipped", ((2, 1), (9, 3)), "2024-05-06T08:05:00+00:00"),
    (1004, "alan", "shipped", ((5, 1),), "2024-05-07T12:30:00+00:00"),
    (1005, "barbara", "paid", ((6, 1), (7, 2), (8, 1)), "2024-05-08T19:02:00+00:00"),
    (1006, "ken", "paid", ((10, 1), (11, 1)), "2024-05-09T10:11:00+00:00"),
    (1007, "ada", "pending", ((12, 4),), "2024-05-10T14:45:00+00:00"),
)
MAX_QTY = 99
MAX_ITEMS = 50


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def make_order(
    order_id: int, *, customer: str, items: list[OrderItem], status: str, created_at: str
) -> Order:
    total = sum(item["qty"] * item["price_cents"] for item in items)
    return Order(
        id=order_id,
        customer=customer,
        status=status,
        items=items,
        total_cents=total,
        created_at=created_at,
    )


def _item(product_id: int, qty: int) -> OrderItem:
    product = PRODUCTS[product_id]
    return OrderItem(
        product_id=product_id, name=product["name"], qty=qty, price_cents=product["price_cents"]
    )


class OrderBook:
    """One app's orders: the seed orders, then those created from `first_new_id` on."""

    def __init__(self, *, first_new_id: int) -> None:
        self.next_id = first_new_id
        self.orders: dict[int, Order] = {
            oid: make_order(
                oid, customer=who, items=[_item(p, q) for p, q in items], status=st, created_at=at
            )
            for oid, who, st, items, at in _SEED_ORDERS
        }

    def all(self) -> list[Order]:
        return [self.orders[oid] for oid in sorted(self.orders)]

    def create(self, *, customer: str, items: list[OrderItem], status: str) -> Order:
        order = make_order(
            self.next_id, customer=customer, items=items, status=status, created_at=now_iso()
        )
        self.orders[order["id"]] = order
        self.next_id += 1
        return order


class InvalidOrder(Exception):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("invalid order")
        self.errors = errors


async def read_order(request: Request) -> tuple[str, list[OrderItem]]:
    """`{"customer": "ada", "items": [{"product_id": 3, "qty": 1}]}` -> (customer, items)."""
    try:
        body = await request.json()
    except ValueError:
        raise InvalidOrder([{"field": "body", "message": "must be JSON"}]) from None
    return parse_order(body)


def parse_order(body: object) -> tuple[str, list[OrderItem]]:
    if not isinstance(body, dict):
        raise InvalidOrder([{"field": "body", "message": "must be a JSON object"}])
    errors: list[dict[str, str]] = []
    customer = body.get("customer")
    if not isinstance(customer, str) or not 0 < len(customer.strip()) <= 64:
        errors.append({"field": "customer", "message": "must be a name of 1 to 64 characters"})
    raw_items = body.get("items")
    items: list[OrderItem] = []
    if not isinstance(raw_items, list) or not 0 < len(raw_items) <= MAX_ITEMS:
        errors.append({"field": "items", "message": f"must be a list of 1 to {MAX_ITEMS} items"})
    else:
        for n, raw in enumerate(raw_items):
            item = _parse_item(raw, f"items[{n}]", errors)
            if item is not None:
                items.append(item)
    if errors:
        raise InvalidOrder(errors)
    assert isinstance(customer, str)
    return customer.strip(), items


def _whole(value: object, low: int, high: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def _parse_item(raw: object, where: str, errors: list[dict[str, str]]) -> OrderItem | None:
    if not isinstance(raw, dict):
        errors.append({"field": where, "message": 'must be {"product_id": N, "qty": N}'})
        return None
    product_id = _whole(raw.get("product_id"), 1, 2**31)
    if product_id not in PRODUCTS:
        errors.append({"field": f"{where}.product_id", "message": "is not a known product"})
    qty = _whole(raw.get("qty", 1), 1, MAX_QTY)
    if qty is None:
        errors.append({"field": f"{where}.qty", "message": f"must be a whole number 1-{MAX_QTY}"})
    if product_id is None or product_id not in PRODUCTS or qty is None:
        return None
    return _item(product_id, qty)


def reply(
    served_by: str,
    payload: Mapping[str, Any],
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON object that says which app answered."""
    return JSONResponse({**payload, "served_by": served_by}, status_code, headers)


def problem(
    served_by: str,
    status_code: int,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An `application/problem+json` error (RFC 9457) that says which app answered."""
    payload = {"title": HTTPStatus(status_code).phrase, "status": status_code, "detail": detail}
    body = {**payload, **extra, "served_by": served_by}
    return JSONResponse(body, status_code, headers, media_type="application/problem+json")


def json_error_handler(served_by: str) -> Callable[[Request, Exception], Awaitable[Response]]:
    """A Starlette exception handler that renders HTTPException (404, 405...) as problem JSON."""

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = f"{request.method} {request.url.path}: {exc.detail}"
        return problem(served_by, exc.status_code, detail, headers=exc.headers)

    return handle
