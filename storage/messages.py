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

import functools
from datetime import UTC, datetime
from typing import NamedTuple
from uuid import UUID

import asyncpg

from hoomi_protocol.errors import ErrorCode

from . import archive, audit
from .audit import Actor
from .db import stateless
from .errors import StorageError, forbidden, not_found
from .hoomis import member_role, require_member
from .records import (
    DeletedMessage,
    EditedMessage,
    HistoryPage,
    Reencrypted,
    SearchPage,
    StoredMessage,
    SyncPage,
    WireMessage,
)
from .writer import check_scheme_tokens, is_nonce_conflict, nonce_reused

_COLUMNS = ("id, hoomi_id, seq, sender_id, content, nonce, session_id, created_at, deleted_at, "
            "scheme, updated_at")


def _kept(hoomi: str) -> str:
    """Messages still within the Hoomi's retention: one past it is never served, even
    before the purge job erases it (the Hoomi's row is read once per query, an InitPlan)."""
    return f"""created_at >= coalesce(
    (SELECT now() - make_interval(secs => h.retention_seconds) FROM hoomis h
     WHERE h.id = {hoomi}), '-infinity')"""


def _before(where: str = "", limit: str = "$3") -> str:
    return f"""
SELECT {_COLUMNS}, content_len FROM messages
WHERE hoomi_id = $1 AND seq < $2 AND {_kept("$1")}{where}
ORDER BY seq DESC LIMIT {limit}
"""


def _after(where: str = "", limit: str = "$3") -> str:
    return f"""
SELECT {_COLUMNS}, content_len FROM messages
WHERE hoomi_id = $1 AND seq > $2 AND {_kept("$1")}{where}
ORDER BY seq ASC LIMIT {limit}
"""


def _bounded(page: str, order: str, max_bytes: str) -> str:
    """`page` (limit + 1 rows, $3) cut where its content passes `max_bytes` (a parameter)
    or at `limit` rows, whichever comes first, keeping at least the first row. `fetched`
    is how many rows the page had before the cut: more than returned means more exist."""
    return f"""
SELECT {_COLUMNS}, content_len, fetched FROM (
  SELECT p.*, count(*) OVER () AS fetched, row_number() OVER w AS rn,
         sum(coalesce(octet_length(p.content), p.content_len, 0)) OVER w AS total
  FROM ({page}) p
  WINDOW w AS (ORDER BY p.seq {order} ROWS UNBOUNDED PRECEDING)
) b
WHERE rn = 1 OR (rn < $3 AND total <= {max_bytes})
ORDER BY seq {order}
"""


def _ms(t: str) -> str:
    """Milliseconds since the epoch of timestamp `t`, computed as the hub computes them
    from a datetime (server/events.py `ms`: int(t.timestamp() * 1000)): the exact
    microseconds as a double, divided by 10^6, times 1000, truncated. IEEE doubles give
    the same result on both sides, so a page has the same bytes either way
    (tests/test_storage_paging.py compares them with the typed rows)."""
    return (f"trunc((extract(epoch FROM {t}) * 1000000)::int8::float8 / 1000000 * 1000)"
            "::int8")


# A page's columns, from its query's rows `m`: typed (StoredMessage) or in wire form
# (WireMessage); content_len follows either (set: the message is archived).
_TYPED = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(",")) + ", m.content_len"
_WIRE = (f"m.id::text AS id, m.seq, m.sender_id::text AS sender_id, m.content, m.nonce, "
         f"m.session_id, {_ms('m.created_at')} AS created_at, "
         f"m.deleted_at IS NOT NULL AS deleted, m.scheme, "
         f"{_ms('coalesce(m.updated_at, m.created_at)')} AS updated_at, m.content_len")


def _rows(page: str, columns: str, extra: str = "") -> str:
    """`page`'s rows as `columns` (and `extra`: `, m.fetched`)."""
    return f"SELECT {columns}{extra} FROM ({page}) m"


def _for_reader(page: str, columns: str, extra: str = "") -> str:
    """The same page for reader $4, with the membership check in the same round trip:
    no row at all means "not a member"; a member of an empty range gets one row of NULLs."""
    return f"""
SELECT {columns}{extra}
FROM hoomi_members hm
LEFT JOIN LATERAL ({page}) m ON true
WHERE hm.hoomi_id = $1 AND hm.user_id = $4
"""


_Queries = tuple[str, str, str, str]


@functools.lru_cache(maxsize=1024)
def _queries(direction: str, wire: bool, scheme_below: bool, rows: int) -> _Queries:
    """A page's four queries: plain, for a reader, byte-bounded, byte-bounded for a reader
    (max_bytes is $4, or $5 after the reader). With `scheme_below`, only live messages
    with scheme < the last parameter (what is left to reencrypt): $4 plain, $5 for a
    reader or byte-bounded, $6 both. `wire`: the columns in wire form.

    Each reads `rows` (limit + 1, also $3) with a literal LIMIT. With `LIMIT $3`,
    PostgreSQL planned every execution again: its generic plan over the 16 partitions,
    costed for 10 % of the rows, looked 10x the custom one (pg_prepared_statements:
    custom_plans 1001, generic_plans 0; planning 0.26 ms, execution 0.12 ms). With the
    literal it keeps the generic plan after five executions (pruned at run time: still
    one partition, tests/test_partitioning.py), and the hub's page took 207 us instead of
    474 on one connection (tests/test_wire_pages.py). One statement per limit used."""
    q, order = (_before, "DESC") if direction == "history" else (_after, "ASC")
    columns = _WIRE if wire else _TYPED

    def only(n: int) -> str:
        return f" AND deleted_at IS NULL AND scheme < ${n}::int" if scheme_below else ""
    fetched, n = ", m.fetched", str(int(rows))
    # Without the byte bound, $3 (= rows) has no other use: a term that is always true
    # keeps it in the statement, so the parameters keep their numbers and types.
    asked = " AND $3::int8 > 0"
    return (_rows(q(only(4) + asked, n), columns), _for_reader(q(only(5) + asked, n), columns),
            _rows(_bounded(q(only(5), n), order, "$4"), columns, fetched),
            _for_reader(_bounded(q(only(6), n), order, "$5"), columns, fetched))


# What a socket or HTTP page of 50 runs, by name (tests/test_partitioning.py explains them).
_BEFORE, _MEMBER_BEFORE, _BOUNDED_BEFORE, _MEMBER_BOUNDED_BEFORE = _queries(
    "history", True, False, 51)
_AFTER, _MEMBER_AFTER, _BOUNDED_AFTER, _MEMBER_BOUNDED_AFTER = _queries("sync", True, False, 51)

_RANGE = f"""
SELECT {_COLUMNS} FROM messages
WHERE hoomi_id = $1 AND seq > $2 AND seq <= $3 AND {_kept("$1")}
ORDER BY seq ASC
"""

_BY_ID = f"SELECT {_COLUMNS} FROM messages WHERE id = $1 AND hoomi_id = $2"

_DROP_TOKENS = "DELETE FROM message_tokens WHERE hoomi_id = $1 AND seq = ANY($2::int8[])"
_ADD_TOKENS = """
INSERT INTO message_tokens (hoomi_id, token, seq)
SELECT $1, t.token, t.seq FROM unnest($2::bytea[], $3::int8[]) AS t(token, seq)
ON CONFLICT DO NOTHING
"""
_NONCE_TAKEN = """
SELECT t.nonce FROM unnest($2::text[], $3::bytea[]) AS t(session_id, nonce)
JOIN messages m ON m.hoomi_id = $1 AND m.session_id = t.session_id AND m.nonce = t.nonce
LIMIT 1
"""

_NEWEST = 2**63 - 1


def _message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(*tuple(row)[:_WIDTH])


_WIDTH = len(StoredMessage._fields)
_WIRE_WIDTH = len(WireMessage._fields)


def _check_limit(limit: int, field: str) -> None:
    # Pages read limit + 1 rows to know whether more exist; below 1 that trick breaks
    # (limit 0 would index an empty page), so storage refuses it itself.
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StorageError(ErrorCode.INVALID, f"{field}: must be at least 1", field)


async def _fetch(conn: asyncpg.Connection | asyncpg.Pool, query: str, *args: object,
                 ) -> list[asyncpg.Record]:
    """A page's one statement; from a pool, on a connection given back without asyncpg's
    reset round trip (db.stateless: a SELECT leaves no session state)."""
    if isinstance(conn, asyncpg.Pool):
        async with stateless(conn) as c:
            return await c.fetch(query, *args)
    return await conn.fetch(query, *args)


async def _pages_for(
    conn: asyncpg.Connection | asyncpg.Pool, query: str, hoomi_id: UUID, edge: int,
    limit: int, reader: UUID, hoomi_field: str, *more: int,
) -> list[asyncpg.Record]:
    rows = await _fetch(conn, query, hoomi_id, edge, limit, reader, *more)
    if not rows:
        # Not a member: say whether the Hoomi exists at all (the slow path, errors only).
        await require_member(conn, hoomi_id, reader, field=hoomi_field)
        raise forbidden("not a member of this hoomi")
    return [r for r in rows if r[0] is not None]


async def _page_rows(
    conn: asyncpg.Connection | asyncpg.Pool, queries: _Queries, hoomi_id: UUID, edge: int,
    limit: int, reader: UUID | None, hoomi_field: str, max_bytes: int | None,
    scheme_below: int | None,
) -> tuple[list[asyncpg.Record], bool]:
    """The page's rows and whether more follow (`queries`: see `_queries`)."""
    plain, member, bounded, member_bounded = queries
    last = () if scheme_below is None else (scheme_below,)
    if max_bytes is None:
        if reader is None:
            rows = await _fetch(conn, plain, hoomi_id, edge, limit + 1, *last)
        else:
            rows = await _pages_for(conn, member, hoomi_id, edge, limit + 1, reader,
                                    hoomi_field, *last)
        return rows[:limit], len(rows) > limit
    if reader is None:
        rows = await _fetch(conn, bounded, hoomi_id, edge, limit + 1, max_bytes, *last)
    else:
        rows = await _pages_for(conn, member_bounded, hoomi_id, edge, limit + 1, reader,
                                hoomi_field, max_bytes, *last)
    return rows, bool(rows) and rows[0]["fetched"] > len(rows)


async def _page(
    conn: asyncpg.Connection | asyncpg.Pool, direction: str, hoomi_id: UUID, edge: int,
    limit: int, reader: UUID | None, hoomi_field: str, max_bytes: int | None,
    scheme_below: int | None,
) -> tuple[list[StoredMessage], bool]:
    rows, more = await _page_rows(conn, _queries(direction, False, scheme_below is not None,
                                                 limit + 1),
                                  hoomi_id, edge, limit, reader, hoomi_field, max_bytes,
                                  scheme_below)
    return await archive.fill(conn, [_message(r) for r in rows]), more


async def _wire_page(
    conn: asyncpg.Connection | asyncpg.Pool, direction: str, hoomi_id: UUID, edge: int,
    limit: int, reader: UUID | None, hoomi_field: str, max_bytes: int | None,
    scheme_below: int | None,
) -> tuple[list[WireMessage], bool]:
    rows, more = await _page_rows(conn, _queries(direction, True, scheme_below is not None,
                                                 limit + 1),
                                  hoomi_id, edge, limit, reader, hoomi_field, max_bytes,
                                  scheme_below)
    page = [WireMessage._make(r[:_WIRE_WIDTH]) for r in rows]
    if any(r["content_len"] is not None and r["content"] is None for r in rows):
        page = await _fill_wire(conn, hoomi_id, page)
    return page, more


async def _fill_wire(conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID,
                     page: list[WireMessage]) -> list[WireMessage]:
    """`page` with its archived messages' content and nonce read back from their segments
    (archive.fill, as for typed rows)."""
    archived = [StoredMessage(UUID(m.id), hoomi_id, m.seq, None, None, None, None, _EPOCH,
                              None) for m in page if m.content is None and not m.deleted]
    filled = {m.seq: m for m in await archive.fill(conn, archived)}
    return [m._replace(content=filled[m.seq].content, nonce=filled[m.seq].nonce)
            if m.seq in filled else m for m in page]


_EPOCH = datetime.fromtimestamp(0, UTC)


async def history(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, before: int | None, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
    max_bytes: int | None = None, scheme_below: int | None = None,
) -> HistoryPage[StoredMessage]:
    """Up to `limit` messages with seq < before (newest first); tombstones included.
    With `reader`, only for a member of the Hoomi (forbidden / not_found otherwise),
    checked in the same round trip. With `max_bytes`, fewer when their content would
    pass that many bytes (never fewer than one); `next_before` then continues. With
    `scheme_below`, only live messages whose scheme is lower (what is left to migrate)."""
    _check_limit(limit, limit_field)
    edge = _NEWEST if before is None else before
    page, more = await _page(conn, "history", hoomi_id, edge, limit, reader, hoomi_field,
                             max_bytes, scheme_below)
    return HistoryPage(page, page[-1].seq if more else None)


async def since(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, after: int, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
    max_bytes: int | None = None, scheme_below: int | None = None,
) -> SyncPage[StoredMessage]:
    """Up to `limit` messages with seq > after, ascending: a reconnecting client's catch-up.
    `reader`, `max_bytes` and `scheme_below` as for `history` (`has_more` then says
    whether more follow)."""
    _check_limit(limit, limit_field)
    page, more = await _page(conn, "sync", hoomi_id, after, limit, reader, hoomi_field,
                             max_bytes, scheme_below)
    return SyncPage(page, more)


async def wire_history(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, before: int | None, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
    max_bytes: int | None = None, scheme_below: int | None = None,
) -> HistoryPage[WireMessage]:
    """`history`'s page in wire form (WireMessage), what the socket and the HTTP API send:
    the same rows, checks and archive reads, with the ids made strings and the times
    milliseconds by PostgreSQL (the hub's CPU per socket page: bench/RESULTS.md)."""
    _check_limit(limit, limit_field)
    edge = _NEWEST if before is None else before
    page, more = await _wire_page(conn, "history", hoomi_id, edge, limit, reader,
                                  hoomi_field, max_bytes, scheme_below)
    return HistoryPage(page, page[-1].seq if more else None)


async def wire_since(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, after: int, limit: int,
    *, limit_field: str = "limit", reader: UUID | None = None, hoomi_field: str = "hoomi_id",
    max_bytes: int | None = None, scheme_below: int | None = None,
) -> SyncPage[WireMessage]:
    """`since`'s page in wire form (see `wire_history`)."""
    _check_limit(limit, limit_field)
    page, more = await _wire_page(conn, "sync", hoomi_id, after, limit, reader, hoomi_field,
                                  max_bytes, scheme_below)
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
        # Its search tokens go with it (they say which words it held).
        await conn.execute(_DROP_TOKENS, hoomi_id, [row["seq"]])
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


# -- messages that change: edit, reencrypt (SPEC §7.2) -----------------------------------------

MAX_REENCRYPT_ITEMS = 100


async def _replace_tokens(conn: asyncpg.Connection, hoomi_id: UUID,
                          tokens: dict[int, tuple[bytes, ...]]) -> None:
    """The given messages' search tokens become exactly these."""
    if not tokens:
        return
    await conn.execute(_DROP_TOKENS, hoomi_id, list(tokens))
    pairs = [(t, seq) for seq, ts in tokens.items() for t in set(ts)]
    if pairs:
        await conn.execute(_ADD_TOKENS, hoomi_id, [t for t, _ in pairs], [q for _, q in pairs])


async def _nonces_free(conn: asyncpg.Connection, hoomi_id: UUID,
                       pairs: list[tuple[str, bytes]]) -> None:
    """The nonce guard for edits and reencryptions: none of these (session_id, nonce) is
    used by a stored message of the Hoomi, nor twice among them."""
    if len(set(pairs)) != len(pairs) or await conn.fetchval(
            _NONCE_TAKEN, hoomi_id, [s for s, _ in pairs], [n for _, n in pairs]) is not None:
        raise nonce_reused()


async def edit(
    pool: asyncpg.Pool, hoomi_id: UUID, message_id: UUID, actor_id: UUID, *,
    content: bytes, nonce: bytes, session_id: str, scheme: int = 1,
    tokens: tuple[bytes, ...] = (), field: str = "id",
) -> EditedMessage:
    """Replace a message's ciphertext with a new version (its sender only; SPEC §7.2).

    The seq stays, `updated_at` becomes now; the old search tokens go and `tokens` take
    their place; an archived message's segment is marked for rewrite (its old ciphertext
    must leave the object store too). The new nonce passes the nonce guard. Retrying the
    same edit (same content, nonce and session_id) answers as the first time. Audited
    without content."""
    check_scheme_tokens(scheme, tokens)
    try:
        async with pool.acquire() as conn, conn.transaction():
            if await member_role(conn, hoomi_id, actor_id) is None:
                raise forbidden("not a member of this hoomi")
            row = await conn.fetchrow(
                "SELECT seq, sender_id, deleted_at, content, nonce, session_id, scheme, "
                "updated_at, content_len IS NOT NULL AS archived FROM messages "
                "WHERE id = $1 AND hoomi_id = $2 FOR UPDATE", message_id, hoomi_id)
            if row is None or row["deleted_at"] is not None:
                raise not_found("message", field)
            if row["sender_id"] != actor_id:
                raise forbidden("only the sender may edit a message")
            if (row["content"], row["nonce"], row["session_id"], row["scheme"]) == (
                    content, nonce, session_id, scheme):
                return EditedMessage(message_id, hoomi_id, row["seq"], content, nonce,
                                     session_id, scheme, row["updated_at"])  # a retry
            await _nonces_free(conn, hoomi_id, [(session_id, nonce)])
            updated_at = await conn.fetchval(
                "UPDATE messages SET content = $3, nonce = $4, session_id = $5, scheme = $6, "
                "content_len = NULL, updated_at = clock_timestamp() "
                "WHERE id = $1 AND hoomi_id = $2 RETURNING updated_at",
                message_id, hoomi_id, content, nonce, session_id, scheme)
            if row["archived"]:  # the old version's segment is rewritten without it
                await archive.mark_erased(conn, hoomi_id, row["seq"], row["seq"])
            await conn.execute(_DROP_TOKENS, hoomi_id, [row["seq"]])
            await _replace_tokens(conn, hoomi_id, {row["seq"]: tokens})
            await audit.record(conn, Actor.user(actor_id), "message.edit", hoomi_id=hoomi_id,
                               target_id=message_id,
                               details={"seq": row["seq"], "scheme": scheme,
                                        "tokens": len(set(tokens))})
            return EditedMessage(message_id, hoomi_id, row["seq"], content, nonce,
                                 session_id, scheme, updated_at)
    except asyncpg.UniqueViolationError as exc:
        if is_nonce_conflict(exc):  # a concurrent send or edit took the nonce
            raise nonce_reused() from None
        raise


class ReencryptItem(NamedTuple):
    id: UUID
    old_nonce: bytes
    content: bytes
    nonce: bytes
    session_id: str
    scheme: int
    tokens: tuple[bytes, ...] | None = None  # None: the message keeps its tokens


async def reencrypt(
    pool: asyncpg.Pool, hoomi_id: UUID, actor_id: UUID, items: list[ReencryptItem],
) -> Reencrypted:
    """A Hoomi admin's device moves messages to a newer encryption scheme (SPEC §7.2).

    An item is applied only if its message is live, still has `old_nonce` (an optimistic
    check: edited or migrated meanwhile means skipped) and its new scheme is higher than
    the stored one; otherwise its id is in `skipped`. The new nonces pass the nonce
    guard (a reused one refuses the whole call, nothing stored). One audit row per call."""
    if not 1 <= len(items) <= MAX_REENCRYPT_ITEMS:
        raise StorageError(ErrorCode.INVALID, f"items: 1 to {MAX_REENCRYPT_ITEMS}", "items")
    for it in items:
        check_scheme_tokens(it.scheme, () if it.tokens is None else it.tokens)
    if len({it.id for it in items}) != len(items):
        raise StorageError(ErrorCode.INVALID, "items: an id appears twice", "items")
    try:
        async with pool.acquire() as conn, conn.transaction():
            role = await member_role(conn, hoomi_id, actor_id)
            if role is None:
                raise forbidden("not a member of this hoomi")
            if role != "admin":
                raise forbidden("only a hoomi admin may reencrypt its messages")
            rows = await conn.fetch(
                f"SELECT {_COLUMNS}, content_len FROM messages "
                "WHERE hoomi_id = $1 AND id = ANY($2::uuid[]) "
                "ORDER BY id FOR UPDATE", hoomi_id, [it.id for it in items])
            stored = {m.id: m for m in await archive.fill(conn, [_message(r) for r in rows])}
            apply: list[tuple[ReencryptItem, StoredMessage]] = []
            skipped: list[UUID] = []
            for it in items:
                m = stored.get(it.id)
                if m is None or m.deleted_at is not None or m.nonce != it.old_nonce \
                        or it.scheme <= m.scheme:
                    skipped.append(it.id)
                else:
                    apply.append((it, m))
            updated: list[EditedMessage] = []
            if apply:
                await _nonces_free(conn, hoomi_id, [(it.session_id, it.nonce)
                                                    for it, _ in apply])
                res = await conn.fetch(
                    """
                    UPDATE messages m SET content = t.content, nonce = t.nonce,
                        session_id = t.session_id, scheme = t.scheme, content_len = NULL,
                        updated_at = clock_timestamp()
                    FROM unnest($2::uuid[], $3::bytea[], $4::bytea[], $5::text[], $6::int2[])
                         AS t(id, content, nonce, session_id, scheme)
                    WHERE m.hoomi_id = $1 AND m.id = t.id
                    RETURNING m.id, m.updated_at
                    """, hoomi_id, [it.id for it, _ in apply], [it.content for it, _ in apply],
                    [it.nonce for it, _ in apply], [it.session_id for it, _ in apply],
                    [it.scheme for it, _ in apply])
                at = {r["id"]: r["updated_at"] for r in res}
                in_segments = {r["id"] for r in rows if r["content_len"] is not None}
                for seq in sorted(m.seq for _, m in apply if m.id in in_segments):
                    await archive.mark_erased(conn, hoomi_id, seq, seq)
                await _replace_tokens(conn, hoomi_id, {m.seq: it.tokens for it, m in apply
                                                       if it.tokens is not None})
                updated = [EditedMessage(it.id, hoomi_id, m.seq, it.content, it.nonce,
                                         it.session_id, it.scheme, at[it.id]) for it, m in apply]
            await audit.record(conn, Actor.user(actor_id), "message.reencrypt",
                               hoomi_id=hoomi_id,
                               details={"updated": len(updated), "skipped": len(skipped),
                                        "schemes": sorted({it.scheme for it, _ in apply})})
            return Reencrypted(updated, skipped)
    except asyncpg.UniqueViolationError as exc:
        if is_nonce_conflict(exc):
            raise nonce_reused() from None
        raise


# -- blind-index search (SPEC §7.2) ------------------------------------------------------------

MAX_SEARCH_TOKENS = 8
# How many index entries of each token are counted to find the rarest: enough to tell a
# rare word from a common one, cheap (an index-only scan of at most this many entries).
_COUNT_CAP = 2000

# Each token's entries below the edge, counted up to $4, in one round trip.
_TOKEN_COUNTS = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM message_tokens WHERE hoomi_id = $1
                              AND token = q.token AND seq < $3 LIMIT $4) c) AS n
FROM unnest($2::bytea[]) WITH ORDINALITY AS q(token, ord)
ORDER BY q.ord
"""

# Walks the rarest token's entries newest first; each candidate must carry the other
# tokens too ($4, distinct; checked by the primary key); then the message itself, live
# and within retention.
_SEARCH = f"""
SELECT {", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))}
FROM (
  SELECT t.seq FROM message_tokens t
  WHERE t.hoomi_id = $1 AND t.token = $2 AND t.seq < $3
    AND (SELECT count(*) FROM message_tokens u WHERE u.hoomi_id = $1 AND u.seq = t.seq
         AND u.token = ANY($4::bytea[])) = cardinality($4::bytea[])
  ORDER BY t.seq DESC
  LIMIT $5
) s
JOIN messages m ON m.hoomi_id = $1 AND m.seq = s.seq
WHERE m.deleted_at IS NULL AND {_kept("$1").replace("created_at", "m.created_at", 1)}
ORDER BY m.seq DESC
"""


async def search(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, tokens: list[bytes],
    before: int | None, limit: int, reader: UUID, *, hoomi_field: str = "hoomi_id",
) -> SearchPage:
    """Up to `limit` live messages carrying every one of `tokens`, newest first, with
    seq < before; members only. `next_before` continues (None at the oldest match)."""
    _check_limit(limit, "limit")
    distinct = list(dict.fromkeys(tokens))
    if not 1 <= len(distinct) <= MAX_SEARCH_TOKENS or not all(
            isinstance(t, bytes) and 8 <= len(t) <= 32 for t in distinct):
        raise StorageError(ErrorCode.INVALID, f"tokens: 1 to {MAX_SEARCH_TOKENS} tokens of "
                           "8-32 bytes", "tokens")
    await require_member(conn, hoomi_id, reader, field=hoomi_field)
    edge = _NEWEST if before is None else before
    if len(distinct) > 1:  # drive the walk by the rarest token
        counts = [r["n"] for r in await conn.fetch(_TOKEN_COUNTS, hoomi_id, distinct, edge,
                                                   _COUNT_CAP)]
        order = sorted(range(len(distinct)), key=lambda i: counts[i])
        distinct = [distinct[i] for i in order]
    rows = await conn.fetch(_SEARCH, hoomi_id, distinct[0], edge, distinct[1:], limit + 1)
    page = await archive.fill(conn, [_message(r) for r in rows[:limit]])
    # The walk stops at limit + 1 candidates: a candidate purged by retention or deleted
    # meanwhile only makes a page shorter, never skips a match.
    return SearchPage(page, page[-1].seq if len(rows) > limit and page else None)


async def replayed(conn: asyncpg.Connection, lsn: str) -> bool:
    """On a read standby: has it replayed the primary's WAL up to `lsn` (storage/db.py
    WalClock)? Then a query on this connection from now on sees every commit at or
    below it. False on a server that is not in recovery (a standby since promoted keeps
    its last replayed position, which says nothing of what it has now), as on a standby
    that is behind."""
    return bool(await conn.fetchval(
        "SELECT pg_is_in_recovery() AND "
        "coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)", lsn))
