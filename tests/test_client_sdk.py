"""The reference SDK end to end: encrypted exchange across replicas, exactly-once sends
across a client crash, and refusal of tampered ciphertext."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from hoomi_client.crypto import DecryptError, decrypt
from hoomi_client.keys import Keyring, generate_key_file, load_key_file, new_key
from hoomi_client.sdk import Closed, HoomiClient, HubError, Unauthorized, _raise_if_final
from hoomi_protocol import ErrorCode, MessageBody
from server.testing.replica import ROOT
from tests.wsclient import own_replica


async def test_two_clients_exchange_encrypted_messages_through_two_replicas(cluster, tmp_path):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    ring = generate_key_file(tmp_path / "keys.json", [h])
    a = HoomiClient([cluster.a.ws], a_tok, keyring=ring)
    b = HoomiClient([cluster.b.ws], b_tok, keyring=load_key_file(tmp_path / "keys.json"))
    await a.start()
    await b.start()
    texts = [f"hello {i} ✓".encode() for i in range(20)]
    acks = [await a.send_text(h, t) for t in texts]
    assert [x.seq for x in acks] == list(range(1, 21))
    got = []
    while len(got) < 20:
        ev = await b.next_event(10)
        if isinstance(ev, MessageBody):
            got.append(b.open(ev))
    assert [o.plaintext for o in got] == texts
    # The hub only ever had ciphertext.
    conn = await asyncpg.connect(cluster.dsn)
    stored = await conn.fetch("SELECT content FROM messages WHERE hoomi_id = $1", h)
    await conn.close()
    assert all(b"hello" not in r["content"] for r in stored)
    # Infinite scroll back through history, newest first, in pages of 7.
    pages = [p async for p in b.scroll(h, limit=7)]
    assert [len(p) for p in pages] == [7, 7, 6]
    assert [b.open(m).plaintext for p in pages for m in p] == texts[::-1]
    await a.close()
    await b.close()


async def test_client_killed_mid_send_resends_and_stores_each_message_once(cluster, tmp_path):
    (alice, tok) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    keyfile = tmp_path / "keys.json"
    generate_key_file(keyfile, [h])
    state = tmp_path / "state.json"
    count = 300
    args = [sys.executable, str(ROOT / "tests" / "sdk_sender.py"), cluster.a.ws, tok, str(h),
            str(keyfile), str(state), str(count)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        progress = Path(str(state) + ".next")
        while time.monotonic() < deadline:
            if progress.exists() and int(progress.read_text()) >= 60:
                break
            await asyncio.sleep(0.01)
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    conn = await asyncpg.connect(cluster.dsn)
    before = await conn.fetchval("SELECT count(*) FROM messages WHERE hoomi_id = $1", h)
    assert before < count  # it really died mid-way
    # In a thread: the replica it talks to runs in this event loop.
    second = await asyncio.to_thread(subprocess.run, args, env=env, capture_output=True,
                                     timeout=60)
    assert second.stdout.strip() == b"done", second.stderr.decode()[-2000:]
    rows = await conn.fetch(
        "SELECT seq, sender_id, content, nonce, session_id FROM messages WHERE hoomi_id = $1 "
        "ORDER BY seq", h)
    await conn.close()
    ring = load_key_file(keyfile)
    texts = [decrypt(ring, h, r["sender_id"], r["content"], r["nonce"], r["session_id"]
                     ).plaintext for r in rows]
    assert sorted(texts) == sorted(f"message {i}".encode() for i in range(count))
    assert [r["seq"] for r in rows] == list(range(1, count + 1))


async def test_tampered_or_wrongly_keyed_messages_fail_clearly(cluster, tmp_path):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    ring = generate_key_file(tmp_path / "keys.json", [h])
    wrong = Keyring()
    wrong.add(h, new_key(ring.current(h).session_id))
    a = HoomiClient(cluster.a.ws, a_tok, keyring=ring)
    b = HoomiClient(cluster.b.ws, b_tok, keyring=wrong)
    await a.start()
    await b.start()
    ack = await a.send_text(h, b"for alice's keyholders only")
    ev = await b.next_event(10)
    assert isinstance(ev, MessageBody) and ev.id == ack.id
    with pytest.raises(DecryptError) as err:
        b.open(ev)
    assert err.value.reason == "tampered"
    flipped = bytearray(ev.content)
    flipped[0] ^= 1
    with pytest.raises(DecryptError) as err:
        decrypt(ring, h, ev.sender_id, bytes(flipped), ev.nonce, ev.session_id)
    assert err.value.reason == "tampered"
    assert a.open(ev).plaintext == b"for alice's keyholders only"
    await a.close()
    await b.close()


async def test_client_reconnects_to_another_replica_and_resumes(cluster, tmp_path):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    ring = generate_key_file(tmp_path / "keys.json", [h])
    a = HoomiClient(cluster.a.ws, a_tok, keyring=ring)
    b = HoomiClient([cluster.b.ws, cluster.a.ws], b_tok, keyring=ring)
    await a.start()
    await b.start()
    await a.send_text(h, b"one")
    assert b.open(await b.next_event(10)).plaintext == b"one"
    await b._ws.close()  # the connection drops; the client comes back on its own
    await a.send_text(h, b"two")
    await a.send_text(h, b"three")
    got = [b.open(await b.next_event(10)).plaintext for _ in range(2)]
    assert got == [b"two", b"three"] and b.connects == 2
    await a.close()
    await b.close()


async def test_refused_token_and_forbidden_send_raise(cluster):
    bad = HoomiClient(cluster.a.ws, "not-a-token")
    with pytest.raises(Unauthorized):
        await bad.start(timeout=10)
    await bad.close()
    (_, tok) = await cluster.user()
    (bob, _) = await cluster.user()
    theirs = await cluster.admin.hoomi([bob])
    c = HoomiClient(cluster.a.ws, tok)
    await c.start()
    with pytest.raises(HubError) as err:
        await c.send(theirs, os.urandom(32), os.urandom(12), "s1")
    assert err.value.code == ErrorCode.FORBIDDEN
    assert c.state.outbox == {}  # refused for good: not retried
    await c.close()


def _token(user, exp: float) -> str:
    import jwt

    from server.testing.replica import JWT_SECRET
    return jwt.encode({"sub": str(user), "exp": int(exp)}, JWT_SECRET, algorithm="HS256")


async def test_token_source_renews_an_expired_socket_and_misses_nothing(cluster, tmp_path):
    (alice, a_tok), (bob, _) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    ring = generate_key_file(tmp_path / "keys.json", [h])
    issued: list[float] = []

    async def source() -> str:
        # First a token the hub still accepts (5 s leeway) that dies 2 to 3 s later, then
        # long-lived ones, as an identity service would hand out on refresh.
        issued.append(time.time())
        return _token(bob, int(time.time()) - 2 if len(issued) == 1 else time.time() + 3600)

    a = HoomiClient(cluster.a.ws, a_tok, keyring=ring)
    b = HoomiClient(cluster.b.ws, source, keyring=ring)
    await a.start()
    await b.start()
    texts = [f"m{i}".encode() for i in range(20)]
    for t in texts:
        await a.send_text(h, t)
        await asyncio.sleep(0.25)  # spans the expiry: some are pushed while b is away
    got = [b.open(await b.next_event(10)).plaintext for _ in texts]
    assert got == texts
    assert b.connects == 2 and len(issued) == 2
    await a.close()
    await b.close()


async def test_fixed_token_that_expires_stops_the_client(cluster):
    (alice, _) = await cluster.user()
    await cluster.admin.hoomi([alice])
    c = HoomiClient(cluster.a.ws, _token(alice, int(time.time()) - 2))
    await c.start()
    with pytest.raises(Unauthorized):
        await asyncio.wait_for(c.next_event(10), 10)
    await c.close()


async def test_client_over_the_per_user_socket_limit_waits_for_room(module_dsn, valkey):
    async with own_replica(
            module_dsn, valkey.url, "one", HOOMI_MAX_SOCKETS_PER_USER="1") as (r, admin):
        alice = await admin.user()
        tok = await admin.token(alice)
        first = HoomiClient(r.ws, tok)
        await first.start()
        second = HoomiClient(r.ws, tok, backoff_max=0.3)
        starting = asyncio.ensure_future(second.start(timeout=20))
        await asyncio.sleep(1.5)
        assert not starting.done()  # refused with rate_limited/1013, retrying, not failed
        await first.close()
        await asyncio.wait_for(starting, 15)
        assert second.connects == 1
        await second.close()


async def test_client_seals_to_the_content_limit_the_hub_announces(module_dsn, valkey, tmp_path):
    from hoomi_client.crypto import max_plaintext
    async with own_replica(
            module_dsn, valkey.url, "small", HOOMI_MAX_CONTENT_BYTES="1024") as (r, admin):
        alice = await admin.user()
        h = await admin.hoomi([alice])
        c = HoomiClient(r.ws, await admin.token(alice),
                        keyring=generate_key_file(tmp_path / "k.json", [h]))
        welcome = await c.start()
        assert welcome.max_content_bytes == 1024
        biggest = max_plaintext(1024)
        assert (await c.send_text(h, b"x" * biggest)).seq == 1
        with pytest.raises(ValueError, match="at most"):  # refused here, nothing sent
            await c.send_text(h, b"x" * (biggest + 1))
        assert c.state.outbox == {}
        await c.close()


def test_the_client_follows_each_close_codes_reconnect_policy():
    def closed(code: int) -> ConnectionClosed:
        return ConnectionClosed(Close(code, "why"), None)

    with pytest.raises(Unauthorized):
        _raise_if_final(closed(4401))  # NEW_TOKEN: final with a fixed token
    for bug in (4400, 1008):  # NEVER: reconnecting repeats the client's bug
        with pytest.raises(Closed, match=str(bug)):
            _raise_if_final(closed(bug))
    for resume in (4408, 1012, 1013, 1009, 1000, 4999):  # RESUME, or a code we do not use
        _raise_if_final(closed(resume))
    _raise_if_final(ConnectionClosed(None, None))  # no close frame at all: reconnect
