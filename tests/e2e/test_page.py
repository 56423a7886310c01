"""The migration page (SPEC §8 `GET /`) in a real headless Chromium against the real proxy:
every route is shown, numbers move with traffic and breakers without a reload, whatever the
config or a backend says is shown as text, it fits a phone, and it has no console errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Locator, Page, expect, sync_playwright

from tests.e2e.harness import ProxyProcess, UpstreamServer
from tests.e2e.upstream import Recorder, make_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TOKEN = "page-test-token"
WAIT_MS = 20_000  # the page polls every 2 s; the machine may be busy
EVIL_HEADER = "<img src=x onerror=alert(1)>"
EVIL_BODY = "<script>window.__pwned=1</script>"
EVIL_KEY = "<svg onload=window.__pwned=2>"
SHOTS = {390: Path("/tmp/strangler-page-390.png"), 1280: Path("/tmp/strangler-page-1280.png")}


async def evil_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A shadow backend whose answers differ from the primary's by a piece of HTML."""
    if scope["type"] != "http":
        return
    body = json.dumps({"served_by": EVIL_BODY}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Upstreams:
    monolith: Recorder = field(default_factory=lambda: Recorder("monolith"))
    orders: Recorder = field(default_factory=lambda: Recorder("orders"))
    flaky: Recorder = field(default_factory=lambda: Recorder("flaky"))
    servers: dict[str, UpstreamServer] = field(default_factory=dict)

    def config(self, extra: str = "") -> str:
        url = {name: server.url for name, server in self.servers.items()}
        return f"""
version: 1
legacy: monolith
{extra}
backends:
  monolith: {{url: "{url["monolith"]}"}}
  orders: {{url: "{url["orders"]}"}}
  flaky: {{url: "{url["flaky"]}"}}
  evil: {{url: "{url["evil"]}"}}
defaults:
  retry: {{attempts: 1}}
routes:
  - name: orders
    match: {{prefix: /api/orders, methods: [GET, POST]}}
    split: {{orders: 60, monolith: 40}}
  - name: payments
    match: {{prefix: /api/payments}}
    backend: flaky
    breaker: {{failure_threshold: 2, reset_timeout: 120}}
  - name: beta.search
    match: {{prefix: /search, headers: {{X-Beta: "{EVIL_HEADER}"}}}}
    backend: monolith
    shadow: {{backend: evil, compare: true}}
"""


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    u = Upstreams()
    u.servers = {
        "monolith": UpstreamServer(make_app(u.monolith)),
        "orders": UpstreamServer(make_app(u.orders)),
        "flaky": UpstreamServer(make_app(u.flaky)),
        "evil": UpstreamServer(evil_app),
    }
    for server in u.servers.values():
        server.start()
    yield u
    for server in u.servers.values():
        server.stop()


@pytest.fixture(scope="module")
def page_proxy(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("page")
    env = {"STRANGLER_ADMIN_TOKEN": TOKEN}
    with ProxyProcess(upstreams.config(), workdir, env=env) as p:
        yield p


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


@dataclass
class Watched:
    """A page with everything it said to the console, threw, or tried to pop up."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.page_errors == []
        assert self.console_errors == []
        assert self.dialogs == []


@contextmanager
def open_page(browser: Browser, url: str, width: int = 1280) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    watched = Watched(page)
    page.on(
        "console",
        lambda m: watched.console_errors.append(m.text) if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: watched.page_errors.append(str(e)))

    def on_dialog(dialog: Dialog) -> None:
        watched.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        page.goto(url + "/")
        expect(page.locator("#status")).to_contain_text("Updated", timeout=WAIT_MS)
        yield watched
    finally:
        context.close()


@pytest.fixture()
def watched(browser: Browser, page_proxy: ProxyProcess) -> Iterator[Watched]:
    with open_page(browser, page_proxy.admin) as w:
        yield w


def card(page: Page, route: str) -> Locator:
    return page.locator(f'article[data-route="{route}"]')


def backend_row(page: Page, route: str, backend: str) -> Locator:
    return card(page, route).locator(f'tbody tr[data-key="{backend}"]')


def test_page_shows_each_route_with_its_match_and_split(watched: Watched) -> None:
    page = watched.page
    for route in ("orders", "payments", "beta.search", "default"):
        expect(card(page, route)).to_be_visible()
        expect(card(page, route).locator("h2")).to_have_text(route)
    orders = card(page, "orders")
    expect(orders.locator(".match")).to_contain_text("/api/orders")
    expect(orders.locator(".match")).to_contain_text("GET POST")
    expect(orders.locator(".legend")).to_contain_text("orders60%")
    expect(orders.locator(".legend")).to_contain_text("monolith40%")
    expect(backend_row(page, "orders", "orders").locator(".breaker")).to_have_text("closed")
    expect(backend_row(page, "payments", "flaky").locator(".up")).to_have_text("–")
    expect(card(page, "beta.search").locator(".part:has(.mismatches)")).to_contain_text(
        "Shadow → evil"
    )
    expect(card(page, "orders").locator(".part:has(.mismatches)")).to_be_hidden()
    expect(page.locator("#legacy")).to_have_text("monolith")
    expect(page.locator("#reload")).to_contain_text("loaded at start")
    watched.assert_clean()


def test_numbers_change_as_traffic_flows_without_a_reload(
    watched: Watched, page_proxy: ProxyProcess
) -> None:
    page = watched.page
    page.evaluate("window.__sameDocument = true")
    with httpx.Client(base_url=page_proxy.url, timeout=10) as client:
        for i in range(40):
            assert client.get(f"/api/orders/{i}").status_code == 200
    for backend in ("orders", "monolith"):
        rps = backend_row(page, "orders", backend).locator(".rps")
        page.wait_for_function(
            "el => parseFloat(el.textContent) > 0", arg=rps.element_handle(), timeout=WAIT_MS
        )
        expect(backend_row(page, "orders", backend).locator(".p95")).to_contain_text("ms")
    page.wait_for_function(
        "() => parseFloat(document.getElementById('share').textContent) > 0", timeout=WAIT_MS
    )
    rps = backend_row(page, "orders", "orders").locator(".rps")
    before = float(rps.text_content() or "0")
    with httpx.Client(base_url=page_proxy.url, timeout=10) as client:
        for i in range(60):
            client.get(f"/api/orders/{i}")
    page.wait_for_function(
        "([el, before]) => parseFloat(el.textContent) > before",
        arg=[rps.element_handle(), before],
        timeout=WAIT_MS,
    )
    assert page.evaluate("window.__sameDocument") is True
    watched.assert_clean()


def test_an_opening_breaker_shows_on_the_card(
    watched: Watched, page_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    page = watched.page
    expect(card(page, "payments")).not_to_have_class("card alarm")
    upstreams.flaky.fail_status = 503
    try:
        with httpx.Client(base_url=page_proxy.url, timeout=10) as client:
            statuses = [client.get("/api/payments/1").status_code for _ in range(4)]
            refused = client.get("/api/payments/1")
    finally:
        upstreams.flaky.fail_status = None
    assert statuses == [503] * 4
    assert refused.headers["content-type"] == "application/problem+json"
    breaker = backend_row(page, "payments", "flaky").locator(".breaker")
    expect(breaker).to_have_text("open", timeout=WAIT_MS)
    expect(breaker).to_have_class("badge breaker open")
    expect(card(page, "payments")).to_have_class("card alarm")
    expect(backend_row(page, "payments", "flaky").locator(".err")).not_to_have_text("0.0%")
    expect(backend_row(page, "orders", "orders").locator(".breaker")).to_have_text("closed")
    watched.assert_clean()


def test_html_from_config_and_backends_is_shown_as_text(
    watched: Watched, page_proxy: ProxyProcess
) -> None:
    page = watched.page
    r = httpx.get(page_proxy.url + "/search?q=1", headers={"X-Beta": EVIL_HEADER}, timeout=10)
    assert r.status_code == 200 and r.json()["served_by"] == "monolith"
    search = card(page, "beta.search")
    expect(search.locator(".match")).to_contain_text(f"X-Beta: {EVIL_HEADER}")
    mismatch = search.locator(".mismatches details", has_text=r.headers["x-request-id"])
    expect(mismatch).to_be_attached(timeout=WAIT_MS)
    expect(search.locator(".shadow-rate")).to_contain_text("0.0% match (0 of ")
    expect(mismatch.locator("summary")).to_contain_text("GET /search?q=1 · 200 vs 200")
    expect(mismatch.locator("pre")).to_be_hidden()
    mismatch.locator("summary").click()
    expect(mismatch.locator("pre")).to_be_visible()
    expect(mismatch.locator("pre")).to_contain_text(EVIL_BODY)
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('img, svg, iframe, object').length") == 0
    assert page.evaluate("document.scripts.length") == 1
    watched.assert_clean()


def test_a_live_override_shows_as_a_badge(watched: Watched, page_proxy: ProxyProcess) -> None:
    page = watched.page
    orders = card(page, "orders")
    expect(orders.locator(".badge.override")).to_have_count(0)
    r = httpx.post(
        page_proxy.admin + "/api/routes/orders/split",
        json={"orders": 25, "monolith": 75},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200
    expect(orders.locator(".badge.override")).to_have_text("override", timeout=WAIT_MS)
    expect(orders.locator(".legend")).to_contain_text("orders25%")
    expect(orders.locator(".legend")).to_contain_text("monolith75%")
    watched.assert_clean()


@pytest.mark.parametrize("width", [390, 1280])
def test_page_fits_phones_and_desktops(
    browser: Browser, page_proxy: ProxyProcess, width: int
) -> None:
    httpx.get(page_proxy.url + "/search?q=2", headers={"X-Beta": EVIL_HEADER}, timeout=10)
    with open_page(browser, page_proxy.admin, width) as w:
        page = w.page
        expect(card(page, "beta.search").locator(".mismatches details").first).to_be_attached()
        card(page, "beta.search").locator(".mismatches summary").first.click()
        expect(card(page, "default")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        boxes = page.evaluate(
            "[...document.querySelectorAll('article.card')].map(c => c.getBoundingClientRect().x)"
        )
        if width == 390:
            assert len(set(boxes)) == 1  # the cards stack
        else:
            assert len(set(boxes)) > 1  # a grid
        page.screenshot(path=str(SHOTS[width]), full_page=True)
        w.assert_clean()


def test_an_unreachable_admin_api_shows_as_stale(watched: Watched) -> None:
    page = watched.page
    page.route("**/api/routes", lambda route: route.abort())
    status = page.locator("#status")
    expect(status).to_contain_text("Stale: admin API unreachable", timeout=WAIT_MS)
    expect(status).to_have_class("status stale")
    expect(card(page, "orders")).to_be_visible()  # the last data stays, dimmed
    page.unroute("**/api/routes")
    expect(status).to_contain_text("Updated", timeout=WAIT_MS)
    assert watched.page_errors == [] and watched.dialogs == []
    assert all("Failed to load resource" in text for text in watched.console_errors)


def test_a_failed_reload_and_its_errors_are_shown_as_text(
    watched: Watched, page_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    page = watched.page
    good = page_proxy.config_path.read_text()
    page_proxy.config_path.write_text(upstreams.config(extra=f'"{EVIL_KEY}": 1'))
    try:
        r = httpx.post(
            page_proxy.admin + "/api/reload",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert r.status_code == 400
        expect(page.locator("#reload")).to_contain_text("failed", timeout=WAIT_MS)
        expect(page.locator("#reload")).to_have_class("bad")
        expect(page.locator("#reload-errors")).to_contain_text(f"unknown key '{EVIL_KEY}'")
        assert page.evaluate("window.__pwned") is None
        assert page.evaluate("document.querySelectorAll('svg').length") == 0
        for route in ("orders", "payments", "beta.search"):
            expect(card(page, route)).to_be_visible()  # the old config keeps serving
        watched.assert_clean()
    finally:
        page_proxy.config_path.write_text(good)
