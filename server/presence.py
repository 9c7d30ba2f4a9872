"""Who is online across replicas: the answer to `presence` (SPEC §7.2), kept cheap.

A replica knows its own sockets exactly (the Hub's users). For the other replicas' it
reads Redis, where each replica keeps one sorted set per user it holds at least one
authenticated socket of: key `hoomi:presence:{<user hex>}`, members the replica ids
(the broker's 8-byte origin, hex), scores the time (ms since the epoch, on the writing
replica's clock) until which that replica vouches for the user. A replica

- adds its entry as soon as a user's first socket on it is welcomed (`online`), and
  removes it when the user's last socket there is gone (`offline`), within one round
  trip to Redis;
- refreshes the entries of all the users it holds every `ttl / 3` seconds: ZADD with
  `now + ttl`, PEXPIRE of the key to `ttl`, and ZREMRANGEBYSCORE of entries already past
  (a dead replica's), three pipelined commands per user;
- removes all of its entries when it stops cleanly.

A SIGKILLed replica refreshes nothing more: its entries stop counting at most `ttl`
seconds after their last refresh (`HOOMI_PRESENCE_TTL_S`, 30 s by default; plus the
clock skew between replicas, which NTP keeps to milliseconds), and the key itself is
gone `ttl` after the last replica holding the user stopped refreshing it.

Cost: per user with sockets on a replica, not per socket and not per Hoomi: one small
sorted set in Redis (128 bytes by MEMORY USAGE) and three commands every `ttl / 3`
seconds, about 30 us of the replica's CPU each time (bench/presence.py). Asking costs
one ZCOUNT per member not connected to the asking replica, pipelined. Each key is one
user's, so every command names one key, which is what a Redis Cluster needs (the hash
tag `{<user hex>}` places it; a pipeline of many users' keys is split per shard by the
cluster client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from uuid import UUID

_log = logging.getLogger(__name__)

CHUNK = 1000  # users per pipeline


def presence_key(user_id: UUID) -> str:
    return f"hoomi:presence:{{{user_id.hex}}}"


class Presence(Protocol):
    def online(self, user_id: UUID) -> None: ...
    def offline(self, user_id: UUID) -> None: ...
    async def who(self, user_ids: Sequence[UUID]) -> set[UUID]: ...
    async def start(self, local: Callable[[], Iterable[UUID]]) -> None: ...
    async def close(self) -> None: ...


class LocalPresence:
    """One replica (no Redis): its own sockets are everybody's, nobody else to ask."""

    def online(self, user_id: UUID) -> None:
        return None

    def offline(self, user_id: UUID) -> None:
        return None

    async def who(self, user_ids: Sequence[UUID]) -> set[UUID]:
        return set()

    async def start(self, local: Callable[[], Iterable[UUID]]) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisPresence:
    """Entries in Redis (standalone, or a Cluster: `client` is either redis-py client)."""

    def __init__(self, client: Any, ttl: float, replica: bytes) -> None:
        self._client = client
        self._ttl_ms = max(1, int(ttl * 1000))
        self._every = ttl / 3
        self._id = replica.hex()
        self._changes: dict[UUID, bool] = {}  # user -> online (the latest change wins)
        self._wake = asyncio.Event()
        self._local: Callable[[], Iterable[UUID]] = lambda: ()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def online(self, user_id: UUID) -> None:
        self._changes[user_id] = True
        self._wake.set()

    def offline(self, user_id: UUID) -> None:
        self._changes[user_id] = False
        self._wake.set()

    async def who(self, user_ids: Sequence[UUID]) -> set[UUID]:
        """Those of `user_ids` some replica vouches for now."""
        now = int(time.time() * 1000)
        found: set[UUID] = set()
        for i in range(0, len(user_ids), CHUNK):
            chunk = user_ids[i:i + CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for u in chunk:
                pipe.zcount(presence_key(u), now, "+inf")
            counts = await pipe.execute()
            found.update(u for u, n in zip(chunk, counts, strict=True) if n)
        return found

    async def start(self, local: Callable[[], Iterable[UUID]]) -> None:
        self._local = local
        self._task = asyncio.get_running_loop().create_task(self._run(), name="presence")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        # Leave at once rather than after the TTL: this replica's users are gone from it.
        users = list(self._local())
        try:
            for i in range(0, len(users), CHUNK):
                pipe = self._client.pipeline(transaction=False)
                for u in users[i:i + CHUNK]:
                    pipe.zrem(presence_key(u), self._id)
                await asyncio.wait_for(pipe.execute(), 2)
        except Exception as exc:
            _log.info("presence: entries left to expire (%s)", type(exc).__name__)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, due - loop.time()))
            self._wake.clear()
            refresh = loop.time() >= due
            changes, self._changes = self._changes, {}
            try:
                await self._write(changes, refresh)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._failing:
                    _log.warning("presence: Redis write failed (%s); retrying",
                                 type(exc).__name__)
                self._failing = True
                for u, on in changes.items():  # not lost: newer changes win
                    self._changes.setdefault(u, on)
                if refresh:
                    due = loop.time() + 1.0
                await asyncio.sleep(1.0)
                if self._changes:
                    self._wake.set()
                continue
            self._failing = False
            if refresh:
                due = loop.time() + self._every

    async def _write(self, changes: dict[UUID, bool], refresh: bool) -> None:
        here = set(self._local())
        ups = here if refresh else {u for u, on in changes.items() if on and u in here}
        downs = [u for u, on in changes.items() if not on and u not in here]
        now = int(time.time() * 1000)
        ops: list[tuple[UUID, bool]] = [(u, True) for u in ups] + [(u, False) for u in downs]
        for i in range(0, len(ops), CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for u, on in ops[i:i + CHUNK]:
                key = presence_key(u)
                if on:
                    pipe.zadd(key, {self._id: now + self._ttl_ms})
                    pipe.pexpire(key, self._ttl_ms)
                    pipe.zremrangebyscore(key, "-inf", now)
                else:
                    pipe.zrem(key, self._id)
            await pipe.execute()
