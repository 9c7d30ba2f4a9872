"""Fan-out between replicas: Redis (or Valkey) pub/sub, or in-process for one replica.

The broker moves opaque payloads on named channels to the *other* replicas; it knows
nothing of messages. The publishing replica delivers to its own sockets directly, so the
Redis broker tags each payload with its instance id and drops its own echo.
A replica subscribes to `hoomi:<id>` only while one of its sockets belongs to that
Hoomi, and always to the control channel. Pub/sub is at-most-once: a payload can be lost
when Redis or a connection drops, so the hub never trusts it for completeness (seq gaps
are filled from PostgreSQL, and `on_reconnect` tells the hub to reconcile everything).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

_log = logging.getLogger(__name__)

CONTROL_CHANNEL = "hoomi:ctl"

Handler = Callable[[str, bytes], None]
ReconnectHandler = Callable[[], Awaitable[None]]


def hoomi_channel(hoomi_hex: str) -> str:
    return f"hoomi:{hoomi_hex}"


class Broker(Protocol):
    async def start(self, handler: Handler, on_reconnect: ReconnectHandler) -> None: ...
    async def publish(self, events: Iterable[tuple[str, bytes]]) -> None: ...
    async def subscribe(self, channel: str) -> None: ...
    async def unsubscribe(self, channel: str) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class LocalBroker:
    """One replica: there is nobody else to tell, so publishing does nothing."""

    def __init__(self) -> None:
        self._channels: set[str] = set()

    async def start(self, handler: Handler, on_reconnect: ReconnectHandler) -> None:
        self._channels.add(CONTROL_CHANNEL)

    async def publish(self, events: Iterable[tuple[str, bytes]]) -> None:
        return None

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._channels.clear()


class RedisBroker:
    """Many replicas: one pub/sub connection for reading, a pool for publishing."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pub = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        # The reader blocks on this connection for as long as nothing is published, so
        # no socket_timeout; the health check PINGs an idle one to notice a dead peer.
        self._sub_client = aioredis.Redis.from_url(url, socket_connect_timeout=5,
                                                   health_check_interval=30,
                                                   socket_keepalive=True)
        self._pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
        self._channels: set[str] = set()
        self._handler: Handler | None = None
        self._on_reconnect: ReconnectHandler | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._healthy = False
        self._origin = os.urandom(8)

    async def start(self, handler: Handler, on_reconnect: ReconnectHandler) -> None:
        self._handler = handler
        self._on_reconnect = on_reconnect
        self._channels.add(CONTROL_CHANNEL)
        try:
            await self._pubsub.subscribe(*self._channels)
            self._healthy = True
        except (RedisError, OSError) as exc:
            # Start anyway, as when Redis goes away later: sockets on this replica are
            # served, other replicas' messages arrive by reconcile from PostgreSQL, and
            # the reader keeps reconnecting (/readyz says `broker: down` meanwhile).
            _log.warning("Redis unreachable at start-up (%s); serving without pub/sub "
                         "until it answers", exc)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="redis-reader")

    async def publish(self, events: Iterable[tuple[str, bytes]]) -> None:
        pipe = self._pub.pipeline(transaction=False)
        n = 0
        for channel, payload in events:
            pipe.publish(channel, self._origin + payload)
            n += 1
        if n:
            await pipe.execute()

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            if channel in self._channels:
                return
            self._channels.add(channel)
            if self._healthy:
                try:
                    await self._pubsub.subscribe(channel)
                except (RedisError, OSError) as exc:
                    # The reader reconnects and resubscribes to every channel in _channels.
                    _log.warning("subscribe %s failed: %s", channel, exc)

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            if channel not in self._channels:
                return
            self._channels.discard(channel)
            if self._healthy:
                try:
                    await self._pubsub.unsubscribe(channel)
                except (RedisError, OSError) as exc:
                    _log.warning("unsubscribe %s failed: %s", channel, exc)

    async def ping(self) -> bool:
        try:
            return bool(await self._pub.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self._pubsub.aclose()
        except (RedisError, OSError):
            pass
        await self._sub_client.aclose()
        await self._pub.aclose()

    async def _read(self) -> None:
        assert self._handler is not None and self._on_reconnect is not None
        backoff = 0.05
        while True:
            try:
                if not self._healthy:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    await self._resubscribe()
                    backoff = 0.05
                    # Whatever was published while we were away is lost: ask the hub to
                    # compare every Hoomi against PostgreSQL. If that fails too (database
                    # down), listen anyway: the periodic reconcile will catch up.
                    try:
                        await self._on_reconnect()
                    except Exception as exc:
                        _log.warning("reconcile after reconnect failed: %s", exc)
                async for item in self._pubsub.listen():
                    if item.get("type") == "message":
                        self._dispatch(item)
                # listen() ends only when nothing is subscribed: start over.
                self._healthy = False
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._healthy:
                    _log.warning("pub/sub connection lost (%s); reconnecting", exc)
                self._healthy = False
            except Exception:
                _log.exception("pub/sub reader failed; reconnecting")
                self._healthy = False

    async def _resubscribe(self) -> None:
        async with self._lock:
            try:
                await self._pubsub.aclose()
            except (RedisError, OSError):
                pass
            self._pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(*self._channels)
            self._healthy = True
        _log.info("pub/sub reconnected to %d channels", len(self._channels))

    def _dispatch(self, item: dict[str, Any]) -> None:
        assert self._handler is not None
        data: bytes = item["data"]
        if data[:8] == self._origin:
            return  # our own echo: our sockets already have it
        channel = item["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        try:
            self._handler(channel, data[8:])
        except Exception:
            _log.exception("handler failed on %s", channel)
