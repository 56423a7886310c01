"""Breaker state shared between instances through Redis (SPEC §5 `breaker.storage`).

A process has one `SharedBreakerStore` per storage URL (`BreakerStores`); each breaker that
names the URL gets a `SharedStorage`, the pybreaker storage that keeps its state in memory.
Requests only ever touch that memory. A background task, started by the serving process
only (`check`, `explain` and the `--workers` supervisor never touch Redis):

- writes each transition to open or closed as it happens, to one hash per breaker
  (`strangler:breaker:{route}/{backend}`: state, at, origin); a Lua script keeps the most
  recent one (`at`, wall-clock seconds; `origin`, the instance, breaks ties) and bumps a
  version counter;
- polls the counter every `poll_interval`, reads the hashes when it moved and applies a
  transition newer than the local one to the breaker (`Breaker.sync`);
- when Redis fails or hangs (every call is bounded by `timeout`), calls `on_up(False)`,
  logs it once and retries with backoff while breakers go on with their own state; once
  Redis answers again it pushes the local transitions newer than Redis's and pulls the
  newer remote ones: the most recent transition wins.

Only transitions to open and closed are shared. Failure and success counters, half-open
and its single trial stay per instance. A breaker that learns another instance opened it
waits out what is left of the reset timeout from that opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.breaker import CLOSED, OPEN, Breaker, pybreaker

if TYPE_CHECKING:
    from redis.asyncio import Redis
from proxy.logs import event

__all__ = ["BreakerStores", "SharedBreakerStore", "SharedStorage", "Transition"]

log = logging.getLogger("strangler.breaker")

KEY_PREFIX = "strangler:breaker:"
VERSION_KEY = "strangler:breakers:version"

# KEYS: the breaker's hash, the version counter. ARGV: state, at, origin. 1 when written.
_WRITE_IF_NEWER = """
local cur = redis.call('HMGET', KEYS[1], 'at', 'origin')
if cur[1] then
  local at, new = tonumber(cur[1]), tonumber(ARGV[2])
  if at > new or (at == new and cur[2] >= ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'at', ARGV[2], 'origin', ARGV[3])
redis.call('INCR', KEYS[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Transition:
    state: str  # OPEN or CLOSED
    at: float  # wall-clock time it happened; for OPEN, when the breaker opened
    origin: str  # the instance that made it

    def is_newer_than(self, other: Transition | None) -> bool:
        return other is None or (self.at, self.origin) > (other.at, other.origin)

    @classmethod
    def parse(cls, row: list[Any]) -> Transition | None:
        state, at, origin = row
        if state not in (OPEN, CLOSED) or at is None or origin is None:
            return None
        try:
            return cls(state, float(at), origin)
        except ValueError:
            return None


class SharedStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's storage of one breaker: memory only, so a request never waits. A
    transition pybreaker makes to open or closed goes to the store to be written."""

    def __init__(self, store: SharedBreakerStore, key: str) -> None:
        super().__init__("shared")
        self.key = key
        self._store = store
        self._state = CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at: datetime | None = None
        self._breaker: Breaker | None = None

    def attach(self, breaker: Breaker) -> None:
        """The breaker built on this storage: told of other instances' transitions, and
        given at once the last one the store knows of."""
        self._breaker = breaker
        self._store._attached(self)

    def adopt(self, transition: Transition, *, opened_ago: float) -> None:
        """Another instance's transition: set without being written back."""
        if transition.state == OPEN:
            self._opened_at = datetime.fromtimestamp(transition.at, UTC)
        elif self._state == CLOSED:
            return  # closed already: keep this instance's failure count
        self._state = transition.state
        if self._breaker is not None:
            self._breaker.sync(opened_ago=opened_ago)

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        if state in (OPEN, CLOSED):
            self._store._transition(self, state)

    def increment_counter(self) -> None:
        self._failures += 1

    def reset_counter(self) -> None:
        self._failures = 0

    def increment_success_counter(self) -> None:
        self._successes += 1

    def reset_success_counter(self) -> None:
        self._successes = 0

    @property
    def counter(self) -> int:
        return self._failures

    @property
    def success_counter(self) -> int:
        return self._successes

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_at = value


class SharedBreakerStore:
    """The breakers of one process that share one Redis URL, and the task that syncs them."""

    def __init__(
        self,
        url: str,
        *,
        poll_interval: float = 0.25,
        timeout: float = 0.3,
        max_backoff: float = 2.0,
        clock: Callable[[], float] = time.time,
        on_up: Callable[[bool], None] | None = None,
        origin: str | None = None,
    ) -> None:
        self.url = url
        self.origin = origin or os.urandom(6).hex()
        self.up: bool | None = None  # None until the first sync has been tried
        self._poll = poll_interval
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._clock = clock
        self._on_up = on_up
        self._storages: dict[str, SharedStorage] = {}
        self._records: dict[str, Transition] = {}  # the latest transition known, per key
        self._dirty: set[str] = set()  # keys whose latest transition is not in Redis yet
        self._version: bytes | str | None = None
        self._stale = True  # a full sync is due: at start and after each failure
        self._wake = asyncio.Event()
        self._client: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        parts = urlsplit(url)  # no password in logs
        self._where = f"{parts.scheme}://{parts.hostname or ''}:{parts.port or ''}{parts.path}"

    def storage(self, key: str) -> SharedStorage:
        """A storage for the breaker `key` ("route/backend"); it replaces an earlier one of
        that key (a reload rebuilt the breaker)."""
        storage = self._storages[key] = SharedStorage(self, key)
        return storage

    def record(self, key: str) -> Transition | None:
        return self._records.get(key)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop syncing; a last try, bounded, to write what is pending."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            # Python 3.11's asyncio.timeout can turn a cancellation that lands as its own
            # deadline passes into a TimeoutError, which the loop would survive: insist.
            for _ in range(20):
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
            if self._dirty and self.up:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._timeout * 2):
                        await self._flush(self._connect())
        await self._disconnect()

    # --- called by the storages, on the event loop -----------------------------------

    def _attached(self, storage: SharedStorage) -> None:
        known = self._records.get(storage.key)
        if known is not None and self._storages.get(storage.key) is storage:
            storage.adopt(known, opened_ago=self._clock() - known.at)

    def _transition(self, storage: SharedStorage, state: str) -> None:
        if self._storages.get(storage.key) is not storage:
            return  # a breaker a reload replaced, still finishing old requests
        before = self._records.get(storage.key)
        at = self._clock()
        if before is not None and at <= before.at:
            at = before.at + 0.001  # after the one it follows, whatever the clocks say
        self._records[storage.key] = Transition(state, at, self.origin)
        self._dirty.add(storage.key)
        self._wake.set()

    # --- the sync task -----------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._poll
        while not self._closing:
            try:
                async with asyncio.timeout(self._timeout * 4):
                    await self._sync(self._connect())
            except Exception as err:  # noqa: BLE001 - whatever Redis does, stay local
                if self._closing:
                    return
                self._set_up(False, err)
                self._stale = True
                await self._disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            self._set_up(True)
            backoff = self._poll
            await self._idle()

    async def _sync(self, client: Redis) -> None:
        await self._flush(client)
        await self._pull(client, everything=self._stale)
        await self._flush(client)  # what the pull found missing or older in Redis
        self._stale = False

    async def _idle(self) -> None:
        """Until the next poll, or a transition to write."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll):
                await self._wake.wait()
        self._wake.clear()

    async def _flush(self, client: Redis) -> None:
        if not self._dirty:
            return
        keys, self._dirty = self._dirty, set()
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    t = self._records[key]
                    args = (t.state, repr(t.at), t.origin)
                    pipe.eval(_WRITE_IF_NEWER, 2, KEY_PREFIX + key, VERSION_KEY, *args)
                written = await pipe.execute()
        except BaseException:
            self._dirty |= keys
            raise
        if not all(written):
            self._version = None  # Redis holds newer ones: read them now

    async def _pull(self, client: Redis, *, everything: bool) -> None:
        version = await client.get(VERSION_KEY)
        if version == self._version and not everything:
            return
        keys = list(self._storages)
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(KEY_PREFIX + key, ["state", "at", "origin"])
            rows = await pipe.execute()
        self._version = version
        now = self._clock()
        for key, row in zip(keys, rows, strict=True):
            remote, local = Transition.parse(row), self._records.get(key)
            if remote is not None and remote.is_newer_than(local):
                self._records[key] = remote
                self._dirty.discard(key)
                self._storages[key].adopt(remote, opened_ago=now - remote.at)
            elif local is not None and local.is_newer_than(remote):
                self._dirty.add(key)

    def _connect(self) -> Redis:
        # Imported here: a proxy without a shared breaker storage never loads redis.
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if self._client is None:
            self._client = Redis.from_url(
                self.url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),  # we retry, on our own schedule
                decode_responses=True,
            )
        return self._client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await client.aclose()

    def _set_up(self, up: bool, error: BaseException | None = None) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            event(log, "breaker storage up", storage=self._where)
        else:
            event(
                log,
                "breaker storage down: each breaker goes on with its own state",
                logging.WARNING,
                storage=self._where,
                error=f"{type(error).__name__}: {error}",
            )
        if self._on_up is not None:
            self._on_up(up)


class BreakerStores:
    """A process's stores, one per storage URL. Passive until `start()`; a store first
    asked for after that starts at once (a reload named a new URL). `on_up` gets whether
    every started store answers."""

    def __init__(self, *, on_up: Callable[[bool], None] | None = None) -> None:
        self._on_up = on_up
        self._stores: dict[str, SharedBreakerStore] = {}
        self._running = False

    def get(self, url: str) -> SharedBreakerStore:
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = SharedBreakerStore(url, on_up=self._changed)
            if self._running:
                store.start()
        return store

    def start(self) -> None:
        self._running = True
        for store in self._stores.values():
            store.start()

    async def close(self) -> None:
        self._running = False
        for store in self._stores.values():
            await store.close()

    def _changed(self, _: bool) -> None:
        if self._on_up is not None:
            self._on_up(all(s.up for s in self._stores.values() if s.up is not None))
