"""The audit log: who erased what, and when. Append-only; rows never hold ciphertext."""

from __future__ import annotations

import json
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

_INSERT = """
INSERT INTO audit_log (actor_kind, actor_id, action, hoomi_id, target_id, details)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
"""


class Actor:
    """Who did it: a user (by id), the operator (admin token), or the hub itself."""

    __slots__ = ("kind", "id")

    def __init__(self, kind: str, id: UUID | None = None) -> None:
        self.kind = kind
        self.id = id

    @classmethod
    def user(cls, user_id: UUID) -> Actor:
        return cls("user", user_id)

    @classmethod
    def operator(cls) -> Actor:
        return cls("operator")

    @classmethod
    def system(cls) -> Actor:
        return cls("system")


async def record(
    conn: asyncpg.Connection,
    actor: Actor,
    action: str,
    *,
    hoomi_id: UUID | None = None,
    target_id: UUID | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Write one audit row; call it inside the transaction that does the deletion."""
    await conn.execute(
        _INSERT, actor.kind, actor.id, action, hoomi_id, target_id, json.dumps(details or {})
    )


async def entries(conn: asyncpg.Connection, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest audit rows, for operators and tests."""
    rows = await conn.fetch(
        """
        SELECT id, at, actor_kind, actor_id, action, hoomi_id, target_id, details
        FROM audit_log ORDER BY id DESC LIMIT $1
        """,
        limit,
    )
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


class AuditPage(NamedTuple):
    entries: list[dict[str, Any]]
    # The `before` for the next older page; None when the oldest matching row is reached.
    next_before: int | None


async def page(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    hoomi_id: UUID | None = None,
    actor_id: UUID | None = None,
    action: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> AuditPage:
    """Audit rows newest first, `limit` at a time, filtered; page on with `next_before`.

    Paged by id (the identity column only grows), so a page never repeats or skips a row
    while new ones are written. Each filter is optional; NULL parameters match anything.
    """
    rows = await conn.fetch(
        """
        SELECT id, at, actor_kind, actor_id, action, hoomi_id, target_id, details
        FROM audit_log
        WHERE ($1::uuid IS NULL OR hoomi_id = $1)
          AND ($2::uuid IS NULL OR actor_id = $2)
          AND ($3::text IS NULL OR action = $3)
          AND ($4::bigint IS NULL OR id < $4)
        ORDER BY id DESC
        LIMIT $5
        """,
        hoomi_id, actor_id, action, before, limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    found = [{**dict(r), "details": json.loads(r["details"])} for r in rows]
    return AuditPage(found, rows[-1]["id"] if more else None)
