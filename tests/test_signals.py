"""Live signals (issue 13 part 1; SPEC §7.2): `read` and its `receipt`, `typing`,
`presence`. The store (read_seq never moves back), the session (only sockets that asked
for "signals" get the pushes; typing at most once a second per Hoomi), and two real
replicas on one Valkey: receipts and typing cross replicas, presence sees both, and a
SIGKILLed replica's users stop counting once their entries expire."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from uuid import UUID, uuid4

import pytest

from hoomi_client.keys import generate_key_file, load_key_file
from hoomi_client.sdk import HoomiClient
from hoomi_protocol import (
    DEFAULT_LIMITS,
    Error,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    Presence,
    PresenceReply,
    Read,
    ReadAck,
    Receipt,
    Send,
    Typing,
    TypingNotice,
    Welcome,
    decode_server,
    encode_client,
)
from server.config import load
from server.events import pack_receipt, pack_typing, unpack_signal
from server.session import Session
from server.testing.replica import ROOT
from storage import hoomis as hoomi_store
from storage.errors import StorageError
from storage.records import HoomiSummary
from storage.writer import BatchWriter
from tests import factories
from tests.terminal import Terminal
from tests.wsclient import Peer, own_replica

H = UUID(int=1)
OTHER = UUID(int=2)
ME, YOU = uuid4(), uuid4()


# -- the store ---------------------------------------------------------------------------------

async def test_read_seq_never_moves_back_nor_past_the_end_and_is_in_the_users_hoomis(pool):
    alice, bob, eve = await factories.users(pool, 3)
    h = await factories.hoomi(pool, [alice], [bob])
    writer = BatchWriter(pool)
    writer.start()
    for _ in range(5):
        await writer.append(factories.request(h, alice))
    await writer.close()
    assert await hoomi_store.mark_read(pool, h, bob, 3) == (3, True)
    assert await hoomi_store.mark_read(pool, h, bob, 2) == (3, False)  # never back
    assert await hoomi_store.mark_read(pool, h, bob, 3) == (3, False)
    assert await hoomi_store.mark_read(pool, h, bob, 99) == (5, True)  # capped at last_seq
    # Concurrent reads from several devices: the greatest wins, whatever the order.
    await asyncio.gather(*(hoomi_store.mark_read(pool, h, alice, s) for s in (4, 1, 5, 2)))
    mine = {s.hoomi_id: s for s in await hoomi_store.user_hoomis(pool, bob)}
    assert mine[h] == HoomiSummary(h, 5, "member", 5)
    assert (await hoomi_store.user_hoomis(pool, alice))[0].read_seq == 5
    with pytest.raises(StorageError) as refused:
        await hoomi_store.mark_read(pool, h, eve, 1)
    assert refused.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(StorageError) as missing:
        await hoomi_store.mark_read(pool, uuid4(), bob, 1)
    assert missing.value.code == ErrorCode.NOT_FOUND


# -- the session (pure) ------------------------------------------------------------------------

def session(features: tuple[str, ...] = ()) -> tuple[Session, list[float], Welcome]:
    clock = [0.0]
    s = Session(load({}), DEFAULT_LIMITS, clock=lambda: clock[0])
    hello = s.receive(encode_client(Hello(token="t", features=features, ref=1)))
    assert isinstance(hello, Hello)
    mine = [HoomiSummary(H, 4, "member", 3)]
    s.authenticated(ME, 3600.0, mine)
    s.membership_at_hello(mine)
    s.welcome(hello, mine, lambda h: 4)
    welcome = decode_server(s.data_to_send() or b"")
    assert isinstance(welcome, Welcome)
    return s, clock, welcome


def frames(s: Session) -> list[object]:
    out = []
    while (data := s.data_to_send()) is not None:
        out.append(decode_server(data))
    return out


def push_signals(s: Session) -> None:
    for payload in (pack_receipt(H, YOU, 2), pack_typing(H, YOU), pack_typing(H, ME),
                    pack_typing(OTHER, YOU)):
        sig = unpack_signal(payload)
        kind = "receipt" if payload[:1] == b"R" else "typing"
        s.on_signal(sig.hoomi_id, sig.user_id, kind, sig.frame)


def test_a_v1_session_sees_no_signal_push_and_a_welcome_without_features():
    s, _, welcome = session()
    assert welcome.features is None and welcome.hoomis[0].read_seq == 3
    push_signals(s)
    assert frames(s) == []


def test_signals_reach_a_session_that_asked_except_its_own_typing_and_other_hoomis():
    s, _, welcome = session(("batch-not-here", "signals", "signals"))
    assert welcome.features == ["signals"]  # what this hub accepted, once each
    push_signals(s)
    assert frames(s) == [Receipt(hoomi_id=H, user_id=YOU, seq=2),
                         TypingNotice(hoomi_id=H, user_id=YOU)]


def test_typing_is_handed_on_once_a_second_per_hoomi_and_refused_to_a_non_member():
    s, clock, _ = session(("signals",))
    typing = encode_client(Typing(hoomi_id=H))
    assert s.receive(typing) == Typing(hoomi_id=H)
    clock[0] = 0.5
    assert s.receive(typing) is None  # dropped without a word
    clock[0] = 1.0
    assert s.receive(typing) == Typing(hoomi_id=H)
    assert frames(s) == []
    assert s.receive(encode_client(Typing(hoomi_id=OTHER, ref="t"))) is None
    refused = frames(s)
    assert len(refused) == 1 and isinstance(refused[0], Error)
    assert (refused[0].code, refused[0].ref) == (ErrorCode.FORBIDDEN, "t")


# -- two replicas ------------------------------------------------------------------------------

async def joined(url: str, token: str, *features: str) -> tuple[Peer, Welcome]:
    peer = await Peer.connect(url)
    await peer.send(Hello(token=token, features=features))
    welcome = await peer.recv()
    assert isinstance(welcome, Welcome), welcome
    return peer, welcome


async def reply(peer: Peer, frame: object) -> object:
    """The reply to `frame` (by its ref), skipping pushes."""
    await peer.send(frame)
    while True:
        got = await peer.recv()
        if getattr(got, "ref", None) == getattr(frame, "ref", None) and not isinstance(
                got, Receipt | TypingNotice):
            return got


async def signals_until_pong(peer: Peer) -> list[object]:
    """The receipt and typing pushes this peer got until the reply to a ping."""
    await peer.send(Ping(ref="end"))
    got = []
    while not isinstance(frame := await peer.recv(), Pong):
        if isinstance(frame, Receipt | TypingNotice):
            got.append(frame)
    return got


async def next_signal(peer: Peer) -> object:
    while not isinstance(frame := await peer.recv(), Receipt | TypingNotice):
        pass
    return frame


async def test_read_receipts_typing_and_presence_across_two_replicas(cluster):
    (alice, alice_tok), (bob, bob_tok), (carol, carol_tok) = [
        await cluster.user() for _ in range(3)]
    outsider, outsider_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob, carol])
    a1, _ = await joined(cluster.a.ws, alice_tok, "signals")
    a2, _ = await joined(cluster.b.ws, alice_tok, "signals")  # alice's other device
    b, _ = await joined(cluster.b.ws, bob_tok, "signals")
    c, _ = await joined(cluster.a.ws, carol_tok)  # a v1 client: asks for nothing
    for i in range(3):
        ack = await reply(a1, Send(hoomi_id=h, client_msg_id=uuid4(), content=os.urandom(32),
                                   nonce=os.urandom(12), session_id="s", ref=i))
        assert getattr(ack, "seq", None) == i + 1

    assert await reply(a1, Read(hoomi_id=h, seq=2, ref="r")) == ReadAck(
        hoomi_id=h, seq=2, ref="r")
    receipt = Receipt(hoomi_id=h, user_id=alice, seq=2)
    assert await next_signal(a2) == receipt  # her other connection, on the other replica
    assert await next_signal(b) == receipt  # a member, on the other replica
    # Lower: the stored value, nothing pushed; past the end: capped at last_seq.
    assert await reply(a1, Read(hoomi_id=h, seq=1, ref="low")) == ReadAck(
        hoomi_id=h, seq=2, ref="low")
    assert await reply(a2, Read(hoomi_id=h, seq=50, ref="high")) == ReadAck(
        hoomi_id=h, seq=3, ref="high")
    assert await next_signal(a1) == Receipt(hoomi_id=h, user_id=alice, seq=3)

    # Bob types twice at once, then reads: alice's sockets see one typing, then the
    # receipt (one publisher, one channel: in order); bob's own socket sees neither.
    await b.send(Typing(hoomi_id=h))
    await b.send(Typing(hoomi_id=h))
    assert await reply(b, Read(hoomi_id=h, seq=3, ref="b")) == ReadAck(
        hoomi_id=h, seq=3, ref="b")
    for peer in (a1, a2):
        assert await next_signal(peer) == TypingNotice(hoomi_id=h, user_id=bob)
        assert await next_signal(peer) == Receipt(hoomi_id=h, user_id=bob, seq=3)
    assert await signals_until_pong(b) == []
    # The v1 client saw messages, but no signal at all.
    assert await signals_until_pong(c) == []

    everyone = sorted([alice, bob, carol])
    assert await reply(b, Presence(hoomi_id=h, ref="p")) == PresenceReply(
        hoomi_id=h, user_ids=everyone, ref="p")
    assert await reply(c, Presence(hoomi_id=h, ref="p")) == PresenceReply(
        hoomi_id=h, user_ids=everyone, ref="p")
    # Carol (only on replica a) leaves: replica b stops counting her within a round trip.
    await c.close()
    deadline = time.monotonic() + 10
    while (got := await reply(b, Presence(hoomi_id=h, ref="p2"))).user_ids != [
            u for u in everyone if u != carol]:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.05)

    # Refusals: a non-member and an unknown Hoomi, for every signal request.
    out, _ = await joined(cluster.a.ws, outsider_tok, "signals")
    for frame in (Read(hoomi_id=h, seq=1, ref=1), Presence(hoomi_id=h, ref=2),
                  Typing(hoomi_id=h, ref=3)):
        got = await reply(out, frame)
        assert isinstance(got, Error) and got.code == ErrorCode.FORBIDDEN, got
    for frame in (Read(hoomi_id=uuid4(), seq=1, ref=4), Presence(hoomi_id=uuid4(), ref=5)):
        got = await reply(out, frame)
        assert isinstance(got, Error) and got.code == ErrorCode.NOT_FOUND, got

    # The read position comes back in the next welcome.
    _, again = await joined(cluster.a.ws, bob_tok)
    assert [(s.hoomi_id, s.read_seq) for s in again.hoomis] == [(h, 3)]
    for peer in (a1, a2, b, out):
        await peer.close()


async def test_presence_forgets_a_sigkilled_replicas_users_after_its_ttl(cluster, module_dsn,
                                                                           valkey):
    (alice, alice_tok), (bob, bob_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    b, _ = await joined(cluster.b.ws, bob_tok)
    async with own_replica(module_dsn, valkey.url, "doomed", process=True,
                           HOOMI_PRESENCE_TTL_S="1") as (doomed, _):
        a, _ = await joined(doomed.ws, alice_tok)
        got = await reply(b, Presence(hoomi_id=h, ref=1))
        assert got == PresenceReply(hoomi_id=h, user_ids=sorted([alice, bob]), ref=1)
        doomed.kill()  # no goodbye: its Redis entries stay until they expire
        killed = time.monotonic()
        deadline = killed + 15
        while (got := await reply(b, Presence(hoomi_id=h, ref=2))).user_ids != [bob]:
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.1)
    await b.close()


async def test_one_replica_without_redis_answers_presence_from_its_own_sockets(module_dsn):
    async with own_replica(module_dsn, None, "alone") as (r, admin):
        alice, bob, carol = await admin.user(), await admin.user(), await admin.user()
        h = await admin.hoomi([alice], [bob, carol])
        a, _ = await joined(r.ws, await admin.token(alice), "signals")
        b, _ = await joined(r.ws, await admin.token(bob), "signals")
        assert await reply(a, Presence(hoomi_id=h, ref=1)) == PresenceReply(
            hoomi_id=h, user_ids=sorted([alice, bob]), ref=1)
        await b.send(Typing(hoomi_id=h))
        assert await next_signal(a) == TypingNotice(hoomi_id=h, user_id=bob)
        for peer in (a, b):
            await peer.close()


# -- the SDK and `hoomi chat` ------------------------------------------------------------------

async def next_event_of(client: HoomiClient, kind: type) -> object:
    while not isinstance(ev := await client.next_event(timeout=15), kind):
        pass
    return ev


async def test_hoomi_chat_and_the_sdk_speak_signals(cluster, tmp_path):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    keyfile = tmp_path / "keys.json"
    generate_key_file(keyfile, [h])
    bob_sdk = HoomiClient(cluster.b.ws, b_tok, keyring=load_key_file(keyfile), signals=True)
    welcome = await bob_sdk.start()
    assert welcome.features == ["signals", "batch"] and bob_sdk.read_seq(h) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    a = Terminal([sys.executable, "-m", "server.cli", "chat", "--hoomi", str(h),
                  "--key-file", str(keyfile), "--url", cluster.a.ws, "--token", a_tok], env)
    bob8 = str(bob)[:8]
    try:
        await a.expect("-- online: " + ", ".join(sorted([bob8, "me"])) + " --")
        await bob_sdk.send_text(h, b"are you there?")
        await a.expect(f"#1 {bob8}: are you there?")
        # The chat tells the hub it showed #1: bob's client gets alice's receipt.
        assert await next_event_of(bob_sdk, Receipt) == Receipt(hoomi_id=h, user_id=alice,
                                                                seq=1)
        assert await bob_sdk.read(h, 1) == 1
        await a.expect(f"-- read by {bob8} up to #1 --")
        await bob_sdk.typing(h)
        await bob_sdk.typing(h)  # within the second: not sent
        await a.expect(f"-- {bob8} is typing… --")
        assert sorted(await bob_sdk.presence(h)) == sorted([alice, bob])
        a.type("/quit")
        assert await asyncio.to_thread(a.proc.wait, 10) == 0  # the hub runs in this loop
        deadline = time.monotonic() + 10
        while await bob_sdk.presence(h) != [bob]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        a.close()
        await bob_sdk.close()
    # A v1 SDK client (no signals) meanwhile got no receipt or typing event.
    v1 = HoomiClient(cluster.b.ws, b_tok, keyring=load_key_file(keyfile), batch=False)
    assert (await v1.start()).features is None and v1.read_seq(h) == 1
    await v1.close()


async def test_signals_and_presence_on_a_valkey_cluster(sharded):  # noqa: F811
    """HOOMI_REDIS_MODE=cluster: signals ride the Hoomi's sharded channel, presence keys
    (one per user, hash-tagged) live on whichever shard owns their slot."""
    (ca, cb), admin = sharded
    alice, bob = await admin.user(), await admin.user()
    h = await admin.hoomi([alice], [bob])
    a, _ = await joined(ca.ws, await admin.token(alice), "signals")
    b, _ = await joined(cb.ws, await admin.token(bob), "signals")
    ack = await reply(a, Send(hoomi_id=h, client_msg_id=uuid4(), content=os.urandom(32),
                              nonce=os.urandom(12), session_id="s", ref=1))
    assert getattr(ack, "seq", None) == 1
    assert await reply(b, Read(hoomi_id=h, seq=1, ref=2)) == ReadAck(hoomi_id=h, seq=1, ref=2)
    assert await next_signal(a) == Receipt(hoomi_id=h, user_id=bob, seq=1)
    await a.send(Typing(hoomi_id=h))
    assert await next_signal(b) == TypingNotice(hoomi_id=h, user_id=alice)
    assert await reply(a, Presence(hoomi_id=h, ref=3)) == PresenceReply(
        hoomi_id=h, user_ids=sorted([alice, bob]), ref=3)
    await b.close()
    deadline = time.monotonic() + 10
    while (await reply(a, Presence(hoomi_id=h, ref=4))).user_ids != [alice]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await a.close()
