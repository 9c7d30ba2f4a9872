"""A push to a big Hoomi: each socket is handed its frames and written before the next
(server/hub.py `_fan_out`), framed once for every socket that writes the same bytes
(server/transport.py), and still one write per socket for what one turn queued."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from websockets.frames import Frame, Opcode

from hoomi_protocol import Ack, Hello, MessageBody, Send, Welcome, decode_server_stream
from server.broker import LocalBroker
from server.hub import FAN_OUT_AT, Hub
from server.transport import binary_frame
from storage.ids import uuid7
from storage.records import AppendResult
from tests import factories
from tests.wsclient import TIMEOUT, Peer


class Recorder:
    """Stands in for a socket: writes down what the hub hands it, in one shared log."""

    def __init__(self, user_id: UUID, log: list[tuple[int, str, int]], n: int,
                 done: asyncio.Event, total: int) -> None:
        self.user_id, self.log, self.n, self.done, self.total = user_id, log, n, done, total
        self.membership_epoch = 0

    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        self.log.append((self.n, "message", seq))

    def flush(self) -> None:
        self.log.append((self.n, "flush", 0))
        if sum(1 for _, what, _ in self.log if what == "flush") == self.total:
            self.done.set()

    def on_deletion(self, hoomi_id: UUID, seq: int, frame: bytes) -> None: ...
    def on_joined(self, hoomi_id: UUID, role: str) -> None: ...
    def on_left(self, hoomi_id: UUID) -> None: ...
    def on_user_gone(self) -> None: ...
    def on_memberships(self, roles: dict[UUID, str]) -> None: ...


@pytest.fixture
async def hub(pool):
    h = Hub(pool, LocalBroker(), gap_grace=0.01)
    await h.start()
    yield h
    await h.close()


async def test_a_big_feed_hands_each_socket_its_frames_and_writes_it_before_the_next(
        pool, hub):
    n = FAN_OUT_AT + 8
    users = await factories.users(pool, n)
    h = await factories.hoomi(pool, users[:1], users[1:])
    log: list[tuple[int, str, int]] = []
    done = asyncio.Event()
    for i, u in enumerate(users):
        await hub.join(Recorder(u, log, i, done, n), [h])
    # Two commits in one turn: handed over at the next, not now (the acks of their
    # batch are queued in this turn and leave with them).
    hub.on_message(h, 1, b"one")
    hub.on_message(h, 2, b"two")
    assert log == []
    await asyncio.wait_for(done.wait(), 5)
    # Socket by socket: both frames, in seq order, then its write; then the next socket.
    assert len(log) == 3 * n
    for k in range(n):
        (a, m1, s1), (b, m2, s2), (c, f, _) = log[3 * k:3 * k + 3]
        assert a == b == c and (m1, s1, m2, s2, f) == ("message", 1, "message", 2, "flush")
    assert sorted(log[3 * k][0] for k in range(n)) == list(range(n))


class Broken(Recorder):
    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        raise RuntimeError("a bug in one socket")


async def test_one_socket_that_fails_does_not_keep_the_push_from_the_others(pool, hub):
    n = FAN_OUT_AT + 8
    users = await factories.users(pool, n)
    h = await factories.hoomi(pool, users)
    log: list[tuple[int, str, int]] = []
    done = asyncio.Event()
    for i, u in enumerate(users):
        await hub.join((Broken if i % 2 else Recorder)(u, log, i, done, n // 2), [h])
    hub.on_message(h, 1, b"one")
    await asyncio.wait_for(done.wait(), 5)
    assert sorted(i for i, what, _ in log if what == "message") == list(range(0, n, 2))


async def test_a_small_feed_is_handed_its_push_at_once(pool, hub):
    users = await factories.users(pool, 3)
    h = await factories.hoomi(pool, users)
    log: list[tuple[int, str, int]] = []
    for i, u in enumerate(users):
        await hub.join(Recorder(u, log, i, asyncio.Event(), 3), [h])
    hub.on_message(h, 1, b"one")
    # Written by the loop's shared flush (server/ws.py) with the rest of this turn's.
    assert sorted(log) == [(i, "message", 1) for i in range(3)]


async def test_every_member_of_a_big_hoomi_gets_the_push_and_the_sender_one_message(
        cluster):
    users = [await cluster.user() for _ in range(FAN_OUT_AT + 8)]
    h = await cluster.admin.hoomi([u for u, _ in users])
    peers = []
    for i, (_, token) in enumerate(users):
        peer = await Peer.connect(cluster.a.ws)
        # Half ask for batch, half are v1: both write the same shared frame.
        await peer.send(Hello(token=token, features=["batch"] if i % 2 else []))
        peers.append(peer)
    try:
        for peer in peers:
            assert isinstance(await peer.recv(), Welcome)
        content = os.urandom(40)
        await peers[1].send(Send(hoomi_id=h, client_msg_id=uuid4(), content=content,
                                 nonce=os.urandom(12), session_id="s1", ref=5))
        # The sender (batch): its ack and its push in one WebSocket message.
        frames = decode_server_stream(await asyncio.wait_for(peers[1].conn.recv(), TIMEOUT))
        acks = [f for f in frames if isinstance(f, Ack)]
        pushes = [f for f in frames if isinstance(f, MessageBody)]
        assert len(frames) == 2 and len(acks) == len(pushes) == 1
        assert (acks[0].ref, acks[0].seq, pushes[0].seq) == (5, 1, 1)
        for i, peer in enumerate(peers):
            if i == 1:
                continue
            got = decode_server_stream(await asyncio.wait_for(peer.conn.recv(), TIMEOUT))
            assert [(type(f), f.seq, f.content) for f in got] == [(MessageBody, 1, content)]
    finally:
        for peer in peers:
            await peer.close()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_a_frame_built_by_the_hub_is_the_one_websockets_builds(size):
    data = os.urandom(size)
    assert binary_frame(data) == Frame(Opcode.BINARY, data).serialize(mask=False)



class RecordingBroker(LocalBroker):
    """A broker that writes down what the hub publishes; `shared`: whether other
    replicas may be listening."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared  # type: ignore[misc]
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, events: Iterable[tuple[str, bytes]]) -> None:
        self.published.extend(events)


@pytest.mark.parametrize("shared", [False, True])
async def test_a_commit_is_broadcast_only_when_other_replicas_may_listen(pool, shared):
    broker = RecordingBroker(shared)
    h = Hub(pool, broker, gap_grace=0.01)
    await h.start()
    try:
        alice, = await factories.users(pool, 1)
        hoomi = await factories.hoomi(pool, [alice])
        h.committed([(factories.request(hoomi, alice),
                      AppendResult(uuid7(), hoomi, 1, datetime.now(UTC), False))])
        await asyncio.wait_for(h._to_publish.join(), 5)
        # A lone replica (LocalBroker) has nobody to tell: no broadcast is even built.
        assert [channel for channel, _ in broker.published] == (
            [f"hoomi:{hoomi.hex}"] if shared else [])
    finally:
        await h.close()
