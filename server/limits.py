"""Rate and concurrency limits: pure objects with an injected clock, no I/O.

- `TokenBucket`: `rate` per second on average, `burst` at once; `take()` answers 0 (go)
  or the milliseconds until a token is there (a `retry_after_ms` for the client).
- `KeyedBuckets`: one bucket per key (a user, a client address), its memory bounded: a
  bucket that has refilled is indistinguishable from a new one, so it is dropped, and past
  `max_keys` the least recently used key goes first.
- `KeyedCounter`: how many of something each key holds now (sockets of an address,
  database reads of a user), with a cap; `acquire` answers False past it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

Clock = Callable[[], float]


class TokenBucket:
    """`rate` per second on average, `burst` at once."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "clock")

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> int:
        """0 if a request may go now (and it is counted), else the ms until one may."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0
        return max(1, int((1.0 - self.tokens) / self.rate * 1000))

    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst


class KeyedBuckets:
    """A TokenBucket per key, with at most `max_keys` kept."""

    __slots__ = ("rate", "burst", "max_keys", "clock", "_buckets")

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000,
                 clock: Clock = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, key: Hashable) -> int:
        """As TokenBucket.take, for this key's bucket."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()

    def blocked(self, key: Hashable) -> int:
        """The ms until this key may go again, without taking a token (0: it may)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0
        bucket._refill()
        if bucket.tokens >= 1.0:
            return 0
        return max(1, int((1.0 - bucket.tokens) / bucket.rate * 1000))

    def _prune(self) -> None:
        """Drop refilled buckets; if none were, the least recently used ones."""
        for key in [k for k, b in self._buckets.items() if b.full()]:
            del self._buckets[key]
        while len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class KeyedCounter:
    """How many each key holds now, at most `limit` each."""

    __slots__ = ("limit", "_held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[Hashable, int] = {}

    def acquire(self, key: Hashable) -> bool:
        held = self._held.get(key, 0)
        if held >= self.limit:
            return False
        self._held[key] = held + 1
        return True

    def release(self, key: Hashable) -> None:
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)

    def held(self, key: Hashable) -> int:
        return self._held.get(key, 0)

    def __len__(self) -> int:
        return len(self._held)
