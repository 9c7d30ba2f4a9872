"""Backup and restore of a large message store: what `hoomi backup URL` and `hoomi restore
URL` cost, against the bare tools in the same run.

    .venv/bin/python -m bench.backup [--messages 1000000] [--no-s3]

Fills a fresh database (embedded PostgreSQL unless DATABASE_URL is set) with N messages
of random (so incompressible, like ciphertext) content, 40-400 bytes, 1 in 1000 of
4 KiB, 1 in 50 a tombstone, over 200 Hoomis. Then, each timed:

- baseline: bare `pg_dump --format=custom` to a local file, at gzip's default level and
  at level 1 (what `hoomi backup` uses);
- `backup_once` to `file:///dir` (pg_dump, table of contents read back, sha256, manifest);
- `backup_once` to `s3://bucket/prefix` on a local SeaweedFS (server/testing/s3.py), and the
  same steps one by one: pg_dump + TOC, sha256, upload (multipart), read-back check;
- baseline: bare `pg_restore --dbname` of the local dump into an empty database;
- `restore_from` the S3 URL (or the directory with --no-s3) into an empty database:
  download + sha256 check, then the one-transaction restore; every message then compared
  (a digest of all rows, in seq order) with the source.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import asyncpg

from bench.common import fresh_database
from storage.backup import dump, pg_tool, restore, split_password
from storage.backup_store import (
    backup_once,
    fetch,
    file_digest,
    open_destination,
    restore_from,
)
from storage.ids import uuid7s

_DIGEST = """
SELECT count(*), md5(string_agg(
    id::text || hoomi_id::text || seq || coalesce(sender_id::text, '-') || client_msg_id::text
    || coalesce(md5(content), '-') || coalesce(md5(nonce), '-') || coalesce(session_id, '-')
    || created_at::text || updated_at::text || coalesce(deleted_at::text, '-'),
    ',' ORDER BY hoomi_id, seq))
FROM messages
"""


def _rows(n: int, hoomis: list, users: list) -> Iterator[tuple]:
    rng = random.Random(7)
    seqs = dict.fromkeys(hoomis, 0)
    start = datetime.now(UTC) - timedelta(days=30)
    ids = uuid7s(n)
    for i in range(n):
        h = hoomis[i % len(hoomis)]
        seqs[h] += 1
        at = start + timedelta(seconds=i * 2)
        if i % 50 == 0:
            yield (ids[i], h, seqs[h], users[i % len(users)], uuid4(), None, None, None, at,
                   at, at)
            continue
        size = 4096 if i % 1000 == 1 else rng.randint(40, 400)
        yield (ids[i], h, seqs[h], users[i % len(users)], uuid4(), os.urandom(size),
               os.urandom(12), f"session-{i % 7}", at, at, None)


async def fill(dsn: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        users = [r["id"] for r in await conn.fetch(
            "INSERT INTO users (id) SELECT gen_random_uuid() FROM generate_series(1, 50) "
            "RETURNING id")]
        hoomis = [r["id"] for r in await conn.fetch(
            "INSERT INTO hoomis (id) SELECT gen_random_uuid() FROM generate_series(1, 200) "
            "RETURNING id")]
        rows = _rows(n, hoomis, users)
        columns = ["id", "hoomi_id", "seq", "sender_id", "client_msg_id", "content", "nonce",
                   "session_id", "created_at", "updated_at", "deleted_at"]
        while True:
            chunk = [r for _, r in zip(range(100_000), rows, strict=False)]
            if not chunk:
                break
            await conn.copy_records_to_table("messages", records=chunk, columns=columns)
        await conn.execute("UPDATE hoomis SET last_seq = (SELECT coalesce(max(seq), 0) "
                           "FROM messages WHERE hoomi_id = hoomis.id)")
        await conn.execute("VACUUM ANALYZE")
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        print(f"filled {n} messages; database {size / 1e6:.0f} MB")
    finally:
        await conn.close()


async def digest(dsn: str) -> tuple[int, str]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(_DIGEST)
        return int(row[0]), str(row[1])
    finally:
        await conn.close()


async def empty_database(base_dsn: str) -> tuple[str, str]:
    name = f"restore_{uuid4().hex[:8]}"
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    head, _, tail = base_dsn.partition("?")
    return name, head.rsplit("/", 1)[0] + "/" + name + ("?" + tail if tail else "")


async def drop_database(base_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def timed(label: str, results: dict[str, float]):
    class _T:
        def __enter__(self) -> None:
            self.t = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            results[label] = time.perf_counter() - self.t
            print(f"  {label}: {results[label]:.1f} s", flush=True)
    return _T()


async def once(dsn: str, url: str, keep: int = 5):
    conn = await asyncpg.connect(dsn)
    try:
        return await backup_once(conn, dsn, url, keep)
    finally:
        await conn.close()


async def main(n: int, use_s3: bool) -> None:
    t: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="hoomi-bench-backup-"))
    s3 = None
    try:
        async with fresh_database() as dsn:
            with timed("fill", t):
                await fill(dsn, n)
            source = await digest(dsn)

            # Baseline: the bare tool.
            clean, password = split_password(dsn)
            env = {**os.environ, **({"PGPASSWORD": password} if password else {})}
            for level in ("default", "1"):  # hoomi's dump uses --compress=1
                bare = work / f"bare-{level}.dump"
                with timed(f"bare pg_dump -Fc --compress={level}", t):
                    subprocess.run([str(pg_tool("pg_dump")), "--format=custom", "--no-owner",
                                    "--no-privileges", f"--file={bare}", f"--dbname={clean}",
                                    *(["--compress=1"] if level == "1" else [])],
                                   check=True, env=env)
                print(f"    dump size: {bare.stat().st_size / 1e6:.0f} MB")

            with timed("backup file:// (pg_dump, TOC, sha256, manifest)", t):
                made = await once(dsn, f"file://{work / 'dir'}")
            assert made is not None and made.made is not None
            url = f"file://{work / 'dir'}"

            if use_s3:
                from server.testing.s3 import SeaweedS3

                s3 = SeaweedS3()
                s3.start()
                os.environ.update(s3.env())
                bucket = s3.create_bucket()
                url = s3.url(bucket, "backups")
                # SeaweedFS grows a new bucket's volumes on its first write (about 5 s
                # here): done before the clock starts, as on any store already in use.
                warm = open_destination(s3.url(bucket, "warm-up"))
                import obstore

                obstore.put(warm.store, "x", os.urandom(1 << 20))  # type: ignore[attr-defined]
                with timed("backup s3:// (pg_dump, TOC, sha256, upload, read back)", t):
                    await once(dsn, url)
                # The same steps one by one.
                step = work / "step"
                step.mkdir()
                with timed("  step: pg_dump + TOC", t):
                    info = dump(dsn, step / "hoomi-20000101T000000000Z.dump")
                with timed("  step: sha256 of the local file", t):
                    size, sha = file_digest(info.path)
                dest = open_destination(s3.url(bucket, "steps"))
                with timed("  step: upload (multipart)", t):
                    obstore.put(dest.store, info.path.name, info.path)  # type: ignore[attr-defined]
                with timed("  step: read back + sha256", t):
                    got = dest._digest(info.path.name)  # type: ignore[attr-defined]
                assert got == (size, sha)

            base = dsn
            name, target = await empty_database(base)
            try:
                clean_t, password_t = split_password(target)
                with timed("bare pg_restore --dbname (empty database)", t):
                    subprocess.run([str(pg_tool("pg_restore")), "--no-owner",
                                    "--no-privileges", f"--dbname={clean_t}", str(bare)],
                                   check=True, env=env)
            finally:
                await drop_database(base, name)

            name, target = await empty_database(base)
            try:
                with timed(f"restore {url.split(':')[0]}:// (download, sha256, restore)", t):
                    tables, manifest = await asyncio.to_thread(restore_from, url, target)
                with timed("compare every message", t):
                    restored = await digest(target)
                assert restored == source, (restored, source)
                print(f"  restored {tables} tables, {restored[0]} messages, identical")
            finally:
                await drop_database(base, name)

            # The same restore, its two halves one by one.
            name, target = await empty_database(base)
            try:
                (work / "fetch").mkdir(mode=0o700)
                with timed("  step: download + sha256 check", t):
                    path, _ = await asyncio.to_thread(fetch, url, work / "fetch")
                with timed("  step: restore in one transaction", t):
                    await asyncio.to_thread(restore, target, path)
            finally:
                await drop_database(base, name)
    finally:
        if s3 is not None:
            s3.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--no-s3", action="store_true", help="directory destination only")
    args = ap.parse_args()
    asyncio.run(main(args.messages, not args.no_s3))
