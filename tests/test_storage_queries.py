"""Queries, deletion and the schema's foreign-key behaviour, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import asyncpg
import pytest

from hoomi_protocol.errors import ErrorCode
from storage import audit, hoomis, messages, users
from storage.audit import Actor
from storage.errors import StorageError
from storage.migrate import available, migrate
from storage.records import Member
from storage.writer import BatchWriter
from tests import factories


@pytest.fixture
async def writer(pool: asyncpg.Pool):
    w = BatchWriter(pool)
    w.start()
    yield w
    await w.close()


async def test_migrations_rerun_is_a_no_op(pool):
    async with pool.acquire() as conn:
        before = await conn.fetch("SELECT version, applied_at FROM schema_migrations")
        assert await migrate(conn) == []
        after = await conn.fetch("SELECT version, applied_at FROM schema_migrations")
    assert before == after
    assert [r["version"] for r in after] == [m.version for m in available()]


async def test_concurrent_migrations_apply_each_version_once(pg_template):
    from tests import pg
    admin = await asyncpg.connect(pg_template.dsn)
    name = f"fresh_{uuid4().hex[:8]}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        conns = [await asyncpg.connect(pg.dsn_for(pg_template, name)) for _ in range(3)]
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        for c in conns:
            await c.close()
        assert sorted(applied, key=len) == [[], [], [m.version for m in available()]]
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_seed_indexes_exist_by_name(pool):
    names = {r["indexname"] for r in await pool.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")}
    assert {"idx_messages_hoomi_created", "idx_messages_sender", "idx_messages_created",
            "messages_hoomi_seq_key"} <= names


async def test_deleted_user_leaves_messages_with_null_sender(pool, writer):
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice], [bob])
    ack = await writer.append(factories.request(h, bob))
    left = await users.delete_user(pool, bob, Actor.operator())
    assert left == [h]
    row = await pool.fetchrow("SELECT sender_id, content FROM messages WHERE id = $1", ack.id)
    assert row["sender_id"] is None and row["content"] is not None
    assert await hoomis.member_role(pool, h, bob) is None
    async with pool.acquire() as conn:
        entry, created = await audit.entries(conn)
    assert created["action"] == "hoomi.create"
    assert (entry["action"], entry["actor_kind"], entry["target_id"]) == (
        "user.delete", "operator", bob)


async def test_deleted_hoomi_takes_its_messages_and_is_audited(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    keep = await factories.hoomi(pool, [alice])
    for hid in (h, h, keep):
        await writer.append(factories.request(hid, alice))
    assert await hoomis.delete_hoomi(pool, h, Actor.operator()) == [alice]
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE hoomi_id = $1", h) == 0
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1
    async with pool.acquire() as conn:
        entry, *created = await audit.entries(conn)
    assert [e["action"] for e in created] == ["hoomi.create", "hoomi.create"]
    assert entry["action"] == "hoomi.delete" and entry["hoomi_id"] == h
    assert entry["details"] == {"last_seq": 2, "members": 1}
    with pytest.raises(StorageError) as err:
        await hoomis.delete_hoomi(pool, h, Actor.operator())
    assert err.value.code == ErrorCode.NOT_FOUND


async def test_delete_for_everyone_erases_ciphertext_and_keeps_seq(pool, writer):
    alice, bob, carol = await factories.users(pool, 3)
    h = await factories.hoomi(pool, [alice], [bob, carol])
    ack = await writer.append(factories.request(h, bob))
    with pytest.raises(StorageError) as err:
        await messages.delete_for_everyone(pool, h, ack.id, carol)
    assert err.value.code == ErrorCode.FORBIDDEN
    done = await messages.delete_for_everyone(pool, h, ack.id, bob)
    assert (done.seq, done.changed) == (1, True)
    row = await pool.fetchrow("SELECT * FROM messages WHERE id = $1", ack.id)
    assert (row["content"], row["nonce"], row["session_id"]) == (None, None, None)
    assert row["seq"] == 1 and row["deleted_at"] is not None
    assert row["updated_at"] >= row["created_at"]
    again = await messages.delete_for_everyone(pool, h, ack.id, alice)
    assert again.changed is False
    async with pool.acquire() as conn:
        entries = [e for e in await audit.entries(conn) if e["action"] != "hoomi.create"]
    assert [(e["action"], e["actor_id"], e["details"]["by"]) for e in entries] == [
        ("message.delete", bob, "sender")]


async def test_admin_may_delete_anyones_message_non_member_may_not(pool, writer):
    alice, bob, eve = await factories.users(pool, 3)
    h = await factories.hoomi(pool, [alice], [bob])
    ack = await writer.append(factories.request(h, bob))
    with pytest.raises(StorageError) as err:
        await messages.delete_for_everyone(pool, h, ack.id, eve)
    assert err.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(StorageError) as err:
        await messages.delete_for_everyone(pool, h, uuid4(), alice)
    assert err.value.code == ErrorCode.NOT_FOUND
    assert (await messages.delete_for_everyone(pool, h, ack.id, alice)).changed


async def test_user_hoomis_reports_last_seq_and_role(pool, writer):
    alice, bob = await factories.users(pool, 2)
    h1 = await factories.hoomi(pool, [alice], [bob])
    h2 = await factories.hoomi(pool, [bob])
    for _ in range(3):
        await writer.append(factories.request(h1, alice))
    mine = {s.hoomi_id: (s.last_seq, s.role) for s in await hoomis.user_hoomis(pool, bob)}
    assert mine == {h1: (3, "member"), h2: (0, "admin")}
    assert await hoomis.user_hoomis(pool, uuid4()) == []


async def test_membership_changes_are_audited_and_checked(pool):
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice])
    assert await hoomis.set_member(pool, h, bob, "member", Actor.user(alice)) is None
    assert await hoomis.set_member(pool, h, bob, "admin", Actor.user(alice)) == "member"
    assert await hoomis.members(pool, h) == sorted(
        [Member(alice, "admin"), Member(bob, "admin")])
    await hoomis.remove_member(pool, h, bob, Actor.operator())
    assert await hoomis.member_role(pool, h, bob) is None
    with pytest.raises(StorageError) as err:
        await hoomis.remove_member(pool, h, bob, Actor.operator())
    assert err.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(StorageError) as err:
        await hoomis.set_member(pool, h, uuid4(), "member", Actor.operator())
    assert (err.value.code, err.value.field) == (ErrorCode.NOT_FOUND, "user_id")
    with pytest.raises(StorageError) as err:
        await hoomis.set_member(pool, h, bob, "owner", Actor.operator())
    assert (err.value.code, err.value.field) == (ErrorCode.INVALID, "role")
    async with pool.acquire() as conn:
        actions = [e["action"] for e in await audit.entries(conn)]
    assert actions == ["member.remove", "member.set", "member.set", "hoomi.create"]


async def test_create_hoomi_with_unknown_member_stores_nothing(pool):
    alice, = await factories.users(pool, 1)
    with pytest.raises(StorageError) as err:
        await hoomis.create_hoomi(pool, [Member(alice, "admin"), Member(uuid4(), "member")])
    assert (err.value.code, err.value.field) == (ErrorCode.NOT_FOUND, "members[1].user_id")
    assert await pool.fetchval("SELECT count(*) FROM hoomis") == 0


async def test_create_user_twice_is_refused(pool):
    uid = await users.create_user(pool)
    with pytest.raises(StorageError) as err:
        await users.create_user(pool, uid)
    assert (err.value.code, err.value.field) == (ErrorCode.INVALID, "id")


async def test_retention_purges_only_expired_messages_and_audits(pool, writer):
    from storage.retention import purge_expired

    alice, = await factories.users(pool, 1)
    short = await factories.hoomi(pool, [alice])
    forever = await factories.hoomi(pool, [alice])
    for h in (short, short, short, forever):
        await writer.append(factories.request(h, alice))
    await hoomis.set_retention(pool, short, 3600, Actor.user(alice))
    await pool.execute("UPDATE messages SET created_at = now() - interval '2 hours' "
                       "WHERE seq <= 2")
    assert await purge_expired(pool, batch=1) == 2
    left = await pool.fetch("SELECT hoomi_id, seq FROM messages ORDER BY hoomi_id, seq")
    assert sorted((r["hoomi_id"], r["seq"]) for r in left) == sorted([(short, 3), (forever, 1)])
    async with pool.acquire() as conn:
        purges = [e for e in await audit.entries(conn) if e["action"] == "retention.purge"]
    assert [(e["actor_kind"], e["details"]["count"]) for e in purges] == [("system", 1)] * 2
    page = await messages.history(pool, short, None, 10)
    assert [m.seq for m in page.messages] == [3] and page.next_before is None
    assert await purge_expired(pool) == 0


async def test_retention_beyond_100_years_is_refused_by_storage_and_schema(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    with pytest.raises(StorageError) as err:
        await hoomis.set_retention(pool, h, 10**12, Actor.user(alice))
    assert (err.value.code, err.value.field) == (ErrorCode.INVALID, "retention_seconds")
    await hoomis.set_retention(pool, h, hoomis.MAX_RETENTION_SECONDS, Actor.user(alice))
    assert await hoomis.hoomi_info(pool, h) == (0, 3_153_600_000)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE hoomis SET retention_seconds = $2 WHERE id = $1",
                           h, 3_153_600_001)


async def test_purge_failure_in_one_hoomi_does_not_stop_the_others(pool, writer):
    from storage.retention import purge_expired

    alice, = await factories.users(pool, 1)
    broken, fine = sorted([await factories.hoomi(pool, [alice]) for _ in range(2)])
    for h in (broken, fine):
        await writer.append(factories.request(h, alice))
        await hoomis.set_retention(pool, h, 60, Actor.user(alice))
    await pool.execute("UPDATE messages SET created_at = now() - interval '1 hour'")
    await pool.execute(
        f"""
        CREATE FUNCTION refuse_purge() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.hoomi_id = '{broken}' THEN RAISE EXCEPTION 'cannot purge'; END IF;
            RETURN OLD;
        END $$;
        CREATE TRIGGER refuse_purge BEFORE DELETE ON messages
        FOR EACH ROW EXECUTE FUNCTION refuse_purge();
        """
    )
    assert await purge_expired(pool) == 1
    left = await pool.fetch("SELECT hoomi_id, seq FROM messages")
    assert [(r["hoomi_id"], r["seq"]) for r in left] == [(broken, 1)]


async def test_create_hoomi_is_audited_with_its_members(pool):
    alice, bob = await factories.users(pool, 2)
    h = await hoomis.create_hoomi(pool, [Member(alice, "admin"), Member(bob, "member")])
    h2 = await hoomis.create_hoomi(pool, [Member(alice, "admin")], actor=Actor.user(bob))
    async with pool.acquire() as conn:
        second, first = await audit.entries(conn)
    assert (first["action"], first["actor_kind"], first["actor_id"], first["hoomi_id"],
            first["details"]) == ("hoomi.create", "operator", None, h,
                                  {"members": {str(alice): "admin", str(bob): "member"}})
    assert (second["action"], second["actor_kind"], second["actor_id"], second["hoomi_id"],
            second["details"]) == ("hoomi.create", "user", bob, h2,
                                   {"members": {str(alice): "admin"}})


async def _while_a_join_is_uncommitted(pool, hoomi_id, user_id, deletion):
    """Start `deletion` while another transaction holds an uncommitted membership row,
    then commit that row: the deletion must wait for it and report it."""
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "INSERT INTO hoomi_members (hoomi_id, user_id, role) VALUES ($1, $2, 'member')",
            hoomi_id, user_id)
        deleting = asyncio.ensure_future(deletion)
        await asyncio.sleep(0.2)
        await tx.commit()
    return await deleting


async def test_delete_hoomi_returns_a_member_added_concurrently(pool):
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice])
    former = await _while_a_join_is_uncommitted(
        pool, h, bob, hoomis.delete_hoomi(pool, h, Actor.operator()))
    assert sorted(former) == sorted([alice, bob])


async def test_delete_user_returns_a_hoomi_joined_concurrently(pool):
    alice, bob = await factories.users(pool, 2)
    first = await factories.hoomi(pool, [alice, bob])
    second = await factories.hoomi(pool, [alice])
    left = await _while_a_join_is_uncommitted(
        pool, second, bob, users.delete_user(pool, bob, Actor.operator()))
    assert sorted(left) == sorted([first, second])


async def test_page_limit_below_one_is_invalid(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    for call in (messages.history(pool, h, None, 0), messages.since(pool, h, 0, 0),
                 messages.history(pool, h, None, -1, limit_field="query.limit")):
        with pytest.raises(StorageError) as err:
            await call
        assert err.value.code == ErrorCode.INVALID
        assert err.value.field in ("limit", "query.limit")
    assert (await messages.history(pool, h, None, 1)).messages == []


async def test_not_found_names_the_callers_field(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    cases = [
        (messages.delete_for_everyone(pool, h, uuid4(), alice), "id"),
        (messages.delete_for_everyone(pool, h, uuid4(), alice, field="message_id"),
         "message_id"),
        (hoomis.set_member(pool, uuid4(), alice, "member", Actor.operator()), "hoomi_id"),
        (hoomis.set_member(pool, uuid4(), alice, "member", Actor.operator(), hoomi_field="id"),
         "id"),
        (hoomis.set_member(pool, h, uuid4(), "member", Actor.operator(), user_field="body.user"),
         "body.user"),
        (hoomis.remove_member(pool, h, uuid4(), Actor.operator()), "user_id"),
        (hoomis.set_retention(pool, uuid4(), 60, Actor.operator(), hoomi_field="hoomi_id"),
         "hoomi_id"),
        (hoomis.delete_hoomi(pool, uuid4(), Actor.operator(), field="hoomi_id"), "hoomi_id"),
        (users.delete_user(pool, uuid4(), Actor.operator(), field="user_id"), "user_id"),
    ]
    fields = []
    for call, _ in cases:
        with pytest.raises(StorageError) as err:
            await call
        assert err.value.code == ErrorCode.NOT_FOUND
        fields.append(err.value.field)
    assert fields == [f for _, f in cases]


async def test_user_with_hoomis_tells_a_missing_user_from_one_without_hoomis(pool):
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice])
    assert await hoomis.user_with_hoomis(pool, uuid4()) is None
    assert await hoomis.user_with_hoomis(pool, bob) == []
    assert await hoomis.user_with_hoomis(pool, alice) == await hoomis.user_hoomis(pool, alice)
    assert [s.hoomi_id for s in await hoomis.user_with_hoomis(pool, alice)] == [h]


async def test_pages_for_a_reader_check_membership_in_the_same_query(pool, writer):
    alice, bob, eve = await factories.users(pool, 3)
    h = await factories.hoomi(pool, [alice], [bob])
    empty = await factories.hoomi(pool, [alice])
    for _ in range(5):
        await writer.append(factories.request(h, alice))
    for reader in (alice, bob):
        assert await messages.history(pool, h, 4, 2, reader=reader) == \
            await messages.history(pool, h, 4, 2)
        assert await messages.since(pool, h, 1, 3, reader=reader) == \
            await messages.since(pool, h, 1, 3)
    page = await messages.history(pool, empty, None, 10, reader=alice)
    assert (page.messages, page.next_before) == ([], None)
    assert (await messages.since(pool, empty, 0, 10, reader=alice)).messages == []
    for call in (messages.history(pool, h, None, 10, reader=eve),
                 messages.since(pool, h, 0, 10, reader=eve)):
        with pytest.raises(StorageError) as err:
            await call
        assert err.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(StorageError) as err:
        await messages.history(pool, uuid4(), None, 10, reader=alice, hoomi_field="id")
    assert (err.value.code, err.value.field) == (ErrorCode.NOT_FOUND, "id")
