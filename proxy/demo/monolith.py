"""The demo's legacy monolith, "Legacy Shop": HTML pages and the whole JSON API.

    GET  /                    the shop: products, a cart with checkout, and an Orders panel
                              that fetches /api/orders and shows who served it
    GET  /products            all products (HTML); /products/{id} one product and its reviews
    GET  /api/products        {"products": [...], "count"}; ?category=kitchen|home|paper
    GET  /api/products/{id}   one product
    GET  /api/reviews         {"reviews": [...], "count"}; ?product_id=N
    GET  /api/orders          {"orders": [...], "count", "generated_at"}
    POST /api/orders          {"customer": "ada", "items": [{"product_id": 3, "qty": 1}]}
                              -> 201 the order; bad input -> 422 application/problem+json
    GET  /api/orders/{id}     the order, or 404 problem JSON
    POST /api/checkout        same body as POST /api/orders -> 201 {"order", "message"}
    GET  /health              200 {"status": "ok"}
    /_demo/...                chaos knobs, see `proxy.demo.chaos`

The monolith keeps its own, legacy implementation of orders and checkout, so the proxy can
fall back to it when the extracted orders service fails. Every JSON body has
`"served_by": "monolith"` and every response `X-Served-By: monolith`. Orders created here
get ids from 5001 on; the seed orders are the same as the orders service's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from html import escape

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from proxy.demo.chaos import Chaos, DemoMiddleware, chaos_routes
from proxy.demo.shop import (
    PRODUCTS,
    REVIEWS,
    InvalidOrder,
    OrderBook,
    Product,
    json_error_handler,
    now_iso,
    problem,
    read_order,
    reply,
)

NAME = "monolith"
FIRST_NEW_ID = 5001


class LegacyShop:
    def __init__(self) -> None:
        self.book = OrderBook(first_new_id=FIRST_NEW_ID)

    async def home(self, request: Request) -> Response:
        prices = {p["id"]: {"name": p["name"], "price_cents": p["price_cents"]} for p in _all()}
        script = _SCRIPT.replace("__PRODUCTS__", json.dumps(prices).replace("</", "<\\/"))
        body = f"<h1>Everything for a slow Sunday</h1>{_cards(_all(), add=True)}{_PANELS}"
        return _page("Shop", body, script=script)

    async def products_page(self, request: Request) -> Response:
        return _page("Products", f"<h1>All products</h1>{_cards(_all(), add=False)}")

    async def product_page(self, request: Request) -> Response:
        product = PRODUCTS.get(request.path_params["product_id"])
        if product is None:
            return _page("Not found", "<h1>No such product</h1>", status_code=404)
        reviews = "".join(
            f"<li>{'★' * r['rating']}{'☆' * (5 - r['rating'])} {escape(r['text'])} "
            f"<span class=meta>— {escape(r['author'])}</span></li>"
            for r in REVIEWS
            if r["product_id"] == product["id"]
        )
        body = (
            f"<h1>{escape(product['name'])}</h1><div class=panel><p>"
            f"{escape(product['description'])}</p><p class=price>{_money(product)}</p>"
            f"<p class=meta>{escape(product['category'])} · <a href='/api/products/"
            f"{product['id']}'>as JSON</a></p><h2>Reviews</h2>"
            f"<ul>{reviews or '<li class=meta>No reviews yet.</li>'}</ul></div>"
            "<p><a href='/'>Back to the shop</a></p>"
        )
        return _page(product["name"], body)

    async def api_products(self, request: Request) -> Response:
        category = request.query_params.get("category")
        products = [p for p in _all() if category is None or p["category"] == category]
        return reply(NAME, {"products": products, "count": len(products)})

    async def api_product(self, request: Request) -> Response:
        product_id: int = request.path_params["product_id"]
        product = PRODUCTS.get(product_id)
        if product is None:
            return problem(NAME, 404, f"no product {product_id}")
        return reply(NAME, product)

    async def api_reviews(self, request: Request) -> Response:
        wanted = request.query_params.get("product_id")
        if wanted is not None and not wanted.isdigit():
            return problem(NAME, 422, "product_id must be a whole number")
        reviews = [r for r in REVIEWS if wanted is None or r["product_id"] == int(wanted)]
        return reply(NAME, {"reviews": reviews, "count": len(reviews)})

    async def api_orders(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                customer, items = await read_order(request)
            except InvalidOrder as exc:
                return problem(NAME, 422, "the order is not valid", errors=exc.errors)
            order = self.book.create(customer=customer, items=items, status="pending")
            location = {"Location": f"/api/orders/{order['id']}"}
            return reply(NAME, order, status_code=201, headers=location)
        orders = self.book.all()
        return reply(NAME, {"orders": orders, "count": len(orders), "generated_at": now_iso()})

    async def api_order(self, request: Request) -> Response:
        order_id: int = request.path_params["order_id"]
        order = self.book.orders.get(order_id)
        if order is None:
            return problem(NAME, 404, f"no order {order_id}")
        return reply(NAME, order)

    async def api_checkout(self, request: Request) -> Response:
        try:
            customer, items = await read_order(request)
        except InvalidOrder as exc:
            return problem(NAME, 422, "the cart is not valid", errors=exc.errors)
        order = self.book.create(customer=customer, items=items, status="paid")
        message = f"Thanks {customer}! Order {order['id']} is paid."
        return reply(NAME, {"order": order, "message": message}, status_code=201)

    async def health(self, request: Request) -> Response:
        return reply(NAME, {"status": "ok"})


def create_app(*, chaos: Chaos | None = None) -> Starlette:
    """The monolith; `chaos` lets a test set the knobs or replace rng and sleep."""
    chaos = chaos if chaos is not None else Chaos()
    shop = LegacyShop()
    routes = [
        Route("/", shop.home, methods=["GET"]),
        Route("/products", shop.products_page, methods=["GET"]),
        Route("/products/{product_id:int}", shop.product_page, methods=["GET"]),
        Route("/api/products", shop.api_products, methods=["GET"]),
        Route("/api/products/{product_id:int}", shop.api_product, methods=["GET"]),
        Route("/api/reviews", shop.api_reviews, methods=["GET"]),
        Route("/api/orders", shop.api_orders, methods=["GET", "POST"]),
        Route("/api/orders/{order_id:int}", shop.api_order, methods=["GET"]),
        Route("/api/checkout", shop.api_checkout, methods=["POST"]),
        Route("/health", shop.health, methods=["GET"]),
        *chaos_routes(chaos, NAME),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(DemoMiddleware, served_by=NAME, chaos=chaos)],
        exception_handlers={HTTPException: _error_handler},
    )


async def _error_handler(request: Request, exc: Exception) -> Response:
    """Problem JSON under /api and for the chaos knobs, an HTML page elsewhere."""
    if request.url.path.startswith(("/api/", "/_demo")) or not isinstance(exc, HTTPException):
        return await json_error_handler(NAME)(request, exc)
    title = "Not found" if exc.status_code == 404 else str(exc.detail)
    body = f"<h1>{escape(title)}</h1><p><a href='/'>Back to the shop</a></p>"
    return _page(title, body, status_code=exc.status_code, headers=exc.headers)


def _all() -> list[Product]:
    return list(PRODUCTS.values())


def _money(product: Product) -> str:
    return f"€{product['price_cents'] / 100:.2f}"


def _cards(products: list[Product], *, add: bool) -> str:
    cards = (
        f"<div class=card><h3><a href='/products/{p['id']}'>{escape(p['name'])}</a></h3>"
        f"<p>{escape(p['description'])}</p><div class=row><span class=price>{_money(p)}</span>"
        + (f"<button data-add='{p['id']}'>Add</button>" if add else "")
        + "</div></div>"
        for p in products
    )
    return f"<div class=grid>{''.join(cards)}</div>"


def _page(
    title: str,
    body: str,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    script: str = "",
) -> HTMLResponse:
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)} · Legacy Shop</title><link rel=icon href='data:,'>"
        f"<style>{_CSS}</style></head><body><header><a class=brand href='/'>Legacy Shop</a>"
        "<nav><a href='/products'>Products</a><a href='/#orders'>Orders</a></nav>"
        "<span class='badge monolith'>page served by monolith</span></header>"
        f"<main>{body}</main><footer>The legacy monolith of the strangler demo. Every "
        "response says who served it in <code>X-Served-By</code>.</footer>"
        f"{f'<script>{script}</script>' if script else ''}</body></html>"
    )
    return HTMLResponse(html, status_code, headers)


_CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--ink);
 background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;padding:.75rem 1rem;
 background:#243b53;color:#fff}
header a{color:#fff;text-decoration:none}
.brand{font-weight:700;font-size:1.1rem}
nav{display:flex;gap:1rem;flex:1}
main,footer{max-width:960px;margin:0 auto;padding:1rem}
footer{color:var(--muted);font-size:.8rem}
h1{font-size:1.4rem;margin:.25rem 0 1rem}
h2{font-size:1.1rem;margin:0 0 .5rem}
a{color:#243b53}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.75rem}
.card,.panel{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.75rem}
.card{display:flex;flex-direction:column}
.card h3{font-size:1rem;margin:0 0 .25rem}
.card p{margin:.25rem 0 .5rem;color:var(--muted);font-size:.9rem;flex:1}
.price{font-weight:600;flex:1}
.cols{display:grid;grid-template-columns:minmax(0,1fr);gap:1rem;margin-top:1rem;align-items:start}
@media(min-width:760px){.grid{grid-template-columns:repeat(4,1fr)}
 .cols{grid-template-columns:repeat(2,minmax(0,1fr))}}
.row{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin:.25rem 0}
.meta{color:var(--muted);font-size:.85rem}
button{font:inherit;padding:.35rem .8rem;border:0;border-radius:6px;background:#334e68;
 color:#fff;cursor:pointer}
button.secondary{background:var(--line);color:var(--ink)}
button:disabled{opacity:.5;cursor:default}
input[type=text]{font:inherit;padding:.3rem .5rem;border:1px solid #cbd2d9;border-radius:6px;
 width:9rem}
.badge{display:inline-block;padding:.1rem .55rem;border-radius:999px;font-size:.8rem;
 font-weight:600;background:#d9e2ec;color:var(--ink)}
.badge.monolith{background:#ffe8d9;color:#a1410d}
.badge.orders{background:#d6f5e6;color:#0f7049}
.badge.error{background:#ffe3e3;color:#b91c1c}
ul.cart{list-style:none;padding:0;margin:.5rem 0}
ul.cart li{display:flex;justify-content:space-between;align-items:center;gap:.5rem;
 padding:.25rem 0;border-bottom:1px solid var(--line)}
pre{background:#102a43;color:#d9e2ec;padding:.75rem;border-radius:6px;overflow:auto;
 max-height:320px;font-size:.8rem;margin:.5rem 0 0}
"""

_PANELS = """<div class=cols>
<section class=panel id=cart><h2>Cart</h2><ul class=cart id=cart-items></ul>
<div class=row><strong id=cart-total></strong></div>
<div class=row><label>Name <input type=text id=customer value=guest maxlength=64></label>
<button id=checkout>Checkout</button><button class=secondary id=clear>Clear</button></div>
<div id=checkout-result></div></section>
<section class=panel id=orders><h2>Orders</h2>
<div class=row><button id=load>GET /api/orders</button>
<label><input type=checkbox id=auto> every 2 s</label></div>
<div id=orders-result><p class=meta>The proxy decides who answers: the monolith or the
new orders service. Every answer says which.</p></div></section></div>"""

_SCRIPT = """
const PRODUCTS = __PRODUCTS__;
const $ = (id) => document.getElementById(id);
const money = (cents) => "€" + (cents / 100).toFixed(2);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
let cart = {};
try { cart = JSON.parse(localStorage.getItem("cart") || "{}"); } catch (e) {}
for (const id of Object.keys(cart)) if (!PRODUCTS[id]) delete cart[id];

function save() { localStorage.setItem("cart", JSON.stringify(cart)); render(); }
function render() {
  const ids = Object.keys(cart);
  const rows = ids.map((id) => {
    const li = el("li"), less = el("button", "secondary", "−");
    less.onclick = () => { if (--cart[id] <= 0) delete cart[id]; save(); };
    li.append(el("span", "", cart[id] + " × " + PRODUCTS[id].name), less);
    return li;
  });
  $("cart-items").replaceChildren(...(rows.length ? rows : [el("li", "meta", "Empty")]));
  const total = ids.reduce((sum, id) => sum + cart[id] * PRODUCTS[id].price_cents, 0);
  $("cart-total").textContent = "Total " + money(total);
  $("checkout").disabled = !ids.length;
}

async function call(method, url, body) {
  const started = performance.now(), init = {method, headers: {Accept: "application/json"}};
  if (body) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  let res = {ok: false, status: 0, who: "nobody", data: null};
  try {
    const r = await fetch(url, init), text = await r.text();
    let data = text;
    try { data = JSON.parse(text); } catch (e) {}
    const who = (data && data.served_by) || r.headers.get("X-Served-By") || "proxy";
    res = {ok: r.ok, status: r.status, who, data};
  } catch (e) { res.data = String(e); }
  res.ms = Math.round(performance.now() - started);
  return res;
}
function show(target, method, url, res, summary) {
  const known = res.who === "monolith" || res.who === "orders";
  const badge = el("span", "badge " + (known ? res.who : res.ok ? "" : "error"),
                   "served by " + res.who);
  const line = el("div", "row");
  line.append(badge, el("span", "meta", method + " " + url + " → " + (res.status || "failed")
                                        + " · " + res.ms + " ms"));
  const parts = [line];
  if (summary) parts.push(el("div", "meta", summary));
  parts.push(el("pre", "", typeof res.data === "string" ? res.data
                                                        : JSON.stringify(res.data, null, 2)));
  $(target).replaceChildren(...parts);
}

async function loadOrders() {
  const res = await call("GET", "/api/orders");
  const d = res.data, ok = res.ok && d && Array.isArray(d.orders);
  show("orders-result", "GET", "/api/orders", res,
       ok ? d.count + " orders, generated at " + d.generated_at : "");
}
async function checkout() {
  const items = Object.keys(cart).map((id) => ({product_id: Number(id), qty: cart[id]}));
  $("checkout").disabled = true;
  const res = await call("POST", "/api/checkout", {customer: $("customer").value, items});
  if (res.ok) { cart = {}; save(); } else { render(); }
  show("checkout-result", "POST", "/api/checkout", res, res.ok ? res.data.message : "");
}

document.querySelectorAll("[data-add]").forEach((b) => {
  b.onclick = () => { cart[b.dataset.add] = (cart[b.dataset.add] || 0) + 1; save(); };
});
$("clear").onclick = () => { cart = {}; save(); };
$("checkout").onclick = checkout;
$("load").onclick = loadOrders;
let timer = null;
$("auto").onchange = (e) => {
  clearInterval(timer);
  timer = e.target.checked ? setInterval(loadOrders, 2000) : null;
  if (e.target.checked) loadOrders();
};
render();
"""
