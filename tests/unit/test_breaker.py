from __future__ import annotations

import asyncio

import pybreaker
import pytest

from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Ticket


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    clock: FakeClock | None = None,
    *,
    failures: int = 3,
    reset: float = 30.0,
    successes: int = 1,
    changes: list[tuple[str, str, str]] | None = None,
) -> Breaker:
    return Breaker(
        name="orders/orders",
        failure_threshold=failures,
        reset_timeout=reset,
        success_threshold=successes,
        clock=clock or FakeClock(),
        on_state_change=None if changes is None else lambda *change: changes.append(change),
    )


def acquire(breaker: Breaker) -> Ticket:
    ticket = breaker.try_acquire()
    assert ticket is not None
    return ticket


def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_failure(acquire(breaker))


def trip(breaker: Breaker, clock: FakeClock, *, reset: float = 30.0) -> None:
    """Open the breaker and let its reset timeout elapse."""
    fail(breaker, breaker.settings[0])
    assert breaker.state == OPEN
    clock.now += reset


def test_closed_hands_out_the_same_ticket_without_allocating() -> None:
    breaker = make()
    first, second = breaker.try_acquire(), breaker.try_acquire()
    assert first is second
    assert first is not None and not first.trial


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = make(failures=3)
    fail(breaker, 2)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_success_resets_the_failure_count() -> None:
    breaker = make(failures=3)
    fail(breaker, 2)
    breaker.record_success(acquire(breaker))
    fail(breaker, 2)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


def test_pybreaker_holds_the_counters() -> None:
    breaker = make(failures=5)
    fail(breaker, 2)
    assert breaker._cb.fail_counter == 2
    breaker.record_success(acquire(breaker))
    assert breaker._cb.fail_counter == 0
    assert breaker._cb.current_state == CLOSED


def test_concurrent_attempts_failing_together_count_each() -> None:
    breaker = make(failures=3)
    tickets = [acquire(breaker) for _ in range(5)]
    for ticket in tickets:
        breaker.record_failure(ticket)
    assert breaker.state == OPEN
    assert breaker._cb.fail_counter == 3  # verdicts after the trip are ignored


def test_open_rejects() -> None:
    clock = FakeClock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 29.9
    assert breaker.try_acquire() is None
    assert breaker.state == OPEN


def test_trial_after_reset_timeout() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker, clock)
    ticket = breaker.try_acquire()
    assert ticket is not None and ticket.trial
    assert breaker.state == HALF_OPEN
    assert breaker.try_acquire() is None


def test_state_reads_open_until_the_trial_starts() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker, clock)
    assert breaker.state == OPEN
    assert breaker.retry_after() == 0.0
    acquire(breaker)
    assert breaker.state == HALF_OPEN


def test_exactly_one_trial_in_a_loop() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker, clock)
    tickets = [breaker.try_acquire() for _ in range(50)]
    assert sum(t is not None for t in tickets) == 1
    assert tickets[0] is not None


async def test_exactly_one_trial_under_gather() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker, clock)

    async def attempt() -> Ticket | None:
        await asyncio.sleep(0)
        return breaker.try_acquire()

    tickets = await asyncio.gather(*(attempt() for _ in range(50)))
    assert sum(t is not None for t in tickets) == 1


def test_trial_success_closes() -> None:
    clock = FakeClock()
    breaker = make(clock)
    trip(breaker, clock)
    breaker.record_success(acquire(breaker))
    assert breaker.state == CLOSED
    assert breaker.try_acquire() is not None


def test_success_threshold_two_needs_two_trials() -> None:
    clock = FakeClock()
    breaker = make(clock, successes=2)
    trip(breaker, clock)
    first = acquire(breaker)
    assert breaker.try_acquire() is None
    breaker.record_success(first)
    assert breaker.state == HALF_OPEN
    second = acquire(breaker)  # the next single trial
    assert second.trial
    assert breaker.try_acquire() is None
    breaker.record_success(second)
    assert breaker.state == CLOSED


def test_failure_in_half_open_reopens_with_a_fresh_timeout() -> None:
    clock = FakeClock()
    breaker = make(clock, successes=2)
    trip(breaker, clock)
    breaker.record_success(acquire(breaker))
    clock.now += 5
    breaker.record_failure(acquire(breaker))
    assert breaker.state == OPEN
    assert breaker.retry_after() == 30.0
    clock.now += 29.0
    assert breaker.try_acquire() is None
    clock.now += 1.0
    assert acquire(breaker).trial


def test_half_open_then_closed_needs_success_count_again_after_reopening() -> None:
    clock = FakeClock()
    breaker = make(clock, successes=2)
    trip(breaker, clock)
    breaker.record_success(acquire(breaker))
    breaker.record_failure(acquire(breaker))
    clock.now += 30
    breaker.record_success(acquire(breaker))
    assert breaker.state == HALF_OPEN  # the success before the re-opening does not count


def test_release_frees_the_trial_without_counting() -> None:
    clock = FakeClock()
    breaker = make(clock, successes=1)
    trip(breaker, clock)
    trial = acquire(breaker)
    breaker.release(trial)
    assert breaker.state == HALF_OPEN
    assert breaker._cb.success_counter == 0
    again = acquire(breaker)
    assert again is not trial
    breaker.record_success(trial)  # a released ticket's verdict is ignored
    assert breaker.state == HALF_OPEN
    breaker.record_success(again)
    assert breaker.state == CLOSED


def test_release_after_a_verdict_is_harmless() -> None:
    clock = FakeClock()
    breaker = make(clock, successes=2)
    trip(breaker, clock)
    first = acquire(breaker)
    breaker.record_success(first)
    second = acquire(breaker)
    breaker.release(first)  # from a `finally` after record_success
    assert breaker.try_acquire() is None  # `second` is still the trial
    breaker.record_success(second)
    assert breaker.state == CLOSED


def test_release_in_closed_state_counts_nothing() -> None:
    breaker = make(failures=2)
    fail(breaker)
    breaker.release(acquire(breaker))
    fail(breaker)
    assert breaker.state == OPEN


def test_late_verdicts_from_before_a_state_change_are_ignored() -> None:
    clock = FakeClock()
    breaker = make(clock, failures=2)
    stale = acquire(breaker)
    trip(breaker, clock)
    breaker.record_success(stale)  # arrives while open: does not close it
    assert breaker.state == OPEN
    breaker.record_success(acquire(breaker))
    assert breaker.state == CLOSED
    breaker.record_failure(stale)
    breaker.record_failure(acquire(breaker))
    assert breaker.state == CLOSED  # one failure of this closed period, not two


def test_on_state_change_reports_each_transition() -> None:
    clock = FakeClock()
    changes: list[tuple[str, str, str]] = []
    breaker = make(clock, changes=changes, successes=1)
    trip(breaker, clock)
    breaker.record_failure(acquire(breaker))
    clock.now += 30
    breaker.record_success(acquire(breaker))
    name = "orders/orders"
    assert changes == [
        (name, CLOSED, OPEN),
        (name, OPEN, HALF_OPEN),
        (name, HALF_OPEN, OPEN),
        (name, OPEN, HALF_OPEN),
        (name, HALF_OPEN, CLOSED),
    ]


def test_retry_after_counts_down() -> None:
    clock = FakeClock()
    breaker = make(clock, reset=10.0)
    assert breaker.retry_after() == 0.0
    fail(breaker, 3)
    assert breaker.retry_after() == 10.0
    clock.now += 4
    assert breaker.retry_after() == 6.0
    clock.now += 20
    assert breaker.retry_after() == 0.0
    acquire(breaker)
    assert breaker.retry_after() == 0.0


def test_settings_and_name() -> None:
    breaker = make(failures=4, reset=12.5, successes=2)
    assert breaker.settings == (4, 12.5, 2)
    assert breaker.name == "orders/orders"


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        make(failures=0)


def test_storage_holds_the_state() -> None:
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    clock = FakeClock()
    breaker = Breaker(
        name="r/b",
        failure_threshold=1,
        reset_timeout=5,
        success_threshold=1,
        clock=clock,
        storage=storage,
    )
    breaker.record_failure(acquire(breaker))
    assert storage.state == OPEN
    twin = Breaker(
        name="r/b",
        failure_threshold=1,
        reset_timeout=5,
        success_threshold=1,
        clock=clock,
        storage=storage,
    )
    assert twin.state == OPEN
    assert twin.try_acquire() is None
