"""The demo apps that `strangler demo` runs behind the proxy (SPEC §1, `config/demo.yaml`).

`monolith` is the legacy "Legacy Shop" (HTML pages and the whole JSON API); `orders` is the
service extracted from it (the orders and checkout API). Both answer with `X-Served-By`
and `"served_by"` so whoever watches the demo sees which one served a request, and both
have chaos knobs under `/_demo` (see `proxy.demo.chaos`).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette

from proxy.demo import monolith, orders

APPS: dict[str, Callable[[], Starlette]] = {
    "monolith": monolith.create_app,
    "orders": orders.create_app,
}
DEFAULT_PORTS: dict[str, int] = {"monolith": 8001, "orders": 8002}

__all__ = ["APPS", "DEFAULT_PORTS"]
