"""Messages that change (SPEC §7.2): edit, reencrypt, blind-index search, tokens erased
with their message; storage first, then through real replicas (socket and HTTP)."""

from __future__ import annotations

import os

import pytest

from protocol.errors import ErrorCode
from storage import messages, retention
from storage.errors import StorageError
from storage.messages import ReencryptItem
from storage.writer import BatchWriter
from tests import factories

T = [bytes([i]) * 16 for i in range(8)]


@pytest.fixture
async def writer(pool):
    w = BatchWriter(pool, max_batch=64, max_delay=0.001)
    w.start()
    yield w
    await w.close()


async def _tokens(pool, h) -> dict[int, set[bytes]]:
    out: dict[int, set[bytes]] = {}
    for r in await pool.fetch("SELECT seq, token FROM message_tokens WHERE hoomi_id = $1", h):
        out.setdefault(r["seq"], set()).add(r["token"])
    return out


async def test_edit_by_sender_replaces_content_tokens_and_stamps_updated_at(pool, writer):
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice], [bob])
    ack = await writer.append(factories.request(h, alice)._replace(tokens=(T[0], T[1])))
    new = dict(content=os.urandom(40), nonce=os.urandom(12), session_id="s1", scheme=2)
    with pytest.raises(StorageError) as err:
        await messages.edit(pool, h, ack.id, bob, **new)
    assert err.value.code == ErrorCode.FORBIDDEN
    edited = await messages.edit(pool, h, ack.id, alice, tokens=(T[2],), **new)
    assert (edited.seq, edited.scheme) == (1, 2) and edited.updated_at > ack.created_at
    again = await messages.edit(pool, h, ack.id, alice, tokens=(T[2],), **new)
    assert again.updated_at == edited.updated_at  # a retry changes nothing
    m = await messages.get(pool, h, ack.id)
    assert (m.content, m.nonce, m.scheme, m.updated_at) == (new["content"], new["nonce"], 2,
                                                            edited.updated_at)
    assert await _tokens(pool, h) == {1: {T[2]}}
    # The nonce guard covers edits: another message's nonce is refused.
    other = await writer.append(factories.request(h, alice))
    taken = await pool.fetchval("SELECT nonce FROM messages WHERE id = $1", other.id)
    with pytest.raises(StorageError) as err:
        await messages.edit(pool, h, ack.id, alice, content=os.urandom(40), nonce=taken,
                            session_id="s1")
    assert err.value.field == "nonce"
    assert [r["action"] for r in await pool.fetch(
        "SELECT action FROM audit_log WHERE action = 'message.edit'")] == ["message.edit"]


async def test_reencrypt_skips_stale_old_nonce_and_lower_schemes_admin_only(pool, writer):
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice], [bob])
    acks = [await writer.append(factories.request(h, bob)._replace(tokens=(T[0],)))
            for _ in range(4)]
    olds = {r["id"]: r["nonce"] for r in await pool.fetch(
        "SELECT id, nonce FROM messages WHERE hoomi_id = $1", h)}
    items = [ReencryptItem(a.id, olds[a.id], os.urandom(30), os.urandom(12), "mig", 2,
                           (T[1],) if i == 0 else None) for i, a in enumerate(acks)]
    items[1] = items[1]._replace(old_nonce=os.urandom(12))  # edited meanwhile
    with pytest.raises(StorageError) as err:
        await messages.reencrypt(pool, h, bob, items)
    assert err.value.code == ErrorCode.FORBIDDEN
    done = await messages.reencrypt(pool, h, alice, items)
    assert sorted(e.id for e in done.updated) == sorted([acks[0].id, acks[2].id, acks[3].id])
    assert done.skipped == [acks[1].id]
    left = await messages.history(pool, h, None, 50, scheme_below=2)
    assert [m.id for m in left.messages] == [acks[1].id]
    # Scheme must rise: the same scheme again skips everything.
    again = await messages.reencrypt(pool, h, alice, [items[0]._replace(
        old_nonce=items[0].nonce, nonce=os.urandom(12))])
    assert again.skipped == [acks[0].id] and again.updated == []
    assert await _tokens(pool, h) == {1: {T[1]}, 2: {T[0]}, 3: {T[0]}, 4: {T[0]}}


async def test_search_pages_matches_members_only_and_tokens_go_with_their_message(pool, writer):
    alice, bob, eve = await factories.users(pool, 3)
    h = await factories.hoomi(pool, [alice], [bob])
    for i in range(30):
        tokens = (T[0],) + ((T[1],) if i % 3 == 0 else ()) + ((T[2],) if i == 5 else ())
        await writer.append(factories.request(h, alice)._replace(tokens=tokens))
    page = await messages.search(pool, h, [T[1], T[0]], None, 4, bob)
    assert [m.seq for m in page.messages] == [28, 25, 22, 19] and page.next_before == 19
    rest = await messages.search(pool, h, [T[0], T[1]], page.next_before, 50, bob)
    assert [m.seq for m in rest.messages] == [16, 13, 10, 7, 4, 1] and rest.next_before is None
    assert (await messages.search(pool, h, [T[3]], None, 5, bob)).messages == []
    with pytest.raises(StorageError) as err:
        await messages.search(pool, h, [T[0]], None, 5, eve)
    assert err.value.code == ErrorCode.FORBIDDEN
    # delete for everyone erases its tokens; an edit replaces them; retention purges them
    m28 = page.messages[0]
    await messages.delete_for_everyone(pool, h, m28.id, alice)
    assert 28 not in await _tokens(pool, h)
    assert [m.seq for m in (await messages.search(pool, h, [T[1]], None, 2, bob)).messages] \
        == [25, 22]
    await messages.edit(pool, h, page.messages[1].id, alice, content=os.urandom(20),
                        nonce=os.urandom(12), session_id="s1")
    assert 25 not in await _tokens(pool, h)
    await pool.execute("UPDATE messages SET created_at = now() - interval '2 hours' "
                       "WHERE hoomi_id = $1 AND seq <= 10", h)
    await pool.execute("UPDATE hoomis SET retention_seconds = 3600 WHERE id = $1", h)
    await retention.purge_expired(pool)
    assert min(await _tokens(pool, h)) == 11
    found = await messages.search(pool, h, [T[2]], None, 5, bob)
    assert found.messages == []  # seq 6 was purged, tokens and all
