"""Backup and restore through the CLI, on a real database with a real hub and clients:
what a restore keeps, what it refuses, and that clients carry on after it."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import uuid4

import asyncpg

from hoomi_client.keys import generate_key_file
from hoomi_client.sdk import HoomiClient
from server.testing.replica import ADMIN_TOKEN, JWT_SECRET, ROOT, Replica
from tests.wsclient import Admin


def hoomi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


async def test_restore_brings_back_the_backup_and_clients_carry_on(dsn, tmp_path):
    env = {**os.environ, "DATABASE_URL": dsn, "HOOMI_JWT_SECRET": JWT_SECRET,
           "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN}
    env.pop("REDIS_URL", None)
    hub = Replica(dsn, None, name="bk").start()
    admin = Admin(hub.http)
    alice, bob = await admin.user(), await admin.user()
    h = await admin.hoomi([alice], [bob])
    ring = generate_key_file(tmp_path / "keys.json", [h])
    a = HoomiClient(hub.ws, await admin.token(alice), keyring=ring, backoff_max=0.5)
    b = HoomiClient(hub.ws, await admin.token(bob), keyring=ring, backoff_max=0.5)
    await a.start()
    await b.start()
    try:
        for i in range(5):
            await a.send_text(h, f"kept {i}".encode())
        backup = tmp_path / "hoomi.dump"
        done = hoomi("backup", str(backup), env=env)  # online: the hub keeps running
        assert done.returncode == 0, done.stderr
        assert backup.is_file() and "tables" in done.stdout
        again = hoomi("backup", str(backup), env=env)
        assert again.returncode != 0 and "exists" in again.stderr
        for i in range(3):
            await a.send_text(h, f"lost {i}".encode())
        got = [b.open(await b.next_event(10)).plaintext for _ in range(8)]
        assert got[-1] == b"lost 2" and b.state.last_seq[h] == 8

        refused = hoomi("restore", str(backup), "--yes", env=env)
        assert refused.returncode != 0 and "stop every replica" in refused.stderr
        unconfirmed = hoomi("restore", str(backup), env=env)
        assert unconfirmed.returncode != 0 and "--yes" in unconfirmed.stderr

        hub.stop()
        restored = hoomi("restore", str(backup), "--yes", env=env)
        assert restored.returncode == 0, restored.stderr
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT seq FROM messages WHERE hoomi_id = $1 ORDER BY seq",
                                    h)
            assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
            assert await conn.fetchval("SELECT last_seq FROM hoomis WHERE id = $1", h) == 5
        finally:
            await conn.close()

        hub.start()  # same port: both clients come back on their own
        ack = await a.send_text(h, b"after the restore")
        assert ack.seq == 6  # seq 6 is used again
        # Bob had seen up to 8; he follows the hub down and still gets the new message.
        event = await b.next_event(20)
        assert b.open(event).plaintext == b"after the restore" and event.seq == 6
        history = [b.open(m).plaintext for page in [p async for p in b.scroll(h)] for m in page]
        assert history == [b"after the restore"] + [f"kept {i}".encode() for i in range(5)][::-1]
    finally:
        await a.close()
        await b.close()
        await admin.close()
        hub.stop()


def test_backup_and_restore_in_embedded_mode(tmp_path: Path):
    env = {**os.environ, "HOOMI_DATA_DIR": str(tmp_path / "data")}
    env.pop("DATABASE_URL", None)
    backup = tmp_path / "embedded.dump"
    assert hoomi("migrate", env=env).returncode == 0
    done = hoomi("backup", str(backup), env=env)
    assert done.returncode == 0, done.stderr
    listing = subprocess.run(
        [str(_pg_restore()), "--list", str(backup)], capture_output=True, text=True)
    assert "TABLE DATA public messages" in listing.stdout
    restored = hoomi("restore", str(backup), "--yes", env=env)
    assert restored.returncode == 0, restored.stderr
    missing = hoomi("restore", str(tmp_path / "nope.dump"), "--yes", env=env)
    assert missing.returncode != 0 and "no such backup file" in missing.stderr
    # The same with a destination URL: one line naming what went wrong, no traceback.
    url = f"file://{tmp_path / 'dir'}"
    assert hoomi("backup", url, env=env).returncode == 0
    restored = hoomi("restore", url, "--yes", env=env)
    assert restored.returncode == 0 and "sha256 checked" in restored.stdout, restored.stderr
    for args, error in ((("backup", "file:///proc/hoomi-nope"), "cannot make /proc/hoomi-nope"),
                        (("restore", f"file://{tmp_path}/empty", "--yes"),
                         "no verified backup there")):
        failed = hoomi(*args, env=env)
        assert failed.returncode == 1 and error in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr


def _pg_restore() -> Path:
    from storage.backup import pg_tool
    return pg_tool("pg_restore")


def test_split_password_takes_it_out_of_either_place_in_the_uri():
    from storage.backup import split_password
    assert split_password("postgresql://hub:p%40ss%3Aw@db.example:5432/hoomi?sslmode=require") \
        == ("postgresql://hub@db.example:5432/hoomi?sslmode=require", "p@ss:w")
    assert split_password("postgres://hub@/hoomi?host=/run/pg&password=pw") \
        == ("postgres://hub@/hoomi?host=%2Frun%2Fpg", "pw")
    assert split_password("postgresql://postgres:@/postgres?host=/tmp/x") \
        == ("postgresql://postgres@/postgres?host=%2Ftmp%2Fx", None)
    assert split_password("host=db user=hub") == ("host=db user=hub", None)


def _watch_pg_dump(marker: str, done: threading.Event, seen: list[tuple[bytes, bytes, int]]
                   ) -> None:
    """Poll /proc for the real pg_dump child writing `marker` until `done`: its argv, its
    environment and the mode of the file it writes, as any local user would look."""
    while not done.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"pg_dump" not in cmdline.split(b"\0")[0] or marker.encode() not in cmdline:
                    continue
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                mode = os.stat(marker).st_mode & 0o777
            except OSError:
                continue  # gone meanwhile
            seen.append((cmdline, environ, mode))


async def test_backup_keeps_the_password_off_the_command_line_and_the_file_private(
        dsn, pool, tmp_path: Path):
    from storage.backup import dump
    secret = "pw-" + uuid4().hex
    role = "backup_" + uuid4().hex[:8]
    await pool.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{secret}'")
    try:
        # Enough rows that pg_dump runs for a moment while /proc is watched.
        await pool.execute(
            "INSERT INTO audit_log (actor_kind, action, details) "
            "SELECT 'system', 'filler', jsonb_build_object('pad', repeat(md5(i::text), 30)) "
            "FROM generate_series(1, 20000) i")
        parts = urlsplit(dsn)
        with_password = urlunsplit(parts._replace(
            netloc=f"{role}:{quote(secret)}@{parts.netloc.rpartition('@')[2]}"))
        backup = tmp_path / "private.dump"
        partial = str(backup) + ".partial"
        done = threading.Event()
        seen: list[tuple[bytes, bytes, int]] = []
        watcher = threading.Thread(target=_watch_pg_dump, args=(partial, done, seen))
        watcher.start()
        try:
            info = await asyncio.to_thread(dump, with_password, backup)
        finally:
            done.set()
            watcher.join()
    finally:
        await pool.execute(f"DROP ROLE {role}")
    assert seen, "pg_dump was never seen running"
    for cmdline, environ, mode in seen:
        assert secret.encode() not in cmdline
        assert role.encode() in cmdline  # the DSN it got is ours, minus the password
        assert f"PGPASSWORD={secret}".encode() in environ.split(b"\0")
        assert mode == 0o600  # the .partial, while pg_dump writes it
    assert info.tables > 0
    assert backup.stat().st_mode & 0o777 == 0o600
    assert not Path(partial).exists()


# -- backups to a destination URL (storage/backup_store.py) ----------------------------------

# Messages of the current schema: 3 Hoomis, tombstones, contents from 16 B to 4 KiB.
_FILL = """
WITH h AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM hoomis),
     g AS (SELECT i FROM generate_series($1::int, $2::int) i)
INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, content, nonce,
                      session_id, created_at, deleted_at)
SELECT uuidv7(), h.id, (SELECT coalesce(max(seq), 0) FROM messages m WHERE m.hoomi_id = h.id)
                       + g.i, $3::uuid, gen_random_uuid(),
       CASE WHEN g.i % 50 = 0 THEN NULL
            ELSE decode(repeat(md5(g.i::text || random()::text), 1 + g.i % 128), 'hex') END,
       CASE WHEN g.i % 50 = 0 THEN NULL
            ELSE decode(substr(md5(random()::text), 1, 24), 'hex') END,
       CASE WHEN g.i % 50 = 0 THEN NULL ELSE 's' || (g.i % 7) END,
       now() - make_interval(secs => $2 - g.i), CASE WHEN g.i % 50 = 0 THEN now() END
FROM g CROSS JOIN h
"""


async def fill(conn: asyncpg.Connection, per_hoomi: int, hoomis: int = 3) -> None:
    """`per_hoomi` more messages in each of the database's Hoomis (made if none)."""
    sender = await conn.fetchval("SELECT id FROM users LIMIT 1")
    if sender is None:
        sender = await conn.fetchval("INSERT INTO users (id) VALUES (gen_random_uuid()) "
                                     "RETURNING id")
        await conn.execute("INSERT INTO hoomis (id) SELECT gen_random_uuid() "
                           "FROM generate_series(1, $1)", hoomis)
    await conn.execute(_FILL, 1, per_hoomi, sender)
    await conn.execute("UPDATE hoomis SET last_seq = (SELECT coalesce(max(seq), 0) "
                       "FROM messages WHERE hoomi_id = hoomis.id)")


async def fill_db(dsn: str, per_hoomi: int) -> None:
    conn = await asyncpg.connect(dsn)  # not a hub's (a restore refuses while one is open)
    try:
        await fill(conn, per_hoomi)
    finally:
        await conn.close()


async def all_messages(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM messages ORDER BY hoomi_id, seq")
    finally:
        await conn.close()


async def backup_url(dsn: str, url: str, keep: int):
    from storage.backup_store import backup_once

    conn = await asyncpg.connect(dsn)
    try:
        return await backup_once(conn, dsn, url, keep)
    finally:
        await conn.close()


async def test_backups_in_a_directory_are_verified_private_and_the_newest_kept(
        dsn, tmp_path: Path):
    from storage.backup import BackupError
    from storage.backup_store import DirDestination, Manifest, file_digest, restore_from
    from storage.migrate import available

    root = tmp_path / "backups"
    url = f"file://{root}"
    await fill_db(dsn, 100)
    # Left by an interrupted backup: no manifest, so never counted, and pruned once a
    # newer backup is verified.
    root.mkdir(mode=0o700)
    orphan = root / "hoomi-20200101T000000000Z.dump"
    orphan.write_bytes(b"half a dump")
    outcomes = []
    for i in range(3):
        if i:
            await fill_db(dsn, 10)
        outcomes.append(await backup_url(dsn, url, keep=2))
    made = [o.made for o in outcomes]
    assert made[0].name < made[1].name < made[2].name
    assert outcomes[0].pruned == [orphan.name] and outcomes[2].pruned == [made[0].name]
    kept = sorted(p.name for p in root.iterdir())
    assert kept == sorted(n + s for n in (made[1].name, made[2].name) for s in ("", ".json"))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for p in root.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p  # never world-readable
    newest = Manifest.from_json((root / (made[2].name + ".json")).read_bytes())
    assert newest == made[2]
    assert (newest.size, newest.sha256) == file_digest(root / newest.name)
    shipped = tuple(m.version for m in available())
    assert newest.migrations == shipped and newest.schema_version == shipped[-1]
    assert newest.pg_dump_version.startswith("pg_dump (PostgreSQL) ") and newest.tables > 5
    expected = await all_messages(dsn)  # as of the newest backup: 100 + 2 x 10 per Hoomi
    assert len(expected) == 3 * 120

    # A newer dump without a manifest (an upload cut off) is not what a restore takes.
    (root / "hoomi-29991231T235959999Z.dump").write_bytes(b"not verified")
    await fill_db(dsn, 5)
    tables, manifest = await asyncio.to_thread(restore_from, url, dsn)
    assert manifest == newest and tables == newest.tables
    assert await all_messages(dsn) == expected

    # A named older backup restores that one.
    await asyncio.to_thread(restore_from, f"{url}/{made[1].name}", dsn)
    assert len(await all_messages(dsn)) == 3 * 110

    # Bytes that differ from the manifest are refused before anything is replaced.
    damaged = bytearray((root / newest.name).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (root / newest.name).write_bytes(bytes(damaged))
    try:
        await asyncio.to_thread(restore_from, url, dsn)
    except BackupError as err:
        assert "does not match its manifest" in str(err)
    else:
        raise AssertionError("a damaged backup was restored")
    assert len(await all_messages(dsn)) == 3 * 110
    assert DirDestination(url, root).names()  # nothing was pruned by a restore


async def test_restore_of_the_newest_backup_from_s3_into_a_fresh_database(
        dsn, pg_template, s3, tmp_path: Path, monkeypatch):
    import obstore
    from obstore.store import S3Store

    from storage.backup_store import Manifest
    from tests import pg

    bucket = s3.create_bucket()
    url = s3.url(bucket, "hub/backups")
    env = {**os.environ, **s3.env(), "DATABASE_URL": dsn, "HOOMI_JWT_SECRET": JWT_SECRET,
           "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN, "HOOMI_BACKUP_KEEP": "2"}
    await fill_db(dsn, 200)
    conn = await asyncpg.connect(dsn)
    try:  # 6.4 MB that does not compress: the dump goes up in several parts
        await conn.execute(
            "UPDATE messages SET content = (SELECT decode(string_agg(md5(random()::text "
            "|| g::text), ''), 'hex') FROM generate_series(1, 1000) g "
            "WHERE messages.id IS NOT NULL) WHERE seq <= 133 AND deleted_at IS NULL")
    finally:
        await conn.close()
    first = hoomi("backup", url, env=env)
    assert first.returncode == 0, first.stderr
    await fill_db(dsn, 20)
    second = hoomi("backup", url, env=env)
    assert second.returncode == 0, second.stderr
    expected = await all_messages(dsn)
    assert len(expected) == 3 * 220
    await fill_db(dsn, 7)  # after the newest backup: not in the restore

    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    store = S3Store(bucket, prefix="hub/backups")
    names = sorted(o["path"] for o in obstore.list_with_delimiter(store)["objects"])
    assert len(names) == 4 and all(n.startswith("hoomi-") for n in names)
    newest = Manifest.from_json(bytes(obstore.get(store, names[-1]).bytes()))
    assert newest.name == names[-2] and newest.name in second.stdout
    assert newest.size > 6_000_000 and newest.sha256 in second.stdout
    # A newer dump without a manifest (an upload cut off) is never the one restored.
    obstore.put(store, "hoomi-29991231T235959999Z.dump", b"not verified")

    fresh = "restore_" + uuid4().hex[:8]
    await pg._admin(pg_template, f"CREATE DATABASE {fresh}")  # empty: no schema at all
    fresh_dsn = pg.dsn_for(pg_template, fresh)
    try:
        restored = hoomi("restore", url, "--yes", env={**env, "DATABASE_URL": fresh_dsn})
        assert restored.returncode == 0, restored.stderr
        assert newest.name in restored.stdout and "sha256 checked" in restored.stdout
        got = await all_messages(fresh_dsn)
        assert got == expected  # every message, every column, byte for byte

        # Bytes changed on the server since the manifest: refused before pg_restore.
        data = bytearray(bytes(obstore.get(store, newest.name).bytes()))
        data[-100] ^= 0xFF
        obstore.put(store, newest.name, bytes(data))
        await fill_db(fresh_dsn, 1)
        tampered = hoomi("restore", url, "--yes", env={**env, "DATABASE_URL": fresh_dsn})
        assert tampered.returncode != 0
        assert "does not match its manifest" in tampered.stderr
        assert len(await all_messages(fresh_dsn)) == 3 * 221  # untouched
    finally:
        await pg.drop_database(pg_template, fresh)


def test_multipart_parts_stay_within_s3s_limits():
    from storage.backup_store import part_size

    assert part_size(346_000_000) == 5 << 20  # 1M messages: 66 parts of 5 MiB
    for size in (48 << 30, 200 << 30, 5 << 40):  # past 10 000 parts of 5 MiB
        assert -(-size // part_size(size)) <= 10_000
