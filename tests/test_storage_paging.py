"""History and catch-up paging checked against an in-memory model with hypothesis.

The store holds a Hoomi whose oldest messages were purged (as retention does) and some
of whose messages are tombstones; hypothesis then drives `history` and `since` with
arbitrary cursors and limits, and walks whole scrolls page by page.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import messages
from storage.writer import BatchWriter
from tests import factories

T = TypeVar("T")
TOTAL, PURGED = 130, 7
DELETED = {9, 10, 50, 129}


class LoopThread:
    """An event loop of its own, so hypothesis' synchronous examples can await storage."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _fill(dsn: str) -> tuple[asyncpg.Pool, Any]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool)
    writer.start()
    acks = [await writer.append(factories.request(h, alice)) for _ in range(TOTAL)]
    await writer.close()
    for a in acks:
        if a.seq in DELETED:
            await messages.delete_for_everyone(pool, h, a.id, alice)
    await pool.execute("DELETE FROM messages WHERE hoomi_id = $1 AND seq <= $2", h, PURGED)
    return pool, h


MODEL = list(range(PURGED + 1, TOTAL + 1))  # stored seqs, ascending
cursor = st.integers(min_value=0, max_value=TOTAL + 5)
limits = st.integers(min_value=1, max_value=100)


def test_paging_matches_the_model(dsn: str) -> None:
    lt = LoopThread()
    try:
        pool, h = lt.run(_fill(dsn))

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(before=st.none() | cursor.filter(lambda c: c >= 1), limit=limits)
        def history_page(before: int | None, limit: int) -> None:
            page = lt.run(messages.history(pool, h, before, limit))
            older = [s for s in reversed(MODEL) if before is None or s < before]
            assert [m.seq for m in page.messages] == older[:limit]
            assert page.next_before == (older[limit - 1] if len(older) > limit else None)
            for m in page.messages:
                assert (m.content is None) == (m.seq in DELETED) == (m.deleted_at is not None)

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(after=cursor, limit=limits)
        def sync_page(after: int, limit: int) -> None:
            page = lt.run(messages.since(pool, h, after, limit))
            newer = [s for s in MODEL if s > after]
            assert [m.seq for m in page.messages] == newer[:limit]
            assert page.has_more == (len(newer) > limit)

        @settings(max_examples=40, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(limit=limits)
        def full_scroll(limit: int) -> None:
            seen: list[int] = []
            before: int | None = None
            while True:
                page = lt.run(messages.history(pool, h, before, limit))
                seen += [m.seq for m in page.messages]
                if page.next_before is None:
                    break
                before = page.next_before
            assert seen == list(reversed(MODEL))

        history_page()
        sync_page()
        full_scroll()
        lt.run(pool.close())
    finally:
        lt.stop()


# -- pages bounded in bytes ------------------------------------------------------------------

SIZES = [16, 3000, 40, 4000, 4000, 16, 900, 2500, 60, 3999, 1200, 16, 4000, 700, 80,
         2048, 2049, 16, 3500, 100, 4000, 16, 16, 1800, 2600, 500, 4000, 4000, 30, 1024]
GONE = {3, 14, 22}  # tombstones: no content, 0 bytes


async def _fill_sized(dsn: str) -> tuple[asyncpg.Pool, Any, Any]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool)
    writer.start()
    acks = [await writer.append(factories.request(h, alice, size=n)) for n in SIZES]
    await writer.close()
    for a in acks:
        if a.seq in GONE:
            await messages.delete_for_everyone(pool, h, a.id, alice)
    return pool, h, alice


def _cut(seqs: list[int], limit: int, max_bytes: int) -> list[int]:
    """The model: at most `limit`, content at most `max_bytes`, never fewer than one."""
    page: list[int] = []
    total = 0
    for s in seqs[:limit]:
        total += 0 if s in GONE else SIZES[s - 1]
        if page and total > max_bytes:
            break
        page.append(s)
    return page


SIZED = list(range(1, len(SIZES) + 1))
max_bytes = st.integers(min_value=1, max_value=sum(SIZES) + 10)


def test_byte_bounded_pages_match_the_model(dsn: str) -> None:
    lt = LoopThread()
    try:
        pool, h, alice = lt.run(_fill_sized(dsn))
        cursors = st.integers(min_value=0, max_value=len(SIZES) + 2)
        readers = st.sampled_from([None, alice])

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(before=st.none() | cursors.filter(lambda c: c >= 1), limit=limits,
               cap=max_bytes, reader=readers)
        def history_page(before: int | None, limit: int, cap: int, reader: Any) -> None:
            page = lt.run(messages.history(pool, h, before, limit, reader=reader,
                                           max_bytes=cap))
            older = [s for s in reversed(SIZED) if before is None or s < before]
            want = _cut(older, limit, cap)
            assert [m.seq for m in page.messages] == want
            assert page.next_before == (want[-1] if len(older) > len(want) else None)
            assert all(len(m.content or b"") == (0 if m.seq in GONE else SIZES[m.seq - 1])
                       for m in page.messages)

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(after=cursors, limit=limits, cap=max_bytes, reader=readers)
        def sync_page(after: int, limit: int, cap: int, reader: Any) -> None:
            page = lt.run(messages.since(pool, h, after, limit, reader=reader, max_bytes=cap))
            newer = [s for s in SIZED if s > after]
            want = _cut(newer, limit, cap)
            assert [m.seq for m in page.messages] == want
            assert page.has_more == (len(newer) > len(want))

        @settings(max_examples=60, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(limit=limits, cap=max_bytes)
        def whole_scrolls(limit: int, cap: int) -> None:
            seen: list[int] = []
            before: int | None = None
            while True:
                hp = lt.run(messages.history(pool, h, before, limit, max_bytes=cap))
                assert hp.messages, "a page always holds at least one message"
                seen += [m.seq for m in hp.messages]
                if hp.next_before is None:
                    break
                before = hp.next_before
            assert seen == list(reversed(SIZED))  # each message once, newest first
            caught: list[int] = []
            while True:
                sp = lt.run(messages.since(pool, h, caught[-1] if caught else 0, limit,
                                           max_bytes=cap))
                caught += [m.seq for m in sp.messages]
                if not sp.has_more:
                    break
            assert caught == SIZED

        history_page()
        sync_page()
        whole_scrolls()
        lt.run(pool.close())
    finally:
        lt.stop()


async def test_large_messages_make_short_pages_and_every_one_comes_once(pool) -> None:
    """64 KiB messages under a 200 KiB page bound: three per page, following next_before
    returns all 10 once, in order; one message larger than the bound still comes alone."""
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool)
    writer.start()
    for _ in range(10):
        await writer.append(factories.request(h, alice, size=65536))
    await writer.close()
    pages, before = [], None
    while True:
        page = await messages.history(pool, h, before, 100, reader=alice,
                                      max_bytes=200 * 1024)
        pages.append([m.seq for m in page.messages])
        if page.next_before is None:
            break
        before = page.next_before
    assert pages == [[10, 9, 8], [7, 6, 5], [4, 3, 2], [1]]
    alone = await messages.since(pool, h, 0, 100, max_bytes=1024)
    assert [m.seq for m in alone.messages] == [1] and alone.has_more
