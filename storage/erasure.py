"""Erasure down to the data files: VACUUM of `messages` after deletions and purges.

A delete for everyone writes a new row version without content, nonce and session; a
retention purge deletes rows. PostgreSQL keeps the old versions (heap tuples holding the
nonce and any short content, TOAST chunks holding long content) in the table's files
until VACUUM removes them, and autovacuum's default trigger (20 % of the table dead)
may never come for a large message store. So every replica runs `erase_forever`: every
HOOMI_ERASE_INTERVAL_S, if anything was deleted since the last run, one replica at a
time (advisory lock) runs a plain VACUUM of `messages` and its TOAST table. Plain VACUUM
takes a SHARE UPDATE EXCLUSIVE lock only: sends, reads and deletes go on meanwhile.

What VACUUM does not do (measured by tests/test_erasure.py, which reads the files):
it removes the dead versions from the pages, but compacting a page does not zero the
space they leave, so some of their bytes stay in the page's free space until new rows
are written there. Only a rewrite drops those, so the same job also rewrites (VACUUM
FULL) each partition of `messages` that had updates or deletes since its last rewrite,
at most once per HOOMI_ERASE_REWRITE_S (`rewrite_erased`): the rewritten partition gets
new files and the old ones are unlinked. A rewrite locks its one partition (1/N of the
Hoomis) for as long as it copies it; it waits at most `_REWRITE_LOCK_TIMEOUT` for the
lock, so it never queues sends behind a long transaction, and a partition it cannot
lock is tried again on the next run. See docs/storage.md, "What erased means on disk".
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

_log = logging.getLogger(__name__)

_LOCK_KEY = 0x686F6F6D69657261  # "hoomiera"

# Dead row versions of messages (its partitions: migration 0004) and of their TOAST
# tables, as the statistics see them. The counters lag a deleting transaction by about
# a second (backends flush them when idle), and a run that finds none is a cheap query.
_DEAD = """
SELECT coalesce(sum(n_dead_tup), 0)
FROM pg_stat_all_tables
WHERE relid IN (SELECT p.relid FROM pg_partition_tree('messages') p
                UNION ALL
                SELECT c.reltoastrelid FROM pg_partition_tree('messages') p
                JOIN pg_class c ON c.oid = p.relid)
"""

# PROCESS_TOAST: the TOAST table holds long contents. TRUNCATE: empty pages at the end
# of the file go back to the filesystem; VACUUM takes that brief lock only if nobody
# holds or waits for one, and lets go as soon as someone waits. message_tokens too: a
# deleted, purged or edited message's search tokens go with its content (migration 0007).
_VACUUM = "VACUUM (PROCESS_TOAST TRUE, TRUNCATE TRUE) messages, message_tokens"

# A first run on a large table reads all of it; later runs skip the pages the visibility
# map marks clean. Longer than the pool's command_timeout on purpose.
_VACUUM_TIMEOUT_S = 6 * 3600.0

_erased_here = False

# Each leaf partition of messages, with its statistics' count of updated and deleted
# rows (a delete for everyone is an update; a purge a delete) and that count at its last
# rewrite. A count below the recorded one (statistics reset by a crash) also differs.
_PARTITIONS = """
SELECT c.relname AS partition, c.oid::regclass::text AS qualified,
       coalesce(s.n_tup_upd + s.n_tup_del, 0) AS changes,
       r.changes AS at_rewrite, r.rewritten_at
FROM pg_partition_tree('messages') p
JOIN pg_class c ON c.oid = p.relid
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
LEFT JOIN erasure_rewrites r ON r.partition = c.relname
WHERE p.isleaf
ORDER BY c.relname
"""

_RECORD = """
INSERT INTO erasure_rewrites (partition, changes, rewritten_at) VALUES ($1, $2, now())
ON CONFLICT (partition) DO UPDATE SET changes = $2, rewritten_at = now()
"""

# How long a rewrite waits for its partition's lock before giving up until the next run:
# while it waits, the sends behind it wait too.
_REWRITE_LOCK_TIMEOUT = "500ms"


def note_erased() -> None:
    """Called after this process deleted message content: the next run vacuums even
    before the statistics show the dead versions."""
    global _erased_here
    _erased_here = True


async def erase_deleted(pool: asyncpg.Pool) -> bool:
    """VACUUM `messages` if any deletion left dead versions; True if it ran.

    Returns False when nothing was deleted, or when another replica holds the lock
    (it is vacuuming; a deletion it misses is found on the next run here).
    """
    global _erased_here
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            return False
        try:
            pending = _erased_here
            if not pending and not await conn.fetchval(_DEAD):
                return False
            _erased_here = False
            started = time.perf_counter()
            try:
                await conn.execute(_VACUUM, timeout=_VACUUM_TIMEOUT_S)
            except BaseException:
                _erased_here = _erased_here or pending  # not done: the next run tries again
                raise
            _log.info("erasure: vacuumed messages in %.2f s", time.perf_counter() - started)
            return True
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def rewrite_erased(pool: asyncpg.Pool, every: float) -> list[str]:
    """Rewrite (VACUUM FULL) each partition of `messages` that had updates or deletes
    since its last rewrite and was not rewritten in the last `every` seconds; return
    the partitions rewritten. One replica at a time (the erasure job's lock)."""
    done: list[str] = []
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            return done
        try:
            now = await conn.fetchval("SELECT now()")
            for row in await conn.fetch(_PARTITIONS):
                if row["changes"] == (row["at_rewrite"] or 0):
                    continue  # nothing erased there since its last rewrite
                last = row["rewritten_at"]
                if last is not None and (now - last).total_seconds() < every:
                    continue
                if await _rewrite(conn, row["qualified"]):
                    await conn.execute(_RECORD, row["partition"], row["changes"])
                    done.append(row["partition"])
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return done


async def _rewrite(conn: asyncpg.Connection, partition: str) -> bool:
    started = time.perf_counter()
    await conn.execute(f"SET lock_timeout = '{_REWRITE_LOCK_TIMEOUT}'")
    try:
        await conn.execute(f"VACUUM (FULL) {partition}", timeout=_VACUUM_TIMEOUT_S)
    except asyncpg.LockNotAvailableError:
        _log.info("erasure: %s busy; its rewrite waits for the next run", partition)
        return False
    finally:
        await conn.execute("RESET lock_timeout")
    _log.info("erasure: rewrote %s in %.2f s", partition, time.perf_counter() - started)
    return True


async def erase_forever(pool: asyncpg.Pool, interval: float, rewrite_every: float = 0.0
                        ) -> None:
    """Every `interval` seconds until cancelled: `erase_deleted`, then (unless
    `rewrite_every` is 0) `rewrite_erased`."""
    while True:
        await asyncio.sleep(interval)
        try:
            await erase_deleted(pool)
            if rewrite_every > 0:
                await rewrite_erased(pool, rewrite_every)
        except Exception as exc:
            _log.warning("erasure failed: %s", exc)
