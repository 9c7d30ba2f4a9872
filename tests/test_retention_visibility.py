"""A message past its Hoomi's retention is never served, even before the purge job has
erased it: not in history or sync pages (socket and HTTP), not in a resume's catch-up.
The messages are aged by moving their created_at back in the real database; no purge runs
(the replicas' purge interval is a minute)."""

from __future__ import annotations

import asyncpg
import httpx

from hoomi_protocol import MessageBody, Page, Sync, Welcome
from storage import hoomis, messages
from storage.audit import Actor
from storage.writer import BatchWriter
from tests import factories
from tests.wsclient import joined, send


async def _age(conn, hoomi_id, upto_seq: int, seconds: int) -> None:
    await conn.execute(
        "UPDATE messages SET created_at = created_at - make_interval(secs => $3) "
        "WHERE hoomi_id = $1 AND seq <= $2", hoomi_id, upto_seq, seconds)


async def test_expired_messages_are_hidden_from_pages_before_the_purge(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool)
    writer.start()
    try:
        for _ in range(10):
            await writer.append(factories.request(h, alice))
    finally:
        await writer.close()
    async with pool.acquire() as conn:
        await _age(conn, h, 4, 7200)
    # No retention: everything is served.
    page = await messages.history(pool, h, None, 50, reader=alice)
    assert [m.seq for m in page.messages] == list(range(10, 0, -1))
    await hoomis.set_retention(pool, h, 3600, Actor.user(alice))
    for reader in (alice, None):
        page = await messages.history(pool, h, None, 50, reader=reader)
        assert [m.seq for m in page.messages] == list(range(10, 4, -1))
        assert page.next_before is None
        older = await messages.history(pool, h, 5, 50, reader=reader)
        assert older.messages == [] and older.next_before is None
        sync = await messages.since(pool, h, 0, 3, reader=reader)
        assert [m.seq for m in sync.messages] == [5, 6, 7] and sync.has_more
        bounded = await messages.since(pool, h, 0, 50, reader=reader, max_bytes=1 << 20)
        assert [m.seq for m in bounded.messages] == list(range(5, 11))
    each = await messages.since_each(pool, {h: 0}, 50)
    assert [m.seq for m in each[h].messages] == list(range(5, 11))
    # Longer retention brings nothing back that was not purged: they are simply in range.
    await hoomis.set_retention(pool, h, 86400, Actor.user(alice))
    page = await messages.history(pool, h, None, 50, reader=alice)
    assert len(page.messages) == 10


async def test_expired_messages_are_not_served_over_the_socket_or_http(cluster):
    (alice, a_tok), = [await cluster.user()]
    h = await cluster.admin.hoomi([alice])
    peer, _ = await joined(cluster.a.ws, a_tok)
    for i in range(6):
        await peer.send(send(h, ref=i))
    for _ in range(6):
        await peer.recv()
    await peer.close()
    async with httpx.AsyncClient(base_url=cluster.a.http, timeout=10) as http:
        auth = {"Authorization": f"Bearer {a_tok}"}
        r = await http.put(f"/v1/hoomis/{h}/retention", headers=auth,
                           json={"retention_seconds": 3600})
        assert r.status_code == 204

        conn = await asyncpg.connect(cluster.dsn)
        try:
            await _age(conn, h, 3, 7200)
        finally:
            await conn.close()
        r = await http.get(f"/v1/hoomis/{h}/messages", headers=auth)
        assert [m["seq"] for m in r.json()["messages"]] == [6, 5, 4]
        r = await http.get(f"/v1/hoomis/{h}/messages?after=0", headers=auth)
        assert [m["seq"] for m in r.json()["messages"]] == [4, 5, 6]
    # A resume from 0 catches up on what is still kept only.
    peer, welcome = await joined(cluster.b.ws, a_tok, resume={h: 0})
    assert isinstance(welcome, Welcome)
    got = []
    while len(got) < 3:
        frame = await peer.recv()
        if isinstance(frame, MessageBody):
            got.append(frame.seq)
    assert got == [4, 5, 6]
    await peer.send(Sync(hoomi_id=h, after=0, limit=10, ref="s"))
    page, _ = await peer.recv_until(Page)
    assert [m.seq for m in page.messages] == [4, 5, 6]
    await peer.close()
