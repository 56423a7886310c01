"""The demo apps' middleware: who served each response, and faults injected on demand.

Every response of a demo app carries `X-Served-By: monolith` or `X-Served-By: orders`.
Both apps also have chaos knobs, to show what the proxy's breakers, retries and
fallbacks do when a backend misbehaves:

    POST /_demo/fail?rate=0.5            answer that fraction of requests with 503
    POST /_demo/fail?rate=1&status=500   ... or with another 5xx
    POST /_demo/delay?ms=300             wait that long before every answer
    POST /_demo/reset                    no failures, no delay
    GET  /_demo                          the current settings

Call them on the app's own port (`curl -X POST 'http://127.0.0.1:8002/_demo/fail?rate=1'`):
through the proxy, `/_demo/...` is claimed by no route and reaches the monolith. The knobs
touch every path but `/_demo/...` itself (health checks included), so a reset always works.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.demo.shop import problem, reply

MAX_DELAY_MS = 60_000


@dataclass
class Chaos:
    """The knobs' settings; `rng` and `sleep` are there for tests to replace."""

    fail_rate: float = 0.0
    fail_status: int = 503
    delay_ms: int = 0
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def settings(self) -> dict[str, float]:
        return {
            "fail_rate": self.fail_rate,
            "fail_status": self.fail_status,
            "delay_ms": self.delay_ms,
        }

    def reset(self) -> None:
        self.fail_rate, self.fail_status, self.delay_ms = 0.0, 503, 0

    def should_fail(self) -> bool:
        return self.fail_rate > 0 and self.rng.random() < self.fail_rate


class DemoMiddleware:
    """Tags every response with `X-Served-By`, then applies the chaos settings."""

    def __init__(self, app: ASGIApp, *, served_by: str, chaos: Chaos) -> None:
        self.app = app
        self.served_by = served_by
        self.tag = (b"x-served-by", served_by.encode())
        self.chaos = chaos

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.tag]
            await send(message)

        if not scope["path"].startswith("/_demo"):
            if self.chaos.delay_ms:
                await self.chaos.sleep(self.chaos.delay_ms / 1000)
            if self.chaos.should_fail():
                detail = f"failure injected by POST /_demo/fail (rate {self.chaos.fail_rate})"
                response = problem(self.served_by, self.chaos.fail_status, detail)
                await response(scope, receive, tagged)
                return
        await self.app(scope, receive, tagged)


def chaos_routes(chaos: Chaos, served_by: str) -> list[Route]:
    """The `/_demo` endpoints that turn the knobs of `chaos`."""

    def settings() -> Response:
        return reply(served_by, {"chaos": chaos.settings()})

    def invalid(detail: str) -> Response:
        return problem(served_by, 422, detail)

    async def show(request: Request) -> Response:
        return settings()

    async def fail(request: Request) -> Response:
        try:
            rate = float(request.query_params.get("rate", "1"))
            status = int(request.query_params.get("status", "503"))
        except ValueError:
            return invalid("rate must be a number from 0 to 1, status a 5xx code")
        if not 0 <= rate <= 1 or not 500 <= status <= 599:
            return invalid("rate must be a number from 0 to 1, status a 5xx code")
        chaos.fail_rate, chaos.fail_status = rate, status
        return settings()

    async def delay(request: Request) -> Response:
        try:
            ms = int(request.query_params.get("ms", "0"))
        except ValueError:
            ms = -1
        if not 0 <= ms <= MAX_DELAY_MS:
            return invalid(f"ms must be a whole number of milliseconds from 0 to {MAX_DELAY_MS}")
        chaos.delay_ms = ms
        return settings()

    async def reset(request: Request) -> Response:
        chaos.reset()
        return settings()

    return [
        Route("/_demo", show, methods=["GET"]),
        Route("/_demo/fail", fail, methods=["POST"]),
        Route("/_demo/delay", delay, methods=["POST"]),
        Route("/_demo/reset", reset, methods=["POST"]),
    ]
