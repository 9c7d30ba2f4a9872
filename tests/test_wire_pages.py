"""Pages in wire form (storage.messages.wire_history / wire_since, what the socket and the
HTTP API send) against the typed pages they replace: the same `page` frame bytes and the
same JSON bytes (server/api.py `_page_json` against JSONResponse) for every kind of row
(tombstones, edits, schemes, session ids JSON must escape, odd timestamps, archived
messages), cursors and bounds included."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import asyncpg
import pytest
from starlette.responses import JSONResponse

from server import api
from server.events import page_frame
from storage import archive, messages
from storage.archive import Archive
from storage.ids import uuid7s
from storage.writer import BatchWriter
from tests import factories


@pytest.fixture
async def writer(pool: asyncpg.Pool):
    w = BatchWriter(pool)
    w.start()
    yield w
    await w.close()


# Session ids JSON writes as they are, and ones it escapes (quote, backslash, controls).
_SESSIONS = ["s1", "séance ☃", 'a"b', "back\\slash", "tab\there", "nl\n", "\x01\x1f",
             "del\x7f", "s2"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Microseconds since the epoch whose milliseconds float arithmetic and exact division
# disagree on (before 1970), and some that end in .5 ms, .999 ms, or nothing.
_ODD_TIMES = [-2046000, -2042000, -1, 0, 999, 1764600000123000, 1764600000123999,
              1764600000000500, 253402300798999999]


async def _every_kind_of_row(pool: asyncpg.Pool, writer: BatchWriter) -> tuple[UUID, UUID]:
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice], [bob])
    rnd = random.Random(3)
    acks = []
    for i in range(30):
        req = factories.request(h, alice if i % 3 else bob, size=rnd.randint(16, 900),
                                session_id=_SESSIONS[i % 9])
        acks.append(await writer.append(req._replace(scheme=1 + i % 3)))
    for a in (acks[4], acks[17]):
        await messages.delete_for_everyone(pool, h, a.id, alice)
    await messages.edit(pool, h, acks[10].id, alice, content=b"e" * 40, nonce=b"n" * 12,
                        session_id="s9", scheme=3)
    for a, us in zip(acks[20:], _ODD_TIMES, strict=False):
        await pool.execute("UPDATE messages SET created_at = $3 WHERE hoomi_id = $1 AND id = $2",
                           h, a.id, _EPOCH + timedelta(microseconds=us))
    return alice, h


async def _same_pages(pool: asyncpg.Pool, reader: UUID, h: UUID) -> int:
    """Every page variant, typed and in wire form: the same frame bytes and JSON."""
    hoomi = str(h)
    compared = 0
    for limit in (1, 7, 100):
        for kw in ({}, {"reader": reader}, {"max_bytes": 2000},
                   {"reader": reader, "max_bytes": 1500}, {"scheme_below": 3},
                   {"reader": reader, "max_bytes": 3000, "scheme_below": 2}):
            for before in (None, 25, 2):
                typed = await messages.history(pool, h, before, limit, **kw)
                wire = await messages.wire_history(pool, h, before, limit, **kw)
                assert wire.next_before == typed.next_before, (before, limit, kw)
                assert page_frame(5, h, wire.messages, next_before=wire.next_before) == \
                    page_frame(5, h, typed.messages, next_before=typed.next_before)
                nb = "null" if wire.next_before is None else wire.next_before
                assert api._page_json(hoomi, wire.messages, f'"next_before":{nb}') == \
                    JSONResponse({"hoomi_id": hoomi,
                                  "messages": [api._message_json(m) for m in typed.messages],
                                  "next_before": typed.next_before}).body
                compared += len(wire.messages)
            for after in (0, 12, 29):
                typed_sync = await messages.since(pool, h, after, limit, **kw)
                wire_sync = await messages.wire_since(pool, h, after, limit, **kw)
                assert wire_sync.has_more == typed_sync.has_more, (after, limit, kw)
                assert page_frame(None, h, wire_sync.messages, has_more=wire_sync.has_more) \
                    == page_frame(None, h, typed_sync.messages, has_more=typed_sync.has_more)
                more = "true" if wire_sync.has_more else "false"
                assert api._page_json(hoomi, wire_sync.messages, f'"has_more":{more}') == \
                    JSONResponse({"hoomi_id": hoomi,
                                  "messages": [api._message_json(m)
                                               for m in typed_sync.messages],
                                  "has_more": typed_sync.has_more}).body
                compared += len(wire_sync.messages)
    return compared


async def test_wire_pages_have_the_bytes_of_typed_pages(pool, writer):
    reader, h = await _every_kind_of_row(pool, writer)
    assert await _same_pages(pool, reader, h) > 400


async def test_wire_pages_read_archived_messages_back(pool, writer, tmp_path):
    reader, h = await _every_kind_of_row(pool, writer)
    before = await messages.wire_history(pool, h, None, 100, reader=reader)
    arc = Archive(f"file://{tmp_path}", cache_bytes=1 << 20)
    archive.configure(arc)
    try:
        # All live messages up to the one dated in year 9999 (not yet old enough).
        assert (await archive.run_pass(pool, arc, 0, max_messages=7)).messages == 26
        assert await pool.fetchval("SELECT count(*) FROM messages WHERE hoomi_id = $1 "
                                   "AND content IS NULL AND content_len > 0", h) == 26
        after = await messages.wire_history(pool, h, None, 100, reader=reader)
        assert after == before
        assert await _same_pages(pool, reader, h) > 400
    finally:
        archive.configure(None)


async def test_a_bounded_page_keeps_postgresqls_generic_plan(pool, writer):
    """The page the hub serves (for a reader, byte-bounded) is planned once per connection,
    not at every execution (storage/messages.py `_queries`, the literal LIMIT)."""
    reader, h = await _every_kind_of_row(pool, writer)
    # A Hoomi of some size elsewhere: PostgreSQL costs a generic plan for all partitions.
    other = await factories.hoomi(pool, [reader])
    rows = [(i, other, k + 1, reader, uuid4(), b"x" * 64, os.urandom(12), "s1")
            for k, i in enumerate(uuid7s(5000))]
    await pool.copy_records_to_table("messages", records=rows, columns=[
        "id", "hoomi_id", "seq", "sender_id", "client_msg_id", "content", "nonce",
        "session_id"])
    await pool.execute("ANALYZE messages")  # as autovacuum does: statistics to plan with
    async with pool.acquire() as conn:
        for before in range(30, 10, -1):
            await messages.wire_history(conn, h, before, 5, reader=reader, max_bytes=1 << 20)
        plans = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE '%LEFT JOIN LATERAL%' "
            "AND statement NOT LIKE '%pg_prepared_statements%'")
    assert plans is not None
    assert plans["generic_plans"] >= 10 and plans["custom_plans"] <= 5, dict(plans)
