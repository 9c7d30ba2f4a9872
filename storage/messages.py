"""Reading messages (history pages, catch-up) and deleting them for everyone.

Cursors are seqs, never timestamps: seqs are dense per Hoomi and visible in order
(see writer.py), so `seq > after` misses nothing and `seq < before` repeats nothing.
Both directions read one extra row to know whether more exist, on the
`messages_hoomi_seq_key` (hoomi_id, seq) index.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from protocol.errors import ErrorCode

from . import audit
from .audit import Actor
from .errors import StorageError, forbidden, not_found
from .hoomis import member_role, require_member
from .records import DeletedMessage, HistoryPage, StoredMessage, SyncPage

_COLUMNS = "id, hoomi_id, seq, sender_id, content, nonce, session_id, created_at, deleted_at"

_BEFORE = f"""
SELECT {_COLUMNS} FROM messages
WHERE hoomi_id = $1 AND seq < $2
ORDER BY seq DESC LIMIT $3
"""

_AFTER = f"""
SELECT {_COLUMNS} FROM messages
WHERE hoomi_id = $1 AND seq > $2
ORDER BY seq ASC LIMIT $3
"""


def _for_reader(page: str) -> str:
    """The same page for reader $4, with the membership check in the same round trip:
    no row at all means "not a member"; a member of an empty range gets one row of NULLs."""
    columns = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))
    return f"""
SELECT {columns}
FROM hoomi_members hm
LEFT JOIN LATERAL ({page}) m ON true
WHERE hm.hoomi_id = $1 AND hm.user_id = $4
"""


_MEMBER_BEFORE = _for_reader(_BEFORE)
_MEMBER_AFTER = _for_reader(_AFTER)

_RANGE = f"""
SELECT {_COLUMNS} FROM messages
WHERE hoomi_id = $1 AND seq > $2 AND seq <= $3
ORDER BY seq ASC
"""

_BY_ID = f"SELECT {_COLUMNS} FROM messages WHERE id = $1 AND hoomi_id = $2"

_NEWEST = 2**63 - 1


def _message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(*row)


def _check_limit(limit: int, field: str) -> None:
    # Pages read limit + 1 rows to know whether more exist; below 1 that trick breaks
    # (limit 0 would index an empty page), so storage refuses it itself.
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StorageError(ErrorCode.INVALID, f"{field}: must be at least 1", field)


async def _pages_for(
    conn: asyncpg.Connection | asyncpg.Pool, query: str, hoomi_id: UUID, edge: int,
    limit: int, reader: UUID, hoomi_field: str,
) -> list[asyncpg.Record]:
    rows = await conn.fetch(query, hoomi_id, edge, limit, reader)
    if not rows:
        # Not a member: say whether the Hoomi exists at all (the slow path, errors only).
        await require_member(conn, hoomi_id, reader, field=hoomi_field)
        raise forbidden("not a member of this hoomi")
    return [r for r in rows if r["id"] is not None]


async def history(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, before: int | None, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
) -> HistoryPage:
    """Up to `limit` messages with seq < before (newest first); tombstones included.
    With `reader`, only for a member of the Hoomi (forbidden / not_found otherwise),
    checked in the same round trip."""
    _check_limit(limit, limit_field)
    edge = _NEWEST if before is None else before
    if reader is None:
        rows = await conn.fetch(_BEFORE, hoomi_id, edge, limit + 1)
    else:
        rows = await _pages_for(conn, _MEMBER_BEFORE, hoomi_id, edge, limit + 1, reader,
                                 hoomi_field)
    page = [_message(r) for r in rows[:limit]]
    next_before = page[-1].seq if len(rows) > limit else None
    return HistoryPage(page, next_before)


async def since(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, after: int, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
) -> SyncPage:
    """Up to `limit` messages with seq > after, ascending: a reconnecting client's catch-up.
    `reader` as for `history`."""
    _check_limit(limit, limit_field)
    if reader is None:
        rows = await conn.fetch(_AFTER, hoomi_id, after, limit + 1)
    else:
        rows = await _pages_for(conn, _MEMBER_AFTER, hoomi_id, after, limit + 1, reader,
                                 hoomi_field)
    return SyncPage([_message(r) for r in rows[:limit]], len(rows) > limit)


async def between(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, after: int, upto: int
) -> list[StoredMessage]:
    """Messages with after < seq <= upto, ascending: how a replica fills a pub/sub gap."""
    return [_message(r) for r in await conn.fetch(_RANGE, hoomi_id, after, upto)]


async def get(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, message_id: UUID
) -> StoredMessage | None:
    row = await conn.fetchrow(_BY_ID, message_id, hoomi_id)
    return _message(row) if row else None


async def delete_for_everyone(
    pool: asyncpg.Pool, hoomi_id: UUID, message_id: UUID, actor_id: UUID,
    *, field: str = "id",
) -> DeletedMessage:
    """Erase a message's ciphertext, nonce and session for good; keep its seq as a tombstone.

    Allowed to its sender and to the Hoomi's admins; audited in the same transaction.
    Deleting a tombstone again succeeds and changes nothing. `field` names the message
    in a not_found: `id` in a socket frame, `message_id` in the HTTP route's path.
    """
    async with pool.acquire() as conn, conn.transaction():
        # Membership first: a non-member learns nothing, not even whether the id exists.
        role = await member_role(conn, hoomi_id, actor_id)
        if role is None:
            raise forbidden("not a member of this hoomi")
        row = await conn.fetchrow(
            """
            SELECT seq, sender_id, deleted_at FROM messages
            WHERE id = $1 AND hoomi_id = $2
            FOR UPDATE
            """,
            message_id,
            hoomi_id,
        )
        if row is None:
            raise not_found("message", field)
        if row["sender_id"] != actor_id and role != "admin":
            raise forbidden("only the sender or a hoomi admin may delete a message")
        if row["deleted_at"] is not None:
            return DeletedMessage(message_id, hoomi_id, row["seq"], False)
        await conn.execute(
            """
            UPDATE messages
            SET content = NULL, nonce = NULL, session_id = NULL,
                deleted_at = now(), updated_at = now()
            WHERE id = $1
            """,
            message_id,
        )
        await audit.record(
            conn,
            Actor.user(actor_id),
            "message.delete",
            hoomi_id=hoomi_id,
            target_id=message_id,
            details={
                "seq": row["seq"],
                "by": "sender" if row["sender_id"] == actor_id else "admin",
            },
        )
        return DeletedMessage(message_id, hoomi_id, row["seq"], True)
