"""NGINX twice: the origin serving static files, and the reference reverse proxy.

Both run from generated configs in a temp dir, one worker process each, access log off,
never as the system service. The settings that matter for the comparison:

origin   sendfile, tcp_nopush/nodelay, open_file_cache, keepalive_requests 1000000 (the
         default 1000 would close every client connection each 1000 requests)
proxy    upstream keepalive pool of 128 connections (HTTP/1.1, Connection ""), client
         keepalive_requests 1000000, X-Forwarded-For/-Proto and an X-Request-ID set on the
         way in and returned on the way out (strangler does the same work), response
         buffering on with 8 x 64 KiB buffers (the default 8 x 4 KiB made NGINX ~1.4x slower
         on 1 MiB bodies here: a weaker reference; strangler relays 64 KiB chunks too) and no
         temp files (proxy_max_temp_file_size 0: larger bodies stream, never spill to disk)
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from bench import procstat

_TEMP_MODULES = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError("nginx is not installed: run bench/deps.sh")
    return found


def version() -> str:
    done = subprocess.run([binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: nginx/")


def _temp_paths(workdir: Path) -> str:
    """Temp dirs inside `workdir` for every module compiled in (NGINX creates them at start,
    and the compiled-in defaults under /var/lib/nginx need root)."""
    built = subprocess.run([binary(), "-V"], capture_output=True, text=True, check=False).stderr
    lines = []
    for module in _TEMP_MODULES:
        if module != "client_body" and f"--without-http_{module}_module" in built:
            continue
        lines.append(f"  {module}_temp_path {workdir / 'tmp' / module};")
    return "\n".join(lines)


def _common(workdir: Path, name: str) -> str:
    return f"""
worker_processes 1;
daemon off;
master_process on;
user {getpass.getuser()};
pid {workdir / (name + ".pid")};
error_log {workdir / (name + "-error.log")} warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 4096; }}
"""


def origin_config(workdir: Path, port: int, root: Path) -> str:
    return (
        _common(workdir, "origin")
        + f"""
http {{
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  open_file_cache max=64 inactive=600s;
  open_file_cache_valid 600s;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
{_temp_paths(workdir)}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {root};
    location / {{ }}
  }}
}}
"""
    )


def proxy_config(workdir: Path, port: int, origin_port: int) -> str:
    return (
        _common(workdir, "proxy")
        + f"""
http {{
  access_log off;
  tcp_nodelay on;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
{_temp_paths(workdir)}
  upstream origin {{
    server 127.0.0.1:{origin_port};
    keepalive 128;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Request-ID $request_id;
      add_header X-Request-ID $request_id;
      proxy_buffering on;
      proxy_buffer_size 64k;
      proxy_buffers 8 64k;
      proxy_busy_buffers_size 128k;
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""
    )


class Nginx:
    """One NGINX master (and its worker) started under `taskset -c CPU`."""

    def __init__(self, workdir: Path, name: str, config: str, port: int, cpu: int | None) -> None:
        self.workdir = workdir
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = workdir / f"{name}.conf"
        self.config_path.write_text(config)
        for module in _TEMP_MODULES:
            (workdir / "tmp" / module).mkdir(parents=True, exist_ok=True)
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.command = [
            *pin,
            binary(),
            "-p",
            str(workdir),
            "-e",
            str(workdir / f"{name}-error.log"),
            "-c",
            str(self.config_path),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, probe_path: str, timeout: float = 10.0) -> Nginx:
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / f"{self.name}-error.log").read_text(errors="replace")
                raise RuntimeError(f"nginx ({self.name}) exited {self.proc.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(self.url + probe_path, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx ({self.name}) did not answer on {self.url}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return procstat.tree(self.pid)

    def worker_peak_rss_kib(self) -> int:
        workers = [p for p in self.pids() if p != self.pid]
        return max((procstat.peak_rss_kib(p) for p in workers), default=0)

    def worker_rss_kib(self) -> int:
        workers = [p for p in self.pids() if p != self.pid]
        return max((procstat.status_kib(p, "VmRSS") for p in workers), default=0)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
