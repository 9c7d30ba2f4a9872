"""Fan-out between replicas: Redis (or Valkey) pub/sub, or in-process for one replica.

The broker moves opaque payloads on named channels to the *other* replicas; it knows
nothing of messages. The publishing replica delivers to its own sockets directly, so the
Redis broker tags each payload with its instance id and drops its own echo.
A replica subscribes to `hoomi:<id>` only while one of its sockets belongs to that
Hoomi, and always to the control channel. With `HOOMI_REDIS_MODE=cluster`, ClusterBroker
does the same with sharded pub/sub on a Redis or Valkey Cluster (SPUBLISH/SSUBSCRIBE,
each channel on its slot's shard). Pub/sub is at-most-once: a payload can be lost
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
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from .presence import LocalPresence, Presence, RedisPresence

_log = logging.getLogger(__name__)

CONTROL_CHANNEL = "hoomi:ctl"

Handler = Callable[[str, bytes], None]
ReconnectHandler = Callable[[], Awaitable[None]]


def hoomi_channel(hoomi_hex: str) -> str:
    return f"hoomi:{hoomi_hex}"


class Broker(Protocol):
    # Whether other replicas may be listening: False for a lone replica (LocalBroker),
    # whose commits then build no broadcasts at all.
    shared: bool

    async def start(self, handler: Handler, on_reconnect: ReconnectHandler) -> None: ...
    async def publish(self, events: Iterable[tuple[str, bytes]]) -> None: ...
    async def subscribe(self, channel: str) -> None: ...
    async def unsubscribe(self, channel: str) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...
    # Who is online on the other replicas (server/presence.py), through the same server.
    def presence(self, ttl: float) -> Presence: ...


def _dispatch(handler: Handler, origin: bytes, item: dict[str, Any]) -> None:
    """One pub/sub message to the hub, unless it is our own echo (our sockets already
    have it): payloads start with the publishing replica's 8-byte origin."""
    data: bytes = item["data"]
    if data[:8] == origin:
        return
    channel = item["channel"]
    if isinstance(channel, bytes):
        channel = channel.decode()
    try:
        handler(channel, data[8:])
    except Exception:
        _log.exception("handler failed on %s", channel)


class LocalBroker:
    """One replica: there is nobody else to tell, so publishing does nothing."""

    shared = False

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

    def presence(self, ttl: float) -> Presence:
        return LocalPresence()


class RedisBroker:
    """Many replicas: one pub/sub connection for reading, a pool for publishing."""

    shared = True

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

    def presence(self, ttl: float) -> Presence:
        return RedisPresence(self._pub, ttl, self._origin)

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
        _dispatch(self._handler, self._origin, item)


class _Shard:
    """This replica's sharded subscriptions on one cluster node: one connection, its own
    reader task. Its `channels` are the ones this broker subscribed here and still wants."""

    __slots__ = ("name", "client", "pubsub", "channels", "leaving", "reader")

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        # No retries inside redis-py: an error reaches the broker at once, which re-reads
        # the slot map and subscribes again wherever the channel now lives.
        self.client = aioredis.Redis(host=host, port=port, socket_connect_timeout=5,
                                     socket_keepalive=True, health_check_interval=30,
                                     retry=Retry(NoBackoff(), 0))
        self.pubsub = self.client.pubsub()
        self.channels: set[str] = set()
        # SUNSUBSCRIBEs we sent whose confirmation has not come back: a confirmation is
        # ours until these are used up; past them the node unsubscribed us by itself.
        self.leaving: dict[str, int] = {}
        self.reader: asyncio.Task[None] | None = None

    async def sunsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self.leaving[channel] = self.leaving.get(channel, 0) + 1
        await self.pubsub.sunsubscribe(channel)

    def confirmed(self, channel: str) -> bool:
        """Whether a SUNSUBSCRIBE for `channel` answers one of ours."""
        n = self.leaving.get(channel, 0)
        if not n:
            return False
        if n == 1:
            del self.leaving[channel]
        else:
            self.leaving[channel] = n - 1
        return True

    async def close(self) -> None:
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
            try:
                await self.reader
            except (asyncio.CancelledError, Exception):
                pass
        for closing in (self.pubsub.aclose, self.client.aclose):
            try:
                await closing()
            except (RedisError, OSError):
                pass


class ClusterBroker:
    """Many replicas on a Redis or Valkey Cluster: sharded pub/sub.

    Each channel lives on the shard that owns its hash slot, so the fan-out load spreads
    over the cluster's masters. A publish sends one SPUBLISH pipeline per master, routed
    by the slot map of redis-py's cluster client (falling back to that client's own
    pipeline, which follows MOVED, when a master refuses or is gone), and this replica
    SSUBSCRIBEs each channel it needs on the master that owns it, one connection and one
    reader task per master (redis-py's ClusterPubSub polls its per-node connections in
    turn, which does not suit a reader that must block on all of them at once).

    The control channel (`hoomi:ctl`: membership changes, users gone) is one sharded
    channel like the others, which every replica subscribes to, so it reaches every
    replica through the one shard that owns its slot (a classic PUBLISH would be
    broadcast over the cluster bus to every node instead; membership changes are rare).

    When a node's connection breaks (its master died), or the node unsubscribes us
    (SUNSUBSCRIBE pushed when its slot moved or it became a replica), or a command is
    refused (MOVED), the supervisor re-reads the slot map and subscribes every wanted
    channel on its current owner, retrying with backoff through a failover, and then
    calls `on_reconnect`: what was published meanwhile is gone, and the hub reconciles
    against PostgreSQL as after a standalone Redis outage. The slot map is also re-read
    after a publish had to be rerouted, and every RECHECK_S anyway (a master that failed
    over behind a network partition may never break our connection): a channel found on
    the wrong node is moved, and the hub reconciles.
    """

    shared = True

    RECHECK_S = 30.0

    def __init__(self, url: str) -> None:
        self._cluster: RedisCluster = RedisCluster.from_url(
            url, socket_timeout=5, socket_connect_timeout=5)
        self._wanted: set[str] = set()
        self._shards: dict[str, _Shard] = {}
        self._publishers: dict[str, aioredis.Redis] = {}  # node name -> its own pool
        self._closing: set[asyncio.Task[None]] = set()
        self._where: dict[str, str] = {}  # channel -> node name it is subscribed on
        self._handler: Handler | None = None
        self._on_reconnect: ReconnectHandler | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._lost = False  # something may have been missed: reconcile after the next sync
        self._moved = False  # a sync found a channel subscribed on a node that lost its slot
        self._healthy = False
        self._origin = os.urandom(8)

    async def start(self, handler: Handler, on_reconnect: ReconnectHandler) -> None:
        self._handler = handler
        self._on_reconnect = on_reconnect
        self._wanted.add(CONTROL_CHANNEL)
        try:
            await self._sync()
        except (RedisError, RedisClusterException, OSError) as exc:
            # As RedisBroker: serve anyway, keep trying (/readyz says `broker: down`).
            _log.warning("Redis cluster unreachable at start-up (%s); serving without "
                         "pub/sub until it answers", exc)
            self._trouble()
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name="redis-cluster-supervisor")

    async def publish(self, events: Iterable[tuple[str, bytes]]) -> None:
        """SPUBLISH each event on its slot's master: one plain pipeline per master, in
        parallel, from the slot map as last read. A group that fails (MOVED after a slot
        moved, a master gone) is sent again through redis-py's cluster pipeline, which
        follows redirects and refreshes the map; an event of that group already published
        then arrives twice, and the hub drops the second by its seq."""
        events = list(events)
        groups: dict[str, list[tuple[str, bytes]]] = {}
        try:
            for channel, payload in events:
                node = self._cluster.get_node_from_key(channel)
                if node is None:
                    raise RedisClusterException(f"no master for {channel}")
                groups.setdefault(node.name, []).append((channel, self._origin + payload))
        except (RedisError, RedisClusterException, KeyError):
            # No slot map yet (the cluster was down at start-up): the cluster client
            # reads one for us.
            await self._publish_routed([(c, self._origin + p) for c, p in events])
            return
        if len(groups) == 1:
            name, items = next(iter(groups.items()))
            await self._publish_direct(name, items)
            return
        failed = await asyncio.gather(
            *(self._publish_direct(name, items) for name, items in groups.items()),
            return_exceptions=True)
        for outcome in failed:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _publish_direct(self, name: str, items: list[tuple[str, bytes]]) -> None:
        client = self._publishers.get(name)
        if client is None:
            host, _, port = name.rpartition(":")
            client = self._publishers[name] = aioredis.Redis(
                host=host, port=int(port), socket_timeout=5, socket_connect_timeout=5,
                retry=Retry(NoBackoff(), 0))
        pipe = client.pipeline(transaction=False)
        for channel, data in items:
            pipe.spublish(channel, data)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            # The type only: a pipeline's error message quotes its commands' payloads.
            _log.info("spublish of %d events on %s failed (%s); routing through the "
                      "cluster client", len(items), name, type(exc).__name__)
            self._dirty.set()  # the slot map moved: so may our subscriptions have to
            await self._publish_routed(items)

    async def _publish_routed(self, items: list[tuple[str, bytes]]) -> None:
        pipe = self._cluster.pipeline(transaction=False)
        for channel, data in items:
            pipe.spublish(channel, data)
        if not items:
            return
        try:
            await pipe.execute()
        except (RedisError, RedisClusterException, OSError) as exc:
            # Re-raised without the message, which would quote the payloads (the hub
            # logs it): the type and the count are what an operator needs.
            raise RedisError(f"SPUBLISH of {len(items)} events failed: "
                             f"{type(exc).__name__}") from None

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            if channel in self._wanted:
                return
            self._wanted.add(channel)
            if not self._healthy:
                return  # the supervisor subscribes it with the rest
            try:
                await self._place(channel)
            except (RedisError, RedisClusterException, OSError) as exc:
                _log.warning("ssubscribe %s failed: %s", channel, exc)
                self._trouble()

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            if channel not in self._wanted:
                return
            self._wanted.discard(channel)
            shard = self._shards.get(self._where.pop(channel, ""))
            if shard is None:
                return
            try:
                await shard.sunsubscribe(channel)
            except (RedisError, OSError) as exc:
                _log.warning("sunsubscribe %s failed: %s", channel, exc)

    def presence(self, ttl: float) -> Presence:
        return RedisPresence(self._cluster, ttl, self._origin)

    async def ping(self) -> bool:
        if not self._healthy:
            return False
        try:
            return bool(await self._cluster.ping(target_nodes=RedisCluster.PRIMARIES))
        except (RedisError, RedisClusterException, OSError):
            return False

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except (asyncio.CancelledError, Exception):
                pass
        for shard in list(self._shards.values()):
            await shard.close()
        self._shards.clear()
        for client in self._publishers.values():
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass
        self._publishers.clear()
        try:
            await self._cluster.aclose()
            # RedisCluster.aclose() closes nothing unless the client's own initialize() ran
            # (redis-py 8.1: its `_initialize` flag); _sync reads the slot map with
            # nodes_manager.initialize(), so the node connections are closed here.
            await self._cluster.nodes_manager.aclose()
            await self._cluster.nodes_manager.aclose("startup_nodes")
        except (RedisError, OSError):
            pass

    # -- keeping every wanted channel subscribed on its slot's master -----------------------

    def _trouble(self) -> None:
        self._healthy = False
        self._lost = True
        self._dirty.set()

    async def _supervise(self) -> None:
        assert self._on_reconnect is not None
        backoff = 0.05
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.RECHECK_S)
            except TimeoutError:
                pass  # re-read the slot map anyway
            lost, self._lost = self._lost, False
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Typically a failover in progress: the map still names the dead master.
                _log.info("pub/sub resync failed (%s); retrying in %.2f s", exc, backoff)
                self._lost = True
                self._dirty.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)  # a failover takes a second or two
                continue
            backoff = 0.05
            lost, self._moved = lost or self._moved, False
            if lost:
                _log.info("sharded pub/sub resubscribed %d channels on %d nodes",
                          len(self._wanted), len(self._shards))
                # Whatever was published while a shard was away is lost: compare every
                # Hoomi against PostgreSQL. If that fails (database down), listen anyway.
                try:
                    await self._on_reconnect()
                except Exception as exc:
                    _log.warning("reconcile after pub/sub resync failed: %s", exc)

    async def _sync(self) -> None:
        """Re-read the slot map; subscribe each wanted channel where its slot now lives."""
        async with self._lock:
            self._dirty.clear()
            try:
                await self._cluster.nodes_manager.initialize()
            except BaseException:
                self._healthy = False
                raise
            masters = {n.name for n in self._cluster.get_primaries()}
            for name in [n for n in self._shards if n not in masters]:
                await self._drop(self._shards[name])
            for name in [n for n in self._publishers if n not in masters]:
                # Closed in the background: a publish may be using it right now.
                stale = self._publishers.pop(name)
                closing = asyncio.get_running_loop().create_task(stale.aclose())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            failed: Exception | None = None
            unreachable: set[str] = set()  # tried once per pass (a dead host costs a timeout)
            for channel in sorted(self._wanted):
                node = None
                try:
                    node = self._cluster.get_node_from_key(channel)
                    if node is not None and node.name in unreachable:
                        continue
                    await self._place(channel)
                except (RedisError, RedisClusterException, OSError) as exc:
                    # Its master is still the dead one (or its slot uncovered for now):
                    # place the others meanwhile.
                    failed = failed or exc
                    if node is not None:
                        unreachable.add(node.name)
            if failed is not None:
                self._healthy = False
                raise failed
            self._healthy = True

    async def _place(self, channel: str) -> None:
        """Subscribe `channel` on the master owning its slot (caller holds the lock)."""
        node = self._cluster.get_node_from_key(channel)
        if node is None:  # only with replica=True; keeps mypy honest
            raise RedisClusterException(f"no master for {channel}")
        where = self._where.get(channel)
        if where == node.name and where in self._shards:
            return
        old = self._shards.get(where or "")
        if old is not None:
            self._moved = True  # what was published on the new owner meanwhile is missed
            try:
                await old.sunsubscribe(channel)
            except (RedisError, OSError):
                pass  # that node may be the one that went away
        self._where.pop(channel, None)
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = _Shard(node.name, node.host, int(node.port))
        try:
            await shard.pubsub.ssubscribe(channel)
        except BaseException:
            if not shard.channels:
                self._shards.pop(node.name, None)
                await shard.close()
            raise
        shard.channels.add(channel)
        self._where[channel] = node.name
        if shard.reader is None:
            shard.reader = asyncio.get_running_loop().create_task(
                self._read(shard), name=f"redis-shard-{node.name}")

    async def _drop(self, shard: _Shard) -> None:
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        for channel in shard.channels:
            if self._where.get(channel) == shard.name:
                del self._where[channel]
        shard.channels.clear()
        await shard.close()

    async def _read(self, shard: _Shard) -> None:
        try:
            while True:
                item = await shard.pubsub.get_message(timeout=None)
                if item is None:
                    continue
                kind = item.get("type")
                if kind == "smessage":
                    self._dispatch(item)
                elif kind == "sunsubscribe":
                    channel = item["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    if not shard.confirmed(channel) and channel in shard.channels:
                        # Not ours: the node gave the slot up (migrated, or demoted).
                        _log.info("%s unsubscribed us from %s; resyncing", shard.name, channel)
                        shard.channels.discard(channel)
                        if self._where.get(channel) == shard.name:
                            del self._where[channel]
                        self._trouble()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("sharded pub/sub connection to %s lost (%s); resyncing",
                         shard.name, exc)
            shard.reader = None  # this task ends here; close() must not await it
            if self._shards.get(shard.name) is shard:
                del self._shards[shard.name]
            for channel in shard.channels:
                if self._where.get(channel) == shard.name:
                    del self._where[channel]
            self._trouble()
            await shard.close()

    def _dispatch(self, item: dict[str, Any]) -> None:
        assert self._handler is not None
        _dispatch(self._handler, self._origin, item)
