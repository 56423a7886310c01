"""Instructions per request: strangler under valgrind's callgrind, counting the user-space
instructions its process executes for a fixed number of requests.

    python bench/instr.py [--scenario demo] [--connections 1] [--requests 2000]
    python bench/instr.py --checkout /tmp/base          # another checkout of the repo

Wall time on this shared VM moves by tens of percent from minute to minute; an instruction
count hardly does (runs of the same code agree within about 1%), so a change to the hot path
can be judged here in one run each. It counts only our process's user-space instructions:
not the kernel's work in our syscalls, not cache misses, so it complements `bench/ab.py`
(time, paired) and does not replace it.

The origin is the NGINX origin of `bench/run.py`; the client is a small asyncio one in this
process (`--connections` keep-alive connections sending their requests one after another).
Counting starts after a warm-up (`callgrind_control --instr=on`) and ends with a dump.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.main import free_port, origin_and_reference  # noqa: E402
from bench.model import PROXY_CPU  # noqa: E402
from bench.nginx import Nginx  # noqa: E402
from bench.strangler import ROOT, SCENARIOS, STICKY_COOKIE, Strangler  # noqa: E402


class _Counted(Strangler):
    """`strangler run` under callgrind, instrumentation off until switched on."""

    def __init__(self, out: Path, *args: Any) -> None:
        super().__init__(*args)
        pin = self.command[:3] if self.command[0] == "taskset" else []
        self.command = [
            *pin,
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            *self.command[len(pin) :],
        ]

    def start(self, timeout: float = 180.0) -> Strangler:  # valgrind starts slowly
        return super().start(timeout)


@contextmanager
def origin_in_tempdir(prefix: str) -> Iterator[tuple[Path, Nginx]]:
    """A fresh work directory and the NGINX origin of bench/run.py serving from it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        origin, _ = origin_and_reference(workdir)
        origin.start("/bench/1k")
        try:
            yield workdir, origin
        finally:
            origin.stop()


async def load(port: int, path: str, connections: int, requests: int) -> None:
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Cookie: {STICKY_COOKIE}=bench-user-1\r\n\r\n"
    ).encode()

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(head)
                status = await reader.readline()
                if b" 200 " not in status:
                    raise RuntimeError(f"unexpected answer: {status!r}")
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
        finally:
            writer.close()

    share, extra = divmod(requests, connections)
    await asyncio.wait_for(
        asyncio.gather(*(one(share + (i < extra)) for i in range(connections))), 1800
    )


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _total(out: Path, before: set[Path]) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in sorted(set(out.parent.glob(out.name + "*")) - before):
            match = re.search(r"^(?:totals|summary): (\d+)", dump.read_text(), re.M)
            if match:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def measure(
    checkout: Path,
    scenario: str,
    path: str,
    connections: int,
    requests: int,
    keep: Path | None = None,
) -> float:
    with origin_in_tempdir("strangler-instr-") as (workdir, origin):
        out = workdir / "callgrind.out"
        port, admin = free_port(), free_port()
        proxy = _Counted(out, workdir, scenario, origin.url, port, admin, PROXY_CPU, checkout)
        proxy.start()
        try:
            asyncio.run(load(port, path, connections, max(100, requests // 10)))
            before = set(workdir.glob("callgrind.out*"))
            _control(proxy.pid, "--instr=on")
            asyncio.run(load(port, path, connections, requests))
            _control(proxy.pid, "--dump")
            total = _total(out, before)
            if keep is not None:
                for dump in set(workdir.glob("callgrind.out*")) - before:
                    shutil.copy(dump, keep)
            return total / requests
        finally:
            proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/instr.py", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="demo", choices=SCENARIOS)
    p.add_argument("--path", default="/bench/1k")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--checkout", type=Path, default=ROOT, help="the repo to run (default: this)")
    p.add_argument("--keep", type=Path, help="copy callgrind's dump here (callgrind_annotate)")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing (apt-get install valgrind)")
    per = measure(
        args.checkout, args.scenario, args.path, args.connections, args.requests, args.keep
    )
    print(
        f"{args.scenario}, {args.connections} connections, {args.path}, "
        f"{args.requests} requests: {per:,.0f} instructions per request"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
