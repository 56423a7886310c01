"""What the serving process imports, and when (issue 8: peak RSS per worker). uvicorn, with
click and its config machinery, is ~3 MiB of a worker's memory: both ports are served by
`proxy.http1`, and uvicorn is imported only for the first WebSocket it hands over.

Seen from outside the real process: with PYTHONPROFILEIMPORTTIME set, Python writes a line
to stderr (here the proxy's log) for every module an `import` statement imports, as it does
(not for `importlib.import_module`, which uvicorn uses for its protocol classes)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from websockets.sync.client import connect

from tests.e2e.conftest import Backends, main_config
from tests.e2e.harness import ProxyProcess, wait_until

_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +([\w.]+)$", re.MULTILINE)


def imported(proxy: ProxyProcess) -> set[str]:
    return set(_IMPORTED.findall(proxy.log_text()))


def test_uvicorn_is_imported_on_the_first_websocket_only(
    backends: Backends, tmp_path: Path
) -> None:
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    with ProxyProcess(main_config(backends), tmp_path, env=env) as proxy:
        for _ in range(3):
            assert httpx.get(proxy.url + "/api/orders/1", timeout=10).status_code == 200
        with httpx.Client(base_url=proxy.admin, timeout=10) as admin:
            assert admin.get("/healthz").status_code == 200
            assert admin.get("/readyz").status_code == 200
            assert admin.get("/api/routes").status_code == 200
            assert "strangler_requests_total" in admin.get("/metrics").text
            assert admin.post("/api/reload").status_code in (401, 403)
        before = imported(proxy)
        assert "proxy.http1" in before and "starlette.routing" in before  # the log works
        assert not {m for m in before if m.split(".")[0] in ("uvicorn", "click")}

        url = proxy.url.replace("http://", "ws://") + "/api/orders/ws"
        with connect(url, open_timeout=10) as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "orders: hi"
        assert wait_until(lambda: {"uvicorn", "uvicorn.config"} <= imported(proxy), 5)
        # A second WebSocket reuses what the first imported and built.
        with connect(url, open_timeout=10) as ws:
            ws.send("again")
            assert ws.recv(timeout=5) == "orders: again"
        assert httpx.get(proxy.admin + "/healthz", timeout=10).status_code == 200
