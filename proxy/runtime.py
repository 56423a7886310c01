"""The runtime snapshot a request reads: router, per-route policies and backend clients.

`build(config, previous)` makes a new snapshot from a validated config. Breakers,
bulkheads, retry budgets and connection pools whose settings did not change are carried
over from `previous`, so a reload keeps their state; so are the shared breaker stores
(`breaker_store`), which the serving process starts. A snapshot is never changed in place:
a split override makes a new one (`with_split`) that shares everything else.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from proxy.breaker import CLOSED, Breaker
from proxy.breaker_store import BreakerStores, SharedBreakerStore
from proxy.bulkhead import Bulkhead
from proxy.config import Config, Route
from proxy.config import Retry as RetryConfig
from proxy.forward import Timeouts, Upstream
from proxy.headers import TrustedProxies
from proxy.logs import event
from proxy.metrics import Metrics
from proxy.retry import RetryBudget, RetryOn
from proxy.routing import Router, Rule, normalize_prefix
from proxy.shadow import ShadowPolicy
from proxy.split import Chooser, Split, Sticky

log = logging.getLogger("strangler.runtime")

DEFAULT_ROUTE = "default"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int
    backoff: float
    max_backoff: float
    on: RetryOn

    @classmethod
    def of(cls, retry: RetryConfig) -> RetryPolicy:
        return cls(retry.attempts, retry.backoff, retry.max_backoff, RetryOn.of(retry.on))


@dataclass(frozen=True, slots=True)
class RouteState:
    """One route with its effective (defaults-merged) policies and long-lived state."""

    name: str
    config: Route | None  # None for the implicit `default` route
    base_split: Split
    split: Split
    chooser: Chooser
    strip_prefix: str | None
    fallback: str | None
    timeouts: Timeouts
    retry: RetryPolicy
    budget: RetryBudget
    bulkhead: Bulkhead
    max_body: int | None
    breakers: dict[str, Breaker]
    breaker_settings: tuple[int, float, int]
    on_breaker_change: Callable[[str, str, str], None] = field(repr=False)
    shadow: ShadowPolicy | None = None
    breaker_store: SharedBreakerStore | None = None

    @property
    def override(self) -> Mapping[str, int] | None:
        return None if self.split is self.base_split else self.split.weights

    def breaker_state(self, backend: str) -> str:
        """The (route, backend) breaker's state, without making the breaker: one not made
        yet is closed (with a shared storage they are made up front, by `build`)."""
        found = self.breakers.get(backend)
        return CLOSED if found is None else found.state

    def breaker(self, backend: str) -> Breaker:
        """The (route, backend) breaker, made on first use: most of a large config's routes
        may never see a request, and a breaker with its pybreaker costs ~0.7 KiB."""
        found = self.breakers.get(backend)
        if found is None:
            threshold, reset, success = self.breaker_settings
            name = f"{self.name}/{backend}"
            storage = self.breaker_store.storage(name) if self.breaker_store else None
            found = self.breakers[backend] = Breaker(
                name=name,
                failure_threshold=threshold,
                reset_timeout=reset,
                success_threshold=success,
                on_state_change=self.on_breaker_change,
                storage=storage,
            )
            if storage is not None:
                storage.attach(found)
        return found


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    router: Router[RouteState]
    routes: Mapping[str, RouteState]
    upstreams: Mapping[str, Upstream]
    trusted: TrustedProxies
    metrics: Metrics
    rng: random.Random
    workers: int = 1
    breaker_stores: BreakerStores = field(default_factory=BreakerStores)

    @property
    def legacy(self) -> str:
        return self.config.legacy

    def with_split(self, route: str, weights: Mapping[str, int] | None) -> Runtime:
        """A snapshot with `route`'s split overridden (None: back to the file's split)."""
        state = self.routes[route]
        split = state.base_split if weights is None else Split.of(weights, self.legacy)
        new_state = replace(state, split=split)
        routes = {**self.routes, route: new_state}
        rules = _rules(self.config, routes)
        router = Router.build(rules, routes[DEFAULT_ROUTE])
        self.metrics.set_split(route, split.weights, self.upstreams)
        return replace(self, routes=routes, router=router)


def build(
    config: Config, previous: Runtime | None, metrics: Metrics, *, workers: int = 1
) -> Runtime:
    """A snapshot for `config`. With several workers each enforces its share of a route's
    bulkhead, so the route as a whole keeps to its configured limit."""
    upstreams = _upstreams(config, previous)
    routes: dict[str, RouteState] = {}
    old_routes = previous.routes if previous else {}
    workers = previous.workers if previous else workers
    stores = previous.breaker_stores if previous else BreakerStores(on_up=metrics.set_storage_up)
    shared: dict[tuple[Any, ...], Any] = {}
    for route in config.routes:
        old = old_routes.get(route.name)
        routes[route.name] = _route_state(config, route, old, metrics, workers, stores, shared)
    old = old_routes.get(DEFAULT_ROUTE)
    routes[DEFAULT_ROUTE] = _route_state(config, None, old, metrics, workers, stores, shared)
    router = Router.build(_rules(config, routes), routes[DEFAULT_ROUTE])
    _publish(config, routes, metrics)
    return Runtime(
        config=config,
        router=router,
        routes=routes,
        upstreams=upstreams,
        trusted=TrustedProxies(config.trusted_proxies),
        metrics=metrics,
        rng=previous.rng if previous else random.Random(),
        workers=workers,
        breaker_stores=stores,
    )


def retired_upstreams(old: Runtime, new: Runtime) -> list[Upstream]:
    """Pools the new snapshot no longer uses: to close once their last request is done."""
    kept = {id(u) for u in new.upstreams.values()}
    return [u for u in old.upstreams.values() if id(u) not in kept]


def _rules(config: Config, routes: Mapping[str, RouteState]) -> list[Rule[RouteState]]:
    rules: list[Rule[RouteState]] = []
    for order, route in enumerate(config.routes):
        match = route.match
        rules.append(
            Rule(
                name=route.name,
                prefix=normalize_prefix(match.prefix),
                target=routes[route.name],
                methods=frozenset(match.methods) if match.methods else None,
                headers=tuple((k.lower(), v) for k, v in (match.headers or {}).items()),
                host=match.host,
                order=order,
            )
        )
    return rules


def _upstreams(config: Config, previous: Runtime | None) -> dict[str, Upstream]:
    old = previous.upstreams if previous else {}
    upstreams: dict[str, Upstream] = {}
    for name, backend in config.backends.items():
        candidate = Upstream(
            name,
            backend.url,
            max_connections=backend.max_connections,
            preserve_host=backend.preserve_host,
        )
        kept = old.get(name)
        upstreams[name] = kept if kept and kept.settings == candidate.settings else candidate
    return upstreams


def _route_state(
    config: Config,
    route: Route | None,
    old: RouteState | None,
    metrics: Metrics,
    workers: int,
    stores: BreakerStores,
    shared: dict[tuple[Any, ...], Any],
) -> RouteState:
    """`shared`: the immutable parts (split, timeouts, retry policy, sticky) that routes with
    the same settings share within one snapshot; with 1,000 routes most are alike."""
    d = config.defaults
    name = route.name if route else DEFAULT_ROUTE
    timeout = route.timeout.merged_over(d.timeout) if route and route.timeout else d.timeout
    retry = route.retry.merged_over(d.retry) if route and route.retry else d.retry
    breaker = route.breaker.merged_over(d.breaker) if route and route.breaker else d.breaker
    bulkhead = route.bulkhead.merged_over(d.bulkhead) if route and route.bulkhead else d.bulkhead
    weights = route.weights if route else {config.legacy: 100}
    split = _once(shared, ("split", *weights.items()), lambda: Split.of(weights, config.legacy))
    sticky = route.sticky if route else None

    bulk = Bulkhead(
        -(-bulkhead.max_concurrent // workers),
        -(-bulkhead.max_queue // workers),
        bulkhead.queue_timeout,
        on_change=lambda n: metrics.set_in_flight(name, n),
    )
    if old is not None and old.bulkhead.settings == bulk.settings:
        bulk = old.bulkhead
    budget = RetryBudget(retry.budget)
    if old is not None and old.budget.settings == budget.settings:
        budget = old.budget
    breaker_settings = (breaker.failure_threshold, breaker.reset_timeout, breaker.success_threshold)
    store = stores.get(breaker.storage) if breaker.storage else None
    breakers: dict[str, Breaker] = {}
    if old is not None and (old.breaker_settings, old.breaker_store) == (breaker_settings, store):
        # Shared, not copied: a breaker a request on the old snapshot makes is this one's too.
        breakers = old.breakers

    def on_breaker_change(breaker_name: str, before: str, after: str) -> None:
        backend = breaker_name.rpartition("/")[2]
        metrics.set_breaker_state(name, backend, after)
        level = logging.WARNING if after == "open" else logging.INFO
        event(log, "breaker state changed", level, route=name, backend=backend, state=after)

    shadow = _shadow_policy(name, route, old, metrics)
    state = RouteState(
        name=name,
        config=route,
        base_split=split,
        split=split,
        chooser=Chooser(
            name,
            _once(
                shared,
                ("sticky", sticky.cookie, sticky.header, bool(sticky.client_ip)),
                lambda: Sticky(sticky.cookie, sticky.header, bool(sticky.client_ip)),
            )
            if sticky
            else None,
        ),
        strip_prefix=route.rewrite.strip_prefix if route and route.rewrite else None,
        fallback=route.fallback if route else None,
        timeouts=_once(
            shared,
            ("timeouts", timeout.connect, timeout.read, timeout.total),
            lambda: Timeouts(timeout.connect, timeout.read, timeout.total),
        ),
        retry=_once(shared, ("retry", retry), lambda: RetryPolicy.of(retry)),
        budget=budget,
        bulkhead=bulk,
        max_body=route.max_body if route and route.max_body is not None else d.max_body,
        breakers=breakers,
        breaker_settings=breaker_settings,
        on_breaker_change=on_breaker_change,
        shadow=shadow,
        breaker_store=store,
    )
    for backend in (*split.order, *([state.fallback] if state.fallback else [])):
        if store is not None:
            state.breaker(backend)  # attached to the storage now, to take its state
        metrics.set_breaker_state(name, backend, state.breaker_state(backend))
    return state


def _once(shared: dict[tuple[Any, ...], Any], key: tuple[Any, ...], make: Callable[[], T]) -> T:
    found: T | None = shared.get(key)
    if found is None:
        found = shared[key] = make()
    return found


SHADOW_PENDING = 50  # copies in flight per route, at most
SHADOW_CAPTURE = 256 * 1024  # primary and shadow bodies kept for comparison, at most


def _shadow_policy(
    name: str, route: Route | None, old: RouteState | None, metrics: Metrics
) -> ShadowPolicy | None:
    if route is None or route.shadow is None:
        return None
    cfg = route.shadow
    policy = ShadowPolicy(
        route=name,
        backend=cfg.backend,
        percent=cfg.percent,
        methods=cfg.methods,
        max_body=cfg.max_body,
        compare=cfg.compare,
        ignore=cfg.ignore,
        compare_headers=cfg.compare_headers,
        on_result=lambda backend, result: metrics.shadow_result(name, backend, result),
        max_pending=SHADOW_PENDING,
        capture_limit=SHADOW_CAPTURE,
    )
    if old is not None and old.shadow is not None and old.shadow.settings == policy.settings:
        return old.shadow
    return policy


def _publish(config: Config, routes: Mapping[str, RouteState], metrics: Metrics) -> None:
    roles = {name: "legacy" if name == config.legacy else "service" for name in config.backends}
    metrics.retain(set(routes), roles)
    for name, role in roles.items():
        metrics.set_backend_info(name, role)
    for route in routes.values():
        metrics.set_split(route.name, route.split.weights, config.backends)


def describe(state: RouteState) -> dict[str, Any]:
    """A route's match as plain data (admin API, explain)."""
    if state.config is None:
        return {"prefix": "/"}
    match = state.config.match
    # `match.model_dump(exclude_none=True)`, without building the model's serializer.
    fields: dict[str, Any] = {"prefix": match.prefix, "methods": match.methods}
    fields.update(headers=match.headers, host=match.host)
    return {key: value for key, value in fields.items() if value is not None}
