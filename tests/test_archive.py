"""The message archive (storage/archive.py, SPEC §7.1): old content moves to segment
objects in file:// and in a real S3 server (SeaweedFS, server/testing/s3.py); every read returns it
byte for byte; a SIGKILL at any step of `hoomi archive` loses nothing; deletion and
retention erase it from the store's bytes; a store that is down gives `unavailable`."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import asyncpg
import httpx
import pytest

from hoomi_protocol import Ack
from hoomi_protocol.errors import ErrorCode
from server.testing.s3 import SeaweedS3
from storage import archive, messages, retention
from storage.archive import Archive, Entry, SegmentError, decode, encode
from storage.errors import StorageError
from storage.writer import BatchWriter
from tests import factories
from tests.wsclient import joined, own_replica, send
from tests.wsclient import messages as pushed


@pytest.fixture
async def writer(pool: asyncpg.Pool):
    w = BatchWriter(pool)
    w.start()
    yield w
    await w.close()


async def _fill(pool: asyncpg.Pool, writer: BatchWriter, per_hoomi: int = 23,
                hoomis: int = 2) -> tuple[UUID, list[UUID]]:
    (user,) = await factories.users(pool, 1)
    ids = [await factories.hoomi(pool, [user]) for _ in range(hoomis)]
    rnd = random.Random(9)
    for h in ids:
        for _ in range(per_hoomi):  # one by one: ids (UUIDv7) and seqs in the same order
            await writer.append(factories.request(h, user, size=rnd.randint(16, 600)))
    return user, ids


async def _everything(pool: asyncpg.Pool, user: UUID, hoomis: list[UUID]) -> list[object]:
    """Every read path's answer: history and sync pages (plain, for a reader, byte
    bounded), gap fills, hello's catch-up, single messages."""
    out: list[object] = []
    for h in hoomis:
        out.append(await messages.history(pool, h, None, 100))
        out.append(await messages.history(pool, h, 15, 5, reader=user))
        out.append(await messages.history(pool, h, None, 100, max_bytes=2000))
        out.append(await messages.since(pool, h, 0, 100, reader=user))
        out.append(await messages.since(pool, h, 3, 100, reader=user, max_bytes=1500))
        out.append(await messages.between(pool, h, 2, 20))
        page = await messages.history(pool, h, None, 100)
        out.append([await messages.get(pool, h, m.id) for m in page.messages])
    out.append(await messages.since_each(pool, {h: 1 for h in hoomis}, 50))
    return out


def _store_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


# -- the format ------------------------------------------------------------------------------

def test_segment_round_trip_and_every_corruption_is_refused():
    h = UUID(int=7)
    entries = [Entry(3, UUID(int=1), b"n" * 12, b""), Entry(9, UUID(int=2), b"m" * 12, b"x" * 70)]
    blob = encode(h, 2, 10, entries)
    seg = decode(blob)
    assert (seg.hoomi_id, seg.first_seq, seg.last_seq) == (h, 2, 10)
    assert list(seg.entries.values()) == entries
    import hashlib
    decode(blob, hashlib.sha256(blob).hexdigest())
    with pytest.raises(SegmentError):
        decode(blob, "0" * 64)
    for i in (0, 20, 60, len(blob) - 40, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 1
        with pytest.raises(SegmentError):
            decode(bytes(bad))
    with pytest.raises(SegmentError):
        decode(blob[:-5])


# -- reads ----------------------------------------------------------------------------------

async def _archive_and_compare(pool, writer, url: str) -> tuple[UUID, list[UUID], Archive]:
    user, hoomis = await _fill(pool, writer)
    before = await _everything(pool, user, hoomis)
    arc = Archive(url, cache_bytes=1 << 20)
    archive.configure(arc)
    try:
        result = await archive.run_pass(pool, arc, 0, max_messages=7)
        assert (result.messages, result.busy) == (46, False)
        assert result.segments == 8  # 23 = 7 + 7 + 7 + 2 per Hoomi
        assert await pool.fetchval("SELECT count(*) FROM messages WHERE content IS NOT NULL "
                                   "OR nonce IS NOT NULL") == 0
        assert [r["archived_upto"] for r in await pool.fetch(
            "SELECT archived_upto FROM hoomis WHERE id = ANY($1) ORDER BY id", hoomis)] \
            == [23, 23]
        arc.cache.clear()
        assert await _everything(pool, user, hoomis) == before  # cold
        assert await _everything(pool, user, hoomis) == before  # cached
        assert arc.cache.bytes <= 1 << 20
        # A second pass has nothing to do.
        assert (await archive.run_pass(pool, arc, 0)).messages == 0
    except BaseException:
        archive.configure(None)
        raise
    return user, hoomis, arc


async def test_archived_messages_read_back_byte_for_byte_from_files(pool, writer, tmp_path):
    try:
        await _archive_and_compare(pool, writer, f"file://{tmp_path}")
        assert len(list(tmp_path.rglob("*.seg"))) == 8
    finally:
        archive.configure(None)


async def test_archived_messages_read_back_byte_for_byte_from_s3(pool, writer, s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    try:
        await _archive_and_compare(pool, writer, s3.url(s3.create_bucket(), "archive"))
    finally:
        archive.configure(None)


async def test_a_store_that_is_down_gives_unavailable_never_wrong_data(pool, writer,
                                                                       monkeypatch):
    own = SeaweedS3()
    own.start()
    try:
        for k, v in own.env().items():
            monkeypatch.setenv(k, v)
        user, hoomis, arc = await _archive_and_compare(pool, writer,
                                                       own.url(own.create_bucket()))
        own.stop()
        arc.cache.clear()
        with pytest.raises(StorageError) as err:
            await messages.history(pool, hoomis[0], None, 10, reader=user)
        assert err.value.code == ErrorCode.UNAVAILABLE
        with pytest.raises(StorageError) as err:
            await messages.since_each(pool, {hoomis[1]: 0}, 10)
        assert err.value.code == ErrorCode.UNAVAILABLE
    finally:
        archive.configure(None)
        own.close()


async def test_without_an_archive_configured_archived_rows_are_unavailable(pool, writer,
                                                                           tmp_path):
    user, hoomis = await _fill(pool, writer, per_hoomi=3, hoomis=1)
    await archive.run_pass(pool, Archive(f"file://{tmp_path}"), 0)
    with pytest.raises(StorageError) as err:
        await messages.history(pool, hoomis[0], None, 10)
    assert err.value.code == ErrorCode.UNAVAILABLE


async def test_one_pass_at_a_time(pool, tmp_path):
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", archive._LOCK_KEY)
        try:
            assert (await archive.run_pass(pool, Archive(f"file://{tmp_path}"), 0)).busy
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", archive._LOCK_KEY)


# -- erasure ---------------------------------------------------------------------------------

async def _erasure(pool, writer, url: str, gone) -> None:
    user, hoomis = await _fill(pool, writer, per_hoomi=12, hoomis=1)
    h = hoomis[0]
    arc = Archive(url)
    archive.configure(arc)
    await archive.run_pass(pool, arc, 0, max_messages=5)
    page = (await messages.history(pool, h, None, 100)).messages  # newest first
    victim = page[3]  # seq 9: in the segment 6..10
    await messages.delete_for_everyone(pool, h, victim.id, user)
    assert await pool.fetchval("SELECT count(*) FROM message_segments WHERE erase_pending") == 1
    result = await archive.run_pass(pool, arc, None)
    assert result.rewritten == 1
    assert await gone(victim.content)
    after = (await messages.history(pool, h, None, 100)).messages
    assert [m.content for m in after if m.seq != victim.seq] == \
        [m.content for m in page if m.seq != victim.seq]
    assert next(m for m in after if m.seq == victim.seq).deleted_at is not None
    # Retention: everything goes; every segment and its bytes with it.
    await pool.execute("UPDATE messages SET created_at = now() - interval '2 days' "
                       "WHERE hoomi_id = $1", h)
    await pool.execute("UPDATE hoomis SET retention_seconds = 86400 WHERE id = $1", h)
    assert await retention.purge_expired(pool) == 12
    await archive.run_pass(pool, arc, None)
    assert await pool.fetchval("SELECT count(*) FROM message_segments") == 0
    for m in page:
        if m.content:
            assert await gone(m.content)


async def test_deleted_and_purged_archived_content_leaves_the_files(pool, writer, tmp_path):
    async def gone(needle: bytes) -> bool:
        return needle not in _store_bytes(tmp_path)
    try:
        await _erasure(pool, writer, f"file://{tmp_path}", gone)
    finally:
        archive.configure(None)


async def test_deleted_and_purged_archived_content_leaves_seaweedfs(pool, writer, s3,
                                                                    monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)

    async def gone(needle: bytes) -> bool:
        return await asyncio.to_thread(s3.wait_gone, needle)
    try:
        await _erasure(pool, writer, s3.url(s3.create_bucket()), gone)
    finally:
        archive.configure(None)


# -- crash safety: a real SIGKILL of `hoomi archive` at every step ----------------------------

def _hoomi_archive(dsn: str, url: str, kill_at: str | None,
                   *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOMI_")}
    env.update(DATABASE_URL=dsn, HOOMI_ARCHIVE_URL=url, HOOMI_LOG_LEVEL="warning",
               HOOMI_JWT_SECRET="x" * 32, HOOMI_ADMIN_TOKEN="y" * 32,
               HOOMI_TEST_SESSION=os.environ.get("HOOMI_TEST_SESSION", ""))
    if kill_at:
        env["HOOMI_ARCHIVE_KILL_AT"] = kill_at
    hoomi = Path(sys.executable).parent / "hoomi"
    return subprocess.run([str(hoomi), "archive", *(args or ("--older-than", "0"))],
                          env=env, capture_output=True, text=True, timeout=120)


async def test_sigkill_at_every_step_loses_nothing_and_a_rerun_completes(
        pool, writer, dsn, tmp_path):
    user, hoomis = await _fill(pool, writer, per_hoomi=10, hoomis=3)
    before = await _everything(pool, user, hoomis)
    url = f"file://{tmp_path}"
    arc = Archive(url)
    archive.configure(arc)
    try:
        for step, orphans, segments in (("recorded", 1, 0), ("written", 1, 0),
                                        ("verified", 1, 0), ("committed", 0, 1)):
            run = _hoomi_archive(dsn, url, step)
            assert run.returncode == -signal.SIGKILL, (step, run.stderr)
            arc.cache.clear()
            assert await _everything(pool, user, hoomis) == before, step
            # A kill before the commit leaves an object the database knows as an orphan
            # (the next pass deletes it first); after it, one segment and no orphan.
            assert await pool.fetchval("SELECT count(*) FROM archive_orphans") == orphans
            assert await pool.fetchval("SELECT count(*) FROM message_segments") == segments
        run = _hoomi_archive(dsn, url, None)
        assert run.returncode == 0, run.stderr
        assert "archived 20 messages in 2 segments" in run.stdout
        assert "archived 20/20 messages" in run.stderr  # the progress line
        arc.cache.clear()
        assert await _everything(pool, user, hoomis) == before
        assert await pool.fetchval("SELECT count(*) FROM archive_orphans") == 0
        keys = {r["object_key"] for r in await pool.fetch(
            "SELECT object_key FROM message_segments")}
        on_disk = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.seg")}
        assert on_disk == keys and len(keys) == 3
    finally:
        archive.configure(None)


async def test_sigkill_during_a_rewrite_loses_nothing(pool, writer, dsn, tmp_path):
    user, hoomis = await _fill(pool, writer, per_hoomi=6, hoomis=1)
    url = f"file://{tmp_path}"
    arc = Archive(url)
    archive.configure(arc)
    try:
        assert _hoomi_archive(dsn, url, None).returncode == 0
        page = (await messages.history(pool, hoomis[0], None, 100)).messages
        await messages.delete_for_everyone(pool, hoomis[0], page[2].id, user)
        expected = await _everything(pool, user, hoomis)
        for step in ("rewritten", "swapped"):
            assert _hoomi_archive(dsn, url, step).returncode == -signal.SIGKILL
            arc.cache.clear()
            assert await _everything(pool, user, hoomis) == expected, step
        assert _hoomi_archive(dsn, url, None).returncode == 0
        assert page[2].content not in _store_bytes(tmp_path)
        assert len(list(tmp_path.rglob("*.seg"))) == 1
        arc.cache.clear()
        assert await _everything(pool, user, hoomis) == expected
    finally:
        archive.configure(None)


# -- a real replica: the background pass, every read path, erasure, metrics -----------------

async def test_a_replica_archives_in_the_background_and_serves_it_all_byte_for_byte(
        dsn, tmp_path):
    # A process: HOOMI_ARCHIVE_URL sets the archive reader for the whole process.
    async with own_replica(dsn, None, "archive", process=True,
                           HOOMI_ARCHIVE_URL=f"file://{tmp_path}",
                           HOOMI_ARCHIVE_AFTER_S="0", HOOMI_ARCHIVE_INTERVAL_S="1") as (
            replica, admin):
        alice, bob = await admin.user(), await admin.user()
        a_tok, b_tok = await admin.token(alice), await admin.token(bob)
        h = await admin.hoomi([alice], [bob])
        peer, _ = await joined(replica.ws, a_tok)
        frames = [send(h, ref=i, body=os.urandom(40 + i)) for i in range(8)]
        for f in frames:
            await peer.send(f)
        acks = {}
        while len(acks) < 8:
            got = await peer.recv()
            if isinstance(got, Ack):
                acks[got.ref] = got
        deadline = time.monotonic() + 30
        while (await admin.http.get(f"/v1/admin/hoomis/{h}")).json()["archived_upto"] != 8:
            assert time.monotonic() < deadline, "not archived within 30 s"
            await asyncio.sleep(0.2)
        assert await _count(dsn, "SELECT count(*) FROM messages WHERE content IS NULL") == 8
        auth = {"Authorization": f"Bearer {b_tok}"}
        async with httpx.AsyncClient(base_url=replica.http, timeout=10) as http:
            body = (await http.get(f"/v1/hoomis/{h}/messages?limit=50", headers=auth)).json()
            assert [base64.b64decode(m["content"]) for m in reversed(body["messages"])] == \
                [f.content for f in frames]
            assert [base64.b64decode(m["nonce"]) for m in reversed(body["messages"])] == \
                [f.nonce for f in frames]
            # Resume at hello: the catch-up comes from the segments too.
            pb, _ = await joined(replica.ws, b_tok, resume={h: 2})
            got = await pushed(pb, 6)
            assert [m.content for m in got] == [f.content for f in frames[2:]]
            await pb.close()
            text = (await http.get("/metrics")).text
            assert "hoomi_archived_messages_total 8.0" in text
            assert "hoomi_archive_read_seconds_count" in text
            # Deletion for everyone reaches the segment file within a tick or two.
            victim = frames[4]
            r = await http.delete(f"/v1/hoomis/{h}/messages/{acks[4].id}",
                                  headers={"Authorization": f"Bearer {a_tok}"})
            assert r.status_code == 204
            deadline = time.monotonic() + 30
            while victim.content in _store_bytes(tmp_path):
                assert time.monotonic() < deadline, "erased content still in the archive"
                await asyncio.sleep(0.2)
            body = (await http.get(f"/v1/hoomis/{h}/messages?limit=50", headers=auth)).json()
            assert [base64.b64decode(m["content"]) if m.get("content") else None
                    for m in reversed(body["messages"])] == \
                [f.content if i != 4 else None for i, f in enumerate(frames)]
        await peer.close()


async def _count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_a_deleted_hoomis_segments_leave_the_store(pool, writer, tmp_path):
    from storage.audit import Actor
    from storage.hoomis import delete_hoomi

    user, hoomis = await _fill(pool, writer, per_hoomi=9, hoomis=2)
    kept = (await messages.history(pool, hoomis[1], None, 100)).messages
    arc = Archive(f"file://{tmp_path}")
    await archive.run_pass(pool, arc, 0, max_messages=4)
    assert len(list(tmp_path.rglob("*.seg"))) == 6
    await delete_hoomi(pool, hoomis[0], Actor.system())
    # ON DELETE CASCADE took the segment rows; the trigger left their keys as orphans.
    assert await pool.fetchval("SELECT count(*) FROM archive_orphans") == 3
    assert (await archive.run_pass(pool, arc, None)).orphans_deleted == 3
    assert sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.seg")) == \
        ["00000000000000000001", "00000000000000000005", "00000000000000000009"]
    assert all(p.parent.name == str(hoomis[1]) for p in tmp_path.rglob("*.seg"))
    archive.configure(arc)
    try:
        assert (await messages.history(pool, hoomis[1], None, 100)).messages == kept
    finally:
        archive.configure(None)


async def test_after_restoring_an_older_backup_check_repoints_rewritten_segments(
        dsn, tmp_path):
    """Erasure wins over backups: a segment rewritten (a message deleted) after the backup
    is read from its newest object after the restore, and `archive.check` (hoomi archive
    --check) points the row there and makes the erased message a tombstone."""
    from storage import backup
    from storage.db import create_pool

    store = tmp_path / "archive"
    pool = await create_pool(dsn, min_size=1, max_size=4)
    w = BatchWriter(pool)
    w.start()
    user, (h,) = await _fill(pool, w, per_hoomi=10, hoomis=1)
    await w.close()
    arc = Archive(f"file://{store}")
    archive.configure(arc)
    try:
        await archive.run_pass(pool, arc, 0, max_messages=5)
        page = (await messages.history(pool, h, None, 100)).messages  # seqs 10 .. 1
        await asyncio.to_thread(backup.dump, dsn, tmp_path / "before.dump")
        victim = page[2]  # seq 8, in the segment 6..10
        await messages.delete_for_everyone(pool, h, victim.id, user)
        assert (await archive.run_pass(pool, arc, None)).rewritten == 1
        await pool.close()
        await asyncio.to_thread(backup.restore, dsn, tmp_path / "before.dump")
        pool = await create_pool(dsn, min_size=1, max_size=4)
        arc.cache.clear()
        # The restored row names the old object, gone: the newest one of its range
        # serves the rest; the erased message cannot be served (unavailable, not wrong).
        assert (await messages.history(pool, h, 8, 100)).messages == page[3:]
        with pytest.raises(StorageError) as err:
            await messages.history(pool, h, None, 100)
        assert err.value.code == ErrorCode.UNAVAILABLE
        result = await archive.check(pool, arc)
        assert (result.segments, result.missing, result.repaired, result.tombstoned,
                result.lost) == (2, 1, 1, 1, 0)
        after = (await messages.history(pool, h, None, 100)).messages
        assert [m for m in after if m.seq != 8] == [m for m in page if m.seq != 8]
        assert next(m for m in after if m.seq == 8).deleted_at is not None
        assert victim.content not in _store_bytes(store)
        assert await pool.fetchval("SELECT count(*) FROM audit_log "
                                   "WHERE action = 'archive.erased_since_backup'") == 1
        run = _hoomi_archive(dsn, f"file://{store}", None, "--check")
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("2 segments: 0 missing"), run.stdout
    finally:
        archive.configure(None)
        await pool.close()


async def test_a_segment_that_cannot_be_rewritten_does_not_hold_back_the_others(
        pool, writer, tmp_path):
    user, hoomis = await _fill(pool, writer, per_hoomi=4, hoomis=2)
    arc = Archive(f"file://{tmp_path}")
    archive.configure(arc)
    try:
        await archive.run_pass(pool, arc, 0)
        victims = [(await messages.history(pool, h, None, 10)).messages[1] for h in hoomis]
        for h, v in zip(hoomis, victims, strict=True):
            await messages.delete_for_everyone(pool, h, v.id, user)
        (broken,) = (tmp_path / str(hoomis[0])).glob("*.seg")
        broken.unlink()  # as if lost: its rewrite fails every time
        assert (await archive.run_pass(pool, arc, None)).rewritten == 1
        assert victims[1].content not in _store_bytes(tmp_path)
        assert await pool.fetchval("SELECT count(*) FROM message_segments "
                                   "WHERE erase_pending") == 1
    finally:
        archive.configure(None)


async def test_an_install_upgraded_from_before_0004_gets_the_archive_column(pg_template):
    """0005 applied while 0004's copy is still pending (every migration is applied before
    `hoomi migrate` moves the rows): the partitioned table, which becomes `messages` at
    the swap, must get content_len and the new CHECK too, not only the old table."""
    from storage.migrate import MigrationPending, migrate
    from tests.old_install import old_install
    from tests.pg import scratch

    async with scratch(pg_template, target=3) as conn:
        await old_install(conn, 3000)
        with pytest.raises(MigrationPending):
            await migrate(conn, target=5)
        await migrate(conn, copy=True, target=5)
        assert await conn.fetchval("SELECT to_regclass('messages_partitioned')") is None
        seq = await conn.fetchval("SELECT min(seq) FROM messages WHERE deleted_at IS NULL")
        await conn.execute("UPDATE messages SET content_len = octet_length(content), "
                           "content = NULL, nonce = NULL WHERE seq = $1 "
                           "AND deleted_at IS NULL", seq)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE messages SET content_len = 1 WHERE content IS NOT NULL")


async def test_every_replica_drops_cached_segments_an_erasure_replaced(pool, writer, tmp_path):
    user, (h,) = await _fill(pool, writer, per_hoomi=5, hoomis=1)
    writer_side, reader_side = Archive(f"file://{tmp_path}"), Archive(f"file://{tmp_path}")
    await archive.run_pass(pool, writer_side, 0)
    archive.configure(reader_side)  # another replica's reads: its own cache
    try:
        page = (await messages.history(pool, h, None, 10)).messages
        assert len(reader_side.cache.keys()) == 1
        await messages.delete_for_everyone(pool, h, page[0].id, user)
        await archive.run_pass(pool, writer_side, None)
        assert await archive.prune_cache(pool, reader_side) == 1
        assert reader_side.cache.keys() == [] and reader_side.cache.bytes == 0
    finally:
        archive.configure(None)
