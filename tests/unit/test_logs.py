"""The access log's JSON lines, built by hand for speed, are exactly what `json.dumps` gives
for the same entry (key order, escaping, numbers), whatever the request carried."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy import logs
from proxy.logs import AccessLog
from proxy.outcome import Outcome


class _Sink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_soon(self, line: str) -> None:
        self.lines.append(line)


def _expected(o: Outcome) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": "access",
        "request_id": o.request_id,
        "route": o.route,
        "backend": o.backend,
        "method": o.method,
        "path": o.path,
        "status": o.status,
        "duration_ms": round(o.duration * 1000, 3),
        "bytes": o.bytes_sent,
        "client": o.client_ip,
    }
    if o.attempts > 1:
        entry["attempts"] = o.attempts
    if o.fallback_from:
        entry["fallback_from"] = o.fallback_from
    if o.error:
        entry["error"] = o.error
    return entry


CASES = [
    dict(route="orders", backend="svc", method="GET", path="/api/orders/7"),
    dict(route="orders", backend="svc", method="GET", path='/a"b\\c/\u00e9\u2603', attempts=2),
    dict(route="r\u00e9", backend="mono", method="BREW", path="/x", fallback_from="svc"),
    dict(route="none", backend="none", method="POST", path="/", error='upstream "down"\n'),
    dict(route="orders", backend="svc", method="GET", path="/api/orders/7", status=503),
]


@pytest.mark.parametrize("case", CASES)
def test_an_access_line_is_what_json_dumps_gives(case: dict[str, Any]) -> None:
    sink = _Sink()
    log = AccessLog(sink)  # type: ignore[arg-type]
    o = Outcome("0123abcd", case["method"], case["path"], 0.0)
    o.route, o.backend = case["route"], case["backend"]
    o.status = case.get("status", 200)
    o.duration, o.bytes_sent, o.client_ip = 0.0123456, 1024, "10.0.0.\u00e9"
    o.attempts = case.get("attempts", 1)
    o.fallback_from = case.get("fallback_from", "")
    o.error = case.get("error", "")
    for _ in range(2):  # the second time from the caches
        log.log(o)
    for line in sink.lines:
        assert line.endswith("\n")
        entry = json.loads(line)
        timestamp = entry.pop("time")
        assert len(timestamp) == 24 and timestamp.endswith("Z")
        assert json.dumps(entry, separators=(",", ":")) == json.dumps(
            _expected(o), separators=(",", ":")
        )
        # Byte for byte: json.dumps of the whole entry, time first.
        whole = {"time": timestamp, **_expected(o)}
        assert line == json.dumps(whole, separators=(",", ":")) + "\n"


def test_the_name_caches_stay_bounded() -> None:
    sink = _Sink()
    log = AccessLog(sink)  # type: ignore[arg-type]
    for i in range(5000):
        o = Outcome("id", f"M{i}", "/", 0.0)  # a client may send any method
        log.log(o)
        assert len(logs._fragments) <= 4097 and len(logs._quoted) <= 4097
    assert json.loads(sink.lines[-1])["method"] == "M4999"
