"""The admin port (SPEC §8): health, readiness, metrics, the admin API and the migration page.

It never sits on the main port, so every path of the monolith keeps working. It reads and
steers the proxy through a `Control`: in-process with one worker, through the supervisor
with several.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.page import page, static


class Control(Protocol):
    """What the admin port needs of the data plane."""

    @property
    def token_env(self) -> str: ...

    def is_ready(self) -> bool: ...

    def metrics(self) -> tuple[bytes, str]: ...

    def routes(self) -> dict[str, Any]: ...

    def explain(self, method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]: ...

    def set_split(self, route: str, weights: Mapping[str, int] | None) -> None: ...

    async def reload(self) -> dict[str, Any]: ...


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "status": status, "title": title, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _authorized(request: Request, token_env: str) -> Response | None:
    """None when the request carries the admin token; the refusal otherwise."""
    token = os.environ.get(token_env, "")
    if not token:
        return problem(403, "Forbidden", f"admin writes are disabled: set ${token_env}")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        return problem(401, "Unauthorized", "a valid 'Authorization: Bearer TOKEN' is required")
    return None


async def _settled(control: Control) -> None:
    """Answer a change only once it is live everywhere (with workers, in each of them). A
    control without `settle` applies its changes at once."""
    settle = getattr(control, "settle", None)
    if settle is not None:
        await settle()


def create_admin(control: Control) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if control.is_ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def metrics(request: Request) -> Response:
        body, content_type = control.metrics()
        return Response(body, media_type=content_type)

    async def routes(request: Request) -> Response:
        return JSONResponse(control.routes())

    async def explain(request: Request) -> Response:
        params = request.query_params
        headers = []
        for raw in params.getlist("header"):
            name, sep, value = raw.partition(":")
            if not sep:
                return problem(400, "Bad request", f"header {raw!r} is not NAME:VALUE")
            headers.append((name.strip(), value.strip()))
        url = params.get("url")
        if not url:
            return problem(400, "Bad request", "the url parameter is required")
        try:
            answer = control.explain(params.get("method", "GET"), url, headers)
        except ValueError as err:
            return problem(400, "Bad request", str(err))
        return JSONResponse(answer)

    async def set_split(request: Request) -> Response:
        refusal = _authorized(request, control.token_env)
        if refusal is not None:
            return refusal
        name = request.path_params["name"]
        if request.method == "DELETE":
            weights = None
        else:
            try:
                weights = json.loads(await request.body())
            except ValueError:
                return problem(400, "Bad request", 'the body must be JSON: {"BACKEND": PCT}')
            if not isinstance(weights, dict):  # `null` would read as "remove the override"
                return problem(
                    400, "Invalid split", 'the split must be a JSON object: {"BACKEND": PCT}'
                )
        try:
            control.set_split(name, weights)
        except KeyError:
            return problem(404, "Not found", f"no route named {name!r}")
        except ValueError as err:
            return problem(400, "Invalid split", str(err))
        await _settled(control)
        return JSONResponse({"route": name, "split": weights, "override": weights is not None})

    async def reload(request: Request) -> Response:
        refusal = _authorized(request, control.token_env)
        if refusal is not None:
            return refusal
        result = await control.reload()
        if result["result"] != "success":
            return problem(
                400, "Invalid config", "the config was not reloaded", errors=result["errors"]
            )
        await _settled(control)
        return JSONResponse(result)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", static),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/api/routes", routes),
            Route("/api/explain", explain),
            Route("/api/routes/{name}/split", set_split, methods=["POST", "DELETE"]),
            Route("/api/reload", reload, methods=["POST"]),
        ]
    )
