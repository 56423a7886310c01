"""proxy.split (SPEC §4): the bucket function, the layout of a split over the buckets, the
chooser's reasons and the sticky cookie."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from proxy.split import (
    BUCKETS,
    COOKIE_MAX_AGE,
    Chooser,
    Split,
    Sticky,
    bucket_of,
    moved_share,
    new_sticky_key,
    set_cookie_value,
)

LEGACY = "monolith"

# Computed once with sha256("{route}\x00{key}"), first 8 bytes big-endian, mod 10,000, and
# pinned here: if any of these changes, every sticky user of every deployment moves.
KNOWN_BUCKETS = [
    ("orders", "42", 5056),
    ("orders", "alice", 1536),
    ("orders", "", 7482),
    ("payments", "42", 2656),
    ("orders", "ü-ключ", 8369),
    ("default", "127.0.0.1", 4612),
]


def keys(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"user-{rng.getrandbits(64):016x}" for _ in range(n)]


@dataclass
class FakeRequest:
    """What the chooser reads of a request."""

    client_ip: str = "192.0.2.1"
    is_secure: bool = False
    cookies: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def cookie(self, name: str) -> str | None:
        return self.cookies.get(name) or None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


# ---------------------------------------------------------------------------- bucket_of


@pytest.mark.parametrize(("route", "key", "bucket"), KNOWN_BUCKETS)
def test_bucket_of_is_pinned_to_known_values(route: str, key: str, bucket: int) -> None:
    assert bucket_of(route, key) == bucket


def test_bucket_of_is_sha256_not_hash() -> None:
    for route, key, _ in KNOWN_BUCKETS:
        digest = hashlib.sha256(route.encode() + b"\x00" + key.encode()).digest()
        assert bucket_of(route, key) == int.from_bytes(digest[:8], "big") % BUCKETS


def test_bucket_of_depends_on_the_route() -> None:
    # the same user lands in unrelated buckets on two routes, so ramps are independent
    same = sum(bucket_of("orders", k) == bucket_of("payments", k) for k in keys(2000))
    assert same < 10


def test_buckets_are_spread_evenly() -> None:
    counts = Counter(bucket_of("orders", k) * 10 // BUCKETS for k in keys(10_000))
    assert set(counts) == set(range(10))
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_new_sticky_keys_are_random_and_cookie_safe() -> None:
    made = {new_sticky_key() for _ in range(1000)}
    assert len(made) == 1000
    assert all(len(k) == 24 and all(c in "0123456789abcdef" for c in k) for k in made)


# ---------------------------------------------------------------------------- Split layout


def test_legacy_is_laid_last_even_when_listed_first() -> None:
    split = Split.of({LEGACY: 70, "orders": 20, "payments": 10}, LEGACY)
    assert split.order == ("orders", "payments", LEGACY)
    assert split.bounds == (2000, 3000, 10_000)
    assert split.range_of("orders") == (0, 2000)
    assert split.range_of("payments") == (2000, 3000)
    assert split.range_of(LEGACY) == (3000, 10_000)
    assert [split.backend_for(b) for b in (0, 1999, 2000, 2999, 3000, 9999)] == [
        "orders",
        "orders",
        "payments",
        "payments",
        LEGACY,
        LEGACY,
    ]


def test_zero_weight_backends_own_no_bucket() -> None:
    split = Split.of({"orders": 0, "payments": 30, LEGACY: 70}, LEGACY)
    assert split.order == ("payments", LEGACY)
    assert split.range_of("orders") == (0, 0)
    assert all(split.backend_for(b) != "orders" for b in range(BUCKETS))
    kill = Split.of({"orders": 0, LEGACY: 100}, LEGACY)
    assert kill.single == LEGACY
    assert {kill.backend_for(b) for b in range(BUCKETS)} == {LEGACY}
    assert kill.weights == {"orders": 0, LEGACY: 100}  # declared weights are kept for display


def test_legacy_at_zero_and_a_split_without_legacy() -> None:
    split = Split.of({"orders": 100, LEGACY: 0}, LEGACY)
    assert split.single == "orders"
    two = Split.of({"orders": 50, "payments": 50}, LEGACY)
    assert two.order == ("orders", "payments") and two.single is None
    assert two.backend_for(4999) == "orders" and two.backend_for(5000) == "payments"


def test_every_bucket_has_exactly_its_weight() -> None:
    split = Split.of({LEGACY: 33, "a": 1, "b": 66}, LEGACY)
    owned = Counter(split.backend_for(b) for b in range(BUCKETS))
    assert owned == {"a": 100, "b": 6600, LEGACY: 3300}


def test_ramp_10_20_50_only_moves_users_off_legacy() -> None:
    population = keys(10_000)
    steps = [Split.of({LEGACY: 100 - pct, "orders": pct}, LEGACY) for pct in (0, 10, 20, 50, 100)]
    placed = [[s.backend_for(bucket_of("orders", k)) for k in population] for s in steps]
    for before, after in zip(placed, placed[1:], strict=False):
        for old, new in zip(before, after, strict=True):
            # nobody moves back to legacy: once on orders, always on orders
            assert not (old == "orders" and new == LEGACY)
    moved_at_10 = {k for k, b in zip(population, placed[1], strict=True) if b == "orders"}
    for later in placed[2:]:
        on_orders = {k for k, b in zip(population, later, strict=True) if b == "orders"}
        assert moved_at_10 <= on_orders
    shares = [sum(b == "orders" for b in p) / len(population) for p in placed]
    assert shares[0] == 0 and shares[-1] == 1
    for got, want in zip(shares[1:4], (0.10, 0.20, 0.50), strict=True):
        assert abs(got - want) < 0.02


def test_three_backends_ramp_each_service_from_legacy() -> None:
    population = keys(10_000, seed=3)
    before = Split.of({"orders": 10, "payments": 10, LEGACY: 80}, LEGACY)
    after = Split.of({"orders": 10, "payments": 30, LEGACY: 60}, LEGACY)
    counts: Counter[str] = Counter()
    for key in population:
        bucket = bucket_of("orders", key)
        old, new = before.backend_for(bucket), after.backend_for(bucket)
        counts[new] += 1
        assert old == new or (old, new) == (LEGACY, "payments")
    assert abs(counts["orders"] / 10_000 - 0.10) < 0.02
    assert abs(counts["payments"] / 10_000 - 0.30) < 0.02
    assert abs(counts[LEGACY] / 10_000 - 0.60) < 0.02


# ---------------------------------------------------------------------------- moved_share


def test_moved_share_is_exact() -> None:
    def split(**weights: int) -> Split:
        return Split.of(weights, LEGACY)

    assert moved_share(split(orders=10, monolith=90), split(orders=25, monolith=75)) == {
        (LEGACY, "orders"): 0.15
    }
    assert moved_share(split(orders=25, monolith=75), split(orders=10, monolith=90)) == {
        ("orders", LEGACY): 0.15
    }
    assert moved_share(split(orders=10, monolith=90), split(orders=10, monolith=90)) == {}
    # raising the first service shifts the second's buckets: diff shows who moves where
    assert moved_share(
        split(orders=10, payments=10, monolith=80), split(orders=20, payments=10, monolith=70)
    ) == {("payments", "orders"): 0.10, (LEGACY, "payments"): 0.10}
    assert moved_share(split(orders=100, monolith=0), split(orders=0, monolith=100)) == {
        ("orders", LEGACY): 1.0
    }


def test_moved_share_matches_a_bucket_by_bucket_count() -> None:
    rng = random.Random(11)
    for _ in range(50):
        a = rng.randint(0, 100)
        b = rng.randint(0, 100 - a)
        c = rng.randint(0, 100)
        d = rng.randint(0, 100 - c)
        old = Split.of({"orders": a, "payments": b, LEGACY: 100 - a - b}, LEGACY)
        new = Split.of({"orders": c, "payments": d, LEGACY: 100 - c - d}, LEGACY)
        counted: Counter[tuple[str, str]] = Counter()
        for bucket in range(BUCKETS):
            x, y = old.backend_for(bucket), new.backend_for(bucket)
            if x != y:
                counted[(x, y)] += 1
        assert moved_share(old, new) == {k: v / BUCKETS for k, v in counted.items()}


# ---------------------------------------------------------------------------- Chooser


def test_by_weight_within_two_points_over_10000_requests() -> None:
    rng = random.Random(20240601)
    split = Split.of({"orders": 25, "payments": 15, LEGACY: 60}, LEGACY)
    chooser = Chooser("orders", None, rng.random)
    counts = Counter(chooser.choose(split, FakeRequest()).backend for _ in range(10_000))
    for backend, weight in (("orders", 25), ("payments", 15), (LEGACY, 60)):
        assert abs(counts[backend] / 100 - weight) <= 2, counts


def test_sticky_header_without_the_header_is_placed_by_weight() -> None:
    rng = random.Random(99)
    split = Split.of({"orders": 30, LEGACY: 70}, LEGACY)
    chooser = Chooser("orders", Sticky(header="X-User-Id"), rng.random)
    choices = [chooser.choose(split, FakeRequest()) for _ in range(10_000)]
    assert {c.reason for c in choices} == {"by weight, no header X-User-Id"}
    assert all(c.sticky_key is None and c.set_cookie is None for c in choices)
    share = sum(c.backend == "orders" for c in choices) / 100
    assert abs(share - 30) <= 2


def test_only_backend_reason() -> None:
    choice = Chooser("orders", None).choose(Split.of({"orders": 100}, LEGACY), FakeRequest())
    assert (choice.backend, choice.reason, choice.bucket) == ("orders", "only backend", None)


def test_sticky_header_key() -> None:
    split = Split.of({"orders": 50, LEGACY: 50}, LEGACY)
    chooser = Chooser("orders", Sticky(header="X-User-Id"))
    choice = chooser.choose(split, FakeRequest(headers={"x-user-id": "42"}))
    assert choice.sticky_key == "42"
    assert choice.bucket == 5056 and choice.backend == LEGACY
    assert choice.reason == "sticky header X-User-Id"
    assert choice.set_cookie is None
    again = [chooser.choose(split, FakeRequest(headers={"x-user-id": "42"})) for _ in range(20)]
    assert {c.backend for c in again} == {LEGACY}


def test_sticky_client_ip_key() -> None:
    split = Split.of({"orders": 50, LEGACY: 50}, LEGACY)
    chooser = Chooser("default", Sticky(client_ip=True))
    choice = chooser.choose(split, FakeRequest(client_ip="127.0.0.1"))
    assert (choice.sticky_key, choice.bucket, choice.backend) == ("127.0.0.1", 4612, "orders")
    assert choice.reason == "sticky client ip"


def test_sticky_cookie_present() -> None:
    split = Split.of({"orders": 20, LEGACY: 80}, LEGACY)
    chooser = Chooser("orders", Sticky(cookie="sid"))
    choice = chooser.choose(split, FakeRequest(cookies={"sid": "alice"}))
    assert (choice.sticky_key, choice.bucket, choice.backend) == ("alice", 1536, "orders")
    assert choice.reason == "sticky cookie sid"
    assert choice.set_cookie is None


def test_sticky_cookie_missing_makes_a_key_and_places_by_it() -> None:
    split = Split.of({"orders": 50, LEGACY: 50}, LEGACY)
    chooser = Chooser("orders", Sticky(cookie="sid"))
    seen = set()
    for _ in range(200):
        choice = chooser.choose(split, FakeRequest())
        assert choice.sticky_key is not None and choice.sticky_key not in seen
        seen.add(choice.sticky_key)
        assert choice.reason == "new sticky key, cookie sid set"
        assert choice.bucket == bucket_of("orders", choice.sticky_key)
        assert choice.backend == split.backend_for(choice.bucket)
        assert choice.set_cookie == set_cookie_value("sid", choice.sticky_key, secure=False)
        # the next request, carrying the cookie, goes where the first one went
        later = chooser.choose(split, FakeRequest(cookies={"sid": choice.sticky_key}))
        assert (later.backend, later.bucket) == (choice.backend, choice.bucket)


def test_new_cookie_is_secure_only_over_https() -> None:
    split = Split.of({"orders": 50, LEGACY: 50}, LEGACY)
    chooser = Chooser("orders", Sticky(cookie="sid"))
    plain = chooser.choose(split, FakeRequest(is_secure=False)).set_cookie
    secure = chooser.choose(split, FakeRequest(is_secure=True)).set_cookie
    assert plain is not None and secure is not None
    assert b"Secure" not in plain
    assert secure.endswith(b"; Secure")


def test_set_cookie_value_attributes() -> None:
    assert COOKIE_MAX_AGE == 2_592_000
    value = set_cookie_value("sid", "abc123", secure=False).decode()
    name_value, *attrs = [p.strip() for p in value.split(";")]
    assert name_value == "sid=abc123"
    assert sorted(attrs) == sorted(["Path=/", "Max-Age=2592000", "HttpOnly", "SameSite=Lax"])
    secure = set_cookie_value("sid", "abc123", secure=True).decode()
    assert sorted(p.strip() for p in secure.split(";")[1:]) == sorted(
        ["Path=/", "Max-Age=2592000", "HttpOnly", "SameSite=Lax", "Secure"]
    )


def test_same_key_same_backend_in_a_fresh_chooser() -> None:
    # nothing of the chooser's state (or the process's hash seed) enters the placement
    split = Split.of({"orders": 37, LEGACY: 63}, LEGACY)
    a = Chooser("orders", Sticky(header="X-User-Id"), random.Random(1).random)
    b = Chooser("orders", Sticky(header="X-User-Id"), random.Random(2).random)
    for key in keys(500):
        req = FakeRequest(headers={"x-user-id": key})
        assert a.choose(split, req).backend == b.choose(split, req).backend
