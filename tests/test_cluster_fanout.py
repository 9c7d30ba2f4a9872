"""Fan-out on a real 3-shard Valkey Cluster (HOOMI_REDIS_MODE=cluster): sharded pub/sub.

Two `hoomi serve` replicas whose REDIS_URL names one node of the cluster (logging at
info, so a failure's replica logs show the broker's resyncs). Periodic
reconcile is pushed past the module's run time (HOOMI_RECONCILE_INTERVAL_S=120), so what
arrives came through pub/sub, a seq gap filled from PostgreSQL, or the reconcile the
broker asks for after resubscribing, not through a timer.
"""

from __future__ import annotations

import asyncio
import os
from uuid import UUID, uuid4

import asyncpg
import pytest
import redis

from hoomi_protocol import Ack, Membership, MessageBody
from server import config
from server.broker import ClusterBroker
from server.testing.loopback import until_ok
from tests.wsclient import joined, messages, send


def test_redis_mode_is_standalone_or_cluster(tmp_path):
    base = {"HOOMI_DATA_DIR": str(tmp_path)}
    assert config.load(base).redis_mode == "standalone"
    assert config.load({**base, "HOOMI_REDIS_MODE": "Cluster"}).redis_mode == "cluster"
    with pytest.raises(config.ConfigError, match="HOOMI_REDIS_MODE: standalone or cluster"):
        config.load({**base, "HOOMI_REDIS_MODE": "sentinel"})


def shard_subscribers(port: int, channel: str) -> int:
    with redis.Redis(port=port) as node:
        reply = node.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


async def test_hoomis_on_every_shard_cross_replicas_in_order(sharded, valkey_cluster):
    (ra, rb), admin = sharded
    alice, bob = await admin.user(), await admin.user()
    # Enough Hoomis that their channels land on all three shards.
    hoomis: list[UUID] = []
    owners: set[int] = set()
    while len(owners) < 3:
        h = await admin.hoomi([alice], [bob])
        hoomis.append(h)
        owners.add(valkey_cluster.master_of(f"hoomi:{h.hex}"))
    pa, _ = await joined(ra.ws, await admin.token(alice))
    pb, _ = await joined(rb.ws, await admin.token(bob))
    # Each channel is SSUBSCRIBEd by both replicas on the master owning its slot.
    for h in hoomis:
        ch = f"hoomi:{h.hex}"
        assert shard_subscribers(valkey_cluster.master_of(ch), ch) == 2
    frames = [send(h, ref=i) for i in range(20) for h in hoomis]
    for f in frames:
        await pa.send(f)
    got = await messages(pb, len(frames))
    for h in hoomis:
        mine = [m for m in got if m.hoomi_id == h]
        assert [m.seq for m in mine] == list(range(1, 21))
        assert [m.content for m in mine] == [f.content for f in frames if f.hoomi_id == h]
    await pa.close()
    await pb.close()


async def test_membership_control_reaches_both_replicas(sharded):
    (ra, rb), admin = sharded
    alice, carol = await admin.user(), await admin.user()
    h = await admin.hoomi([alice])
    token = await admin.token(carol)
    on_a, _ = await joined(ra.ws, token)
    on_b, _ = await joined(rb.ws, token)
    # The change is made through replica a; its `joined` control event reaches the
    # socket on replica b over the sharded control channel.
    r = await admin.http.put(f"/v1/admin/hoomis/{h}/members/{carol}", json={"role": "member"})
    assert r.status_code == 204, r.text
    for peer in (on_a, on_b):
        frame, _ = await peer.recv_until(Membership)
        assert (frame.hoomi_id, frame.state) == (h, "joined")
    # Carol's socket on b now gets h's messages, sent on a.
    pa, _ = await joined(ra.ws, await admin.token(alice))
    await pa.send(send(h, ref=1))
    assert [(m.hoomi_id, m.seq) for m in await messages(on_b, 1)] == [(h, 1)]
    r = await admin.http.delete(f"/v1/admin/hoomis/{h}/members/{carol}")
    assert r.status_code == 204, r.text
    for peer in (on_a, on_b):
        frame, _ = await peer.recv_until(Membership)
        assert (frame.hoomi_id, frame.state) == (h, "left")
    r = await admin.http.delete(f"/v1/admin/users/{carol}")
    assert r.status_code == 204, r.text
    for peer in (on_a, on_b):
        code, _ = await peer.closed()
        assert code == 4401
    await pa.close()


async def until(check, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"{what} not after {timeout} s"
        await asyncio.sleep(0.05)


async def test_slot_moved_to_another_shard_resubscribes_there(sharded, valkey_cluster):
    # A resharding moves a Hoomi's slot: the old master unsubscribes both replicas
    # (SUNSUBSCRIBE pushed), they subscribe on the new owner, publishing follows MOVED.
    (ra, rb), admin = sharded
    alice, bob = await admin.user(), await admin.user()
    h = await admin.hoomi([alice], [bob])
    ch = f"hoomi:{h.hex}"
    pa, _ = await joined(ra.ws, await admin.token(alice))
    pb, _ = await joined(rb.ws, await admin.token(bob))
    await pa.send(send(h, ref=0))
    assert [m.seq for m in await messages(pb, 1)] == [1]
    owner = valkey_cluster.master_of(ch)
    target = next(p for p in valkey_cluster.masters() if p != owner)
    valkey_cluster.move_slot(ch, target)
    assert valkey_cluster.master_of(ch) == target
    await until(lambda: shard_subscribers(target, ch) == 2, 10,
                "both replicas subscribed on the new owner")
    for i in range(1, 4):
        await pa.send(send(h, ref=i))
    assert [m.seq for m in await messages(pb, 3)] == [2, 3, 4]
    await pa.close()
    await pb.close()


async def test_broker_leaving_and_rejoining_channels_needs_no_resync(valkey_cluster):
    # A Hoomi's last socket on a replica leaves and another joins at once (SUNSUBSCRIBE
    # then SSUBSCRIBE): the confirmation of our own SUNSUBSCRIBE must not be taken for
    # the node dropping us, which would resubscribe everything and reconcile every Hoomi.
    got: list[tuple[str, bytes]] = []
    reconciles: list[int] = []

    async def reconcile() -> None:
        reconciles.append(1)

    a, b = ClusterBroker(valkey_cluster.url), ClusterBroker(valkey_cluster.url)
    await a.start(lambda ch, p: None, reconcile)
    await b.start(lambda ch, p: got.append((ch, p)), reconcile)
    try:
        channels = [f"hoomi:{uuid4().hex}" for _ in range(12)]
        for ch in channels:
            await b.subscribe(ch)
        for _ in range(3):
            for ch in channels:
                await b.unsubscribe(ch)
                await b.subscribe(ch)
        for ch in channels[:6]:
            await b.unsubscribe(ch)
        await a.publish([(ch, ch.encode()) for ch in channels])
        await until(lambda: len(got) >= 6, 5, "6 deliveries")
        await asyncio.sleep(0.2)  # a resync, were one started, would reconcile meanwhile
        assert sorted(got) == sorted((ch, ch.encode()) for ch in channels[6:])
        assert reconciles == []
        assert await b.ping()
    finally:
        await a.close()
        await b.close()


def clients_on(ports: list[int]) -> int:
    """Connections the nodes count, ours included (one each), summed over the nodes."""
    total = 0
    for port in ports:
        with redis.Redis(port=port) as node:
            total += int(node.info("clients")["connected_clients"])
    return total


async def test_a_closed_broker_leaves_no_connection_open(valkey_cluster):
    before = clients_on(valkey_cluster.ports)
    broker = ClusterBroker(valkey_cluster.url)

    async def reconcile() -> None:
        pass

    await broker.start(lambda ch, p: None, reconcile)
    channels = [f"hoomi:{uuid4().hex}" for _ in range(12)]  # on every shard
    for ch in channels:
        await broker.subscribe(ch)
    await broker.publish([(ch, b"x") for ch in channels])
    assert clients_on(valkey_cluster.ports) > before
    await broker.close()
    await until(lambda: clients_on(valkey_cluster.ports) == before, 5,
                "every connection of the closed broker gone")


def _connections_to(port: int) -> int:
    """This process's established TCP connections to port `port` (its socket fds matched
    to /proc/net/tcp by inode)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in list(f)[1:]]
    return sum(1 for r in rows
               if int(r[2].split(":")[1], 16) == port and r[3] == "01" and r[9] in inodes)


async def test_a_closed_cluster_broker_leaves_no_connection_open(valkey_cluster):
    # The seed node's connection (the one the slot map was first read on) outlived close()
    # until the garbage collector found it ("Unclosed ClusterNode object").
    seed = int(valkey_cluster.url.rsplit(":", 1)[1])
    before = _connections_to(seed)

    async def reconcile() -> None:
        pass

    broker = ClusterBroker(valkey_cluster.url)
    await broker.start(lambda ch, p: None, reconcile)
    await broker.subscribe("hoomi:closing")
    await broker.publish([("hoomi:closing", b"x")])
    assert _connections_to(seed) > before
    await broker.close()
    await until(lambda: _connections_to(seed) == before, 5, "the broker's connections closed")


async def stored_seqs(dsn: str, hoomi: UUID) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT seq FROM messages WHERE hoomi_id = $1 ORDER BY seq",
                                hoomi)
    finally:
        await conn.close()
    return [r["seq"] for r in rows]


async def test_shard_master_failover_while_messages_flow(sharded, valkey_cluster, module_dsn):
    # Last in the module: it leaves the cluster with one shard lacking a replica.
    (ra, rb), admin = sharded
    alice, bob = await admin.user(), await admin.user()
    h = await admin.hoomi([alice], [bob])
    pa, _ = await joined(ra.ws, await admin.token(alice))
    pb, _ = await joined(rb.ws, await admin.token(bob))
    victim = valkey_cluster.master_of(f"hoomi:{h.hex}")
    sent: list[int] = []
    acked: dict[int, int] = {}  # ref -> seq
    received: list[MessageBody] = []
    promoted = asyncio.Event()

    async def sender() -> None:
        # Paced sends through the kill, the failover and two seconds past it, so both
        # replicas have moved to the new master before the flow stops.
        loop = asyncio.get_running_loop()
        stop_at: float | None = None
        while stop_at is None or loop.time() < stop_at:
            await pa.send(send(h, ref=len(sent)))
            sent.append(len(sent))
            await asyncio.sleep(0.01)
            if promoted.is_set() and stop_at is None:
                stop_at = loop.time() + 2.0

    async def read_acks() -> None:
        while True:
            frame = await pa.recv()
            if isinstance(frame, Ack):
                acked[frame.ref] = frame.seq

    async def read_pushes() -> None:
        while True:
            frame = await pb.recv()
            if isinstance(frame, MessageBody) and frame.hoomi_id == h:
                received.append(frame)

    sending = asyncio.ensure_future(sender())
    readers = [asyncio.ensure_future(read_acks()), asyncio.ensure_future(read_pushes())]
    try:
        await until(lambda: len(acked) >= 50, 20, "50 acks")
        valkey_cluster.kill(victim)
        acked_at_kill = len(acked)
        await asyncio.to_thread(valkey_cluster.wait_promoted, victim)
        promoted.set()
        await asyncio.wait_for(sending, 30)
        # Every send is acked (the database never went away) ...
        await until(lambda: len(acked) == len(sent), 10, "an ack for every send")
        # ... and every acked message reaches bob on the other replica.
        await until(lambda: len(received) >= len(acked), 20,
                    f"delivery of {len(acked)} acked messages")
        await asyncio.sleep(0.3)  # a duplicate, were there one, would arrive meanwhile
    finally:
        for t in [sending, *readers]:
            t.cancel()
        await asyncio.gather(sending, *readers, return_exceptions=True)
    want = sorted(acked.values())
    seqs = [m.seq for m in received]
    print(f"failover of shard master {victim}: {len(want)} acked "
          f"({len(want) - acked_at_kill} after the kill), {len(seqs)} delivered")
    assert want == list(range(1, len(want) + 1))
    assert seqs == want  # every acked message, once, in seq order
    assert await stored_seqs(module_dsn, h) == want
    assert len(want) > acked_at_kill  # messages flowed through the failover
    # Replica b's subscriber saw the master go and resubscribed on the new one.
    assert f"sharded pub/sub connection to 127.0.0.1:{victim} lost" in rb.output()
    for r in (ra, rb):
        await until_ok(r.http + "/readyz", 10, r.output)  # broker: ok on the new master
    await pa.close()
    await pb.close()
