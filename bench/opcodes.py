"""Python bytecodes per request, by function: `strangler run` with a tracer that counts every
opcode the serving thread executes, between two signals.

    python bench/opcodes.py [--scenario demo] [--connections 1] [--requests 1000] [--top 40]

Deterministic where time is not: the same request makes the same bytecodes, so the table
says which functions of the request's path do the most Python work, and a change to one
shows up exactly (the tracer slows the proxy ~50x, so only the counts mean anything). The
same harness as `bench/instr.py` (NGINX origin, a small asyncio client, warm-up first).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _serve_traced(out: str, argv: list[str]) -> int:
    """Inside the traced process: count opcodes per (file, function) from SIGUSR1 to
    SIGUSR2, then write them to `out`."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_qualname)] += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    def start(*_: object) -> None:
        counts.clear()
        sys.settrace(tracer)
        frame = sys._getframe(1)
        while frame is not None:  # the frames already running (the event loop's)
            frame.f_trace, frame.f_trace_opcodes = local, True
            frame = frame.f_back  # type: ignore[assignment]

    def stop(*_: object) -> None:
        sys.settrace(None)
        rows = [[file, name, n] for (file, name), n in counts.items()]
        Path(out).write_text(json.dumps(rows))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from proxy.cli import main as cli_main

    return cli_main(argv)


def _short(file: str) -> str:
    parts = Path(file).parts
    if "proxy" in parts:
        return "/".join(parts[parts.index("proxy") :])
    return "/".join(parts[-2:])


def main(argv: Sequence[str] | None = None) -> int:
    from bench import instr
    from bench.main import free_port
    from bench.model import PROXY_CPU
    from bench.strangler import SCENARIOS, Strangler

    p = argparse.ArgumentParser(prog="bench/opcodes.py", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="demo", choices=SCENARIOS)
    p.add_argument("--path", default="/bench/1k")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    with instr.origin_in_tempdir("strangler-opcodes-") as (workdir, origin):
        out = workdir / "opcodes.json"
        port, admin = free_port(), free_port()
        proxy = Strangler(workdir, args.scenario, origin.url, port, admin, PROXY_CPU)
        at = proxy.command.index("-m")
        proxy.command[at : at + 2] = [str(Path(__file__).resolve()), "--serve-traced", str(out)]
        proxy.start()
        try:
            asyncio.run(instr.load(port, args.path, args.connections, 200))
            os.kill(proxy.pid, signal.SIGUSR1)
            asyncio.run(instr.load(port, args.path, args.connections, args.requests))
            os.kill(proxy.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            rows = json.loads(out.read_text())
        finally:
            proxy.stop()
    total = sum(n for _, _, n in rows)
    by_file: collections.Counter[str] = collections.Counter()
    for file, _, n in rows:
        by_file[_short(file)] += n
    print(
        f"{args.scenario}, {args.connections} connections, {args.path}: "
        f"{total / args.requests:,.0f} bytecodes per request"
    )
    print("\nby file:")
    for file, n in by_file.most_common(args.top):
        print(f"{n / args.requests:9,.1f}  {n / total:6.1%}  {file}")
    print("\nby function:")
    rows.sort(key=lambda row: -row[2])
    for file, name, n in rows[: args.top]:
        print(f"{n / args.requests:9,.1f}  {n / total:6.1%}  {name} ({_short(file)})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-traced"]:
        raise SystemExit(_serve_traced(sys.argv[2], sys.argv[3:]))
    raise SystemExit(main())
