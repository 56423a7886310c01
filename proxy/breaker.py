"""The circuit breaker of one (route, backend) (SPEC §5).

pybreaker's CircuitBreaker holds the state and the counters and makes the transitions:
`failure_threshold` consecutive failures open it, `success_threshold` successes in
half-open close it, a failure in half-open opens it again. This wrapper adds what an
asyncio proxy needs on top:

- tickets: an attempt asks `try_acquire()` before it goes and reports on its ticket after,
  since pybreaker only knows how to wrap a synchronous call;
- one half-open trial at a time (pybreaker lets every concurrent call in);
- the reset timeout measured with an injectable `clock` (pybreaker reads the wall clock);
- `sync()`: take a state another instance wrote into a shared storage (`breaker_store`)
  at once, rather than at pybreaker's next call.

`state` turns from "open" to "half-open" when the first trial is handed out, not when
`reset_timeout` elapses; `retry_after()` is 0 from then on. Not thread-safe: one event loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import NoReturn

# pybreaker imports redis (7 MiB) when it is installed, for a storage of its own that we do
# not use: hide it during the import, so only a configured breaker.storage loads redis.
_HIDE_REDIS = "redis" not in sys.modules
if _HIDE_REDIS:
    sys.modules["redis"] = None  # type: ignore[assignment]
try:
    import pybreaker
finally:
    if _HIDE_REDIS:
        del sys.modules["redis"]

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "Ticket", "pybreaker"]

CLOSED: str = pybreaker.STATE_CLOSED
OPEN: str = pybreaker.STATE_OPEN
HALF_OPEN: str = pybreaker.STATE_HALF_OPEN


class Ticket:
    """Leave for one attempt. Hand it back with record_success, record_failure or release;
    a ticket from before the last state change is ignored.
    """

    __slots__ = ("trial",)

    def __init__(self, *, trial: bool) -> None:
        self.trial = trial  # the half-open trial, not an ordinary closed-state attempt

    def __repr__(self) -> str:
        return f"<Ticket trial={self.trial}>"


class _AttemptFailed(Exception):
    """How a failure is told to pybreaker, which counts only exceptions."""


def _succeed() -> None:
    return None


def _fail() -> NoReturn:
    raise _AttemptFailed


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, on_transition: Callable[[str, str], None]) -> None:
        self._on_transition = on_transition

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._on_transition(old_state.name if old_state else "", new_state.name)


class Breaker:
    __slots__ = (
        "_name",
        "_clock",
        "_on_state_change",
        "_cb",
        "_state",
        "_opened_at",
        "_trial",
        "_closed_ticket",
    )

    def __init__(
        self,
        *,
        name: str,
        failure_threshold: int,
        reset_timeout: float,
        success_threshold: int,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[str, str, str], None] | None = None,
        storage: pybreaker.CircuitBreakerStorage | None = None,
    ) -> None:
        if failure_threshold < 1 or success_threshold < 1 or reset_timeout < 0:
            raise ValueError("need thresholds >= 1 and reset_timeout >= 0")
        self._name = name
        self._clock = clock
        self._on_state_change = on_state_change
        self._trial: Ticket | None = None
        # Replaced on every state change, so late verdicts of an earlier period are ignored.
        self._closed_ticket = Ticket(trial=False)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=failure_threshold,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            listeners=[_Listener(self._transition)],
            state_storage=storage,
            name=name,
            throw_new_error_on_trip=False,
        )
        # A local copy of pybreaker's state, kept by its listener, for a cheap try_acquire.
        self._state: str = self._cb.current_state
        self._opened_at = clock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def state(self) -> str:
        """One of CLOSED, OPEN, HALF_OPEN: "closed", "open", "half-open"."""
        return self._state

    @property
    def settings(self) -> tuple[int, float, int]:
        """(failure_threshold, reset_timeout, success_threshold)."""
        return (self._cb.fail_max, self._cb.reset_timeout, self._cb.success_threshold)

    def retry_after(self) -> float:
        """Seconds until a trial may go; 0 when not open."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cb.reset_timeout - self._clock())

    def try_acquire(self) -> Ticket | None:
        """A ticket for one attempt, or None when the attempt must not go to this backend."""
        if self._state == CLOSED:
            return self._closed_ticket
        if self._trial is not None:
            return None
        if self._state == OPEN:
            if self._clock() - self._opened_at < self._cb.reset_timeout:
                return None
            self._cb.half_open()
        self._trial = ticket = Ticket(trial=True)
        return ticket

    def record_success(self, ticket: Ticket) -> None:
        if ticket is self._closed_ticket:
            # A success matters in closed state only when it ends a run of failures.
            if self._cb.fail_counter:
                self._report(_succeed)
        elif ticket is self._trial:
            self._trial = None
            self._report(_succeed)

    def record_failure(self, ticket: Ticket) -> None:
        if ticket is self._closed_ticket:
            self._report(_fail)
        elif ticket is self._trial:
            self._trial = None
            self._report(_fail)

    def release(self, ticket: Ticket) -> None:
        """The attempt ended without a verdict (the client went away): frees the trial
        without counting anything. Harmless after record_*, so it can sit in `finally`.
        """
        if ticket is self._trial:
            self._trial = None

    def sync(self, *, opened_ago: float = 0.0) -> None:
        """Take the state the storage holds now, set there by another instance, without
        counting anything. `opened_ago`: seconds since that instance opened the breaker, so
        the reset timeout runs from then (capped at a full timeout).
        """
        # Reading pybreaker's state makes it notice the storage's and tell the listener.
        if self._cb.state.name == OPEN:
            self._opened_at = self._clock() - min(max(opened_ago, 0.0), self._cb.reset_timeout)

    def _report(self, outcome: Callable[[], None]) -> None:
        try:
            self._cb.call(outcome)
        # CircuitBreakerError: a shared storage opened the breaker under us.
        except (_AttemptFailed, pybreaker.CircuitBreakerError):
            pass

    def _transition(self, old: str, new: str) -> None:
        self._state = new
        self._trial = None
        self._closed_ticket = Ticket(trial=False)
        if new == OPEN:
            # Also when another instance opened it through the storage: a full
            # reset_timeout from the moment this one learns of it, unless `sync` says more.
            self._opened_at = self._clock()
        if old != new and self._on_state_change is not None:
            self._on_state_change(self._name, old, new)
