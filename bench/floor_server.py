"""Serve one of bench/floor_apps.py's bare apps on strangler's own main-port server
(proxy.http1) instead of uvicorn, for bench/floors.py:

    FLOOR_ORIGIN=http://127.0.0.1:PORT python bench/floor_server.py local|pooled PORT

With `local` it measures the server alone; with `pooled`, the server and strangler's client
with nothing between them (no pipeline, policies, log or metrics): the floor under strangler.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import floor_apps  # noqa: E402
from proxy.config import Limits  # noqa: E402
from proxy.http1 import MainServer  # noqa: E402


async def serve(app_name: str, port: int) -> None:
    sock = socket.create_server(("127.0.0.1", port), backlog=2048)
    sock.setblocking(False)
    await MainServer(getattr(floor_apps, app_name), Limits(), grace=1.0).serve([sock])


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], int(sys.argv[2])))
