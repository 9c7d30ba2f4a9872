"""Erasure down to the data files: after a delete for everyone or a retention purge, the
erasure job's VACUUM takes the old row versions out of `messages` and its TOAST table.
The tests read the relation files themselves (after a CHECKPOINT) and look for each
erased message's nonce and content bytes, telling apart bytes inside a row version
(any tuple a line pointer still points at) from bytes left in a page's free space."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg

from server.testing.replica import Replica
from storage import erasure
from storage.messages import delete_for_everyone
from storage.retention import purge_expired
from storage.writer import BatchWriter
from tests import factories
from tests.relation_files import relation_bytes, split_pages


async def census(conn: asyncpg.Connection, erased: list[tuple[bytes, bytes]]
                 ) -> dict[str, int]:
    """How many erased messages still have a nonce or content piece in the files."""
    await conn.execute("CHECKPOINT")  # what the server holds in memory goes to the files
    data = b""
    for relation in await _message_relations(conn):
        data += await relation_bytes(conn, relation)
    tuples, free = split_pages(data)

    def found(where: bytes) -> int:
        return sum(1 for content, nonce in erased
                   if nonce in where or content[:32] in where or content[-32:] in where)

    return {"in_row_versions": found(tuples), "in_free_space": found(free),
            "anywhere": found(data)}


async def _message_relations(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """The tables holding messages' bytes: each partition (migration 0004) and its TOAST."""
    rows = await conn.fetch(
        "SELECT c.oid::regclass::text AS heap, c.reltoastrelid::regclass::text AS toast "
        "FROM pg_partition_tree('messages') p JOIN pg_class c ON c.oid = p.relid "
        "WHERE p.isleaf")
    return [r[k] for r in rows for k in ("heap", "toast")]


async def _stored(pool: asyncpg.Pool, writer: BatchWriter, n: int, seed: int
                  ) -> tuple[list, list]:
    """n messages from two users in a fresh Hoomi: short ones stay in the heap row, long
    ones go to the TOAST table. Random bytes, so PostgreSQL cannot compress them."""
    rng = random.Random(seed)
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice], [bob])
    reqs = [factories.request(h, rng.choice([alice, bob]), size=rng.choice([120, 600, 4000]))
            for _ in range(n)]
    acks = await asyncio.gather(*(writer.append(r) for r in reqs))
    return reqs, acks


async def _dead_versions(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(erasure._DEAD))


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_erasure_job_takes_deleted_and_purged_versions_out_of_the_files(pool, monkeypatch):
    monkeypatch.setattr(erasure, "_erased_here", False)
    # A table autovacuum has not reached yet: it must not tidy up behind the test's back.
    for relation in (await _message_relations(pool))[::2]:
        await pool.execute(f"ALTER TABLE {relation} SET (autovacuum_enabled = off, "
                           "toast.autovacuum_enabled = off)")
    writer = BatchWriter(pool)
    writer.start()
    reqs, acks = await _stored(pool, writer, 240, seed=1)
    await writer.close()
    conn = await pool.acquire()
    try:
        assert await erasure.erase_deleted(pool) is False  # nothing deleted yet

        # A Hoomi admin deletes a third of them for everyone.
        admin = await pool.fetchval(
            "SELECT user_id FROM hoomi_members WHERE hoomi_id = $1 AND role = 'admin'",
            acks[0].hoomi_id)
        erased = []
        for req, ack in list(zip(reqs, acks, strict=True))[::3]:
            await delete_for_everyone(pool, ack.hoomi_id, ack.id, admin)
            erased.append((req.content, req.nonce))
        before = await census(conn, erased)
        # The delete path sets no flag: the job sees the dead versions in the statistics.
        await _until(lambda: _has_dead(pool))
        assert await erasure.erase_deleted(pool) is True
        after = await census(conn, erased)
        print(f"\ndelete for everyone, {len(erased)} messages: before {before}, "
              f"after the erasure job {after}")
        assert before["in_row_versions"] > 0  # dead versions autovacuum has not reached
        assert after["in_row_versions"] == 0
        # Compaction does not zero what it frees: some bytes stay in pages' free space.
        assert after["anywhere"] == after["in_free_space"]

        # A retention purge of another third: the purge itself asks for the next erasure run.
        await pool.execute("UPDATE hoomis SET retention_seconds = 60 WHERE id = $1",
                           acks[0].hoomi_id)
        old = [ack.id for i, ack in enumerate(acks) if i % 3 == 1]
        await pool.execute("UPDATE messages SET created_at = created_at - interval '1 hour' "
                           "WHERE id = ANY($1::uuid[])", old)
        await erasure.erase_deleted(pool)  # the backdating's own dead versions
        purged = [(r.content, r.nonce) for i, r in enumerate(reqs) if i % 3 == 1]
        assert await purge_expired(pool) == len(purged)
        before = await census(conn, purged)
        assert await erasure.erase_deleted(pool) is True  # flagged, before any statistics
        after = await census(conn, purged)
        print(f"retention purge, {len(purged)} messages: before {before}, "
              f"after the erasure job {after}")
        assert before["in_row_versions"] > 0
        assert after["in_row_versions"] == 0
        assert after["anywhere"] == after["in_free_space"]

        # What does remove every byte: a rewrite of the table (ACCESS EXCLUSIVE lock).
        await conn.execute("VACUUM FULL messages")
        rewritten = await census(conn, erased + purged)
        print(f"after VACUUM FULL: {rewritten}")
        assert rewritten["anywhere"] == 0
    finally:
        await pool.release(conn)


async def _has_dead(pool: asyncpg.Pool) -> bool:
    return await _dead_versions(pool) > 0


async def test_erasure_runs_one_replica_at_a_time_and_retries_what_it_missed(pool,
                                                                             monkeypatch):
    monkeypatch.setattr(erasure, "_erased_here", False)
    erasure.note_erased()
    other = await pool.acquire()
    try:
        await other.execute("SELECT pg_advisory_lock($1)", erasure._LOCK_KEY)
        assert await erasure.erase_deleted(pool) is False  # another replica is at it
        await other.execute("SELECT pg_advisory_unlock($1)", erasure._LOCK_KEY)
    finally:
        await pool.release(other)
    assert await erasure.erase_deleted(pool) is True  # the flag was kept for this run
    assert await erasure.erase_deleted(pool) is False  # and cleared by it


async def test_replica_vacuums_messages_soon_after_a_delete(dsn, pool):
    writer = BatchWriter(pool)
    writer.start()
    reqs, acks = await _stored(pool, writer, 20, seed=2)
    await writer.close()
    sender = reqs[0].sender_id
    replica = Replica(dsn, None, name="erase", HOOMI_ERASE_INTERVAL_S="1").start()
    try:
        before = await _vacuums(pool)
        started = time.monotonic()
        await delete_for_everyone(pool, acks[0].hoomi_id, acks[0].id, sender)
        await _until(lambda: _vacuumed_since(pool, before))
        print(f"\nerased by the replica's job {time.monotonic() - started:.1f} s after the "
              "delete (HOOMI_ERASE_INTERVAL_S=1)")
    finally:
        replica.stop()


async def _vacuums(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(
        "SELECT sum(vacuum_count) FROM pg_stat_all_tables WHERE relid IN "
        "(SELECT relid FROM pg_partition_tree('messages'))"))


async def _vacuumed_since(pool: asyncpg.Pool, count: int) -> bool:
    return await _vacuums(pool) > count and await _dead_versions(pool) == 0



async def test_rewrite_takes_every_erased_byte_out_of_the_files(pool, monkeypatch):
    """The rewrite pass (VACUUM FULL of each partition with erasures) leaves none of an
    erased message's bytes in any file, which plain VACUUM cannot promise; it rewrites
    only partitions with new erasures, and at most once per interval."""
    monkeypatch.setattr(erasure, "_erased_here", False)
    writer = BatchWriter(pool)
    writer.start()
    reqs, acks = await _stored(pool, writer, 120, seed=7)
    await writer.close()
    admin = await pool.fetchval(
        "SELECT user_id FROM hoomi_members WHERE hoomi_id = $1 AND role = 'admin'",
        acks[0].hoomi_id)
    erased = []
    for req, ack in list(zip(reqs, acks, strict=True))[::2]:
        await delete_for_everyone(pool, ack.hoomi_id, ack.id, admin)
        erased.append((req.content, req.nonce))
    conn = await pool.acquire()
    try:
        await _until(lambda: _has_dead(pool))
        await erasure.erase_deleted(pool)
        assert (await census(conn, erased))["anywhere"] > 0  # VACUUM alone leaves some
        partition = await pool.fetchval(
            "SELECT tableoid::regclass::text FROM messages WHERE hoomi_id = $1 LIMIT 1",
            acks[0].hoomi_id)
        await _until(lambda: _changes_seen(pool, partition))
        assert partition in await erasure.rewrite_erased(pool, every=3600)
        assert (await census(conn, erased))["anywhere"] == 0
        kept = [r.content for i, r in enumerate(reqs) if i % 2]
        rows = await pool.fetch("SELECT content FROM messages WHERE hoomi_id = $1 "
                                "AND content IS NOT NULL ORDER BY seq", acks[0].hoomi_id)
        assert sorted(r["content"] for r in rows) == sorted(kept)  # the others untouched
        # Nothing new erased: no rewrite; new erasures within the interval: not yet.
        assert await erasure.rewrite_erased(pool, every=3600) == []
        await delete_for_everyone(pool, acks[1].hoomi_id, acks[1].id, admin)
        await _until(lambda: _changes_seen(pool, partition))
        assert await erasure.rewrite_erased(pool, every=3600) == []
        assert partition in await erasure.rewrite_erased(pool, every=0)
    finally:
        await pool.release(conn)


async def _changes_seen(pool: asyncpg.Pool, partition: str) -> bool:
    """The statistics show updates or deletes not yet covered by a rewrite."""
    row = await pool.fetchrow(
        "SELECT coalesce(s.n_tup_upd + s.n_tup_del, 0) AS changes, r.changes AS done "
        "FROM pg_stat_all_tables s LEFT JOIN erasure_rewrites r ON r.partition = s.relname "
        "WHERE s.relid = $1::regclass", partition)
    return bool(row["changes"]) and row["changes"] != (row["done"] or 0)
