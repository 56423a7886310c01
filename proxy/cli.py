"""The `strangler` command (SPEC §1): argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__

EXIT_OK, EXIT_CHANGES, EXIT_INVALID = 0, 1, 2
DEFAULT_CONFIG = "config/strangler.yaml"
DEFAULT_ADMIN = "http://127.0.0.1:9901"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="strangler", description="A reverse proxy for strangler-fig migrations."
    )
    p.add_argument("--version", action="version", version=f"strangler {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve traffic")
    run.add_argument(
        "-c", "--config", help=f"route file (default $STRANGLER_CONFIG, then {DEFAULT_CONFIG})"
    )
    run.add_argument("--host", help="main port address (overrides listen.host)")
    run.add_argument("--port", type=int, help="main port (overrides listen.port)")
    run.add_argument("--admin-host", help="admin address (overrides admin.host)")
    run.add_argument("--admin-port", type=int, help="admin port (overrides admin.port)")
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    run.add_argument("--log-format", choices=("json", "text"), default="json")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    check = sub.add_parser("check", help="validate a route file and print its route table")
    check.add_argument("file")

    explain = sub.add_parser(
        "explain", help="which route and backend a request would reach, and why"
    )
    explain.add_argument("-c", "--config", help="route file (default as for run)")
    explain.add_argument("method")
    explain.add_argument("url")
    explain.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    explain.add_argument("--client-ip", default="127.0.0.1", help="the client address to assume")
    explain.add_argument("--json", action="store_true", help="print the answer as JSON")

    diff = sub.add_parser("diff", help="what changing the config from OLD to NEW would do")
    diff.add_argument("old")
    diff.add_argument("new")
    diff.add_argument("--json", action="store_true")

    status = sub.add_parser("status", help="the running proxy's routes, splits and breakers")
    status.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"admin URL (default {DEFAULT_ADMIN})"
    )
    status.add_argument("--json", action="store_true")

    split = sub.add_parser("split", help="change a live split (orders=0 monolith=100: kill switch)")
    split.add_argument("route")
    split.add_argument("weights", nargs="*", metavar="BACKEND=PCT")
    split.add_argument("--admin", default=DEFAULT_ADMIN)
    split.add_argument("--token-env", default="STRANGLER_ADMIN_TOKEN")
    split.add_argument("--clear", action="store_true", help="remove the override")

    demo = sub.add_parser("demo", help="run the demo monolith, orders service and proxy")
    demo.add_argument("app", nargs="?", default="all", choices=("all", "monolith", "orders"))
    demo.add_argument("--host", default=None)
    demo.add_argument("--port", type=int, default=None)
    return p


def config_path(given: str | None) -> Path:
    return Path(given or os.environ.get("STRANGLER_CONFIG") or DEFAULT_CONFIG)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "run": _run,
        "check": _check,
        "explain": _explain,
        "diff": _diff,
        "status": _status,
        "split": _split,
        "demo": _demo,
    }[args.command]
    return handler(args)


def _load_or_report(path: Path, *, offloaded: bool = False) -> object:
    """The file's `Config`, or None once every issue is on stderr. `offloaded`: validated
    in a child process, so that this one (it will serve) never builds the validators."""
    from proxy.config import ConfigError

    try:
        if offloaded:
            from proxy import offload

            return offload.load(path)
        from proxy import loader

        return loader.load(path)
    except ConfigError as err:
        for issue in err.issues:
            print(issue, file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    if args.workers > 1:
        # Workers aggregate metrics through files: set before prometheus_client is imported.
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="strangler-metrics-")
    from proxy.config import Config
    from proxy.server import Options, run

    path = config_path(args.config)
    config = _load_or_report(path, offloaded=True)
    if not isinstance(config, Config):
        return EXIT_INVALID
    opts = Options(
        config_path=path,
        host=args.host or config.listen.host,
        port=config.listen.port if args.port is None else args.port,
        admin_host=args.admin_host or config.admin.host,
        admin_port=config.admin.port if args.admin_port is None else args.admin_port,
        workers=max(1, args.workers),
        log_format=args.log_format,
        log_level=args.log_level,
    )
    return run(config, opts)


def _check(args: argparse.Namespace) -> int:
    from proxy.config import Config
    from proxy.loader import route_table

    config = _load_or_report(Path(args.file))
    if not isinstance(config, Config):
        return EXIT_INVALID
    print(route_table(config))
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from proxy.config import Config
    from proxy.explain import explain, render
    from proxy.metrics import Metrics
    from proxy.runtime import build

    config = _load_or_report(config_path(args.config))
    if not isinstance(config, Config):
        return EXIT_INVALID
    headers = []
    for raw in args.header:
        name, sep, value = raw.partition(":")
        if not sep:
            print(f"strangler explain: header {raw!r} is not 'Name: value'", file=sys.stderr)
            return EXIT_INVALID
        headers.append((name.strip(), value.strip()))
    runtime = build(config, None, Metrics())
    try:
        answer = explain(runtime, args.method, args.url, headers, client_ip=args.client_ip)
    except ValueError as err:
        print(f"strangler explain: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    from proxy.config import Config
    from proxy.diff import diff, render

    old = _load_or_report(Path(args.old))
    new = _load_or_report(Path(args.new))
    if not isinstance(old, Config) or not isinstance(new, Config):
        return EXIT_INVALID
    changes = diff(old, new)
    print(json.dumps(changes, indent=2) if args.json else render(changes))
    return EXIT_CHANGES if changes["changed"] else EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from proxy.client import status

    return status(args.admin, as_json=args.json)


def _split(args: argparse.Namespace) -> int:
    from proxy.client import set_split

    return set_split(args.admin, args.route, args.weights, args.token_env, clear=args.clear)


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo.runner import run_demo

    return run_demo(args.app, args.host, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
