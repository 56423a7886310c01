"""Steady demo traffic for the compose stack, so the dashboard has something to show.

A few simulated shoppers, each keeping the `strangler_uid` cookie the proxy gives it (a
sticky split keeps each on one backend), browse the shop, read orders and check out.
Standard library only: it runs in the strangler image with `python /traffic/traffic.py`.
Environment: TARGET (default http://strangler:8080), USERS (20), RPS (8, across all users).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

TARGET = os.environ.get("TARGET", "http://strangler:8080").rstrip("/")
USERS = int(os.environ.get("USERS", "20"))
RPS = float(os.environ.get("RPS", "8"))
STOP = threading.Event()

# (weight, method, path, body): mostly reads, some checkouts.
ACTIONS = [
    (30, "GET", "/", None),
    (20, "GET", "/api/products", None),
    (25, "GET", "/api/orders", None),
    (10, "GET", "/api/orders/1", None),
    (5, "GET", "/api/reviews", None),
    (10, "POST", "/api/checkout", {"customer": "demo", "items": [{"product_id": 3, "qty": 1}]}),
]


def request(cookie: str | None, method: str, path: str, body: object) -> str | None:
    """One request; returns the user's cookie (new when the proxy set one)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(TARGET + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            headers = resp.headers
            resp.read()
    except urllib.error.HTTPError as err:  # a 4xx/5xx answer is still an answer
        headers = err.headers
    except (OSError, ValueError):
        return cookie  # the proxy is not up yet, or restarting: try again later
    for value in headers.get_all("Set-Cookie") or []:
        if value.startswith("strangler_uid="):
            return value.split(";", 1)[0]
    return cookie


def shopper() -> None:
    cookie: str | None = None
    weights = [a[0] for a in ACTIONS]
    pause = USERS / RPS
    while not STOP.is_set():
        _, method, path, body = random.choices(ACTIONS, weights)[0]
        cookie = request(cookie, method, path, body)
        STOP.wait(random.uniform(0.5, 1.5) * pause)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    print(f"traffic: {USERS} users, ~{RPS} requests/s to {TARGET}", flush=True)
    threads = [threading.Thread(target=shopper, daemon=True) for _ in range(USERS)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    try:
        while not STOP.wait(1):
            pass
    except KeyboardInterrupt:
        STOP.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
