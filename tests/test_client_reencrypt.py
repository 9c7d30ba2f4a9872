"""The reference client moves a whole Hoomi to a new key and scheme
(client/hoomi_client/reencrypt.py) while another member chats, end to end through a real
replica; interrupted, it resumes.

10 000 messages (about 25 s, seeding included; HOOMI_REENCRYPT_N=1000 for a quick run)."""

from __future__ import annotations

import asyncio
import os
import time
from uuid import uuid4

import pytest

from hoomi_client.crypto import encrypt
from hoomi_client.keys import GroupKey, Keyring, new_key
from hoomi_client.reencrypt import Progress, migrate_hoomi
from hoomi_client.sdk import HoomiClient
from hoomi_protocol import Edited, MessageBody
from storage.db import create_pool
from storage.records import AppendRequest
from storage.writer import BatchWriter

N = int(os.environ.get("HOOMI_REENCRYPT_N", "10000"))


async def _seed(dsn, h, senders, key: GroupKey, n: int) -> dict[int, bytes]:
    """n messages sealed with the old key (scheme 1), stored through the real writer."""
    pool = await create_pool(dsn, min_size=1, max_size=4)
    writer = BatchWriter(pool, max_batch=256)
    writer.start()
    texts = {}
    try:
        reqs = []
        for i in range(n):
            sender, cmid = senders[i % len(senders)], uuid4()
            text = f"message {i}: l'été à Paris, deploy v{i % 7} 🚀 " * (1 + i % 3)
            sealed = encrypt(key, h, sender, cmid, text.encode())
            reqs.append(AppendRequest(h, sender, cmid, sealed.content, sealed.nonce,
                                      sealed.session_id))
        acks = await asyncio.gather(*(writer.append(r) for r in reqs))
        for i, ack in enumerate(acks):
            texts[ack.seq] = (f"message {i}: l'été à Paris, deploy v{i % 7} 🚀 "
                              * (1 + i % 3)).encode()
    finally:
        await writer.close()
        await pool.close()
    return texts


async def _client(url, token, *keys, hoomi, scheme=2, search=True) -> HoomiClient:
    ring = Keyring()
    for k in keys:
        ring.add(hoomi, k)
    c = HoomiClient([url], token, keyring=ring, scheme=scheme, search=search)
    await c.start()
    return c


async def test_a_hoomi_moves_to_a_new_key_and_scheme_while_a_member_chats(cluster):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    old, new = GroupKey("k1", os.urandom(32)), new_key("k2")
    texts = await _seed(cluster.dsn, h, [alice, bob], old, N)
    admin = await _client(cluster.a.ws, a_tok, old, new, hoomi=h)
    chatter = await _client(cluster.b.ws, b_tok, old, new, hoomi=h)
    # Each migrated message is an `edited` push to every member: the apps read them (an
    # app that stops reading its events stops its socket too, replies included).
    edits = {"admin": 0, "chatter": 0}

    async def consume(name: str, c: HoomiClient) -> None:
        async for ev in c.events():
            if isinstance(ev, Edited):
                edits[name] += 1

    readers = [asyncio.ensure_future(consume("admin", admin)),
               asyncio.ensure_future(consume("chatter", chatter))]

    # The first run is interrupted after a few batches (the device went away).
    seen: list[Progress] = []
    stop = asyncio.Event()

    def interrupted(p: Progress) -> None:
        seen.append(p)
        if p.batches == 3:
            stop.set()

    first = asyncio.ensure_future(migrate_hoomi(admin, h, new, 2, on_progress=interrupted))
    await asyncio.wait({first, asyncio.ensure_future(stop.wait())},
                       return_when=asyncio.FIRST_COMPLETED)
    first.cancel()
    done_first = seen[-1].updated
    assert 0 < done_first < N

    # The second run goes on from what the hub lists as left, while Bob chats.
    chatted: dict[int, bytes] = {}

    async def chat() -> None:
        for i in range(30):
            text = f"bob says {i} pendant la migration".encode()
            chatted[(await chatter.send_text(h, text)).seq] = text

    started = time.perf_counter()
    progress, _ = await asyncio.gather(
        migrate_hoomi(admin, h, new, 2, on_progress=seen.append), chat())
    elapsed = time.perf_counter() - started
    assert progress.unreadable == 0
    # The interrupted run may have had one more batch committed than it reported.
    assert done_first + progress.updated <= N
    left = await admin.history(h, limit=100, scheme_below=2)
    assert left.messages == []

    # Everything opens with the new key alone, with its original sender and text.
    reader = await _client(cluster.a.ws, a_tok, new, hoomi=h)
    after, opened = 0, {}
    while True:
        page = await reader.sync(h, after, limit=100)
        for m in page.messages:
            assert m.scheme == 2 and m.session_id == "k2"
            opened[m.seq] = reader.open(m).plaintext
        if not page.has_more:
            break
        after = page.messages[-1].seq
    assert opened == {**texts, **chatted}
    # Search works under the new key: the tokens were recomputed.
    found = await reader.search_text(h, "ETE paris deploy", limit=5)
    assert len(found.messages) == 5 and all(isinstance(m, MessageBody) for m in found.messages)
    for task in readers:
        task.cancel()
    assert edits["chatter"] > 0
    print(f"\nmigrated {N} messages ({progress.batches} batches after the restart) "
          f"in {elapsed:.1f} s while 30 were sent")
    for c in (admin, chatter, reader):
        await c.close()


@pytest.mark.parametrize("n", [3])
async def test_the_client_resends_with_a_fresh_nonce_when_the_guard_refuses(cluster, n):
    (alice, a_tok) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    key = new_key("k1")
    c = await _client(cluster.a.ws, a_tok, key, hoomi=h, scheme=1, search=False)
    first = await c.send_text(h, b"first")
    stored = (await c.history(h, limit=1)).messages[0]
    # A clone of this device (same key, same nonce memory lost) would reuse a nonce: make
    # the next nonce drawn collide with the stored one, once.
    real = os.urandom
    calls = {"n": 0}

    def clashing(k: int) -> bytes:
        calls["n"] += 1
        return stored.nonce if calls["n"] == 1 and k == 12 else real(k)

    c._nonces.clear()
    import hoomi_client.sdk as sdk_module
    sdk_module.os.urandom = clashing  # type: ignore[attr-defined]
    try:
        ack = await c.send_text(h, b"second")
    finally:
        sdk_module.os.urandom = real  # type: ignore[attr-defined]
    assert ack.seq == first.seq + 1 and calls["n"] >= n - 1
    page = await c.history(h, limit=2)
    assert [c.open(m).plaintext for m in page.messages] == [b"second", b"first"]
    await c.close()
