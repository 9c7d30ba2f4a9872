"""The hub's per-Hoomi sequencer against a real PostgreSQL: a seq jump is filled from the
database before anything later is pushed, and reconcile finds what pub/sub never brought."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest

from hoomi_protocol import MessageBody, decode_server
from server import events
from server.broker import LocalBroker
from server.hub import Hub
from storage.records import StoredMessage
from storage.writer import BatchWriter
from tests import factories


class Screen:
    """Stands in for a socket: records what the hub delivers, in order."""

    def __init__(self, user_id: UUID) -> None:
        self.user_id = user_id
        self.seqs: list[int] = []
        self.bodies: list[MessageBody] = []
        self.arrived = asyncio.Event()
        self.membership_epoch = 0

    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        self.seqs.append(seq)
        self.bodies.append(decode_server(frame))  # type: ignore[arg-type]
        self.arrived.set()

    def on_deletion(self, hoomi_id: UUID, seq: int, frame: bytes) -> None: ...
    def on_joined(self, hoomi_id: UUID, role: str) -> None: ...
    def on_left(self, hoomi_id: UUID) -> None: ...
    def on_user_gone(self) -> None: ...
    def on_memberships(self, roles: dict[UUID, str]) -> None: ...

    async def until(self, n: int) -> list[int]:
        while len(self.seqs) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)
        return self.seqs


@pytest.fixture
async def hub(pool):
    h = Hub(pool, LocalBroker(), gap_grace=0.01)
    await h.start()
    yield h
    await h.close()


async def test_seq_jump_is_filled_from_the_database_before_pushing(pool, hub):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    screen = Screen(alice)
    await hub.join(screen, [h])
    # Three messages commit elsewhere; only the third's event reaches this replica.
    writer = BatchWriter(pool)
    writer.start()
    reqs = [factories.request(h, alice) for _ in range(3)]
    acks = [await writer.append(r) for r in reqs]
    await writer.close()
    third = acks[2]
    frame = events.message_frame(StoredMessage(
        third.id, h, 3, alice, reqs[2].content, reqs[2].nonce, "s1", third.created_at, None))
    hub.on_message(h, 3, frame)
    assert await screen.until(3) == [1, 2, 3]
    assert [b.content for b in screen.bodies] == [r.content for r in reqs]
    hub.on_message(h, 2, frame)  # late duplicates are dropped at once
    hub.on_message(h, 3, frame)
    assert screen.seqs == [1, 2, 3] and hub.delivered(h) == 3


async def test_reconcile_delivers_commits_whose_event_never_came(pool, hub):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    screen = Screen(alice)
    await hub.join(screen, [h])
    writer = BatchWriter(pool)  # no commit hook: as if the committing replica died
    writer.start()
    for _ in range(4):
        await writer.append(factories.request(h, alice))
    await writer.close()
    assert screen.seqs == []
    await hub.reconcile()
    assert await screen.until(4) == [1, 2, 3, 4]


async def test_local_commits_are_pushed_in_order_without_the_database(pool, hub):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    screen = Screen(alice)
    await hub.join(screen, [h])
    writer = BatchWriter(pool, on_commit=hub.committed)
    writer.start()
    await asyncio.gather(*(writer.append(factories.request(h, alice)) for _ in range(50)))
    await writer.close()
    assert await screen.until(50) == list(range(1, 51))
