"""Shadow traffic (SPEC §6): mirror a share of a route's requests to another backend after
the primary answered, and compare the two answers.

One `ShadowPolicy` per route, built from config and kept across reloads while `settings`
are equal. The pipeline asks `wants(method, body_size)` before the primary is sent (so it
knows whether to keep the request body and up to `capture_limit` bytes of the primary's
body), then calls `submit(...)` once the primary has answered. `submit` never waits: it
schedules one task on a bounded set, or drops the copy and counts it.

Results: "match" / "mismatch" when compared, "error" when the shadow could not be reached
or its answer could not be read (a 5xx is an answer, and is compared). Each result goes to
`on_result(backend, result)` for the metrics; mismatches are kept, newest first, with a diff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import UpstreamError
from proxy.forward import Timeouts, Upstream, UpstreamResponse
from proxy.headers import Headers
from proxy.jsonpath import JsonPath, compile_paths, remove_paths

__all__ = [
    "SHADOW_HEADER",
    "Captured",
    "Mirror",
    "ShadowPolicy",
    "compare",
]

log = logging.getLogger("strangler.shadow")

SHADOW_HEADER = b"x-strangler-shadow"
DEFAULT_CAPTURE_LIMIT = 1024 * 1024
MAX_MISMATCHES = 100
MAX_DIFF_LINES = 20
_DRAIN_LIMIT = 64 * 1024  # read this much of an uncompared answer to keep the connection
_INLINE_COMPARE = 64 * 1024  # larger pairs are compared off the event loop
_SHOWN_VALUE = 60
_PLAIN_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Captured:
    """One answer as compared: status, headers, and the body (whole, up to the limit)."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class Mirror:
    """The copy to send. `target` is already the shadow backend's (`upstream.target(...)`),
    `headers` are the ones the primary got; Host is rewritten for the shadow backend."""

    method: str
    target: str
    headers: Headers
    body: bytes | None
    request_id: str


# ---------------------------------------------------------------------------- comparison


def compare(
    primary: Captured,
    shadow: Captured,
    *,
    ignore: Sequence[JsonPath] = (),
    compare_headers: Sequence[str] = (),
) -> tuple[str, str]:
    """("match", "") or ("mismatch", diff): one line per difference, primary value on the
    left, at most `MAX_DIFF_LINES` lines."""
    diff = _Diff()
    if primary.status != shadow.status:
        diff.add(f"status: {primary.status} != {shadow.status}")
    _diff_headers(primary.headers, shadow.headers, compare_headers, diff)
    left, right = _as_json(primary.body), _as_json(shadow.body)
    if left is not _NOT_JSON and right is not _NOT_JSON:
        try:
            _diff_json(remove_paths(left, ignore), remove_paths(right, ignore), "$", diff)
        except RecursionError:
            _diff_bytes(primary.body, shadow.body, diff)
    else:
        _diff_bytes(primary.body, shadow.body, diff)
    if not diff.count:
        return "match", ""
    return "mismatch", diff.text()


class _Diff:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_DIFF_LINES:
            self.lines.append(line)

    def text(self) -> str:
        hidden = self.count - len(self.lines)
        more = [f"... and {hidden} more difference{'s' if hidden > 1 else ''}"] if hidden else []
        return "\n".join(self.lines + more)


_NOT_JSON = object()


def _as_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _diff_headers(primary: Headers, shadow: Headers, names: Sequence[str], diff: _Diff) -> None:
    for name in names:
        key = name.lower().encode("latin-1")
        left = [v for k, v in primary if k.lower() == key]
        right = [v for k, v in shadow if k.lower() == key]
        if left == right:
            continue
        label = f"header {name.lower()}"
        if not right:
            diff.add(f"{label}: missing in shadow")
        elif not left:
            diff.add(f"{label}: missing in primary")
        else:
            diff.add(f"{label}: {_show_header(left)} != {_show_header(right)}")


def _show_header(values: list[bytes]) -> str:
    return _shorten(json.dumps(b", ".join(values).decode("latin-1")))


def _diff_json(left: object, right: object, path: str, diff: _Diff) -> None:
    if isinstance(left, dict) and isinstance(right, dict):
        for key, value in left.items():
            here = path + _member(key)
            if key in right:
                _diff_json(value, right[key], here, diff)
            else:
                diff.add(f"{here}: missing in shadow")
        for key in right:
            if key not in left:
                diff.add(f"{path + _member(key)}: missing in primary")
    elif isinstance(left, list) and isinstance(right, list):
        for n in range(max(len(left), len(right))):
            here = f"{path}[{n}]"
            if n >= len(right):
                diff.add(f"{here}: missing in shadow")
            elif n >= len(left):
                diff.add(f"{here}: missing in primary")
            else:
                _diff_json(left[n], right[n], here, diff)
    elif not _same_scalar(left, right):
        diff.add(f"{path}: {_show(left)} != {_show(right)}")


def _same_scalar(left: object, right: object) -> bool:
    # JSON's true is not 1, although Python's True == 1; 1 and 1.0 are the same number.
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    return left == right


def _member(key: str) -> str:
    if _PLAIN_NAME_RE.fullmatch(key):
        return f".{key}"
    escaped = key.replace("\\", "\\\\").replace("'", "\\'")
    return f"['{escaped}']"


def _show(value: object) -> str:
    return _shorten(json.dumps(value, ensure_ascii=False, sort_keys=True))


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_VALUE else text[: _SHOWN_VALUE - 3] + "..."


def _diff_bytes(left: bytes, right: bytes, diff: _Diff) -> None:
    if left == right:
        return
    at = _first_difference(left, right)
    diff.add(f"body: {len(left)} != {len(right)} bytes, first difference at byte {at}")
    start = max(0, at - 8)
    diff.add(f"  primary: {left[start : at + 24]!r}")
    diff.add(f"  shadow:  {right[start : at + 24]!r}")


def _first_difference(left: bytes, right: bytes, step: int = 4096) -> int:
    at = 0
    end = min(len(left), len(right))
    while at < end and left[at : at + step] == right[at : at + step]:
        at += step
    for a, b in zip(left[at : at + step], right[at : at + step], strict=False):
        if a != b:
            return at
        at += 1
    return at  # one is a prefix of the other


# ---------------------------------------------------------------------------- the policy


class ShadowPolicy:
    """A route's shadow: which requests to copy, the bounded set of copies in flight, the
    counts and the last mismatches."""

    def __init__(
        self,
        *,
        route: str,
        backend: str,
        percent: int,
        methods: tuple[str, ...],
        max_body: int,
        compare: bool,
        ignore: tuple[str, ...],
        compare_headers: tuple[str, ...],
        on_result: Callable[[str, str], None],
        max_pending: int = 100,
        capture_limit: int = DEFAULT_CAPTURE_LIMIT,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= percent <= 100 or max_body < 0 or max_pending < 1 or capture_limit < 0:
            raise ValueError(
                "need 0 <= percent <= 100, max_body >= 0, max_pending >= 1, capture_limit >= 0"
            )
        self.route = route
        self.backend = backend
        self._percent = percent
        self._methods = frozenset(m.upper() for m in methods)
        self._max_body = max_body
        self._compare = compare
        self._ignore = compile_paths(ignore)  # ValueError here: at config time, not per request
        self._compare_headers = tuple(compare_headers)
        self._on_result = on_result
        self._max_pending = max_pending
        self._capture_limit = capture_limit
        self._rng = rng
        self._clock = clock
        self._settings = (
            backend,
            percent,
            tuple(methods),
            max_body,
            compare,
            tuple(ignore),
            tuple(compare_headers),
            max_pending,
            capture_limit,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts = {"match": 0, "mismatch": 0, "error": 0, "dropped": 0}
        self._mismatches: deque[dict[str, Any]] = deque(maxlen=MAX_MISMATCHES)
        self._closed = False
        self._warned = False

    @property
    def settings(self) -> tuple[object, ...]:
        return self._settings

    @property
    def capture_limit(self) -> int:
        """Bytes of the primary's body to keep for `submit`; 0 when nothing is compared. A
        longer body is not kept: pass `primary=None` and the copy is sent uncompared."""
        return self._capture_limit if self._compare else 0

    @property
    def pending(self) -> int:
        return len(self._tasks)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def recent_mismatches(self) -> list[dict[str, Any]]:
        """Newest first: {"time", "request_id", "method", "target", "status", "diff"}."""
        return [dict(m) for m in self._mismatches]

    def wants(self, method: str, body_size: int | None) -> bool:
        """Whether to copy this request: its method is shadowed, its body is known (None: a
        stream of unknown size) and at most `max_body` bytes, and it falls in `percent`."""
        if body_size is None or body_size > self._max_body or method not in self._methods:
            return False
        return self._percent >= 100 or (self._percent > 0 and self._rng() * 100 < self._percent)

    def submit(
        self,
        upstream: Upstream,
        request: Mirror,
        primary: Captured | None,
        timeouts: Timeouts,
    ) -> bool:
        """Schedule the copy and return at once; False (counted as dropped) when
        `max_pending` copies are already in flight or the policy is closed."""
        if self._closed or len(self._tasks) >= self._max_pending:
            self._counts["dropped"] += 1
            return False
        task = asyncio.get_running_loop().create_task(
            self._run(upstream, request, primary, timeouts),
            name=f"shadow {self.route} -> {self.backend}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def wait_idle(self) -> None:
        """Return once no copy is in flight (tests, and a graceful drain under a deadline)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Cancel the copies in flight and refuse new ones (shutdown)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self, upstream: Upstream, request: Mirror, primary: Captured | None, timeouts: Timeouts
    ) -> None:
        # Nothing may escape this task: the loop's default handler would log it at GC.
        try:
            result = await self._exchange(upstream, request, primary, timeouts)
        except (UpstreamError, TimeoutError, OSError) as exc:
            log.debug(
                "shadow %s %s to %s failed: %s", request.method, request.target, self.backend, exc
            )
            result = "error"
        except Exception:
            self._warn_once("shadow of route %s failed unexpectedly", self.route)
            result = "error"
        if result is None:
            return
        self._counts[result] += 1
        try:
            self._on_result(self.backend, result)
        except Exception:
            self._warn_once("shadow result callback of route %s failed", self.route)

    def _warn_once(self, message: str, *args: object) -> None:
        if not self._warned:
            self._warned = True
            log.exception(message, *args)

    async def _exchange(
        self, upstream: Upstream, request: Mirror, primary: Captured | None, timeouts: Timeouts
    ) -> str | None:
        headers = _mirror_headers(upstream.host_header, request.headers)
        async with asyncio.timeout(timeouts.total):
            response = await upstream.send(
                request.method, request.target, headers, request.body, timeouts
            )
            try:
                if primary is None or not self._compare:
                    await _read_capped(response, _DRAIN_LIMIT, keep=False)
                    return None
                body, complete = await _read_capped(response, self._capture_limit, keep=True)
            finally:
                response.close()
        shadow = Captured(response.status, response.headers, body)
        if not complete:
            verdict, diff = (
                "mismatch",
                (
                    f"body: shadow longer than {self._capture_limit} bytes, "
                    f"primary {len(primary.body)} bytes"
                ),
            )
        elif len(primary.body) + len(body) > _INLINE_COMPARE:
            verdict, diff = await asyncio.to_thread(
                compare,
                primary,
                shadow,
                ignore=self._ignore,
                compare_headers=self._compare_headers,
            )
        else:
            verdict, diff = compare(
                primary, shadow, ignore=self._ignore, compare_headers=self._compare_headers
            )
        if verdict == "mismatch":
            self._mismatches.appendleft(
                {
                    "time": self._clock(),
                    "request_id": request.request_id,
                    "method": request.method,
                    "target": request.target,
                    "status": [primary.status, shadow.status],
                    "diff": diff,
                }
            )
        return verdict


def _mirror_headers(host: bytes | None, headers: Headers) -> Headers:
    """The primary's request headers for the shadow: its Host (unless `host` is None, i.e.
    preserve_host), and the shadow mark, which a client cannot forge."""
    out: Headers = [(b"host", host)] if host is not None else []
    for name, value in headers:
        lower = name.lower()
        if lower == SHADOW_HEADER or (host is not None and lower == b"host"):
            continue
        out.append((name, value))
    out.append((SHADOW_HEADER, b"1"))
    return out


async def _read_capped(response: UpstreamResponse, limit: int, *, keep: bool) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether that was all of it."""
    parts: list[bytes] = []
    size = 0
    chunks = response.chunks()
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                return b"".join(parts), False
            if keep:
                parts.append(chunk)
    finally:
        aclose = getattr(chunks, "aclose", None)  # a generator left early is closed now
        if aclose is not None:
            await aclose()
    return b"".join(parts), True
