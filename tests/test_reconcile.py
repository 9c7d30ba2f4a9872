"""The hub's reconcile reads only what changed since its previous round (migration 0009,
storage/changes.py, server/hub.py): an idle round is one statement returning one row
whatever the number of feeds and sockets, and what pub/sub never brought (a message
committed with no broadcast, a membership changed with no control, a user deleted) is
still applied by the next round, including a change whose transaction began before a
round and committed after it, behind later commits."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import asyncpg
import pytest

from server.broker import LocalBroker
from server.hub import Hub
from server.testing.counting import CountingConnection
from storage import changes as change_store
from storage.audit import Actor
from storage.db import connect
from storage.hoomis import remove_member, set_member
from storage.ids import uuid7s
from storage.users import delete_user
from storage.writer import BatchWriter
from tests import factories


class Sock:
    def __init__(self, user_id: UUID) -> None:
        self.user_id = user_id
        self.membership_epoch = 0
        self.seqs: dict[UUID, list[int]] = {}
        self.roles: dict[UUID, str] | None = None
        self.gone = False

    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        self.seqs.setdefault(hoomi_id, []).append(seq)

    def on_memberships(self, roles: dict[UUID, str]) -> None:
        self.roles = roles

    def on_user_gone(self) -> None:
        self.gone = True

    def on_deletion(self, hoomi_id: UUID, seq: int, frame: bytes) -> None: ...
    def on_joined(self, hoomi_id: UUID, role: str) -> None: ...
    def on_left(self, hoomi_id: UUID) -> None: ...
    def on_signal(self, hoomi_id: UUID, user_id: UUID, kind: str, frame: bytes) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


@pytest.fixture
async def hub(dsn) -> AsyncIterator[Hub]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, connect=connect,
                                     connection_class=CountingConnection)
    h = Hub(pool, LocalBroker(), gap_grace=0)
    await h.start()
    yield h
    await h.close()
    await pool.close()


async def followed(hub: Hub, pool, n_users: int, per_user: int
                   ) -> list[tuple[Sock, list[UUID]]]:
    out = []
    for u in await factories.users(pool, n_users):
        hoomis = [await factories.hoomi(pool, [u]) for _ in range(per_user)]
        sock = Sock(u)
        hub.register(sock)
        hub.attach(sock)
        await hub.join(sock, hoomis)
        out.append((sock, hoomis))
    return out


async def test_an_idle_round_is_one_statement_and_one_row(hub, pool):
    await followed(hub, pool, 30, 4)  # 120 feeds, 30 users
    await hub.reconcile()  # the first round reads everything
    CountingConnection.reset_counts()
    await hub.reconcile()
    await hub.reconcile()
    # Per round: one statement returning one row, and the pool's reset when its
    # connection goes back (asyncpg's reset query: one round trip, no rows).
    assert (CountingConnection.statements, CountingConnection.rows) == (4, 2)


async def test_messages_and_memberships_pubsub_never_brought_are_applied(hub, pool):
    (alice, (h1, h2)), (bob, (h3, _)) = await followed(hub, pool, 2, 2)
    await hub.reconcile()  # the first round reads everything
    alice.roles = bob.roles = None
    # Committed with no broadcast (the writer has no commit hook here: a replica that
    # died between commit and publish).
    writer = BatchWriter(pool)
    writer.start()
    for _ in range(3):
        await writer.append(factories.request(h1, alice.user_id))
    await writer.close()
    await set_member(pool, h3, alice.user_id, "member", Actor.operator())
    await remove_member(pool, h2, alice.user_id, Actor.operator())
    await hub.reconcile()
    await _filled(alice, h1, [1, 2, 3])
    assert alice.roles == {h1: "admin", h3: "member"}
    assert bob.roles is None  # bob's memberships did not change: not read
    await delete_user(pool, bob.user_id, Actor.operator())
    await hub.reconcile()
    assert bob.gone and alice.roles == {h1: "admin", h3: "member"}


async def test_a_change_committed_after_a_round_behind_later_commits_is_not_missed(hub, pool):
    (sock, (early, late)), = await followed(hub, pool, 1, 2)
    await hub.reconcile()
    slow = await pool.acquire()
    try:
        tx = slow.transaction()
        await tx.start()
        await _append_raw(slow, early, sock.user_id)  # its xid is taken now, commit later
        writer = BatchWriter(pool)
        writer.start()
        await writer.append(factories.request(late, sock.user_id))  # a later xid, committed
        await writer.close()
        await hub.reconcile()  # sees `late`; `early` still running
        await _filled(sock, late, [1])
        assert early not in sock.seqs
        await tx.commit()
    finally:
        await pool.release(slow)
    await hub.reconcile()
    await _filled(sock, early, [1])


async def test_member_changes_are_pruned_after_an_hour(pool):
    u = (await factories.users(pool, 1))[0]
    await factories.hoomi(pool, [u])
    await pool.execute("UPDATE member_changes SET at = now() - interval '2 hours'")
    await factories.hoomi(pool, [u])
    assert await change_store.prune(pool) == 1
    assert await pool.fetchval("SELECT count(*) FROM member_changes") == 1


async def _append_raw(conn, hoomi_id: UUID, sender: UUID) -> None:
    seq = await conn.fetchval(
        "UPDATE hoomis SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq", hoomi_id)
    await conn.execute(
        "INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, content, nonce, "
        "session_id) VALUES ($1, $2, $3, $4, $5, $6, $7, 's1')",
        uuid7s(1)[0], hoomi_id, seq, sender, uuid4(), os.urandom(32), os.urandom(12))


async def _filled(sock: Sock, hoomi_id: UUID, want: list[int]) -> None:
    """The reconcile hands a gap to the hub's fill task: wait for it (a real condition)."""
    import asyncio

    for _ in range(500):
        if sock.seqs.get(hoomi_id) == want:
            return
        await asyncio.sleep(0.01)
    assert sock.seqs.get(hoomi_id) == want
