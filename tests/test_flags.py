"""server/flags.py: the lean Event and Queue every socket holds behave as asyncio's."""

from __future__ import annotations

import asyncio
import sys

import pytest

from server.flags import Flag, Inbox


async def test_a_flag_wakes_every_waiter_and_survives_a_cancelled_one():
    flag = Flag()
    assert not flag.is_set()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.sleep(0)
    flag.set()
    assert await asyncio.gather(*waiters[1:]) == [True, True]
    assert waiters[0].cancelled()
    assert await flag.wait()  # set: no wait at all
    flag.clear()
    late = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert not late.done()
    flag.set()
    assert await late


async def test_an_inbox_keeps_order_and_a_cancelled_get_loses_nothing():
    inbox: Inbox[int] = Inbox()
    assert inbox.empty() and inbox.qsize() == 0
    getter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    getter.cancel()
    await asyncio.sleep(0)
    for i in range(3):
        inbox.put_nowait(i)
    assert inbox.qsize() == 3
    assert [await inbox.get() for _ in range(2)] == [0, 1]
    assert inbox.get_nowait() == 2
    with pytest.raises(asyncio.QueueEmpty):
        inbox.get_nowait()
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait(7)
    assert await waiting == 7


def test_they_are_smaller_than_asyncios_own():
    async def sizes() -> tuple[int, int]:
        event, queue = asyncio.Event(), asyncio.Queue()
        theirs = sys.getsizeof(event._waiters) + sum(  # type: ignore[attr-defined]
            sys.getsizeof(d) for d in (queue._getters, queue._putters,  # type: ignore[attr-defined]
                                       queue._queue))  # type: ignore[attr-defined]
        flag, inbox = Flag(), Inbox()
        ours = sys.getsizeof(flag) + sys.getsizeof(inbox) + sys.getsizeof(inbox._items)
        return ours, theirs
    ours, theirs = asyncio.run(sizes())
    assert ours * 5 < theirs
