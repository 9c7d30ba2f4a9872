"""A socket's JOIN and READ effects (server/session.py), carried out against the Hub and
PostgreSQL: the session says what to read and takes the rows; this module only reads.

A READ hands its rows to the session one at a time, each once the outbox has room
(`Host.room_for_catch_up`): catch-up never overflows the outbox itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol
from uuid import UUID

from storage import hoomis as hoomi_store
from storage import messages as message_store
from storage.records import SyncPage

from . import events
from .hub import Socket
from .services import Services
from .session import Session, Task

_log = logging.getLogger(__name__)

PAGE = 200
# Hoomis behind at hello are caught up this many at a time, this many messages each, in one
# query (a user in 300 Hoomis must not cost 300 round trips); the rest page on their own.
BATCH = 10
BATCH_PAGE = 20


class Host(Socket, Protocol):
    """The socket the effects are for (server/ws.py Connection): a Hub Socket that also
    has a session, the services, and the means to act on what the session decided."""

    session: Session
    services: Services

    def react(self) -> None: ...
    async def room_for_catch_up(self) -> None: ...
    def spawn(self, coro: Any) -> asyncio.Task[Any]: ...


async def join(host: Host, task: Task) -> None:
    """A JOIN: the Hoomi's feed routes here, then its edge is read (`Session.joined_at`)."""
    try:
        await host.services.hub.join(host, [task.hoomi_id])
        if host.session.generation(task.hoomi_id) != task.generation:
            return
        last = await hoomi_store.last_seqs(host.services.pool, [task.hoomi_id])
    except Exception as exc:
        # Without its feed this socket would miss the Hoomi silently: make the client
        # reconnect (and resume) instead.
        _log.warning("join failed: %s", exc)
        host.session.read_failed(task.hoomi_id, task.generation)
        host.react()
        return
    host.session.joined_at(task.hoomi_id, task.generation, last.get(task.hoomi_id, 0))
    host.react()


async def catch_up_batch(host: Host, group: list[UUID]) -> None:
    """The first catch-up page of several Hoomis in one query; a Hoomi with more (or
    pushed to meanwhile) goes on paging alone."""
    session, hub = host.session, host.services.hub
    ranges: dict[UUID, tuple[int, int, int]] = {}
    for h in group:
        generation = session.generation(h)
        if generation is not None:
            rng = session.read_range(h, generation, hub.delivered(h))
            if rng is not None:
                ranges[h] = (generation, *rng)
    try:
        pages = await message_store.since_each(
            host.services.pool, {h: after for h, (_, after, _) in ranges.items()},
            BATCH_PAGE)
    except Exception as exc:
        _log.debug("batched catch-up failed, paging alone: %s", exc)
        pages = {}
    for h, (generation, _, upto) in ranges.items():
        page = pages.get(h)
        if page is not None and not await _take_rows(host, h, generation, page, upto):
            continue
        host.spawn(catch_up(host, h, generation))


async def catch_up(host: Host, hoomi_id: UUID, generation: int) -> None:
    """Queue what the database has in the cursor's gap, until it meets the pushes."""
    session, hub = host.session, host.services.hub
    failures = 0
    while (rng := session.read_range(hoomi_id, generation, hub.delivered(hoomi_id))):
        after, upto = rng
        try:
            page = await message_store.since(host.services.pool, hoomi_id, after,
                                             PAGE)
        except Exception as exc:
            failures += 1
            if failures >= 5:
                _log.warning("catch-up failed: %s", exc)
                session.read_failed(hoomi_id, generation)
                host.react()
                return
            await asyncio.sleep(0.1 * 2**failures)
            continue
        failures = 0
        if not await _take_rows(host, hoomi_id, generation, page, upto):
            return


async def _take_rows(host: Host, hoomi_id: UUID, generation: int, page: SyncPage,
                 upto: int) -> bool:
    """Hand a page to the session row by row, each once the outbox has room; False
    when the cursor is gone meanwhile."""
    for m in page.messages:
        await host.room_for_catch_up()
        # Re-checked after the wait (by generation): the member may have left meanwhile.
        taken = host.session.rows_read(hoomi_id, generation,
                                       [(m.seq, events.message_frame(m))], m.seq)
        host.react()
        if not taken:
            return False
    if not page.has_more:
        # All that exists up to `upto` was read: the rest of the range was purged.
        taken = host.session.rows_read(hoomi_id, generation, [], upto)
        host.react()
        return taken
    return True
