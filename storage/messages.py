"""Reading messages (history pages, catch-up) and deleting them for everyone.

Cursors are seqs, never timestamps: seqs are dense per Hoomi and visible in order
(see writer.py), so `seq > after` misses nothing and `seq < before` repeats nothing.
Both directions read one extra row to know whether more exist, on the
`messages_hoomi_seq_key` (hoomi_id, seq) index.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from . import audit
from .audit import Actor
from .errors import forbidden, not_found
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

_RANGE = f"""
SELECT {_COLUMNS} FROM messages
WHERE hoomi_id = $1 AND seq > $2 AND seq <= $3
ORDER BY seq ASC
"""

_BY_ID = f"SELECT {_COLUMNS} FROM messages WHERE id = $1 AND hoomi_id = $2"

_NEWEST = 2**63 - 1


def _message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(*row)


async def history(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, before: int | None, limit: int
) -> HistoryPage:
    """Up to `limit` messages with seq < before (newest first); tombstones included."""
    rows = await conn.fetch(_BEFORE, hoomi_id, _NEWEST if before is None else before, limit + 1)
    page = [_message(r) for r in rows[:limit]]
    next_before = page[-1].seq if len(rows) > limit else None
    return HistoryPage(page, next_before)


async def since(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, after: int, limit: int
) -> SyncPage:
    """Up to `limit` messages with seq > after, ascending: a reconnecting client's catch-up."""
    rows = await conn.fetch(_AFTER, hoomi_id, after, limit + 1)
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
    pool: asyncpg.Pool, hoomi_id: UUID, message_id: UUID, actor_id: UUID
) -> DeletedMessage:
    """Erase a message's ciphertext, nonce and session for good; keep its seq as a tombstone.

    Allowed to its sender and to the Hoomi's admins; audited in the same transaction.
    Deleting a tombstone again succeeds and changes nothing.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            SELECT m.seq, m.sender_id, m.deleted_at, hm.role
            FROM messages m
            LEFT JOIN hoomi_members hm ON hm.hoomi_id = m.hoomi_id AND hm.user_id = $3
            WHERE m.id = $1 AND m.hoomi_id = $2
            FOR UPDATE OF m
            """,
            message_id,
            hoomi_id,
            actor_id,
        )
        if row is None:
            raise not_found("message", "id")
        if row["role"] is None:
            raise forbidden("not a member of this hoomi")
        if row["sender_id"] != actor_id and row["role"] != "admin":
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
