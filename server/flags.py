"""Lean stand-ins for asyncio.Event and asyncio.Queue, for what every socket holds.

An idle socket holds three events of its own (server/ws.py), and uvicorn's protocol an
event and a queue: each asyncio.Event carries a deque of waiters (about 600 bytes even
when empty), an asyncio.Queue four of them. These keep their waiters in a list made on
the first wait, so an idle socket holds a few small objects instead
(`python -m bench.socket_memory` shows what a socket costs, by allocation site).
Same semantics as asyncio's for the calls used here; one event loop, no threads.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

_T = TypeVar("_T")


class Flag:
    """asyncio.Event's set / clear / is_set / wait."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for w in waiters or ():
            if not w.done():
                w.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if self._waiters is not None and fut in self._waiters:
                self._waiters.remove(fut)
        return True


class Inbox(Generic[_T]):
    """asyncio.Queue's put_nowait / get / empty / qsize, unbounded, one getter at a time
    (uvicorn's protocol has one: the app's receive)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[_T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: _T) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> _T:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def get_nowait(self) -> _T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)
