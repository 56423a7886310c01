"""The proxy's own errors, and the one place that renders them as problem+json (RFC 9457).

ProxyError
  BadRequest              400
  BodyTooLarge            413
  Unavailable             503 (Retry-After)
    BulkheadFull
    CircuitOpen
  UpstreamError           reason: connect | timeout | status | protocol
    UpstreamConnectError  502
    UpstreamTimeout       504
    UpstreamProtocolError 502
    UpstreamStatusError   carries a 5xx answer; relayed when it is the final one
  ClientGone              the client went away: nobody to answer (logged as 499)
"""

from __future__ import annotations

import json
import math
from typing import Any


class ProxyError(Exception):
    status = 500
    title = "Internal proxy error"

    def __init__(self, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.retry_after = retry_after


class BadRequest(ProxyError):
    status = 400
    title = "Bad request"


class BodyTooLarge(ProxyError):
    status = 413
    title = "Request body too large"


class BodyTimeout(ProxyError):
    status = 408
    title = "Request body not received in time"


class Unavailable(ProxyError):
    status = 503
    title = "Service unavailable"


class BulkheadFull(Unavailable):
    title = "Route at capacity"


class CircuitOpen(Unavailable):
    title = "Circuit breaker open"


class UpstreamError(ProxyError):
    reason = "protocol"


class UpstreamConnectError(UpstreamError):
    status = 502
    title = "Backend unreachable"
    reason = "connect"


class UpstreamTimeout(UpstreamError):
    status = 504
    title = "Backend timed out"
    reason = "timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """The connection never opened: a timeout, and like a connect error nothing was sent."""

    title = "Backend timed out"


class UpstreamProtocolError(UpstreamError):
    status = 502
    title = "Bad response from backend"
    reason = "protocol"


class UpstreamStatusError(UpstreamError):
    """A 5xx from the backend: a failure for breakers and retries, relayed if final."""

    status = 502
    title = "Backend error"
    reason = "status"

    def __init__(self, upstream_status: int, response: Any = None) -> None:
        super().__init__(f"backend answered {upstream_status}")
        self.upstream_status = upstream_status
        self.response = response


class ClientGone(ProxyError):
    status = 499
    title = "Client closed the connection"


PROBLEM_TYPE = "application/problem+json"


def problem(
    error: ProxyError, *, route: str, request_id: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the problem+json answer for `error`."""
    body = json.dumps(
        {
            "type": "about:blank",
            "status": error.status,
            "title": error.title,
            "detail": error.detail,
            "route": route,
            "request_id": request_id,
        }
    ).encode()
    headers = [
        (b"content-type", PROBLEM_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"cache-control", b"no-store"),
    ]
    if error.status == 503:
        seconds = max(1, math.ceil(error.retry_after or 1))
        headers.append((b"retry-after", str(seconds).encode()))
    return error.status, headers, body
