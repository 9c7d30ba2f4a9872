"""Users: the hub only knows their ids; identity lives in the service that signs tokens."""

from __future__ import annotations

from uuid import UUID, uuid4

import asyncpg

from hoomi_protocol.errors import ErrorCode

from . import audit
from .audit import Actor
from .errors import StorageError, not_found


async def create_user(pool: asyncpg.Pool, user_id: UUID | None = None) -> UUID:
    user_id = user_id or uuid4()
    inserted = await pool.fetchval(
        "INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING RETURNING id", user_id
    )
    if inserted is None:
        raise StorageError(ErrorCode.INVALID, "id: user already exists", "id")
    return user_id


async def user_exists(conn: asyncpg.Connection | asyncpg.Pool, user_id: UUID) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user_id))


async def delete_user(
    pool: asyncpg.Pool, user_id: UUID, actor: Actor, *, field: str = "id"
) -> list[UUID]:
    """Delete a user; their messages stay with sender_id NULL. Returns the Hoomis they left."""
    async with pool.acquire() as conn, conn.transaction():
        # Lock the user row, then delete (not read) their memberships: one added
        # concurrently either committed before the lock (and is returned here) or waits
        # on the row's key for its foreign-key check and then fails. Reading first could
        # miss one that the cascade then removes unreported.
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        hoomis = [
            r["hoomi_id"]
            for r in await conn.fetch(
                "DELETE FROM hoomi_members WHERE user_id = $1 RETURNING hoomi_id", user_id
            )
        ]
        deleted = await conn.fetchval("DELETE FROM users WHERE id = $1 RETURNING id", user_id)
        if deleted is None:
            raise not_found("user", field)
        await audit.record(conn, actor, "user.delete", target_id=user_id,
                           details={"hoomis": [str(h) for h in hoomis]})
    return hoomis
