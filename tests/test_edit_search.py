"""Messages that change (SPEC §7.2): edit, reencrypt, blind-index search, tokens erased
with their message; storage first, then through real replicas (socket and HTTP)."""

from __future__ import annotations

import base64
import json
import os
from uuid import uuid4

import asyncpg
import httpx
import pytest

from hoomi_protocol import (
    Ack,
    Delete,
    Edit,
    EditAck,
    Edited,
    Error,
    History,
    MessageBody,
    Page,
    Reencrypt,
    ReencryptAck,
    Search,
    Send,
    Sync,
)
from hoomi_protocol import ReencryptItem as ReencryptItemFrame
from hoomi_protocol.errors import ErrorCode
from storage import messages, retention
from storage.errors import StorageError
from storage.messages import ReencryptItem
from storage.writer import BatchWriter
from tests import factories
from tests.wsclient import joined, send

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


# -- through real replicas: socket and HTTP, two replicas (the `cluster` fixture) -----------

def _backlog(peer) -> list:
    if not hasattr(peer, "backlog"):
        peer.backlog = []
    return peer.backlog


async def _reply(peer, frame, kind=None):
    """Send a request and return its reply (matching ref); pushes read meanwhile are kept
    for `_until` (an `edited` push may come before the edit's own ack)."""
    await peer.send(frame)
    while True:
        got = await peer.recv()
        if getattr(got, "ref", None) == frame.ref and (kind is None or isinstance(got, kind)
                                                       or isinstance(got, Error)):
            return got
        _backlog(peer).append(got)


async def _until(peer, kind, pred=lambda f: True):
    backlog = _backlog(peer)
    while backlog:
        got = backlog.pop(0)
        if isinstance(got, kind) and pred(got):
            return got
    while True:
        got = await peer.recv()
        if isinstance(got, kind) and pred(got):
            return got


def _edit(h, msg_id, ref, **over):
    fields = dict(hoomi_id=h, id=msg_id, content=os.urandom(48), nonce=os.urandom(12),
                  session_id="s1", ref=ref)
    fields.update(over)
    return Edit(**fields)


async def test_edit_is_pushed_on_both_replicas_and_pages_and_http_show_the_latest(cluster):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    a, _ = await joined(cluster.a.ws, a_tok)
    b, _ = await joined(cluster.b.ws, b_tok)
    first = send(h, ref="s1")
    first = Send(**{**{f: getattr(first, f) for f in first.__dataclass_fields__},
                    "scheme": 2, "tokens": (T[0],)})
    ack = await _reply(a, first, Ack)
    pushed = await _until(b, MessageBody)
    assert (pushed.seq, pushed.scheme, pushed.updated_at) == (1, 2, pushed.created_at)

    edit = _edit(h, ack.id, "e1", scheme=3, tokens=(T[1],))
    done = await _reply(a, edit, EditAck)
    assert isinstance(done, EditAck) and (done.id, done.seq) == (ack.id, 1)
    for peer in (a, b):
        got = await _until(peer, Edited)
        assert (got.id, got.seq, got.content, got.nonce, got.scheme, got.updated_at) == (
            ack.id, 1, edit.content, edit.nonce, 3, done.updated_at)
    # Bob may not edit Alice's message; a reused nonce is refused, naming nonce.
    refused = await _reply(b, _edit(h, ack.id, "e2"))
    assert isinstance(refused, Error) and refused.code == ErrorCode.FORBIDDEN
    second = await _reply(a, send(h, ref="s2"), Ack)
    reuse = await _reply(a, _edit(h, second.id, "e3", nonce=edit.nonce))
    assert isinstance(reuse, Error) and (reuse.code, reuse.message[:6]) == (ErrorCode.INVALID,
                                                                          "nonce:")
    again = send(h, ref="s3")
    again = Send(**{**{f: getattr(again, f) for f in again.__dataclass_fields__},
                    "nonce": edit.nonce})
    reuse = await _reply(a, again)
    assert isinstance(reuse, Error) and reuse.message.startswith("nonce:")
    retry = await _reply(a, Send(**{**{f: getattr(first, f) for f in first.__dataclass_fields__},
                                    "ref": "s4"}))
    assert isinstance(retry, Ack) and (retry.id, retry.seq) == (ack.id, 1)  # its original ack

    async with httpx.AsyncClient(base_url=cluster.b.http, timeout=10) as http:
        r = await http.get(f"/v1/hoomis/{h}/messages?after=0",
                           headers={"Authorization": f"Bearer {b_tok}"})
        m1 = r.json()["messages"][0]
        assert base64.b64decode(m1["content"]) == edit.content
        assert (m1["scheme"], m1["updated_at"]) == (3, done.updated_at)
        assert m1["updated_at"] > m1["created_at"]
        r = await http.get(f"/v1/hoomis/{h}/messages?scheme_below=3",
                           headers={"Authorization": f"Bearer {b_tok}"})
        assert [m["seq"] for m in r.json()["messages"]] == [2]
    # A client that reconnects and resumes reads the latest version.
    await b.close()
    b, _ = await joined(cluster.b.ws, b_tok, resume={h: 0})
    resumed = await _until(b, MessageBody, lambda m: m.seq == 1)
    assert (resumed.content, resumed.scheme) == (edit.content, 3)
    later = await _reply(a, _edit(h, ack.id, "e4", scheme=4))
    assert isinstance(later, EditAck)
    got = await _until(b, Edited)
    assert (got.seq, got.scheme, got.updated_at) == (1, 4, later.updated_at)
    for peer in (a, b):
        await peer.close()


async def test_reencrypt_by_an_admin_in_batches_skips_stale_items_and_pushes_edits(cluster):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    a, _ = await joined(cluster.a.ws, a_tok)
    b, _ = await joined(cluster.b.ws, b_tok)
    sent = [send(h, ref=i) for i in range(5)]
    acks = [await _reply(b, f, Ack) for f in sent]
    left = await _reply(a, History(hoomi_id=h, scheme_below=2, ref="left"), Page)
    assert [m.seq for m in left.messages] == [5, 4, 3, 2, 1]
    items = tuple(ReencryptItemFrame(id=m.id, old_nonce=m.nonce, content=os.urandom(40),
                                     nonce=os.urandom(12), session_id="k2", scheme=2)
                  for m in left.messages)
    # Bob edits seq 3 meanwhile: its item's old_nonce is stale and it is skipped.
    await _reply(b, _edit(h, acks[2].id, "edit"), EditAck)
    refused = await _reply(b, Reencrypt(hoomi_id=h, items=items, ref="bob"))
    assert isinstance(refused, Error) and refused.code == ErrorCode.FORBIDDEN
    done = await _reply(a, Reencrypt(hoomi_id=h, items=items, ref="mig"), ReencryptAck)
    assert (done.updated, done.skipped) == (4, [acks[2].id])
    edited = set()
    while len(edited) < 4:
        got = await _until(b, Edited, lambda e: e.scheme == 2)
        edited.add(got.seq)
    assert edited == {1, 2, 4, 5}
    left = await _reply(a, Sync(hoomi_id=h, after=0, scheme_below=2, ref="left2"), Page)
    assert [m.seq for m in left.messages] == [3]
    audit = await _audit(cluster.dsn, h, "message.reencrypt")
    assert audit == [{"updated": 4, "skipped": 1, "schemes": [2]}]
    for peer in (a, b):
        await peer.close()


async def _audit(dsn, h, action):
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT details FROM audit_log WHERE hoomi_id = $1 AND "
                                "action = $2", h, action)
    finally:
        await conn.close()
    return [json.loads(r["details"]) if isinstance(r["details"], str) else r["details"]
            for r in rows]


async def test_search_pages_for_members_only_and_forgets_deleted_messages(cluster):
    (alice, a_tok), (_, e_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice])
    a, _ = await joined(cluster.a.ws, a_tok)
    acks = []
    for i in range(7):
        f = send(h, ref=i)
        tokens = (T[0], T[1]) if i % 2 == 0 else (T[0],)
        f = Send(**{**{k: getattr(f, k) for k in f.__dataclass_fields__}, "tokens": tokens})
        acks.append(await _reply(a, f, Ack))
    page = await _reply(a, Search(hoomi_id=h, tokens=(T[1], T[0]), limit=2, ref="q1"), Page)
    assert [m.seq for m in page.messages] == [7, 5] and page.next_before == 5
    page = await _reply(a, Search(hoomi_id=h, tokens=(T[1],), before=5, ref="q2"), Page)
    assert [m.seq for m in page.messages] == [3, 1] and page.next_before is None
    e, _ = await joined(cluster.b.ws, e_tok)
    refused = await _reply(e, Search(hoomi_id=h, tokens=(T[0],), ref="eve"))
    assert isinstance(refused, Error) and refused.code == ErrorCode.FORBIDDEN
    await _reply(a, Delete(hoomi_id=h, id=acks[6].id, ref="del"), Ack)
    page = await _reply(a, Search(hoomi_id=h, tokens=(T[1],), ref="q3"), Page)
    assert [m.seq for m in page.messages] == [5, 3, 1]
    conn = await asyncpg.connect(cluster.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM message_tokens WHERE hoomi_id = $1 "
                                   "AND seq = 7", h) == 0
    finally:
        await conn.close()
    for peer in (a, e):
        await peer.close()


async def test_the_erasure_job_takes_deleted_tokens_out_of_the_files(pool, writer, monkeypatch):
    """A deleted message's tokens leave message_tokens' row versions with the erasure
    job's VACUUM, as its content leaves messages' (tests/test_erasure.py)."""
    from storage import erasure
    from tests.relation_files import relation_bytes, split_pages

    await pool.execute("ALTER TABLE message_tokens SET (autovacuum_enabled = off)")
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    tokens = [os.urandom(16) for _ in range(30)]
    acks = [await writer.append(factories.request(h, alice)._replace(tokens=(t,)))
            for t in tokens]
    for ack in acks[::3]:
        await messages.delete_for_everyone(pool, h, ack.id, alice)
    gone = tokens[::3]

    async def in_row_versions() -> int:
        await pool.execute("CHECKPOINT")
        async with pool.acquire() as conn:
            live, _ = split_pages(await relation_bytes(conn, "message_tokens"))
        return sum(t in live for t in gone)

    assert await in_row_versions() == len(gone)  # dead versions, still in the file
    monkeypatch.setattr(erasure, "_erased_here", True)
    assert await erasure.erase_deleted(pool) is True
    assert await in_row_versions() == 0
    kept = await pool.fetchval("SELECT count(*) FROM message_tokens WHERE hoomi_id = $1", h)
    assert kept == len(tokens) - len(gone)


async def test_edit_and_search_over_http(cluster):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    b, _ = await joined(cluster.b.ws, b_tok)
    a, _ = await joined(cluster.a.ws, a_tok)
    first = send(h, ref="s1")
    first = Send(**{**{k: getattr(first, k) for k in first.__dataclass_fields__},
                    "tokens": (T[0],)})
    ack = await _reply(a, first, Ack)
    auth = {"Authorization": f"Bearer {a_tok}"}
    new = {"content": base64.b64encode(os.urandom(40)).decode(),
           "nonce": base64.b64encode(os.urandom(12)).decode(), "session_id": "s2",
           "scheme": 2, "tokens": [base64.b64encode(T[1]).decode()]}
    async with httpx.AsyncClient(base_url=cluster.b.http, timeout=10) as http:
        r = await http.put(f"/v1/hoomis/{h}/messages/{ack.id}", json=new, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["id"], body["seq"]) == (str(ack.id), 1)
        got = await _until(b, Edited)
        assert (got.scheme, got.updated_at) == (2, body["updated_at"])
        assert got.content == base64.b64decode(new["content"])
        # Bob may not; a bad nonce is named; an unknown message is named by its path.
        r = await http.put(f"/v1/hoomis/{h}/messages/{ack.id}", json=new,
                           headers={"Authorization": f"Bearer {b_tok}"})
        assert r.status_code == 403
        r = await http.put(f"/v1/hoomis/{h}/messages/{ack.id}",
                           json={**new, "nonce": "AAAA"}, headers=auth)
        assert (r.status_code, r.json()["field"]) == (400, "nonce")
        # The codec's checks (hoomi_protocol.client_frame), as on the socket; JSON null
        # is no value for an optional field.
        b64 = base64.b64encode
        for bad, status, field in [
                ({"content": b64(b"x" * 15).decode()}, 400, "content"),
                ({"content": b64(b"x" * 70_000).decode()}, 413, "content"),
                ({"session_id": "a\x00b"}, 400, "session_id"),
                ({"session_id": 7}, 400, "session_id"),
                ({"scheme": 0}, 400, "scheme"), ({"scheme": None}, 400, "scheme"),
                ({"tokens": None}, 400, "tokens"), ({"tokens": [b64(b"1234").decode()]},
                                                    400, "tokens"),
                ({"tokens": [7]}, 400, "tokens"), ({"tokens": ["!"]}, 400, "tokens")]:
            r = await http.put(f"/v1/hoomis/{h}/messages/{ack.id}", json={**new, **bad},
                               headers=auth)
            assert (r.status_code, r.json()["field"]) == (status, field), (bad, r.text)
        for bad in ({"limit": None}, {"limit": 0}, {"before": 0}, {"tokens": None}):
            r = await http.post(f"/v1/hoomis/{h}/search", headers=auth,
                                json={"tokens": [b64(T[1]).decode()], **bad})
            assert (r.status_code, r.json()["field"]) == (400, next(iter(bad))), (bad, r.text)
        r = await http.put(f"/v1/hoomis/{h}/messages/{ack.id}", json=new, headers=auth)
        assert r.status_code == 200  # the same edit again: the first answer
        r = await http.put(f"/v1/hoomis/{h}/messages/{uuid4()}",
                           json={**new, "nonce": base64.b64encode(os.urandom(12)).decode()},
                           headers=auth)
        assert (r.status_code, r.json()["field"]) == (404, "message_id")
        # Search: the new token finds it, the old one no longer does.
        r = await http.post(f"/v1/hoomis/{h}/search", headers=auth,
                            json={"tokens": [base64.b64encode(T[1]).decode()]})
        assert r.status_code == 200, r.text
        (m,) = r.json()["messages"]
        assert (m["seq"], m["scheme"], r.json()["next_before"]) == (1, 2, None)
        r = await http.post(f"/v1/hoomis/{h}/search", headers=auth,
                            json={"tokens": [base64.b64encode(T[0]).decode()]})
        assert r.json()["messages"] == []
        r = await http.post(f"/v1/hoomis/{h}/search", headers=auth, json={"tokens": []})
        assert (r.status_code, r.json()["field"]) == (400, "tokens")
    for peer in (a, b):
        await peer.close()


async def test_an_edited_or_reencrypted_archived_message_leaves_the_archive(pool, writer,
                                                                            tmp_path):
    """Edits apply to archived messages too (SPEC §7.1): the old version's ciphertext must
    leave the object store, the new one lives in the table and reads back."""
    from storage import archive
    from storage.archive import Archive

    def stored() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())

    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    acks = [await writer.append(factories.request(h, alice, size=200)._replace(tokens=(T[0],)))
            for _ in range(6)]
    arc = Archive(f"file://{tmp_path}")
    archive.configure(arc)
    try:
        await archive.run_pass(pool, arc, 0, max_messages=10)
        page = (await messages.since(pool, h, 0, 10)).messages  # read back from the segment
        old2, old4 = page[1], page[3]
        assert old2.content in stored() and old4.content in stored()
        new = dict(content=os.urandom(64), nonce=os.urandom(12), session_id="s2")
        await messages.edit(pool, h, acks[1].id, alice, tokens=(T[1],), **new)
        item = ReencryptItem(acks[3].id, old4.nonce, os.urandom(64), os.urandom(12), "k2", 2)
        done = await messages.reencrypt(pool, h, alice, [item])
        assert done.skipped == []
        assert await pool.fetchval("SELECT count(*) FROM message_segments "
                                   "WHERE erase_pending") == 1
        await archive.run_pass(pool, arc, None)  # rewrites the segment without them
        assert old2.content not in stored() and old4.content not in stored()
        after = {m.seq: m for m in (await messages.since(pool, h, 0, 10)).messages}
        assert after[2].content == new["content"] and after[4].content == item.content
        assert [after[q].content for q in (1, 3, 5, 6)] == [page[q - 1].content
                                                           for q in (1, 3, 5, 6)]
        found = await messages.search(pool, h, [T[0]], None, 10, alice)
        assert [m.seq for m in found.messages] == [6, 5, 4, 3, 1]  # archived ones too
    finally:
        archive.configure(None)
