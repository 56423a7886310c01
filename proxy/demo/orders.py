"""The demo's extracted service: the orders API, moved out of the Legacy Shop monolith.

    GET  /api/orders          {"orders": [...], "count", "generated_at", "served_by"}
    POST /api/orders          {"customer": "ada", "items": [{"product_id": 3, "qty": 1}]}
                              -> 201 the order (status "pending"), Location header;
                              bad input -> 422 application/problem+json with "errors"
    GET  /api/orders/{id}     the order, or 404 problem JSON
    POST /api/checkout        same body as POST /api/orders -> 201 {"order", "message"}
    GET  /health              200 {"status": "ok"} (liveness)
    GET  /health/ready        200 {"status": "ready"} (the proxy's active health check)
    /_demo/...                chaos knobs, see `proxy.demo.chaos`; e.g. on this app's port
                              `curl -X POST 'http://127.0.0.1:8002/_demo/fail?rate=0.5'`

Every JSON body has `"served_by": "orders"` and every response `X-Served-By: orders`.
It starts from the monolith's seed orders (same ids, same data); orders it creates get
ids from 9001 on.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.demo.chaos import Chaos, DemoMiddleware, chaos_routes
from proxy.demo.shop import (
    InvalidOrder,
    OrderBook,
    json_error_handler,
    now_iso,
    problem,
    read_order,
    reply,
)

NAME = "orders"
FIRST_NEW_ID = 9001


class OrdersService:
    def __init__(self) -> None:
        self.book = OrderBook(first_new_id=FIRST_NEW_ID)

    async def orders(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.create_order(request)
        orders = self.book.all()
        payload = {"orders": orders, "count": len(orders), "generated_at": now_iso()}
        return reply(NAME, payload)

    async def get_order(self, request: Request) -> Response:
        order_id: int = request.path_params["order_id"]
        order = self.book.orders.get(order_id)
        if order is None:
            return problem(NAME, 404, f"no order {order_id}")
        return reply(NAME, order)

    async def create_order(self, request: Request) -> Response:
        try:
            customer, items = await read_order(request)
        except InvalidOrder as exc:
            return problem(NAME, 422, "the order is not valid", errors=exc.errors)
        order = self.book.create(customer=customer, items=items, status="pending")
        location = {"Location": f"/api/orders/{order['id']}"}
        return reply(NAME, order, status_code=201, headers=location)

    async def checkout(self, request: Request) -> Response:
        try:
            customer, items = await read_order(request)
        except InvalidOrder as exc:
            return problem(NAME, 422, "the cart is not valid", errors=exc.errors)
        order = self.book.create(customer=customer, items=items, status="paid")
        message = f"Thanks {customer}! Order {order['id']} is paid."
        return reply(NAME, {"order": order, "message": message}, status_code=201)

    async def health(self, request: Request) -> Response:
        return reply(NAME, {"status": "ok"})

    async def ready(self, request: Request) -> Response:
        return reply(NAME, {"status": "ready", "orders": len(self.book.orders)})


def create_app(*, chaos: Chaos | None = None) -> Starlette:
    """The orders service; `chaos` lets a test set the knobs or replace rng and sleep."""
    chaos = chaos if chaos is not None else Chaos()
    service = OrdersService()
    routes = [
        Route("/api/orders", service.orders, methods=["GET", "POST"]),
        Route("/api/orders/{order_id:int}", service.get_order, methods=["GET"]),
        Route("/api/checkout", service.checkout, methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/health/ready", service.ready, methods=["GET"]),
        *chaos_routes(chaos, NAME),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(DemoMiddleware, served_by=NAME, chaos=chaos)],
        exception_handlers={HTTPException: json_error_handler(NAME)},
    )
