"""SPEC 7.2 "batch": several frames per WebSocket message (a msgpack stream) for a client
that asked; one frame per message for a v1 client. The session (pure), a real replica, and
the SDK over it."""

from __future__ import annotations

import asyncio
import os
import struct
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from hoomi_client.sdk import HoomiClient
from hoomi_protocol import (
    DEFAULT_LIMITS,
    Ack,
    Hello,
    MessageBody,
    Page,
    Pong,
    Send,
    Welcome,
    decode_server,
    decode_server_stream,
    encode_client,
    encode_server,
)
from server import events
from server.broker import hoomi_channel
from server.config import load
from server.events import message_body, message_frame, page_frame
from server.session import BATCH_MAX_BYTES, Session
from storage.records import HoomiSummary, StoredMessage
from tests.wsclient import TIMEOUT, Peer

H = UUID(int=1)
ME = UUID(int=2)


def live_session(*features: str) -> Session:
    s = Session(load({}), DEFAULT_LIMITS, clock=lambda: 0.0)
    hello = s.receive(encode_client(Hello(token="t", features=features, ref=1)))
    assert isinstance(hello, Hello)
    mine = [HoomiSummary(H, 0, "member", 0)]
    s.authenticated(ME, 3600.0, mine)
    s.membership_at_hello(mine)
    s.welcome(hello, mine, lambda h: 0)
    return s


def messages_out(s: Session) -> list[bytes]:
    out = []
    while (data := s.data_to_send()) is not None:
        out.append(data)
    return out


def test_a_v1_session_writes_one_frame_per_message_a_batch_session_one_stream():
    v1, batch = live_session(), live_session("batch", "signals")
    assert batch.features == {"batch", "signals"} and v1.features == frozenset()
    pongs = [Pong(ref=i) for i in range(50)]
    for s in (v1, batch):
        for p in pongs:
            s.reply(p, "pong")
    one_each = messages_out(v1)
    assert len(one_each) == 51  # the welcome, then each pong alone
    assert [decode_server(m) for m in one_each[1:]] == pongs
    (stream,) = messages_out(batch)
    frames = decode_server_stream(stream)
    assert isinstance(frames[0], Welcome) and frames[0].features == ["batch", "signals"]
    assert frames[1:] == pongs
    # After the welcome (which lists the features), the same bytes, only packed.
    assert stream.endswith(b"".join(one_each[1:]))


def test_a_batch_stops_at_its_byte_bound_and_a_large_frame_goes_alone():
    s = live_session("batch")
    messages_out(s)  # the welcome
    big = Pong(ref="x" * (BATCH_MAX_BYTES // 2))
    small = [Pong(ref=i) for i in range(3)]
    for frame in (small[0], big, big, small[1], small[2]):
        s.reply(frame, "pong")
    out = messages_out(s)
    assert all(len(m) <= BATCH_MAX_BYTES for m in out)
    assert [f for m in out for f in decode_server_stream(m)] == [
        small[0], big, big, small[1], small[2]]
    assert len(out) == 2  # [small, big] then [big, small, small]: bounded, in order
    huge = Pong(ref="y" * BATCH_MAX_BYTES)
    s.reply(Pong(ref=1), "pong")
    s.reply(huge, "pong")
    out = messages_out(s)
    assert [decode_server_stream(m) for m in out] == [[Pong(ref=1)], [huge]]
    assert s.outbox.size == 0


# -- a real replica --------------------------------------------------------------------------

async def _joined(url: str, token: str, resume: dict[UUID, int], *features: str) -> Peer:
    peer = await Peer.connect(url)
    await peer.send(Hello(token=token, resume=resume, features=features))
    return peer


async def _frames_until(peer: Peer, pushes: int, batch: bool) -> tuple[list[object], int]:
    """Every frame until `pushes` messages came, and in how many WebSocket messages."""
    frames: list[object] = []
    count = 0
    while sum(isinstance(f, MessageBody) for f in frames) < pushes:
        data = await asyncio.wait_for(peer.conn.recv(), TIMEOUT)
        assert isinstance(data, bytes)
        count += 1
        # A v1 socket: each message is exactly one frame (decode_server refuses more).
        frames.extend(decode_server_stream(data) if batch else [decode_server(data)])
    return frames, count


async def test_a_batch_socket_gets_the_same_frames_in_order_in_fewer_messages(cluster):
    alice, alice_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    sender = await Peer.connect(cluster.a.ws)
    await sender.send(Hello(token=alice_tok))
    assert isinstance(await sender.recv(), Welcome)
    for i in range(30):
        await sender.send(Send(hoomi_id=h, client_msg_id=uuid4(), content=os.urandom(40),
                               nonce=os.urandom(12), session_id="s1", ref=i))
    acks = 0
    while acks < 30:
        acks += isinstance(await sender.recv(), Ack)
    await sender.close()
    # Both resume from 0: the 30 stored messages come as catch-up.
    v1 = await _joined(cluster.a.ws, alice_tok, {h: 0})
    batch = await _joined(cluster.b.ws, alice_tok, {h: 0}, "batch")
    try:
        v1_frames, v1_count = await _frames_until(v1, 30, batch=False)
        got, count = await _frames_until(batch, 30, batch=True)
    finally:
        await v1.close()
        await batch.close()
    welcome_v1, welcome_batch = v1_frames[0], got[0]
    assert isinstance(welcome_v1, Welcome) and welcome_v1.features is None
    assert isinstance(welcome_batch, Welcome) and welcome_batch.features == ["batch"]
    assert [m.seq for m in got[1:] if isinstance(m, MessageBody)] == list(range(1, 31))
    assert got[1:] == v1_frames[1:] and v1_count == len(v1_frames) == 31
    assert count < len(got)  # catch-up rows are queued together: they left together


async def test_a_send_s_ack_leaves_with_its_own_push_in_one_message(cluster):
    # The writer tells the socket right after its commit hook (not through a future's
    # done-callback a loop turn later), so the push and the ack of one batch are queued
    # in one turn and leave in one write: the push first, as before.
    alice, alice_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    peer = await _joined(cluster.a.ws, alice_tok, {}, "batch")
    try:
        assert isinstance(await peer.recv(), Welcome)
        await peer.send(Send(hoomi_id=h, client_msg_id=uuid4(), content=os.urandom(40),
                             nonce=os.urandom(12), session_id="s1", ref=7))
        data = await asyncio.wait_for(peer.conn.recv(), TIMEOUT)
        push, ack = decode_server_stream(data)
        assert isinstance(push, MessageBody) and push.seq == 1
        assert isinstance(ack, Ack) and (ack.ref, ack.id, ack.seq) == (7, push.id, 1)
    finally:
        await peer.close()


async def test_the_sdk_asks_for_batch_and_reads_streams(cluster):
    alice, alice_tok = await cluster.user()
    bob, bob_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    a = HoomiClient(cluster.a.ws, alice_tok)
    b = HoomiClient(cluster.b.ws, bob_tok)
    try:
        assert (await a.start()).features == ["batch"]
        await b.start()
        sent = await asyncio.gather(*(a.send(h, os.urandom(24), os.urandom(12), "s1")
                                      for _ in range(40)))
        got = [await b.next_event(timeout=TIMEOUT) for _ in range(40)]
        assert sorted(ack.seq for ack in sent) == list(range(1, 41))
        assert [m.seq for m in got if isinstance(m, MessageBody)] == list(range(1, 41))
    finally:
        await a.close()
        await b.close()


async def test_a_push_to_many_sockets_is_written_without_a_task_per_socket(cluster):
    # The replica runs in this loop: count the tasks it creates while one message fans
    # out to 20 sockets (each one's write was a task of its own; now one shared flush).
    users = [await cluster.user() for _ in range(20)]
    h = await cluster.admin.hoomi([u for u, _ in users])
    peers = [await _joined(cluster.a.ws, tok, {}, "batch") for _, tok in users]
    try:
        for peer in peers:
            assert isinstance((await peer.recv()), Welcome)
        loop = asyncio.get_running_loop()
        created: list[str] = []
        factory = loop.get_task_factory()

        def counting(loop_: asyncio.AbstractEventLoop, coro, **kw):  # type: ignore[no-untyped-def]
            created.append(getattr(coro, "__qualname__", ""))
            return (factory(loop_, coro, **kw) if factory is not None
                    else asyncio.Task(coro, loop=loop_, **kw))

        loop.set_task_factory(counting)
        try:
            await peers[0].send(Send(hoomi_id=h, client_msg_id=uuid4(), content=os.urandom(40),
                                     nonce=os.urandom(12), session_id="s1", ref=1))
            for peer in peers:
                pushes, _ = await _frames_until(peer, 1, batch=True)
                assert [m.seq for m in pushes if isinstance(m, MessageBody)] == [1]
        finally:
            loop.set_task_factory(factory)
        assert not [name for name in created if "_write_loop" in name]
    finally:
        for peer in peers:
            await peer.close()


# -- pages encoded straight from the rows ------------------------------------------------------

def _stored(seq: int, *, deleted: bool = False, edited: bool = False) -> StoredMessage:
    at = datetime(2026, 12, 1, 13, 0, seq % 60, 123456, tzinfo=UTC)
    return StoredMessage(
        id=uuid4(), hoomi_id=H, seq=seq, sender_id=None if seq == 3 else uuid4(),
        content=None if deleted else os.urandom(seq), nonce=None if deleted else b"n" * 12,
        session_id=None if deleted else f"s{seq}", created_at=at,
        deleted_at=at + timedelta(seconds=1) if deleted else None, scheme=1 + seq % 2,
        updated_at=at + timedelta(seconds=2) if edited or deleted else None)


def test_pages_and_pushes_from_rows_are_the_bytes_of_the_frames():
    rows = [_stored(1), _stored(2, edited=True), _stored(3), _stored(4, deleted=True),
            _stored(5, deleted=True, edited=True)]
    bodies = [message_body(m) for m in rows]
    assert page_frame(7, H, rows, next_before=1) == encode_server(
        Page(ref=7, hoomi_id=H, messages=bodies, next_before=1))
    assert page_frame("r", H, rows, next_before=None) == encode_server(
        Page(ref="r", hoomi_id=H, messages=bodies, next_before=None))
    assert page_frame(None, H, rows[:2], has_more=True) == encode_server(
        Page(ref=None, hoomi_id=H, messages=bodies[:2], has_more=True))
    assert page_frame(1, H, [], has_more=False) == encode_server(
        Page(ref=1, hoomi_id=H, messages=[], has_more=False))
    for m, body in zip(rows, bodies, strict=True):
        assert message_frame(m) == encode_server(body)
        assert decode_server(message_frame(m)) == body


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 120_000), min_size=1, max_size=12), st.integers(1, 2**40))
def test_a_hoomi_s_messages_pack_into_bounded_broadcasts_and_read_back_in_order(
        sizes: list[int], first: int) -> None:
    """events.pack_messages: one Hoomi's (seq, frame) of a batch, as few broadcasts as fit
    PACK_MAX_BYTES; a broadcast of one keeps the v1 `M` layout (old replicas read it)."""
    items = [(first + k, bytes([k]) * n) for k, n in enumerate(sizes)]
    chunks: list[list[tuple[int, bytes]]] = []
    payloads = events.pack_messages(H, items)
    for payload in payloads:
        if payload[:1] == events.MESSAGES:
            hoomi_id, part = events.unpack_messages(payload)
            assert hoomi_id == H and len(part) > 1
            assert sum(len(f) + 12 for _, f in part) <= events.PACK_MAX_BYTES
            with pytest.raises(struct.error):
                events.unpack_messages(payload[:-1])  # cut short: refused, not misread
        else:
            one = events.unpack(payload)
            assert (one.kind, one.hoomi_id) == (events.MESSAGE, H)
            part = [(one.seq, one.frame)]
        chunks.append(part)
    assert [item for part in chunks for item in part] == items
    # A broadcast ends only where the next frame would take it past the bound.
    for part, following in zip(chunks, chunks[1:], strict=False):
        size = sum(len(f) + 12 for _, f in part) + len(following[0][1]) + 12
        assert size > events.PACK_MAX_BYTES


async def test_messages_committed_together_cross_replicas_as_one_broadcast(cluster, valkey):
    """A batch's messages of one Hoomi are one pub/sub message (`P`), and the member on
    the other replica gets every one, in seq order, exactly once."""
    alice, alice_tok = await cluster.user()
    bob, bob_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    watcher = aioredis.Redis.from_url(valkey.url)
    pubsub = watcher.pubsub()
    await pubsub.subscribe(hoomi_channel(h.hex))
    confirmed = await pubsub.get_message(timeout=TIMEOUT)
    assert confirmed is not None and confirmed["type"] == "subscribe"
    receiver = await _joined(cluster.b.ws, bob_tok, {}, "batch")
    sender = await _joined(cluster.a.ws, alice_tok, {}, "batch")
    try:
        for peer in (receiver, sender):  # joined the Hoomi's feed before the first send
            assert isinstance(decode_server_stream(
                await asyncio.wait_for(peer.conn.recv(), TIMEOUT))[0], Welcome)
        sent = [Send(hoomi_id=h, client_msg_id=uuid4(), content=os.urandom(40),
                     nonce=os.urandom(12), session_id="s1", ref=i) for i in range(40)]
        for frame in sent:  # pipelined: the writer commits them in a few batches
            await sender.send(frame)
        got, _ = await _frames_until(receiver, 40, batch=True)
        pushes = [m for m in got if isinstance(m, MessageBody)]
        assert [m.seq for m in pushes] == list(range(1, 41))
        assert [m.content for m in pushes] == [f.content for f in sent]
        kinds: list[bytes] = []
        async with asyncio.timeout(TIMEOUT):
            while sum(_count(p) for p in kinds) < 40:
                item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if item is not None:
                    kinds.append(item["data"][8:])  # after the publishing replica's origin
        assert any(p[:1] == events.MESSAGES for p in kinds)
        assert len(kinds) < 40
    finally:
        await sender.close()
        await receiver.close()
        await pubsub.aclose()
        await watcher.aclose()


def _count(payload: bytes) -> int:
    if payload[:1] == events.MESSAGES:
        return len(events.unpack_messages(payload)[1])
    return 1
