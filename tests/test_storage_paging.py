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
