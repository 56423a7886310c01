"""`strangler demo`: one demo app alone, or all three (monolith, orders, proxy) on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from proxy.demo import APPS, DEFAULT_PORTS

PACKAGED_CONFIG = Path(__file__).with_name("demo.yaml")
DEMO_TOKEN = "demo-token"


def demo_config() -> Path:
    """config/demo.yaml when run from a checkout (so edits are seen), else the packaged one."""
    local = Path("config/demo.yaml")
    return local if local.is_file() else PACKAGED_CONFIG


def run_app(name: str, host: str | None, port: int | None) -> int:
    import uvicorn

    uvicorn.run(
        APPS[name](),
        host=host or "127.0.0.1",
        port=port or DEFAULT_PORTS[name],
        log_level="warning",
        server_header=False,
    )
    return 0


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(app: str, host: str | None, port: int | None) -> int:
    if app != "all":
        return run_app(app, host, port)
    for needed in (*DEFAULT_PORTS.values(), port or 8080, 9901):
        if not _port_free(needed):
            print(
                f"strangler demo: port {needed} is in use (is a demo already running?)",
                file=sys.stderr,
            )
            return 1
    # Ctrl-C or a plain `kill` stops all three, also when started where SIGINT is ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    env = {**os.environ}
    env.setdefault("STRANGLER_ADMIN_TOKEN", DEMO_TOKEN)
    python = [sys.executable, "-m", "proxy"]
    children: list[subprocess.Popen[bytes]] = []
    try:
        for name, app_port in DEFAULT_PORTS.items():
            child = subprocess.Popen([*python, "demo", name], env=env)
            children.append(child)
            if not _wait_listening(app_port, child):
                print(
                    f"strangler demo: the {name} app did not start on :{app_port}", file=sys.stderr
                )
                return 1
        proxy_cmd = [*python, "run", "-c", str(demo_config()), "--log-format", "text"]
        if host:
            proxy_cmd += ["--host", host]
        if port:
            proxy_cmd += ["--port", str(port)]
        proxy = subprocess.Popen(proxy_cmd, env=env)
        children.append(proxy)
        proxy_port = port or 8080
        if not _wait_listening(proxy_port, proxy):
            print("strangler demo: the proxy did not start", file=sys.stderr)
            return 1
        shown = host if host and host != "0.0.0.0" else "127.0.0.1"
        print(
            f"\n  strangler demo is running\n"
            f"    shop, through the proxy:  http://{shown}:{proxy_port}/\n"
            f"    migration page:           http://127.0.0.1:9901/\n"
            f"    metrics:                  http://127.0.0.1:9901/metrics\n"
            f"    the monolith alone:       http://127.0.0.1:{DEFAULT_PORTS['monolith']}/\n"
            f"    the orders service alone: http://127.0.0.1:{DEFAULT_PORTS['orders']}/api/orders\n"
            f"  admin token: ${'{'}STRANGLER_ADMIN_TOKEN{'}'} = {env['STRANGLER_ADMIN_TOKEN']}\n"
            f"  Ctrl-C stops all three.\n",
            flush=True,
        )
        proxy.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(children)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
