"""Hoomis and their members: who may read and write where, and with which role."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID, uuid4

import asyncpg

from hoomi_protocol.errors import ErrorCode

from . import audit
from .audit import Actor
from .errors import StorageError, not_found
from .records import HoomiOverview, HoomiSummary, Member

ROLES = ("admin", "member")
# 100 years. Also a CHECK in migration 0002: past PostgreSQL's timestamp range the purge
# query itself fails.
MAX_RETENTION_SECONDS = 3_153_600_000


async def create_hoomi(
    pool: asyncpg.Pool, members: Sequence[Member], hoomi_id: UUID | None = None,
    *, actor: Actor | None = None,
) -> UUID:
    """Create a Hoomi with its first members, audited (`hoomi.create`) as `actor`,
    the operator unless told otherwise (only the operator routes create Hoomis)."""
    hoomi_id = hoomi_id or uuid4()
    for i, m in enumerate(members):
        if m.role not in ROLES:
            raise StorageError(ErrorCode.INVALID, f"members[{i}].role: admin or member",
                               f"members[{i}].role")
    async with pool.acquire() as conn, conn.transaction():
        created = await conn.fetchval(
            "INSERT INTO hoomis (id) VALUES ($1) ON CONFLICT (id) DO NOTHING RETURNING id",
            hoomi_id,
        )
        if created is None:
            raise StorageError(ErrorCode.INVALID, "id: hoomi already exists", "id")
        known = {
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM users WHERE id = ANY($1::uuid[])", [m.user_id for m in members]
            )
        }
        for i, m in enumerate(members):
            if m.user_id not in known:
                raise not_found("user", f"members[{i}].user_id")
        await conn.executemany(
            """
            INSERT INTO hoomi_members (hoomi_id, user_id, role) VALUES ($1, $2, $3)
            ON CONFLICT (hoomi_id, user_id) DO UPDATE SET role = EXCLUDED.role
            """,
            [(hoomi_id, m.user_id, m.role) for m in members],
        )
        # Every membership change is audited, the first ones included.
        roster = {str(m.user_id): m.role for m in members}  # a repeated user: last role wins
        await audit.record(conn, actor or Actor.operator(), "hoomi.create", hoomi_id=hoomi_id,
                           details={"members": roster})
    return hoomi_id


async def delete_hoomi(
    pool: asyncpg.Pool, hoomi_id: UUID, actor: Actor, *, field: str = "id"
) -> list[UUID]:
    """Delete a Hoomi and, by cascade, all its messages. Returns its former members."""
    async with pool.acquire() as conn, conn.transaction():
        # Lock the Hoomi row, then delete (not read) its members: a member added
        # concurrently either committed before the lock (and is returned here) or waits
        # on the row's key for its foreign-key check and then fails. Reading first could
        # miss one that the cascade then removes unreported.
        await conn.execute("SELECT 1 FROM hoomis WHERE id = $1 FOR UPDATE", hoomi_id)
        members = [
            r["user_id"]
            for r in await conn.fetch(
                "DELETE FROM hoomi_members WHERE hoomi_id = $1 RETURNING user_id", hoomi_id
            )
        ]
        row = await conn.fetchrow(
            """
            WITH gone AS (DELETE FROM hoomis WHERE id = $1 RETURNING id, last_seq)
            SELECT last_seq FROM gone
            """,
            hoomi_id,
        )
        if row is None:
            raise not_found("hoomi", field)
        await audit.record(conn, actor, "hoomi.delete", hoomi_id=hoomi_id,
                           details={"last_seq": row["last_seq"], "members": len(members)})
    return members


async def set_member(
    pool: asyncpg.Pool, hoomi_id: UUID, user_id: UUID, role: str, actor: Actor,
    *, hoomi_field: str = "hoomi_id", user_field: str = "user_id",
) -> str | None:
    """Add a member or change their role. Returns the previous role (None if new).

    `hoomi_field`/`user_field` name the ids in a not_found: the HTTP routes call the
    Hoomi `id` (its path parameter)."""
    if role not in ROLES:
        raise StorageError(ErrorCode.INVALID, "role: admin or member", "role")
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM hoomis WHERE id = $1)", hoomi_id):
            raise not_found("hoomi", hoomi_field)
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user_id):
            raise not_found("user", user_field)
        previous = await conn.fetchval(
            "SELECT role FROM hoomi_members WHERE hoomi_id = $1 AND user_id = $2 FOR UPDATE",
            hoomi_id, user_id,
        )
        await conn.execute(
            """
            INSERT INTO hoomi_members (hoomi_id, user_id, role) VALUES ($1, $2, $3)
            ON CONFLICT (hoomi_id, user_id) DO UPDATE SET role = EXCLUDED.role
            """,
            hoomi_id, user_id, role,
        )
        if previous != role:
            await audit.record(conn, actor, "member.set", hoomi_id=hoomi_id, target_id=user_id,
                               details={"role": role, "previous": previous})
    return previous


async def remove_member(
    pool: asyncpg.Pool, hoomi_id: UUID, user_id: UUID, actor: Actor, *, field: str = "user_id"
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        removed = await conn.fetchval(
            "DELETE FROM hoomi_members WHERE hoomi_id = $1 AND user_id = $2 RETURNING role",
            hoomi_id, user_id,
        )
        if removed is None:
            raise not_found("member", field)
        await audit.record(conn, actor, "member.remove", hoomi_id=hoomi_id, target_id=user_id,
                           details={"role": removed})


async def set_retention(
    pool: asyncpg.Pool, hoomi_id: UUID, seconds: int | None, actor: Actor,
    *, hoomi_field: str = "id",
) -> None:
    if seconds is not None and not 0 < seconds <= MAX_RETENTION_SECONDS:
        raise StorageError(
            ErrorCode.INVALID,
            f"retention_seconds: positive, at most {MAX_RETENTION_SECONDS}, or null",
            "retention_seconds",
        )
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.fetchval(
            "UPDATE hoomis SET retention_seconds = $2 WHERE id = $1 RETURNING id", hoomi_id, seconds
        )
        if done is None:
            raise not_found("hoomi", hoomi_field)
        await audit.record(conn, actor, "hoomi.retention", hoomi_id=hoomi_id,
                           details={"retention_seconds": seconds})


async def member_role(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, user_id: UUID
) -> str | None:
    role: str | None = await conn.fetchval(
        "SELECT role FROM hoomi_members WHERE hoomi_id = $1 AND user_id = $2", hoomi_id, user_id
    )
    return role


async def require_member(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, user_id: UUID, *,
    admin: bool = False, field: str = "hoomi_id",
) -> str:
    """The user's role in the Hoomi; not_found if there is no such Hoomi, forbidden if
    the user is not a member (or not an admin, when `admin` is asked)."""
    role = await member_role(conn, hoomi_id, user_id)
    if role is None:
        if await hoomi_info(conn, hoomi_id) is None:
            raise not_found("hoomi", field)
        raise StorageError(ErrorCode.FORBIDDEN, "not a member of this hoomi")
    if admin and role != "admin":
        raise StorageError(ErrorCode.FORBIDDEN, "only a hoomi admin may do this")
    return role


async def members(conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID) -> list[Member]:
    rows = await conn.fetch(
        "SELECT user_id, role FROM hoomi_members WHERE hoomi_id = $1 ORDER BY user_id", hoomi_id
    )
    return [Member(r["user_id"], r["role"]) for r in rows]


async def user_hoomis(conn: asyncpg.Connection | asyncpg.Pool, user_id: UUID) -> list[HoomiSummary]:
    """The user's Hoomis with their current last_seq and the user's role, for `welcome`."""
    return await user_with_hoomis(conn, user_id) or []


async def user_with_hoomis(
    conn: asyncpg.Connection | asyncpg.Pool, user_id: UUID
) -> list[HoomiSummary] | None:
    """`user_hoomis`, or None if the user does not exist: one round trip for `hello`,
    which must refuse a deleted user's still-valid token (reconnect storms hit this)."""
    rows = await conn.fetch(
        """
        SELECT h.id, h.last_seq, hm.role, hm.read_seq
        FROM users u
        LEFT JOIN hoomi_members hm ON hm.user_id = u.id
        LEFT JOIN hoomis h ON h.id = hm.hoomi_id
        WHERE u.id = $1
        ORDER BY h.id
        """,
        user_id,
    )
    if not rows:
        return None
    return [HoomiSummary(r["id"], r["last_seq"], r["role"], r["read_seq"])
            for r in rows if r["id"] is not None]


async def mark_read(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID, user_id: UUID, seq: int,
    *, field: str = "hoomi_id",
) -> tuple[int, bool]:
    """The member has read up to `seq`: (the read_seq stored, whether it moved). It never
    moves back (a lower `seq` changes nothing) nor past the Hoomi's last_seq; concurrent
    reads of one member serialise on the row, each re-checking the condition. not_found
    for no such Hoomi, forbidden for a non-member."""
    row = await conn.fetchrow(
        """
        WITH moved AS (
            UPDATE hoomi_members hm
            SET read_seq = GREATEST(hm.read_seq, LEAST($3::bigint, h.last_seq))
            FROM hoomis h
            WHERE h.id = hm.hoomi_id AND hm.hoomi_id = $1 AND hm.user_id = $2
              AND hm.read_seq < LEAST($3::bigint, h.last_seq)
            RETURNING hm.read_seq)
        SELECT (SELECT read_seq FROM moved) AS moved,
               (SELECT read_seq FROM hoomi_members
                WHERE hoomi_id = $1 AND user_id = $2) AS stored
        """,
        hoomi_id, user_id, seq,
    )
    if row is not None and row["moved"] is not None:
        return row["moved"], True
    if row is None or row["stored"] is None:
        await require_member(conn, hoomi_id, user_id, field=field)  # raises
        raise StorageError(ErrorCode.FORBIDDEN, "not a member of this hoomi")
    return row["stored"], False


async def hoomi_info(
    conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID
) -> tuple[int, int | None] | None:
    """(last_seq, retention_seconds) of a Hoomi, or None if it does not exist."""
    row = await conn.fetchrow(
        "SELECT last_seq, retention_seconds FROM hoomis WHERE id = $1", hoomi_id
    )
    return (row["last_seq"], row["retention_seconds"]) if row else None


async def last_seqs(
    conn: asyncpg.Connection | asyncpg.Pool, ids: Sequence[UUID]
) -> dict[UUID, int]:
    """Current last_seq of each existing Hoomi among `ids` (one round trip)."""
    rows = await conn.fetch(
        "SELECT id, last_seq FROM hoomis WHERE id = ANY($1::uuid[])", list(ids)
    )
    return {r["id"]: r["last_seq"] for r in rows}


async def memberships(
    conn: asyncpg.Connection | asyncpg.Pool, user_ids: Sequence[UUID]
) -> tuple[set[UUID], dict[UUID, dict[UUID, str]]]:
    """For the hub's reconcile: which of `user_ids` still exist, and each one's Hoomis
    with its role there (one round trip)."""
    rows = await conn.fetch(
        """
        SELECT u.id AS user_id, hm.hoomi_id, hm.role
        FROM users u LEFT JOIN hoomi_members hm ON hm.user_id = u.id
        WHERE u.id = ANY($1::uuid[])
        """,
        list(user_ids),
    )
    existing: set[UUID] = set()
    roles: dict[UUID, dict[UUID, str]] = {}
    for r in rows:
        existing.add(r["user_id"])
        if r["hoomi_id"] is not None:
            roles.setdefault(r["user_id"], {})[r["hoomi_id"]] = r["role"]
    return existing, roles


async def overview(conn: asyncpg.Connection | asyncpg.Pool, hoomi_id: UUID) -> HoomiOverview | None:
    """What an operator sees of a Hoomi (never content): its members, counters and
    retention, how far it is archived, and how many messages it stores (tombstones
    included), in one round trip. None if it does not exist."""
    row = await conn.fetchrow(
        """
        SELECT h.last_seq, h.retention_seconds, h.archived_upto,
               (SELECT count(*) FROM messages m WHERE m.hoomi_id = h.id) AS messages,
               (SELECT coalesce(array_agg(hm.user_id ORDER BY hm.user_id), '{}')
                  FROM hoomi_members hm WHERE hm.hoomi_id = h.id) AS member_ids,
               (SELECT coalesce(array_agg(hm.role ORDER BY hm.user_id), '{}')
                  FROM hoomi_members hm WHERE hm.hoomi_id = h.id) AS member_roles
        FROM hoomis h WHERE h.id = $1
        """,
        hoomi_id,
    )
    if row is None:
        return None
    members = [Member(u, r) for u, r in zip(row["member_ids"], row["member_roles"], strict=True)]
    return HoomiOverview(hoomi_id, members, row["last_seq"], row["retention_seconds"],
                         row["messages"], row["archived_upto"])
