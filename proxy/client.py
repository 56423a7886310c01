"""Our own HTTP client of the admin API (SPEC §1 `strangler status` / `strangler split`, §8).

The I/O functions (`status`, `set_split`) talk to the admin port with httpx, print to
stdout/stderr and return the exit code; everything they print is built by the pure
functions below them (`format_status`, `format_split`, `format_problem`, `parse_weights`),
which take plain data and are unit-tested without a network.

Exit codes: 0 done; 1 refused, unreachable or an unexpected answer; 2 a usage mistake
(a malformed `BACKEND=PCT`). The admin token is sent, never printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TIMEOUT_S = 5.0
_BREAKER_MARK = {"closed": "closed", "half-open": "half-open", "open": "open !"}
_HEADER = ("BACKEND", "BREAKER", "RPS", "ERR %", "P95 MS", "UP")
_NUMERIC = {2, 3, 4}


class UsageError(ValueError):
    """A command-line mistake: the message is printed and the exit code is 2."""


# --- pure helpers --------------------------------------------------------------------------


def admin_base(admin_url: str) -> str:
    """The admin URL without a trailing slash; `host:port` is taken as `http://host:port`."""
    url = admin_url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def parse_weights(items: Sequence[str]) -> dict[str, int]:
    """`["orders=0", "monolith=100"]` -> `{"orders": 0, "monolith": 100}`, in the given order.

    Raises UsageError for an item that is not BACKEND=PCT with PCT an integer from 0 to 100,
    for a backend named twice, or for no items at all. Whether the backends exist and the
    percentages sum to 100 is the admin API's to say (it knows the config).
    """
    if not items:
        raise UsageError("give the new split as BACKEND=PCT... (e.g. orders=0 monolith=100)")
    weights: dict[str, int] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name:
            raise UsageError(f"{item!r} is not BACKEND=PCT (e.g. orders=25)")
        if not raw.isdigit() or not 0 <= int(raw) <= 100:
            raise UsageError(f"{item!r}: {raw!r} is not an integer percentage from 0 to 100")
        if name in weights:
            raise UsageError(f"backend {name!r} is given twice")
        weights[name] = int(raw)
    return weights


def format_split(split: Mapping[str, Any]) -> str:
    """`{"orders": 25, "monolith": 75}` -> `orders 25% / monolith 75%`."""
    if not split:
        return "-"
    return " / ".join(f"{name} {_pct_number(pct)}%" for name, pct in split.items())


def format_match(match: Mapping[str, Any]) -> str:
    """The route's match: prefix, then methods, host and headers when present."""
    parts = [str(match.get("prefix", "/"))]
    methods = match.get("methods")
    if methods:
        parts.append(",".join(str(m) for m in methods))
    if match.get("host"):
        parts.append(f"host={match['host']}")
    headers = match.get("headers")
    if isinstance(headers, Mapping):
        parts.extend(f"header {name}={value}" for name, value in headers.items())
    return " ".join(parts)


def format_time(value: Any) -> str:
    """An epoch time as ISO 8601 UTC (`2024-05-01T12:00:00Z`); a string is kept as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    moment = datetime.fromtimestamp(value, tz=UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def shadow_summary(shadow: Mapping[str, Any]) -> str:
    """`match rate 97.6% (980 match, 24 mismatch; 3 errors)`: errors are not in the rate."""
    match, mismatch = _int(shadow.get("match")), _int(shadow.get("mismatch"))
    errors = _int(shadow.get("error"))
    compared = match + mismatch
    rate = f"{100 * match / compared:.1f}%" if compared else "-"
    error_word = "error" if errors == 1 else "errors"
    return f"match rate {rate} ({match} match, {mismatch} mismatch; {errors} {error_word})"


def format_status(data: Mapping[str, Any]) -> str:
    """The human view of `GET /api/routes`: one block per route, then the totals.

    Each block is the route's name, match and split (`(override)` while a live override is
    set), a row per backend (breaker state with an open breaker marked `!`, requests per
    second, error rate, p95 latency and health over the last 60 s), and its bulkhead use
    and shadow match rate. The columns line up across all the blocks.
    """
    routes = [r for r in data.get("routes") or [] if isinstance(r, Mapping)]
    blocks = [
        (route, [_backend_row(n, b) for n, b in _backends(route).items()]) for route in routes
    ]
    widths = [len(h) for h in _HEADER]
    for _, rows in blocks:
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if i in _NUMERIC else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return ("  " + "  ".join(cells)).rstrip()

    out: list[str] = [] if routes else ["no routes", ""]
    for route, rows in blocks:
        split = format_split(route.get("split") or {})
        if route.get("override") is not None:
            split += " (override)"
        out.append(f"{route.get('name', '?')}  {format_match(route.get('match') or {})}  {split}")
        out.append(line(_HEADER))
        out.extend(line(row) for row in rows)
        extras = [_bulkhead(route.get("bulkhead"))]
        shadow = route.get("shadow")
        if isinstance(shadow, Mapping):
            extras.append("shadow " + shadow_summary(shadow))
        if any(extras):
            out.append("  " + "  ".join(e for e in extras if e))
        out.append("")
    share = 100 * _float(data.get("migrated_share"))
    out.append(f"migrated share: {share:.1f}% of requests served by new services (last 60 s)")
    out.append(_last_reload(data.get("last_reload")))
    return "\n".join(out)


def format_problem(status_code: int, body: Any, fallback: str) -> str:
    """A refusal as one line (`401 Unauthorized: detail`), then one line per listed error."""
    if isinstance(body, Mapping):
        title = str(body.get("title") or fallback)
        detail = body.get("detail")
        first = f"{status_code} {title}" + (f": {detail}" if detail else "")
        errors = body.get("errors")
        lines = [first]
        if isinstance(errors, list):
            lines.extend(f"  {err}" for err in errors)
        return "\n".join(lines)
    text = str(body).strip().splitlines()[0][:200] if str(body).strip() else ""
    return f"{status_code} {fallback}" + (f": {text}" if text else "")


def unreachable_message(command: str, admin_url: str, err: httpx.HTTPError) -> str:
    """`strangler status: cannot reach the admin API at URL: connection refused - ...`."""
    return (
        f"strangler {command}: cannot reach the admin API at {admin_url}: {_reason(err)}"
        " - is strangler running? (use --admin URL)"
    )


# --- I/O ------------------------------------------------------------------------------------


def status(admin_url: str, *, as_json: bool = False) -> int:
    """`strangler status`: print the running proxy's routes (or its raw JSON with as_json)."""
    base = admin_base(admin_url)
    try:
        with httpx.Client(timeout=TIMEOUT_S) as client:
            response = client.get(f"{base}/api/routes")
    except httpx.HTTPError as err:
        _err(unreachable_message("status", base, err))
        return EXIT_FAILED
    if response.status_code != 200:
        problem = format_problem(response.status_code, _json_or_text(response), _phrase(response))
        _err(f"strangler status: the admin API at {base} answered {problem}")
        return EXIT_FAILED
    try:
        data = response.json()
    except ValueError:
        _err(f"strangler status: the admin API at {base} did not answer JSON")
        return EXIT_FAILED
    if as_json:
        print(response.text.rstrip("\n"))
        return EXIT_OK
    if not isinstance(data, Mapping) or not isinstance(data.get("routes"), list):
        _err(f"strangler status: unexpected answer from {base}/api/routes (no 'routes' list)")
        return EXIT_FAILED
    print(format_status(data))
    return EXIT_OK


def set_split(
    admin_url: str,
    route: str,
    weights: Sequence[str],
    token_env: str,
    *,
    clear: bool = False,
) -> int:
    """`strangler split`: set (POST) or, with clear, remove (DELETE) a route's live override."""
    if clear and weights:
        _err("strangler split: --clear takes no BACKEND=PCT (it restores the configured split)")
        return EXIT_USAGE
    parsed: dict[str, int] = {}
    if not clear:
        try:
            parsed = parse_weights(weights)
        except UsageError as err:
            _err(f"strangler split: {err}")
            return EXIT_USAGE
    token = os.environ.get(token_env, "")
    if not token:
        _err(f"strangler split: set ${token_env} to the admin token")
        return EXIT_FAILED
    base = admin_base(admin_url)
    url = f"{base}/api/routes/{quote(route, safe='')}/split"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(timeout=TIMEOUT_S) as client:
            if clear:
                response = client.delete(url, headers=headers)
            else:
                response = client.post(url, json=parsed, headers=headers)
    except httpx.HTTPError as err:
        _err(unreachable_message("split", base, err))
        return EXIT_FAILED
    if response.status_code != 200:
        problem = format_problem(response.status_code, _json_or_text(response), _phrase(response))
        _err(f"strangler split: refused: {problem}")
        return EXIT_FAILED
    if clear:
        print(f"{route}: override cleared, the configured split applies again")
        return EXIT_OK
    answer = _json_or_text(response)
    split = answer.get("split") if isinstance(answer, Mapping) else None
    shown = split if isinstance(split, Mapping) and split else parsed
    print(f"{route}: {format_split(shown)} (live override until the next reload)")
    return EXIT_OK


# --- small parts ----------------------------------------------------------------------------


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _reason(err: httpx.HTTPError) -> str:
    text = str(err).strip()
    if isinstance(err, httpx.TimeoutException):
        return f"no answer within {TIMEOUT_S:g} s"
    if isinstance(err, httpx.ConnectError):
        lowered = text.lower()
        if not text or "refused" in lowered:
            return "connection refused"
        return f"cannot connect ({text})"
    return text or type(err).__name__


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _phrase(response: httpx.Response) -> str:
    return response.reason_phrase or "error"


def _backends(route: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    backends = route.get("backends")
    if not isinstance(backends, Mapping):
        return {}
    return {str(k): v if isinstance(v, Mapping) else {} for k, v in backends.items()}


def _backend_row(name: str, b: Mapping[str, Any]) -> tuple[str, ...]:
    breaker = str(b.get("breaker", "-"))
    return (
        name,
        _BREAKER_MARK.get(breaker, breaker),
        f"{_float(b.get('rps')):.2f}",
        f"{100 * _float(b.get('error_rate')):.1f}",
        f"{_float(b.get('p95_ms')):.1f}",
        _up(b.get("up")),
    )


def _bulkhead(bulkhead: Any) -> str:
    if not isinstance(bulkhead, Mapping):
        return ""
    text = f"bulkhead {_int(bulkhead.get('in_flight'))}/{bulkhead.get('max_concurrent', '-')}"
    queued = _int(bulkhead.get("queued"))
    return text + (f" (+{queued} queued)" if queued else "")


def _last_reload(last: Any) -> str:
    if not isinstance(last, Mapping):
        return "last reload: -"
    text = f"last reload: {format_time(last.get('time'))} {last.get('result', '-')}"
    errors = last.get("errors")
    if isinstance(errors, list) and errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        text += f": {errors[0]}{more}"
    return text


def _up(value: Any) -> str:
    if value is None:
        return "-"
    return "yes" if value else "no"


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value)


def _pct_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
