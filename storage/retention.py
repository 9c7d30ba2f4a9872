"""Retention: a Hoomi with `retention_seconds` set loses its messages once they are older.

Purged rows are deleted outright (not tombstoned): retention is the Hoomi admins' choice
to keep nothing past that age. Seqs are not reused, so clients see history start later,
and a gap fill or catch-up simply skips the purged range. One replica at a time does
the work (advisory lock), in small batches so it never holds long locks; each batch is
audited with its count and seq range. The deleted rows' versions then stay in the table's
files until VACUUM: storage/erasure.py runs it soon after (docs/storage.md). Purged
archived messages mark their segments, which the archiver rewrites without them
(storage/archive.py).
"""

from __future__ import annotations

import logging
from uuid import UUID

import asyncpg

from . import archive, audit, erasure
from .audit import Actor
from .errors import is_outage

_log = logging.getLogger(__name__)

_LOCK_KEY = 0x686F6F6D69726574  # "hoomiret"

_PURGE = """
DELETE FROM messages WHERE hoomi_id = $1 AND id IN (
    SELECT id FROM messages
    WHERE hoomi_id = $1 AND created_at < now() - make_interval(secs => $2)
    ORDER BY created_at
    LIMIT $3
)
RETURNING seq, content IS NULL AND deleted_at IS NULL AS archived
"""


async def purge_expired(pool: asyncpg.Pool, *, batch: int = 1000) -> int:
    """Delete every message past its Hoomi's retention; returns how many went."""
    total = 0
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            return 0  # another replica is purging
        try:
            due = await conn.fetch(
                "SELECT id, retention_seconds FROM hoomis WHERE retention_seconds IS NOT NULL "
                "ORDER BY id")
            for row in due:
                try:
                    total += await _purge_hoomi(conn, row["id"], row["retention_seconds"], batch)
                except Exception as exc:
                    if is_outage(exc):
                        raise  # the database is gone: every later Hoomi would fail too
                    # One Hoomi's failure must not starve the others of their purge;
                    # its committed batches stay purged, the next run retries the rest.
                    _log.error("retention purge of hoomi %s failed: %s: %s",
                               row["id"], type(exc).__name__, exc)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
            if total:
                erasure.note_erased()  # the purged rows' bytes are vacuumed off next
    return total


async def _purge_hoomi(
    conn: asyncpg.Connection, hoomi_id: UUID, retention_seconds: int, batch: int
) -> int:
    purged = 0
    while True:
        async with conn.transaction():
            rows = await conn.fetch(_PURGE, hoomi_id, float(retention_seconds), batch)
            seqs = [r["seq"] for r in rows]
            archived = [r["seq"] for r in rows if r["archived"]]
            if archived:  # their ciphertext is in segments too: rewritten without them
                await archive.mark_erased(conn, hoomi_id, min(archived), max(archived))
            if seqs:
                await audit.record(
                    conn, Actor.system(), "retention.purge", hoomi_id=hoomi_id,
                    details={"count": len(seqs), "from_seq": min(seqs), "to_seq": max(seqs)})
        purged += len(seqs)
        if len(seqs) < batch:
            return purged
