"""The migration page as served by the admin app: HTML under a strict CSP, its own script and
stylesheet with the right types, nothing from another origin, no markup built from data."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from proxy.admin import create_admin

with warnings.catch_warnings():
    # Starlette's TestClient prefers httpx2 and warns on import when it finds only httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


class FakeControl:
    token_env = "STRANGLER_TEST_TOKEN"

    def is_ready(self) -> bool:
        return True

    def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    def routes(self) -> dict[str, Any]:
        return {"routes": [], "migrated_share": 0.0, "legacy": "monolith", "last_reload": {}}

    def explain(self, method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
        return {}

    def set_split(self, route: str, weights: Mapping[str, int] | None) -> None:
        return None

    async def reload(self) -> dict[str, Any]:
        return {"result": "success"}


@pytest.fixture()
def client() -> TestClient:
    return TestClient(create_admin(FakeControl()))


def test_page_is_html_under_a_strict_csp(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"


def test_page_loads_its_own_script_and_stylesheet_and_nothing_inline(
    client: TestClient,
) -> None:
    html = client.get("/").text
    assert '<script src="static/page.js" defer></script>' in html
    assert '<link rel="stylesheet" href="static/page.css">' in html
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert "<style" not in html and "style=" not in html
    assert not re.search(r"\son[a-z]+=", html)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/static/page.js", "text/javascript; charset=utf-8"),
        ("/static/page.css", "text/css; charset=utf-8"),
    ],
)
def test_static_files_have_their_content_type(
    client: TestClient, path: str, content_type: str
) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == content_type
    assert r.headers["x-content-type-options"] == "nosniff"
    assert len(r.content) > 1000


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/..%2Fpage.py", "/static/%2E%2E%2Fadmin.py", "/static/"]
)
def test_only_the_pages_own_files_are_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("path", ["/", "/static/page.js", "/static/page.css"])
def test_nothing_is_loaded_from_another_origin(client: TestClient, path: str) -> None:
    text = client.get(path).text
    assert not re.search(r"https?://", text, re.I)
    assert not re.search(r"""[\"'(=]\s*//""", text), "a protocol-relative URL"
    assert "@import" not in text


def test_script_never_builds_markup_from_strings(client: TestClient) -> None:
    script = client.get("/static/page.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "textContent" in script


def test_the_api_the_page_polls_is_still_json(client: TestClient) -> None:
    r = client.get("/api/routes")
    assert r.status_code == 200 and r.json()["legacy"] == "monolith"
