"""`messages` hash-partitioned by hoomi_id (migration 0004, SPEC §7.1): the schema, the
in-place upgrade of an existing install (`hoomi migrate`: batched, resumable, nothing
lost, the previous release serving meanwhile), partition pruning of history pages, and
the schema checked against Citus' rules for tables distributed by hoomi_id.

The 1M-message upgrade takes longer than the default suite allows on a 2-core machine:
it runs with HOOMI_SLOW_TESTS=1 (`HOOMI_SLOW_TESTS=1 .venv/bin/pytest -s
tests/test_partitioning.py -k million`); the 20 000-message one, with an interruption,
concurrent writes and a resume, is in the default suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from server.testing.replica import ADMIN_TOKEN, JWT_SECRET, Replica
from storage import messages as message_store
from storage.migrate import (
    DEFAULT_MESSAGE_PARTITIONS,
    MigrationError,
    MigrationPending,
    copy_messages,
    migrate,
)
from storage.writer import BatchWriter
from tests import factories, pg
from tests.old_install import old_install
from tests.pg import scratch

ROOT = Path(__file__).resolve().parent.parent
_COLUMNS = ("id, hoomi_id, seq, sender_id, client_msg_id, content, nonce, session_id, "
            "created_at, updated_at, deleted_at")


async def snapshot(conn: asyncpg.Connection) -> None:
    """What the old table holds now, kept aside to compare the moved rows with."""
    await conn.execute("DROP TABLE IF EXISTS expected")
    await conn.execute(f"CREATE TABLE expected AS SELECT {_COLUMNS} FROM messages")


async def differences(conn: asyncpg.Connection) -> tuple[int, int, int]:
    """(rows expected, rows in messages, rows missing, extra or differing in any byte).
    bytea, uuid and timestamptz equality is exact, text compares byte for byte under
    the database's deterministic collation."""
    cols = [c.strip() for c in _COLUMNS.split(",")]
    differ = " OR ".join(f"e.{c} IS DISTINCT FROM m.{c}" for c in cols)
    return (await conn.fetchval("SELECT count(*) FROM expected"),
            await conn.fetchval("SELECT count(*) FROM messages"),
            await conn.fetchval(
                f"SELECT count(*) FROM expected e FULL JOIN messages m "
                f"ON m.id = e.id AND m.hoomi_id = e.hoomi_id WHERE {differ}"))


async def is_partitioned(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = 'messages'::regclass")


class OldRelease:
    """Writes a replica of the previous release makes while the copy runs: new messages
    (its writer's INSERT ... ON CONFLICT (sender_id, client_msg_id)), deletes for
    everyone, retention deletes, on the old table. Records each statement's latency."""

    def __init__(self, dsn: str, hoomi: UUID, sender: UUID, sample: list[UUID]) -> None:
        self.dsn, self.hoomi, self.sender = dsn, hoomi, sender
        self.sample = sample
        self.latencies: list[float] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        rng = random.Random(7)
        seq = await conn.fetchval("SELECT last_seq FROM hoomis WHERE id = $1", self.hoomi)
        try:
            while not self.stop.is_set():
                started = time.perf_counter()
                action = rng.random()
                if action < 0.6:
                    seq += 1
                    await conn.execute(
                        "INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, "
                        "content, nonce, session_id) VALUES (uuidv7(), $1, $2, $3, $4, $5, "
                        "$6, 's') ON CONFLICT (sender_id, client_msg_id) DO NOTHING",
                        self.hoomi, seq, self.sender, uuid4(), os.urandom(64), os.urandom(12))
                elif action < 0.85:
                    await conn.execute(
                        "UPDATE messages SET content = NULL, nonce = NULL, session_id = NULL, "
                        "deleted_at = now(), updated_at = now() WHERE id = $1",
                        rng.choice(self.sample))
                else:
                    await conn.execute("DELETE FROM messages WHERE id = $1",
                                       rng.choice(self.sample))
                self.latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.002)
        finally:
            await conn.close()


# -- the schema ----------------------------------------------------------------------------


async def test_fresh_install_has_hash_partitions_the_seed_indexes_and_keys_with_hoomi_id(
        pool):
    assert await pool.fetchval(
        "SELECT pg_get_partkeydef('messages'::regclass)") == "HASH (hoomi_id)"
    parts = await pool.fetch(
        "SELECT c.relname, c.reloptions, t.reloptions AS toast "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "LEFT JOIN pg_class t ON t.oid = c.reltoastrelid "
        "WHERE i.inhparent = 'messages'::regclass ORDER BY c.relname")
    assert [p["relname"] for p in parts] == [f"messages_p{i:02d}"
                                              for i in range(DEFAULT_MESSAGE_PARTITIONS)]
    for p in parts:  # 0003's autovacuum settings, on each partition and its TOAST table
        assert set(p["reloptions"]) == {"autovacuum_vacuum_scale_factor=0",
                                        "autovacuum_vacuum_threshold=200"}
        assert set(p["toast"]) == {"autovacuum_vacuum_scale_factor=0",
                                   "autovacuum_vacuum_threshold=200"}
    indexes = {r["indexname"]: r["indexdef"] for r in await pool.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'messages'")}
    assert set(indexes) == {"messages_pkey", "messages_hoomi_seq_key",
                            "idx_messages_hoomi_created", "idx_messages_sender",
                            "idx_messages_created", "idx_messages_nonce"}
    assert "UNIQUE" in indexes["idx_messages_nonce"]  # the nonce guard (0007), with hoomi_id
    assert "(hoomi_id, session_id, nonce)" in indexes["idx_messages_nonce"]
    assert "(id, hoomi_id)" in indexes["messages_pkey"]
    assert "UNIQUE" in indexes["idx_messages_sender"]
    assert "(sender_id, client_msg_id, hoomi_id)" in indexes["idx_messages_sender"]
    assert await pool.fetchval(
        "SELECT value FROM hub_settings WHERE name = 'message_partitions'") == "16"
    # Nothing of the move is left behind on a fresh install.
    assert await pool.fetchval("SELECT to_regclass('messages_partitioned')") is None
    assert await pool.fetchval("SELECT finished_at IS NOT NULL FROM messages_copy")


async def test_partition_count_comes_from_the_setting_and_another_later_is_refused(
        pg_template):
    async with scratch(pg_template, partitions=4) as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass") == 4
        assert await migrate(conn, partitions=4) == []
        with pytest.raises(MigrationError) as refused:
            await migrate(conn, partitions=16)
        assert "HOOMI_MESSAGE_PARTITIONS is 16" in str(refused.value)
        assert "created with 4 partitions" in str(refused.value)
        assert "HOOMI_MESSAGE_PARTITIONS=4" in str(refused.value)


# -- the upgrade of an existing install -----------------------------------------------------


async def test_upgrade_is_resumable_keeps_every_byte_and_the_old_release_serves_meanwhile(
        pg_template):
    async with scratch(pg_template, target=3) as conn:
        await old_install(conn, 20_000)
        dsn = pg.dsn_for(pg_template, await conn.fetchval("SELECT current_database()"))
        # A replica of the new release starts: 0004 is applied (new table, mirror
        # trigger, copy job), then it refuses to serve until the move is done.
        with pytest.raises(MigrationPending) as pending:
            await migrate(conn, partitions=16)
        assert "run `hoomi migrate`" in str(pending.value)
        assert not await is_partitioned(conn)

        # `hoomi migrate` copies two batches, then is interrupted (killed, say).
        seen: list[tuple[int, int]] = []
        await copy_messages(conn, batch=3000, max_batches=2,
                            progress=lambda c, t, _e: seen.append((c, t)))
        assert seen == [(3000, 20_000), (6000, 20_000)]

        # Meanwhile, and while the copy resumes, a replica of the previous release
        # writes, deletes for everyone and purges on the old table; a user is deleted.
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM messages ORDER BY id")]
        hoomi, sender = await conn.fetchrow(
            "SELECT hoomi_id, sender_id FROM messages WHERE sender_id IS NOT NULL LIMIT 1")
        old = OldRelease(dsn, hoomi, sender, ids[2000:4000] + ids[12000:14000])
        serving = asyncio.ensure_future(old.run())
        await conn.execute("DELETE FROM users WHERE id = (SELECT id FROM users "
                           "WHERE id <> $1 LIMIT 1)", sender)
        # Deletes for everyone and purges of rows already copied and not yet copied.
        copied, uncopied = ids[100:102], ids[15000:15002]
        await conn.execute("UPDATE messages SET content = NULL, nonce = NULL, "
                           "session_id = NULL, deleted_at = now() WHERE id = ANY($1)",
                           [copied[0], uncopied[0]])
        await conn.execute("DELETE FROM messages WHERE id = ANY($1)", [copied[1], uncopied[1]])
        with pytest.raises(MigrationPending):  # still pending after the interruption
            await migrate(conn, partitions=16)
        await copy_messages(conn, batch=3000, finish=False,
                            progress=lambda c, t, _e: seen.append((c, t)))
        old.stop.set()
        await serving
        assert len(old.latencies) > 10
        assert seen[-1][0] >= 20_000  # resumed after the 6000 already copied

        # Rows inserted during the copy, by the old release, with an id below the
        # cursor (another replica's clock behind): the mirror has them too.
        await conn.execute(
            "INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, content, "
            "nonce) VALUES ('00000000-0000-7000-8000-000000000001', $1, 999999, $2, "
            "gen_random_uuid(), '\\x00112233445566778899aabbccddeeff', "
            "'\\x00112233445566778899aabb')", hoomi, sender)
        await snapshot(conn)
        applied = await migrate(conn, partitions=16, copy=True)
        assert applied == []  # 0004 was applied by the replica that refused to start
        assert await is_partitioned(conn)
        expected, stored, wrong = await differences(conn)
        assert (stored, wrong) == (expected, 0)
        assert expected > 20_000 - 4000  # the purges took some, the old release added
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE id = ANY($1) "
                                   "AND deleted_at IS NOT NULL AND content IS NULL",
                                   [copied[0], uncopied[0]]) == 2
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE id = ANY($1)",
                                   [copied[1], uncopied[1]]) == 0
        assert await conn.fetchval("SELECT to_regclass('messages_partitioned')") is None
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE proname = 'hoomi_mirror_messages'") == 0
        print(f"\nold release's writes during the copy: {len(old.latencies)}, "
              f"max {max(old.latencies) * 1000:.0f} ms")
        await _new_release_continues(dsn, conn)


async def _new_release_continues(dsn: str, conn: asyncpg.Connection) -> None:
    """The new release's writer on the moved rows: seqs go on from the old ones, and a
    retry of a message stored before the upgrade returns its original ack."""
    before = await conn.fetchrow(
        "SELECT m.id, m.hoomi_id, m.seq, m.sender_id, m.client_msg_id, m.created_at, "
        "h.last_seq FROM messages m JOIN hoomis h ON h.id = m.hoomi_id "
        "WHERE m.sender_id IS NOT NULL AND m.deleted_at IS NULL LIMIT 1")
    await conn.execute("INSERT INTO hoomi_members (hoomi_id, user_id, role) "
                       "VALUES ($1, $2, 'member')", before["hoomi_id"], before["sender_id"])
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    writer = BatchWriter(pool)
    writer.start()
    try:
        new = await writer.append(factories.request(before["hoomi_id"], before["sender_id"]))
        retry = await writer.append(factories.request(
            before["hoomi_id"], before["sender_id"], before["client_msg_id"]))
    finally:
        await writer.close()
        await pool.close()
    assert new.seq == before["last_seq"] + 1
    assert (retry.id, retry.seq, retry.created_at, retry.duplicate) == (
        before["id"], before["seq"], before["created_at"], True)


async def test_two_hoomi_migrate_at_once_share_the_copy_and_lose_nothing(pg_template):
    """Replicas starting together wait for each other on the advisory lock and refuse;
    two `hoomi migrate` run together take turns batch by batch and one of them swaps."""
    async with scratch(pg_template, target=3) as conn:
        await old_install(conn, 20_000)
        await snapshot(conn)
        dsn = pg.dsn_for(pg_template, await conn.fetchval("SELECT current_database()"))
        others = [await asyncpg.connect(dsn) for _ in range(4)]
        try:
            starting = await asyncio.gather(*(migrate(c, partitions=16) for c in others[:2]),
                                            return_exceptions=True)
            assert [type(e) for e in starting] == [MigrationPending] * 2
            assert await conn.fetchval(
                "SELECT count(*) FROM schema_migrations WHERE version = 4") == 1
            done = await asyncio.gather(*(migrate(c, partitions=16, copy=True, batch=2000)
                                          for c in others[2:]))
            assert done == [[], []]
        finally:
            for c in others:
                await c.close()
        assert await is_partitioned(conn)
        expected, stored, wrong = await differences(conn)
        assert (expected, stored, wrong) == (20_000, 20_000, 0)


@pytest.mark.skipif(os.environ.get("HOOMI_SLOW_TESTS") != "1",
                    reason="1M-message upgrade (~1-2 min): set HOOMI_SLOW_TESTS=1")
async def test_million_messages_upgrade_in_place_byte_for_byte(pg_template):
    async with scratch(pg_template, target=3) as conn:
        started = time.perf_counter()
        await old_install(conn, 1_000_000)
        filled = time.perf_counter() - started
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('messages'))")
        await snapshot(conn)
        dsn = pg.dsn_for(pg_template, await conn.fetchval("SELECT current_database()"))
        with pytest.raises(MigrationPending):
            await migrate(conn, partitions=16)
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM messages TABLESAMPLE SYSTEM (1)")]
        hoomi, sender = await conn.fetchrow(
            "SELECT hoomi_id, sender_id FROM messages WHERE sender_id IS NOT NULL LIMIT 1")
        old = OldRelease(dsn, hoomi, sender, ids)
        serving = asyncio.ensure_future(old.run())
        started = time.perf_counter()
        progress: list[tuple[int, int, float]] = []
        await copy_messages(conn, finish=False,
                            progress=lambda c, t, e: progress.append((c, t, e)))
        copied = time.perf_counter() - started
        old.stop.set()
        await serving
        await snapshot(conn)
        started = time.perf_counter()
        await migrate(conn, partitions=16, copy=True)
        swapped = time.perf_counter() - started
        started = time.perf_counter()
        expected, stored, wrong = await differences(conn)
        checked = time.perf_counter() - started
        assert (stored, wrong) == (expected, 0)
        assert expected >= 1_000_000 - len(ids)
        lat = sorted(old.latencies)
        print(f"\n1M messages ({size}; filled in {filled:.1f} s): copied in {copied:.1f} s "
              f"({1_000_000 / copied:,.0f}/s, {len(progress)} batches), swap {swapped:.2f} s, "
              f"byte-for-byte check of {stored} rows {checked:.1f} s; the old release "
              f"served {len(lat)} writes meanwhile, p50 {lat[len(lat) // 2] * 1000:.1f} ms, "
              f"p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms, max {lat[-1] * 1000:.0f} ms")


# -- partition pruning ----------------------------------------------------------------------


def _scanned(plan: dict[str, Any]) -> list[str]:
    """Relations a plan reads (pruned partitions do not appear)."""
    found = [plan["Relation Name"]] if "Relation Name" in plan else []
    for child in plan.get("Plans", []):
        found += _scanned(child)
    return found


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_history_page_touches_exactly_one_partition(pool, plan_mode):
    """EXPLAIN ANALYZE of each page query storage/messages.py runs: one partition only,
    the Hoomi's, whether planned for the values (custom plan) or for any (generic plan,
    pruned when the executor starts)."""
    alice, = await factories.users(pool, 1)
    hoomis = [await factories.hoomi(pool, [alice]) for _ in range(6)]
    writer = BatchWriter(pool)
    writer.start()
    await asyncio.gather(*(writer.append(factories.request(h, alice))
                           for h in hoomis for _ in range(5)))
    await writer.close()
    h = hoomis[0]
    home = await pool.fetchval("SELECT tableoid::regclass::text FROM messages "
                               "WHERE hoomi_id = $1 LIMIT 1", h)
    newest = 2**63 - 1
    queries = {
        "history": (message_store._BEFORE, (h, newest, 51)),
        "history for a reader": (message_store._MEMBER_BEFORE, (h, newest, 51, alice)),
        "history, byte-bounded": (message_store._BOUNDED_BEFORE, (h, newest, 51, 1 << 20)),
        "sync": (message_store._AFTER, (h, 0, 51)),
        "sync for a reader, byte-bounded": (message_store._MEMBER_BOUNDED_AFTER,
                                            (h, 0, 51, alice, 1 << 20)),
        "gap fill": (message_store._RANGE, (h, 0, 5)),
        "one message": (message_store._BY_ID, (uuid4(), h)),
    }
    async with pool.acquire() as conn:
        await conn.execute(f"SET plan_cache_mode = {plan_mode}")
        try:
            for name, (sql, args) in queries.items():
                plan = json.loads(await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))[0]["Plan"]
                tables = {t for t in _scanned(plan) if t.startswith("messages")}
                assert tables == {home}, (name, tables)
        finally:
            await conn.execute("RESET plan_cache_mode")
    shown = await pool.fetch(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
                             f"{message_store._BEFORE}", h, newest, 51)
    print(f"\nhistory page of hoomi {h} ({home}):\n" + "\n".join(r[0] for r in shown))


def _loops(plan: dict[str, Any]) -> dict[str, int]:
    """Relation -> how many times the executor scanned it (0: pruned at run time)."""
    found: dict[str, int] = {}
    if "Relation Name" in plan:
        found[plan["Relation Name"]] = plan.get("Actual Loops", 0)
    for child in plan.get("Plans", []):
        for name, loops in _loops(child).items():
            found[name] = found.get(name, 0) + loops
    return found


async def test_catch_up_over_several_hoomis_reads_one_partition_per_hoomi(pool):
    """hello's catch-up (`since_each`) joins each Hoomi asked for with its messages; the
    partitions are pruned per Hoomi as the join runs: one partition scan per Hoomi."""
    alice, = await factories.users(pool, 1)
    hoomis = [await factories.hoomi(pool, [alice]) for _ in range(4)]
    writer = BatchWriter(pool)
    writer.start()
    await asyncio.gather(*(writer.append(factories.request(h, alice))
                           for h in hoomis for _ in range(3)))
    await writer.close()
    homes = {await pool.fetchval("SELECT tableoid::regclass::text FROM messages "
                                 "WHERE hoomi_id = $1 LIMIT 1", h) for h in hoomis}
    plan = json.loads(await pool.fetchval(
        f"EXPLAIN (ANALYZE, FORMAT JSON) {message_store._AFTER_EACH}",
        hoomis, [0] * len(hoomis), 51))[0]["Plan"]
    scanned = {t: n for t, n in _loops(plan).items() if t.startswith("messages") and n}
    assert set(scanned) == homes
    assert sum(scanned.values()) == len(hoomis)


# -- Citus' rules -------------------------------------------------------------------------------

# How each table goes to Citus (docs/scaling.md says the same; a test checks it).
DISTRIBUTED = {"hoomis": "id", "hoomi_members": "hoomi_id", "messages": "hoomi_id",
               "message_segments": "hoomi_id", "archive_orphans": "hoomi_id",
               "message_tokens": "hoomi_id"}
REFERENCE = {"users"}
LOCAL = {"audit_log", "schema_migrations", "hub_settings", "messages_copy", "erasure_rewrites",
         "member_changes"}

_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""

_UNIQUE = """
SELECT i.indrelid::regclass::text AS tab, i.indexrelid::regclass::text AS idx,
       array(SELECT a.attname FROM unnest(i.indkey) k
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k) AS cols
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE i.indisunique AND NOT c.relispartition
  AND c.relnamespace = 'public'::regnamespace
"""

_FOREIGN = """
SELECT conname, conrelid::regclass::text AS src, confrelid::regclass::text AS dst,
       array(SELECT a.attname FROM unnest(conkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = conrelid AND a.attnum = k.n ORDER BY k.o)
         AS src_cols,
       array(SELECT a.attname FROM unnest(confkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = confrelid AND a.attnum = k.n ORDER BY k.o)
         AS dst_cols
FROM pg_constraint
WHERE contype = 'f' AND connamespace = 'public'::regnamespace AND conparentid = 0
"""


async def citus_violations(conn: asyncpg.Connection) -> list[str]:
    """What Citus would refuse in this schema, read from pg_catalog: every table
    classified; a distributed table's unique constraints and indexes include its
    distribution column, which is NOT NULL; a foreign key between distributed tables
    joins their distribution columns (same position); none points from a reference or
    local table to a distributed one, or from a distributed table to a local one."""
    wrong: list[str] = []
    tables = {r["relname"] for r in await conn.fetch(_TABLES)}
    unclassified = tables - set(DISTRIBUTED) - REFERENCE - LOCAL
    wrong += [f"table {t} is not classified (distributed, reference or local)"
              for t in sorted(unclassified)]
    for table, column in DISTRIBUTED.items():
        if not await conn.fetchval(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = $1::regclass "
                "AND attname = $2", table, column):
            wrong.append(f"{table}.{column} (distribution column) may be NULL")
    for r in await conn.fetch(_UNIQUE):
        column = DISTRIBUTED.get(r["tab"])
        if column is not None and column not in r["cols"]:
            wrong.append(f"unique index {r['idx']} on {r['tab']}{tuple(r['cols'])} "
                         f"lacks {column}")
    kind = {**dict.fromkeys(DISTRIBUTED, "distributed"), **dict.fromkeys(REFERENCE, "reference"),
            **dict.fromkeys(LOCAL, "local")}
    for r in await conn.fetch(_FOREIGN):
        src, dst = kind.get(r["src"]), kind.get(r["dst"])
        if src is None or dst is None:
            continue  # an unclassified table, reported above
        if src == "distributed" and dst == "distributed":
            pair = (DISTRIBUTED[r["src"]], DISTRIBUTED[r["dst"]])
            if pair not in zip(r["src_cols"], r["dst_cols"], strict=True):
                wrong.append(f"foreign key {r['conname']} ({r['src']} -> {r['dst']}) does "
                             "not join the distribution columns")
        elif dst == "distributed" or (src == "distributed" and dst == "local"):
            wrong.append(f"foreign key {r['conname']} from {src} table {r['src']} to "
                         f"{dst} table {r['dst']}")
    return wrong


async def test_schema_follows_citus_rules_for_distribution_by_hoomi_id(pool):
    assert await citus_violations(pool) == []


async def test_the_citus_check_catches_a_unique_key_without_hoomi_id(pool):
    await pool.execute("CREATE UNIQUE INDEX one_admin_role ON hoomi_members (user_id, role)")
    await pool.execute("CREATE TABLE reactions (message_id uuid, hoomi_id uuid, "
                       "FOREIGN KEY (hoomi_id) REFERENCES hoomis(id))")
    await pool.execute("ALTER TABLE hoomi_members ADD CONSTRAINT by_user "
                       "FOREIGN KEY (user_id, hoomi_id) REFERENCES hoomi_members "
                       "(hoomi_id, user_id)")
    assert await citus_violations(pool) == [
        "table reactions is not classified (distributed, reference or local)",
        "unique index one_admin_role on hoomi_members('user_id', 'role') lacks hoomi_id",
        "foreign key by_user (hoomi_members -> hoomi_members) does not join the "
        "distribution columns",
    ]


def test_scaling_doc_names_the_same_tables():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    distributed = dict(re.findall(
        r"create_distributed_table\('(\w+)',\s*'(\w+)'", doc))
    reference = set(re.findall(r"create_reference_table\('(\w+)'\)", doc))
    assert distributed == DISTRIBUTED
    assert reference == REFERENCE
    for table in LOCAL:
        assert f"`{table}`" in doc


# -- the operator's view: hoomi serve refuses, hoomi migrate shows progress -----------------


def _hoomi(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT,
                          env={**os.environ, "HOOMI_JWT_SECRET": JWT_SECRET,
                               "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN, **env},
                          capture_output=True, text=True, timeout=120)


async def test_replica_refuses_until_hoomi_migrate_has_moved_the_messages(pg_template):
    async with scratch(pg_template, target=3) as conn:
        await old_install(conn, 20_000)
        dsn = pg.dsn_for(pg_template, await conn.fetchval("SELECT current_database()"))
        replica = Replica(dsn, None, name="pending")
        with pytest.raises(RuntimeError):
            replica.start()
        assert "run `hoomi migrate`" in replica.output()

        other = _hoomi("migrate", DATABASE_URL=dsn, HOOMI_MESSAGE_PARTITIONS="8")
        assert other.returncode == 1
        assert ("HOOMI_MESSAGE_PARTITIONS is 8, but this database's messages table was "
                "created with 16 partitions") in other.stderr

        done = _hoomi("migrate", DATABASE_URL=dsn)
        assert done.returncode == 0, done.stderr
        bars = [line for line in done.stderr.splitlines() if line.startswith("moving messages")]
        assert bars[0].startswith("moving messages [###############")  # half, one batch
        assert "10000/20000" in bars[0] and "20000/20000" in bars[-1]
        assert await is_partitioned(conn)
        replica = Replica(dsn, None, name="moved").start()
        replica.stop()
