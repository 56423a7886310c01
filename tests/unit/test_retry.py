from __future__ import annotations

import random

import pytest

from proxy.retry import RetryBudget, RetryOn, backoff, is_replayable, retries_on


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("method", "has_key", "expected"),
    [
        ("GET", False, True),
        ("HEAD", False, True),
        ("OPTIONS", False, True),
        ("PUT", False, True),
        ("DELETE", False, True),
        ("POST", False, False),
        ("PATCH", False, False),
        ("CONNECT", False, False),
        ("POST", True, True),
        ("PATCH", True, True),
        ("get", False, False),
    ],
)
def test_replayable_methods(method: str, has_key: bool, expected: bool) -> None:
    assert is_replayable(method, has_key) is expected


def test_backoff_stays_within_the_exponential_bound() -> None:
    rng = random.Random(7)
    for attempt in range(1, 6):
        bound = 0.05 * 2 ** (attempt - 1)
        draws = [backoff(attempt, base=0.05, cap=10.0, rng=rng) for _ in range(2000)]
        assert all(0.0 <= d < bound for d in draws)
        # full jitter: spread over the whole range, not bunched near the bound
        assert min(draws) < bound * 0.05
        assert max(draws) > bound * 0.95


def test_backoff_is_capped() -> None:
    rng = random.Random(1)
    draws = [backoff(attempt, base=0.05, cap=1.0, rng=rng) for attempt in range(6, 2000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert max(draws) > 0.95


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = [backoff(3, base=0.1, cap=1.0, rng=random.Random(42)) for _ in range(3)]
    second = [backoff(3, base=0.1, cap=1.0, rng=random.Random(42)) for _ in range(3)]
    assert first == second


def test_backoff_counts_retries_from_one() -> None:
    with pytest.raises(ValueError):
        backoff(0, base=0.1, cap=1.0, rng=random.Random(0))


def test_retry_on_causes_and_statuses() -> None:
    retry_on = RetryOn.of(["connect", 502, 503, 504])
    assert "connect" in retry_on
    assert 503 in retry_on
    assert "timeout" not in retry_on
    assert 500 not in retry_on


def test_retry_on_5xx_means_any_server_error() -> None:
    retry_on = RetryOn.of(["5xx", "timeout", 429])
    assert all(status in retry_on for status in range(500, 600))
    assert 499 not in retry_on and 600 not in retry_on
    assert 429 in retry_on
    assert "timeout" in retry_on
    assert "connect" not in retry_on


def test_retry_on_normalizes_and_refuses_unknown_causes() -> None:
    assert RetryOn.of(["CONNECT", "503", "5XX"]) == RetryOn.of(["connect", 503, "5xx"])
    with pytest.raises(ValueError):
        RetryOn.of(["connection"])


def test_retries_on_takes_the_config_tuple_or_a_retry_on() -> None:
    on = ("connect", "5xx")
    assert retries_on(500, on)
    assert retries_on("connect", RetryOn.of(on))
    assert not retries_on("timeout", on)
    assert not retries_on(404, RetryOn.of(on))


def test_budget_allows_min_retries_without_requests() -> None:
    budget = RetryBudget(0.2, clock=FakeClock())
    assert [budget.try_spend() for _ in range(11)] == [True] * 10 + [False]


def test_budget_follows_the_ratio_above_the_floor() -> None:
    budget = RetryBudget(0.2, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    spent = sum(budget.try_spend() for _ in range(50))
    assert spent == 20
    assert (budget.requests, budget.retries) == (100, 20)


def test_budget_ratio_is_exact_where_floats_are_not() -> None:
    budget = RetryBudget(0.07, min_retries=0, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(20)) == 7  # 0.07 * 100 == 7.000000000000001


def test_budget_zero_ratio_keeps_the_floor() -> None:
    budget = RetryBudget(0.0, clock=FakeClock())
    for _ in range(1000):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(20)) == 10


def test_retries_are_not_counted_as_requests() -> None:
    budget = RetryBudget(0.5, min_retries=0, clock=FakeClock())
    for _ in range(4):
        budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    assert budget.requests == 4


def test_budget_window_slides() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(0.2, window=10.0, clock=clock)
    assert sum(budget.try_spend() for _ in range(10)) == 10
    clock.now = 1005.5
    assert not budget.try_spend()
    clock.now = 1009.9  # still the same 10 buckets
    assert not budget.try_spend()
    clock.now = 1010.0  # second 1000 fell out of the window
    assert budget.retries == 0
    assert budget.try_spend()


def test_budget_forgets_requests_bucket_by_bucket() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(1.0, min_retries=0, window=3.0, clock=clock)
    for second in range(3):
        clock.now = float(second)
        for _ in range(second + 1):
            budget.record_request()
    assert budget.requests == 6
    clock.now = 3.0
    assert budget.requests == 5
    clock.now = 4.0
    assert budget.requests == 3
    clock.now = 5.0
    assert budget.requests == 0


def test_budget_survives_a_clock_jump_past_the_window() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(0.2, clock=clock)
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(30)) == 20
    clock.now = 1_000_000.0
    assert (budget.requests, budget.retries) == (0, 0)
    assert sum(budget.try_spend() for _ in range(30)) == 10
    clock.now = 1_000_010.5  # exactly one window later: a jump of `size` buckets
    assert sum(budget.try_spend() for _ in range(30)) == 10


def test_budget_survives_a_long_idle_gap_then_partial_slide() -> None:
    clock = FakeClock(50.0)
    budget = RetryBudget(1.0, min_retries=0, clock=clock)
    budget.record_request()
    clock.now = 5000.0
    budget.record_request()
    clock.now = 5009.0
    budget.record_request()
    assert budget.requests == 2
    clock.now = 5010.0
    assert budget.requests == 1


def test_budget_tolerates_a_clock_stepping_back() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(1.0, min_retries=0, clock=clock)
    budget.record_request()
    clock.now = 95.0
    budget.record_request()
    assert budget.requests == 2
    assert budget.try_spend()


def test_budget_settings() -> None:
    assert RetryBudget(0.3, min_retries=5, window=20.0).settings == (0.3, 5, 20.0)
