"""Reading messages (history pages, catch-up) and deleting them for everyone.

Cursors are seqs, never timestamps: seqs are dense per Hoomi and visible in order
(see writer.py), so `seq > after` misses nothing and `seq < before` repeats nothing.
Both directions read one extra row to know whether more exist, on the
`messages_hoomi_seq_key` (hoomi_id, seq) index.

With `max_bytes`, a page also stops before its ciphertext passes that many bytes (at
least one message always comes): the cut is made in the query, by a running sum of
`octet_length(content)`, so the server never fetches more than it returns, and the
extra row is only counted (`fetched`), never sent.

Archived messages (storage/archive.py) come back from their segments byte for byte:
each read puts their content and nonce back (`archive.fill`), and byte-bounded pages
count their stored `content_len`.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from protocol.errors import ErrorCode

from . import archive, audit
from .audit import Actor
from .errors import StorageError, forbidden, not_found
from .hoomis import member_role, require_member
from .records import DeletedMessage, HistoryPage, StoredMessage, SyncPage

_COLUMNS = "id, hoomi_id, seq, sender_id, content, nonce, session_id, created_at, deleted_at"


def _kept(hoomi: str) -> str:
    """Messages still within the Hoomi's retention: one past it is never served, even
    before the purge job erases it (the Hoomi's row is read once per query, an InitPlan)."""
    return f"""created_at >= coalesce(
    (SELECT now() - make_interval(secs => h.retention_seconds) FROM hoomis h
     WHERE h.id = {hoomi}), '-infinity')"""


_BEFORE = f"""
SELECT {_COLUMNS}, content_len FROM messages
WHERE hoomi_id = $1 AND seq < $2 AND {_kept("$1")}
ORDER BY seq DESC LIMIT $3
"""

_AFTER = f"""
SELECT {_COLUMNS}, content_len FROM messages
WHERE hoomi_id = $1 AND seq > $2 AND {_kept("$1")}
ORDER BY seq ASC LIMIT $3
"""


def _bounded(page: str, order: str, max_bytes: str) -> str:
    """`page` (limit + 1 rows, $3) cut where its content passes `max_bytes` (a parameter)
    or at `limit` rows, whichever comes first, keeping at least the first row. `fetched`
    is how many rows the page had before the cut: more than returned means more exist."""
    return f"""
SELECT {_COLUMNS}, fetched FROM (
  SELECT p.*, count(*) OVER () AS fetched, row_number() OVER w AS rn,
         sum(coalesce(octet_length(p.content), p.content_len, 0)) OVER w AS total
  FROM ({page}) p
  WINDOW w AS (ORDER BY p.seq {order} ROWS UNBOUNDED PRECEDING)
) b
WHERE rn = 1 OR (rn < $3 AND total <= {max_bytes})
ORDER BY seq {order}
"""


def _for_reader(page: str, extra: str = "") -> str:
    """The same page for reader $4, with the membership check in the same round trip:
    no row at all means "not a member"; a member of an empty range gets one row of NULLs."""
    columns = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(",") + extra.split())
    return f"""
SELECT {columns}
FROM hoomi_members hm
LEFT JOIN LATERAL ({page}) m ON true
WHERE hm.hoomi_id = $1 AND hm.user_id = $4
"""


_MEMBER_BEFORE = _for_reader(_BEFORE)
_MEMBER_AFTER = _for_reader(_AFTER)
# Byte-bounded pages: max_bytes is $4, or $5 after the reader.
_BOUNDED_BEFORE = _bounded(_BEFORE, "DESC", "$4")
_BOUNDED_AFTER = _bounded(_AFTER, "ASC", "$4")
_MEMBER_BOUNDED_BEFORE = _for_reader(_bounded(_BEFORE, "DESC", "$5"), "fetched")
_MEMBER_BOUNDED_AFTER = _for_reader(_bounded(_AFTER, "ASC", "$5"), "fetched")

_RANGE = f"""
SELECT {_COLUMNS} FROM messages
WHERE hoomi_id = $1 AND seq > $2 AND seq <= $3 AND {_kept("$1")}
ORDER BY seq ASC
"""

_BY_ID = f"SELECT {_COLUMNS} FROM messages WHERE id = $1 AND hoomi_id = $2"

_NEWEST = 2**63 - 1


def _message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(*tuple(row)[:_WIDTH])


_WIDTH = len(StoredMessage._fields)


def _check_limit(limit: int, field: str) -> None:
    # Pages read limit + 1 rows to know whether more exist; below 1 that trick breaks
    # (limit 0 would index an empty page), so storage refuses it itself.
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StorageError(ErrorCode.INVALID, f"{field}: must be at least 1", field)


async def _pages_for(
    conn: asyncpg.Connection | asyncpg.Pool, query: str, hoomi_id: UUID, edge: int,
    limit: int, reader: UUID, hoomi_field: str, *more: int,
) -> list[asyncpg.Record]:
    rows = await conn.fetch(query, hoomi_id, edge, limit, reader, *more)
    if not rows:
        # Not a member: say whether the Hoomi exists at all (the slow path, errors only).
        await require_member(conn, hoomi_id, reader, field=hoomi_field)
        raise forbidden("not a member of this hoomi")
    return [r for r in rows if r["id"] is not None]


async def _page(
    conn: asyncpg.Connection | asyncpg.Pool, queries: tuple[str, str, str, str],
    hoomi_id: UUID, edge: int, limit: int, reader: UUID | None, hoomi_field: str,
    max_bytes: int | None,
) -> tuple[list[StoredMessage], bool]:
    """The page's messages and whether more follow. `queries`: plain, for a reader,
    byte-bounded, byte-bounded for a reader."""
    plain, member, bounded, member_bounded = queries
    if max_bytes is None:
        if reader is None:
            rows = await conn.fetch(plain, hoomi_id, edge, limit + 1)
        else:
            rows = await _pages_for(conn, member, hoomi_id, edge, limit + 1, reader,
                                    hoomi_field)
        page = await archive.fill(conn, [_message(r) for r in rows[:limit]])
        return page, len(rows) > limit
    if reader is None:
        rows = await conn.fetch(bounded, hoomi_id, edge, limit + 1, max_bytes)
    else:
        rows = await _pages_for(conn, member_bounded, hoomi_id, edge, limit + 1, reader,
                                hoomi_field, max_bytes)
    page = await archive.fill(conn, [_message(r) for r in rows])
    return page, bool(rows) and rows[0]["fetched"] > len(rows)


_HISTORY = (_BEFORE, _MEMBER_BEFORE, _BOUNDED_BEFORE, _MEMBER_BOUNDED_BEFORE)
_SINCE = (_AFTER, _MEMBER_AFTER, _BOUNDED_AFTER, _MEMBER_BOUNDED_AFTER)


async def history(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, before: int | None, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
    max_bytes: int | None = None,
) -> HistoryPage:
    """Up to `limit` messages with seq < before (newest first); tombstones included.
    With `reader`, only for a member of the Hoomi (forbidden / not_found otherwise),
    checked in the same round trip. With `max_bytes`, fewer when their content would
    pass that many bytes (never fewer than one); `next_before` then continues."""
    _check_limit(limit, limit_field)
    edge = _NEWEST if before is None else before
    page, more = await _page(conn, _HISTORY, hoomi_id, edge, limit, reader, hoomi_field,
                             max_bytes)
    return HistoryPage(page, page[-1].seq if more else None)


async def since(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, after: int, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
    max_bytes: int | None = None,
) -> SyncPage:
    """Up to `limit` messages with seq > after, ascending: a reconnecting client's catch-up.
    `reader` and `max_bytes` as for `history` (`has_more` then says whether more follow)."""
    _check_limit(limit, limit_field)
    page, more = await _page(conn, _SINCE, hoomi_id, after, limit, reader, hoomi_field,
                             max_bytes)
    return SyncPage(page, more)


async def between(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, after: int, upto: int
) -> list[StoredMessage]:
    """Messages with after < seq <= upto, ascending: how a replica fills a pub/sub gap."""
    return await archive.fill(conn, [_message(r) for r in await conn.fetch(
        _RANGE, hoomi_id, after, upto)])


async def get(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, message_id: UUID
) -> StoredMessage | None:
    row = await conn.fetchrow(_BY_ID, message_id, hoomi_id)
    return (await archive.fill(conn, [_message(row)]))[0] if row else None


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
            SELECT seq, sender_id, deleted_at, content IS NULL AS archived FROM messages
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
            SET content = NULL, nonce = NULL, session_id = NULL, content_len = NULL,
                deleted_at = now(), updated_at = now()
            WHERE id = $1 AND hoomi_id = $2
            """,
            message_id,
            hoomi_id,
        )
        if row["archived"]:  # its ciphertext is in a segment too: rewritten without it
            await archive.mark_erased(conn, hoomi_id, row["seq"], row["seq"])
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


_AFTER_EACH = f"""
SELECT m.{", m.".join(c.strip() for c in _COLUMNS.split(","))}
FROM unnest($1::uuid[], $2::bigint[]) AS c(hoomi_id, after)
CROSS JOIN LATERAL (
  SELECT {_COLUMNS} FROM messages
  WHERE hoomi_id = c.hoomi_id AND seq > c.after AND {_kept("c.hoomi_id")}
  ORDER BY seq ASC LIMIT $3
) m
"""


async def since_each(
    conn: asyncpg.Connection | asyncpg.Pool, afters: dict[UUID, int], limit: int
) -> dict[UUID, SyncPage]:
    """`since` for several Hoomis in one round trip (a socket's catch-up at hello): up to
    `limit` messages with seq > afters[hoomi] for each, ascending; every Hoomi asked for
    gets a page, empty if nothing follows. No reader check: for the hub's own catch-up."""
    _check_limit(limit, "limit")
    ids = list(afters)
    rows = await conn.fetch(_AFTER_EACH, ids, [afters[h] for h in ids], limit + 1)
    found: dict[UUID, list[StoredMessage]] = {h: [] for h in ids}
    for m in await archive.fill(conn, [_message(r) for r in rows]):
        found[m.hoomi_id].append(m)
    return {h: SyncPage(ms[:limit], len(ms) > limit) for h, ms in found.items()}
