"""The migration page (SPEC §8 `GET /`): one HTML document with its script and stylesheet,
served from package data under a strict Content-Security-Policy.

The page reads `api/routes` itself and puts every value in with textContent, so nothing it
shows can become markup; the policy allows no inline script or style and no other origin,
as a second line of defence.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
STATIC_TYPES = {"page.js": "text/javascript", "page.css": "text/css"}


@cache
def _asset(folder: str, name: str) -> bytes:
    return files("proxy").joinpath(folder, name).read_bytes()


async def page(request: Request) -> Response:
    return Response(_asset("templates", "page.html"), media_type="text/html", headers=HEADERS)


async def static(request: Request) -> Response:
    """Only the page's own files: the name is looked up, never joined into a path."""
    name = request.path_params["name"]
    media_type = STATIC_TYPES.get(name)
    if media_type is None:
        return PlainTextResponse("not found", status_code=404, headers=HEADERS)
    return Response(_asset("static", name), media_type=media_type, headers=HEADERS)
