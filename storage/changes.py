"""What changed since a replica last looked: the hub's reconcile (server/hub.py) reads
this instead of every followed Hoomi and every connected user (migration 0009).

A watermark is the xmin of the snapshot of the previous look (`pg_snapshot_xmin`): every
transaction below it had ended then, so what it wrote was seen by that look. Rows
written by transactions at or above it (still running then, or begun since) are read
now. The watermark moves only when a look succeeds; a transaction held open for long
keeps it back, and each look re-reads what changed since that transaction began.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

# member_changes rows are kept this long; a replica whose last successful look is older
# than half of it does a full round instead (server/hub.py FULL_AFTER_S).
KEPT_S = 3600


@dataclass(frozen=True, slots=True)
class Changes:
    watermark: int  # for the next look
    last_seqs: dict[UUID, int] = field(default_factory=dict)  # Hoomis whose last_seq moved
    users: set[UUID] = field(default_factory=set)  # users whose memberships changed, or gone


async def since(conn: asyncpg.Connection | asyncpg.Pool, watermark: int | None) -> Changes:
    """The changes at or above `watermark`, in one statement (one snapshot); None: only
    the watermark of now (a full round reads everything itself, after this)."""
    if watermark is None:
        return Changes(int(await conn.fetchval(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text")))
    rows = await conn.fetch(
        """
        SELECT 'x' AS kind, NULL::uuid AS id, NULL::bigint AS last_seq,
               pg_snapshot_xmin(pg_current_snapshot())::text AS xmin
        UNION ALL
        SELECT 'h', id, last_seq, NULL FROM hoomis WHERE changed_xid >= $1::text::xid8
        UNION ALL
        SELECT DISTINCT 'u', user_id, NULL::bigint, NULL::text FROM member_changes
        WHERE changed_xid >= $1::text::xid8
        """,
        str(watermark),
    )
    out = Changes(0)
    mark = 0
    for r in rows:
        if r["kind"] == "x":
            mark = int(r["xmin"])
        elif r["kind"] == "h":
            out.last_seqs[r["id"]] = r["last_seq"]
        else:
            out.users.add(r["id"])
    return Changes(mark, out.last_seqs, out.users)


async def prune(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Drop member_changes rows older than KEPT_S; returns how many."""
    done = await conn.execute(
        "DELETE FROM member_changes WHERE at < now() - make_interval(secs => $1)", KEPT_S)
    return int(done.split()[-1])
