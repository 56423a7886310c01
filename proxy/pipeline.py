"""The order of a request's steps, and the only place that knows it:

    match -> choose -> body -> bulkhead -> [breaker -> attempt -> retry]* -> fallback
          -> relay -> record

(body: a request body of up to 64 KiB is read whole, to be replayed, before a bulkhead slot
is taken; a larger one streams during the attempt.)

Each step is owned by its own module (routing, split, bulkhead, breaker, retry, forward);
this one composes them and turns their errors into answers.
"""

from __future__ import annotations

import asyncio
import time

from proxy.breaker import CLOSED, Breaker, Ticket
from proxy.errors import (
    BodyTooLarge,
    BulkheadFull,
    CircuitOpen,
    ClientGone,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamStatusError,
    problem,
)
from proxy.forward import Body, Timeouts, UpstreamResponse
from proxy.headers import Headers, upstream_request_headers, with_host
from proxy.http1 import BODY_FOLLOWS
from proxy.logs import AccessLog
from proxy.outcome import Outcome
from proxy.request import DisconnectWatch, Request, RequestBody, Send
from proxy.retry import backoff, is_replayable
from proxy.routing import host_of, normalize, strip_prefix
from proxy.runtime import RouteState, Runtime
from proxy.shadow import Captured, Mirror, ShadowPolicy
from proxy.split import Choice

REPLAY_LIMIT = 64 * 1024  # bodies up to this size are held for retries and fallback
SMALL_RESPONSE = 64 * 1024  # answers with a Content-Length up to this go out in one write
# No retry or fallback starts with less of the total timeout left than this: it could not
# answer, and the loop's coarse timer clock can fire the total timeout a little early.
MIN_ATTEMPT = 0.05


class AbortResponse(Exception):
    """Raised to the server after the response started: it closes the connection, so the
    client sees a broken response, never a complete-looking short one."""

    already_logged = True


class _Exchange:
    """The state of one request as it moves through the steps."""

    __slots__ = (
        "rt",
        "req",
        "send",
        "watch",
        "outcome",
        "started_response",
        "body",
        "mirror",
        "choice",
    )

    def __init__(
        self, rt: Runtime, req: Request, send: Send, watch: DisconnectWatch, outcome: Outcome
    ) -> None:
        self.rt = rt
        self.req = req
        self.send = send
        self.watch = watch
        self.outcome = outcome
        self.started_response = False
        self.body: RequestBody | None = None
        self.mirror: tuple[ShadowPolicy, Mirror, str] | None = None
        self.choice: Choice | None = None


async def handle(
    rt: Runtime, req: Request, send: Send, watch: DisconnectWatch, log: AccessLog
) -> None:
    o = Outcome(req.request_id, req.method, req.raw_path.decode("latin-1"), req.started)
    o.client_ip = req.peer
    ex = _Exchange(rt, req, send, watch, o)
    try:
        route = o.route = "none"
        state, path = _match(rt, req)
        o.route = route = state.name
        choice = ex.choice = state.chooser.choose(state.split, req)
        o.bucket = choice.bucket
        if req.has_body:
            # Before the bulkhead: its slots are for the backend's work, not for waiting on
            # a client's upload (a body too big to hold goes on streaming inside the slot).
            body, held = await _read_body(ex, state)
        else:
            body, held = None, True
            watch.start()  # a client that leaves while queued gives its place up
        try:
            async with state.bulkhead.slot():
                await _exchange(ex, state, choice, path, body, held)
        except BulkheadFull:
            rt.metrics.bulkhead_rejection(route)
            raise
    except ProxyError as err:
        await _answer_error(ex, err)
    except asyncio.CancelledError:
        if not watch.fired:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        o.status, o.error = 499, "client went away"
    finally:
        watch.stop()
        o.duration = time.monotonic() - req.started
        rt.metrics.record(o)
        log.log(o)


def _match(rt: Runtime, req: Request) -> tuple[RouteState, str]:
    path = normalize(req.raw_path)
    state = rt.router.match(path, req.method, host_of(req.host), req.header)
    if state.strip_prefix:
        path = strip_prefix(path, state.strip_prefix)
    return state, path


async def _exchange(
    ex: _Exchange, state: RouteState, choice: Choice, path: str, body: Body, held: bool
) -> None:
    req, rt = ex.req, ex.rt
    replayable = held and is_replayable(
        req.method, req.header_bytes(b"idempotency-key") is not None
    )
    headers = upstream_request_headers(
        req.headers,
        peer=req.peer,
        scheme=req.scheme,
        peer_is_trusted=req.peer_is_trusted,
        request_id=req.request_id,
    )
    deadline = time.monotonic() + state.timeouts.total
    state.budget.record_request()
    ex.mirror = _mirror_of(state, req, body, held, path, headers)
    backend = choice.backend
    try:
        resp = await _attempts(ex, state, backend, path, headers, body, replayable, deadline)
    except (CircuitOpen, UpstreamError) as err:
        fallback = state.fallback
        if (
            fallback is None
            or fallback == backend
            or not _may_fall_back(err, held, replayable)
            or deadline - time.monotonic() < MIN_ATTEMPT
        ):
            if isinstance(err, UpstreamStatusError) and err.response is not None:
                await _relay(ex, err.response, backend, choice)
                return
            ex.outcome.backend = backend
            raise
        if isinstance(err, UpstreamStatusError) and err.response is not None:
            err.response.close()
        rt.metrics.fallback(state.name, backend, fallback)
        ex.outcome.fallback_from, backend = backend, fallback
        try:
            resp = await _attempts(ex, state, backend, path, headers, body, False, deadline)
        except UpstreamStatusError as final:
            await _relay(ex, final.response, backend, choice)
            return
        except (CircuitOpen, UpstreamError):
            ex.outcome.backend = backend
            raise
    await _relay(ex, resp, backend, choice)


def _mirror_of(
    state: RouteState, req: Request, body: Body, held: bool, path: str, headers: Headers
) -> tuple[ShadowPolicy, Mirror, str] | None:
    """The copy to send to the route's shadow once the primary answered, if any."""
    shadow = state.shadow
    if shadow is None:
        return None
    size = (len(body) if isinstance(body, bytes) else 0) if held else None
    if not shadow.wants(req.method, size):
        return None
    payload = body if isinstance(body, bytes) else None
    return shadow, Mirror(req.method, "", headers, payload, req.request_id), path


def _send_mirror(ex: _Exchange, captured: Captured | None) -> None:
    assert ex.mirror is not None
    shadow, mirror, path = ex.mirror
    upstream = ex.rt.upstreams.get(shadow.backend)
    if upstream is None:
        return
    target = upstream.target(path, ex.req.query)
    wire = with_host(list(mirror.headers), upstream.host_header, ex.req.header_bytes(b"host"))
    request = Mirror(mirror.method, target, wire, mirror.body, mirror.request_id)
    state = ex.rt.routes.get(shadow.route)
    timeouts = state.timeouts if state is not None else Timeouts(1.0, 30.0, 60.0)
    shadow.submit(upstream, request, captured, timeouts)


def _may_fall_back(err: ProxyError, held: bool, replayable: bool) -> bool:
    """An open breaker sent nothing; a connect error sent nothing either, if the body is in
    hand to send again. Any other failure may have reached the backend: replay-safe only.
    (The caller also refuses once the total timeout is spent: the fallback is an attempt.)"""
    if isinstance(err, CircuitOpen):
        return True
    if isinstance(err, UpstreamConnectError | UpstreamConnectTimeout):
        return held
    return replayable


async def _read_body(ex: _Exchange, state: RouteState) -> tuple[Body, bool]:
    """The body to send: bytes when it is small enough to hold (then it can be replayed),
    else a stream. The second value says whether the body is held."""
    req = ex.req
    length = req.content_length()
    limit = state.max_body
    if limit is not None and length is not None and length > limit:
        raise_too_large(limit)
    if not length and req.header_bytes(b"transfer-encoding") is None:
        ex.watch.start()
        return None, True
    body = ex.body = RequestBody(
        req.receive, limit, on_complete=ex.watch.start, timeout=ex.rt.config.limits.body_timeout
    )
    head = await body.read_up_to(REPLAY_LIMIT)
    if body.complete and len(head) <= REPLAY_LIMIT:
        return head, True
    # Larger bodies are not held even when their last piece is already in: not retried.
    return body.stream(head), False


def raise_too_large(limit: int) -> None:
    raise BodyTooLarge(f"the request body is larger than {limit} bytes")


async def _attempts(
    ex: _Exchange,
    state: RouteState,
    backend: str,
    path: str,
    headers: Headers,
    body: Body,
    replayable: bool,
    deadline: float,
) -> UpstreamResponse:
    """Up to `retry.attempts` tries at one backend, each let through by its breaker."""
    rt, req, o = ex.rt, ex.req, ex.outcome
    upstream = rt.upstreams[backend]
    breaker = state.breaker(backend)
    tries = state.retry.attempts if replayable else 1
    target = upstream.target(path, req.query)
    wire = with_host(headers, upstream.host_header, req.header_bytes(b"host"))
    for attempt in range(1, tries + 1):
        ticket = _admit(ex, state, backend, breaker)
        o.attempts += 1
        if attempt > 1:
            rt.metrics.retry(state.name, backend)
        failure: UpstreamError
        try:
            resp = await upstream.send(
                req.method,
                target,
                wire,
                body,
                state.timeouts,
                remaining=deadline - time.monotonic(),
                body_error=ex.body,
            )
        except UpstreamError as exc:
            breaker.record_failure(ticket)
            rt.metrics.upstream_failure(state.name, backend, exc.reason)
            cause: str | int = exc.reason
            failure = exc
        except BaseException:
            breaker.release(ticket)  # the client went away: not the backend's failure
            raise
        else:
            if resp.status < 500:
                breaker.record_success(ticket)
                return resp
            breaker.record_failure(ticket)
            rt.metrics.upstream_failure(state.name, backend, "status")
            cause, failure = resp.status, UpstreamStatusError(resp.status, resp)
        retried = attempt < tries and (
            cause in state.retry.on
            or (isinstance(failure, UpstreamConnectTimeout) and "connect" in state.retry.on)
        )
        delay = _retry_delay(ex, state, breaker, backend, attempt, deadline) if retried else None
        if delay is None:
            raise failure
        if isinstance(failure, UpstreamStatusError):
            resp.close()
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _admit(ex: _Exchange, state: RouteState, backend: str, breaker: Breaker) -> Ticket:
    """The breaker's leave for one attempt; CircuitOpen, counted, when it refuses."""
    ticket = breaker.try_acquire()
    if ticket is None:
        ex.rt.metrics.breaker_rejection(state.name, backend)
        ex.outcome.backend = backend
        raise CircuitOpen(
            f"the circuit breaker for {backend} is open", retry_after=breaker.retry_after()
        )
    return ticket


def _retry_delay(
    ex: _Exchange,
    state: RouteState,
    breaker: Breaker,
    backend: str,
    attempt: int,
    deadline: float,
) -> float | None:
    """The pause before retry number `attempt`, or None when there is to be no retry: the
    breaker is no longer closed (nothing goes to an open one, and the half-open trial is one
    request), the pause would outlast the total timeout, or the budget is spent (counted)."""
    if breaker.state != CLOSED:
        return None
    retry = state.retry
    delay = backoff(attempt, base=retry.backoff, cap=retry.max_backoff, rng=ex.rt.rng)
    if deadline - time.monotonic() - delay < MIN_ATTEMPT:
        return None
    if not state.budget.try_spend():
        ex.rt.metrics.retry_refused(state.name, backend)
        return None
    return delay


async def _relay(ex: _Exchange, resp: UpstreamResponse, backend: str, choice: Choice) -> None:
    """Send the backend's answer to the client as it arrives; release the upstream
    connection whatever happens."""
    o, send = ex.outcome, ex.send
    o.backend, o.status = backend, resp.status
    headers = resp.headers
    headers.append((b"x-request-id", ex.req.request_id.encode()))
    if choice.set_cookie is not None:
        headers.append((b"set-cookie", choice.set_cookie))
    limit = ex.mirror[0].capture_limit if ex.mirror is not None else 0
    kept: list[bytes] | None = [] if limit else None
    try:
        bodyless = ex.req.method == "HEAD" or resp.status in (204, 304) or resp.status < 200
        length = _content_length(headers)
        if bodyless or (length is not None and length <= SMALL_RESPONSE):
            body = b"" if bodyless else await resp.read(SMALL_RESPONSE)
            ex.watch.stop()
            await _start(ex, resp.status, headers, body_follows=True)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            o.bytes_sent = len(body)
            kept = [body] if kept is not None and len(body) <= limit else None
        else:
            await _start(ex, resp.status, headers)
            async for chunk in resp.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                o.bytes_sent += len(chunk)
                if kept is not None:
                    if o.bytes_sent <= limit:
                        kept.append(chunk)
                    else:
                        kept = None
            ex.watch.stop()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except UpstreamError as err:
        o.error = f"{err.reason}: {err.detail}"
        ex.rt.metrics.upstream_failure(o.route, backend, err.reason)
        if not ex.started_response:
            raise
        raise AbortResponse(o.error) from err
    finally:
        resp.close()
    if ex.mirror is not None:
        captured = None if kept is None else Captured(resp.status, headers, b"".join(kept))
        _send_mirror(ex, captured)


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _start(
    ex: _Exchange, status: int, headers: Headers, *, body_follows: bool = False
) -> None:
    """`body_follows`: the whole body is sent next, at once (our server then holds the head
    for it instead of arranging to flush it alone; other servers ignore the key)."""
    ex.started_response = True
    message = {"type": "http.response.start", "status": status, "headers": headers}
    if body_follows:
        message[BODY_FOLLOWS] = True
    await ex.send(message)


async def _answer_error(ex: _Exchange, err: ProxyError) -> None:
    o = ex.outcome
    o.status = err.status
    o.error = o.error or err.detail
    if isinstance(err, ClientGone):
        return
    if ex.started_response:
        raise AbortResponse(err.detail) from err
    ex.watch.stop()
    status, headers, body = problem(err, route=o.route, request_id=ex.req.request_id)
    if ex.body is not None and not ex.body.complete:
        headers.append((b"connection", b"close"))
    if ex.choice is not None and ex.choice.set_cookie is not None:
        # A new sticky key is kept even when this answer is an error: the retry agrees.
        headers.append((b"set-cookie", ex.choice.set_cookie))
    await _start(ex, status, headers, body_follows=True)
    await ex.send({"type": "http.response.body", "body": body, "more_body": False})
    o.bytes_sent = len(body)
