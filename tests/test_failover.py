"""Failover, tested for real: Patroni + etcd with synchronous replication
(server/testing/patroni.py), two hub replicas on a multi-host DATABASE_URL
(target_session_attrs=read-write), SDK clients sending on both with a ledger of every ack.

- The leader is SIGKILLed (Patroni and every PostgreSQL process of it): every acked
  message is on the new leader exactly once with its acked id and seq, seqs stay dense,
  and sending resumes without restarting a hub.
- The killed leader rejoins as a synchronous standby (pg_rewind), with the same rows.
- A planned switchover under load: no error reaches the application, only retries.

The guarantee: with synchronous replication an ack means the row is on two servers, and
Patroni promotes only the synchronous standby, so no acked message is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from uuid import UUID, uuid4

import asyncpg
import pytest

from hoomi_client.sdk import HoomiClient, HubError
from server.testing.patroni import HACluster, Node, Unavailable, wait_writable
from server.testing.replica import Replica
from server.testing.valkey import Valkey
from storage.db import connect, create_pool
from tests.wsclient import Admin

pytestmark = pytest.mark.timeout(300)

DATABASE = "hoomi"


@dataclass
class Ledger:
    """Every ack the applications got: client_msg_id -> (hoomi, id, seq), with times."""

    acks: dict[UUID, tuple[UUID, UUID, int]] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # monotonic time of each ack
    errors: list[BaseException] = field(default_factory=list)

    def after(self, t: float) -> int:
        return sum(1 for x in self.times if x > t)


async def send_until(clients: list[HoomiClient], hoomis: list[UUID], ledger: Ledger,
                     stop: asyncio.Event, *, per_client: int = 3000,
                     in_flight: int = 4) -> None:
    """Each client sends to its Hoomi until `stop` (at most `per_client` messages)."""
    async def sender(k: int) -> None:
        slots = asyncio.Semaphore(in_flight)
        tasks = []

        async def one() -> None:
            cmid = uuid4()
            try:
                ack = await clients[k].send(hoomis[k % len(hoomis)], os.urandom(48),
                                            os.urandom(12), "s1", client_msg_id=cmid)
            except HubError as exc:  # what the application would see: must not happen
                ledger.errors.append(exc)
                return
            finally:
                slots.release()
            ledger.acks[cmid] = (ack.hoomi_id, ack.id, ack.seq)
            ledger.times.append(time.monotonic())

        for _ in range(per_client):
            await slots.acquire()
            if stop.is_set():
                break
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)

    await asyncio.gather(*(sender(k) for k in range(len(clients))))


async def check_ledger(dsn: str, ledger: Ledger, hoomis: list[UUID]) -> None:
    """The database holds exactly the acked messages, once each, with dense seqs."""
    conn = await connect(dsn, timeout=10)  # all hosts at once: the old leader may hang
    try:
        rows = await conn.fetch("SELECT client_msg_id, hoomi_id, id, seq FROM messages"
                                " WHERE hoomi_id = ANY($1::uuid[])", hoomis)
    finally:
        await conn.close()
    stored = {r["client_msg_id"]: (r["hoomi_id"], r["id"], r["seq"]) for r in rows}
    assert len(stored) == len(rows), "a message is stored twice"
    lost = set(ledger.acks) - set(stored)
    assert not lost, f"{len(lost)} acked messages are not on the leader"
    assert stored == ledger.acks
    for h in hoomis:
        seqs = sorted(seq for hh, _, seq in stored.values() if hh == h)
        assert seqs == list(range(1, len(seqs) + 1)), f"seqs of {h} are not dense"


@dataclass
class Setup:
    ha: HACluster
    replicas: list[Replica]
    admin: Admin
    killed: Node | None = None


@pytest.fixture(scope="module")
async def ha(valkey: Valkey) -> AsyncIterator[Setup]:
    try:
        cluster = HACluster(nodes=2)
    except Unavailable as exc:
        pytest.skip(f"no highly available PostgreSQL here: {exc}")
    replicas: list[Replica] = []
    admin = None
    try:
        await asyncio.to_thread(cluster.start)
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()
        replicas = [Replica(cluster.dsn(DATABASE), valkey.url, name=n,
                            HOOMI_SEND_RATE="100000", HOOMI_SEND_BURST="100000",
                            HOOMI_RECONCILE_INTERVAL_S="0.5")
                    for n in ("ha-a", "ha-b")]
        for r in replicas:
            await asyncio.to_thread(r.start)
        admin = Admin(replicas[0].http)
        yield Setup(cluster, replicas, admin)
    finally:
        if admin is not None:
            await admin.close()
        for r in replicas:
            r.stop()
        await asyncio.to_thread(cluster.close)


@contextlib.asynccontextmanager
async def clients_on(setup: Setup, n_hoomis: int = 2) -> AsyncIterator[
        tuple[list[HoomiClient], list[UUID]]]:
    """Two users per Hoomi, one homed on each hub replica."""
    urls = [r.ws for r in setup.replicas]
    users = [await setup.admin.user() for _ in range(2 * n_hoomis)]
    hoomis = [await setup.admin.hoomi([users[2 * i], users[2 * i + 1]])
              for i in range(n_hoomis)]
    clients = []
    for k, u in enumerate(users):
        order = urls[k % 2:] + urls[:k % 2]
        clients.append(HoomiClient(order, await setup.admin.token(u), backoff_max=0.5))
    try:
        for c in clients:
            await c.start()
        yield clients, [hoomis[k // 2] for k in range(len(clients))]
    finally:
        for c in clients:
            await c.close()


async def test_a_host_that_hangs_does_not_hide_the_primary(ha: Setup):
    """A frozen old leader (TCP accepts, PostgreSQL never answers) listed first: asyncpg
    alone spent its whole connect timeout on it (TimeoutError after 10 s, the primary
    behind it never tried); storage.db.connect tries the hosts at once."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        hosts = ",".join([f"127.0.0.1:{silent.getsockname()[1]}",
                          *(n.host for n in ha.ha.nodes)])
        dsn = f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"
        pool = await create_pool(dsn, min_size=1, max_size=2)
        try:
            leader = await asyncio.to_thread(ha.ha.wait_leader)
            assert await pool.fetchval("SELECT inet_server_port()") == leader.pg_port
            assert await pool.fetchval("SELECT NOT pg_is_in_recovery()")
        finally:
            await pool.close()


async def test_leader_killed_no_acked_message_lost(ha: Setup,
                                                   record_property: Callable[[str, object], None]):
    old = await asyncio.to_thread(ha.ha.wait_leader)
    (new,) = [n for n in ha.ha.nodes if n is not old]
    ledger, stop = Ledger(), asyncio.Event()
    async with clients_on(ha) as (clients, hoomis):
        sending = asyncio.ensure_future(send_until(clients, hoomis, ledger, stop))
        try:
            while len(ledger.acks) < 100:
                assert not sending.done(), sending
                await asyncio.sleep(0.05)
            before = len(ledger.acks)
            killed_at = time.monotonic()
            await asyncio.to_thread(old.kill)
            ha.killed = old
            writable_at = await wait_writable(new, 90)
            # Sending resumes on the new leader, through the same hubs.
            while ledger.after(writable_at) < 100:
                assert not sending.done(), sending
                assert time.monotonic() - killed_at < 120, "sending did not resume"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(sending, 60)
    # The first new ack ends the longest silence after the kill (acks of commits made
    # just before it may still arrive in the first milliseconds).
    times = sorted(t for t in ledger.times if t > killed_at - 1)
    first_ack = max(zip(times, times[1:], strict=False), key=lambda gap: gap[1] - gap[0])[1]
    figures = {"kill_to_first_ack_s": round(first_ack - killed_at, 2),
               "kill_to_writable_s": round(writable_at - killed_at, 2),
               "hub_share_s": round(first_ack - writable_at, 2),
               "acked_before_kill": before, "acked": len(ledger.acks)}
    for k, v in figures.items():
        record_property(k, v)
    print("failover:", figures)
    assert ledger.errors == []
    assert ha.ha.leader() is new
    await check_ledger(ha.ha.dsn(DATABASE), ledger, sorted(set(hoomis)))


async def test_old_leader_rejoins_as_standby(ha: Setup):
    if ha.killed is None:  # run alone: kill the leader here
        old = await asyncio.to_thread(ha.ha.wait_leader)
        await asyncio.to_thread(old.kill)
        await asyncio.to_thread(ha.ha.wait_leader, old.name, 90)
        ha.killed = old
    old, ha.killed = ha.killed, None
    await asyncio.to_thread(old.start)
    members = await asyncio.to_thread(ha.ha.wait_healthy, 120)
    roles = {m["name"]: m["role"] for m in members}
    assert roles[old.name] == "sync_standby", members
    # Its crash recovery alone wrote WAL the new leader never had: Patroni rewound it.
    rewind = [line for line in old.output(tail=None).splitlines()
              if "rewind" in line.lower()]
    assert any("pg_rewind exit code=0" in line for line in rewind), rewind
    assert len({m["timeline"] for m in members}) == 1, members
    # It took the new leader's history: the same rows on both servers once replayed.
    leader = ha.ha.leader()
    assert leader is not None and leader is not old
    conn = await asyncpg.connect(ha.ha.node_dsn(leader, DATABASE))
    try:
        want = await conn.fetch("SELECT id, seq FROM messages ORDER BY id")
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    finally:
        await conn.close()
    conn = await asyncpg.connect(ha.ha.node_dsn(old, DATABASE))
    try:
        deadline = time.monotonic() + 30
        while await conn.fetchval("SELECT pg_last_wal_replay_lsn() < $1::text::pg_lsn", lsn):
            assert time.monotonic() < deadline, "the rejoined standby does not replay"
            await asyncio.sleep(0.1)
        assert await conn.fetchval("SELECT pg_is_in_recovery()")
        assert await conn.fetch("SELECT id, seq FROM messages ORDER BY id") == want
    finally:
        await conn.close()


async def test_switchover_under_load_surfaces_no_error(ha: Setup):
    await asyncio.to_thread(ha.ha.wait_healthy, 120)
    old = await asyncio.to_thread(ha.ha.wait_leader)
    (candidate,) = [n for n in ha.ha.nodes if n is not old]
    ledger, stop = Ledger(), asyncio.Event()
    async with clients_on(ha) as (clients, hoomis):
        sending = asyncio.ensure_future(send_until(clients, hoomis, ledger, stop))
        try:
            while len(ledger.acks) < 100:
                assert not sending.done(), sending
                await asyncio.sleep(0.05)
            await asyncio.to_thread(ha.ha.switchover, candidate)
            switched_at = time.monotonic()
            await asyncio.to_thread(ha.ha.wait_leader, old.name, 60)
            while ledger.after(switched_at) < 100:
                assert not sending.done(), sending
                assert time.monotonic() - switched_at < 90, "sending did not resume"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(sending, 60)
    assert ledger.errors == []
    assert ha.ha.leader() is candidate
    await check_ledger(ha.ha.dsn(DATABASE), ledger, sorted(set(hoomis)))
    # The old leader follows as the synchronous standby, without an operator.
    members = await asyncio.to_thread(ha.ha.wait_healthy, 60)
    assert {m["name"]: m["role"] for m in members}[old.name] == "sync_standby"


async def test_hung_leader_hubs_follow_the_new_primary(ha: Setup,
                                                       record_property: Callable[[str, object],
                                                                                 None]):
    """The leader hangs instead of dying (SIGSTOP: TCP still accepted, nothing answers).
    Patroni promotes the standby once the leader's key expires; the hubs' pooled
    connections sat on the old leader until command_timeout and then the ROLLBACK's
    (60 s after the hang, the first new ack 38 s after the new primary took writes);
    now each pool sees within a second or two that another host is the primary and
    drops them (2 s)."""
    await asyncio.to_thread(ha.ha.wait_healthy, 120)
    old = await asyncio.to_thread(ha.ha.wait_leader)
    (new,) = [n for n in ha.ha.nodes if n is not old]
    ledger, stop = Ledger(), asyncio.Event()
    async with clients_on(ha) as (clients, hoomis):
        sending = asyncio.ensure_future(send_until(clients, hoomis, ledger, stop))
        try:
            while len(ledger.acks) < 100:
                assert not sending.done(), sending
                await asyncio.sleep(0.05)
            await asyncio.to_thread(old.freeze)
            ha.killed = old
            writable_at = await wait_writable(new, 90)
            while ledger.after(writable_at) < 100:
                assert not sending.done(), sending
                # Well under the 30 s command_timeout a stuck connection would wait.
                assert time.monotonic() - writable_at < 20, "the hubs stay on the hung leader"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(sending, 60)
    resumed = round(sorted(t for t in ledger.times if t > writable_at)[99] - writable_at, 2)
    print(f"hung leader: new primary writable -> 100 new acks {resumed} s")
    record_property("hung_writable_to_100_acks_s", resumed)
    assert ledger.errors == []
    await check_ledger(ha.ha.dsn(DATABASE), ledger, sorted(set(hoomis)))
    # The hung machine is replaced: killed, started again, it rejoins as the standby.
    await asyncio.to_thread(old.kill)
    await asyncio.to_thread(old.start)
    ha.killed = None
    members = await asyncio.to_thread(ha.ha.wait_healthy, 120)
    assert {m["name"]: m["role"] for m in members}[old.name] == "sync_standby"
