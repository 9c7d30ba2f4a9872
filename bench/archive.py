"""The message archive: how fast it archives, and what reading from segments costs.

    .venv/bin/python -m bench.archive [--messages 200000] [--hoomis 20] [--pages 400]
                                      [--store file|s3]

`--messages` 200-byte ciphertexts over `--hoomis` Hoomis (loaded with COPY, a day old),
then, in one run on one database:
  table    history pages (limit 50, storage.messages.history, random `before`) read
           from the table, before archiving: the baseline
  archive  one archive pass over everything (storage.archive.run_pass): rows/s
  cold     the same pages from segments with the segment cache emptied before each
           page: every page fetches, verifies and parses its segment(s)
  cached   the same pages again with the cache warm
Every archived page is checked byte for byte against the table page. `--store s3`
archives to a SeaweedFS started here (server/testing/s3.py), `file` to a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from uuid import UUID, uuid4

import asyncpg

from bench.common import fresh_database
from bench.hub import pct
from storage import archive
from storage import messages as message_store
from storage.hoomis import create_hoomi
from storage.ids import uuid7s
from storage.records import HistoryPage, Member
from storage.users import create_user


async def load(pool: asyncpg.Pool, n: int, hoomis: int) -> dict[UUID, int]:
    user = await create_user(pool)
    ids = [await create_hoomi(pool, [Member(user, "member")]) for _ in range(hoomis)]
    per = n // hoomis
    async with pool.acquire() as conn:
        for h in ids:
            mids = uuid7s(per)
            rows = [(mids[k], h, k + 1, user, uuid4(), os.urandom(200), os.urandom(12), "s1")
                    for k in range(per)]
            await conn.copy_records_to_table(
                "messages", records=rows,
                columns=["id", "hoomi_id", "seq", "sender_id", "client_msg_id", "content",
                         "nonce", "session_id"])
            await conn.execute("UPDATE hoomis SET last_seq = $2 WHERE id = $1", h, per)
        await conn.execute("UPDATE messages SET created_at = now() - interval '1 day'")
        await conn.execute("VACUUM ANALYZE messages")
    return {h: per for h in ids}


async def pages(pool: asyncpg.Pool, plan: list[tuple[UUID, int]], cold: bool
                ) -> tuple[list[float], list[HistoryPage]]:
    arc = archive.current()
    took, out = [], []
    for h, before in plan:
        if cold and arc is not None:
            arc.cache.clear()
        t = time.perf_counter()
        out.append(await message_store.history(pool, h, before, 50))
        took.append(time.perf_counter() - t)
    return sorted(took), out


def line(name: str, xs: list[float]) -> str:
    return (f"{name:<8} p50 {pct(xs, 0.50):7.2f} ms   p99 {pct(xs, 0.99):7.2f} ms   "
            f"({len(xs)} pages of 50)")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--hoomis", type=int, default=20)
    ap.add_argument("--pages", type=int, default=400)
    ap.add_argument("--store", choices=("file", "s3"), default="file")
    args = ap.parse_args()
    s3 = None
    tmp = tempfile.TemporaryDirectory(prefix="hoomi-bench-archive-")
    if args.store == "s3":
        from server.testing.s3 import SeaweedS3
        s3 = SeaweedS3()
        s3.start()
        os.environ.update(s3.env())
        url = s3.url(s3.create_bucket(), "archive")
    else:
        url = f"file://{tmp.name}"
    try:
        async with fresh_database() as dsn:
            pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
            counts = await load(pool, args.messages, args.hoomis)
            rng = random.Random(5)
            plan = [(h, rng.randint(51, counts[h] + 1))
                    for h in rng.choices(list(counts), k=args.pages)]
            table, expected = await pages(pool, plan, cold=False)
            arc = archive.Archive(url, cache_bytes=256 << 20)
            archive.configure(arc)
            t = time.perf_counter()
            result = await archive.run_pass(pool, arc, 3600)
            took = time.perf_counter() - t
            assert result.messages == sum(counts.values()), result
            size = await pool.fetchval("SELECT sum(size) FROM message_segments")
            cold, got = await pages(pool, plan, cold=True)
            assert got == expected, "archived pages differ from the table's"
            await pages(pool, plan, cold=False)  # warm the cache
            cached, got = await pages(pool, plan, cold=False)
            assert got == expected
            print(f"store {args.store}: {result.messages} messages, {args.hoomis} Hoomis, "
                  f"200-byte ciphertexts")
            print(f"archive  {result.messages / took:,.0f} rows/s ({took:.1f} s, "
                  f"{result.segments} segments, {size / result.segments / 1024:.0f} KiB "
                  "each)")
            print(line("table", table))
            print(line("cold", cold))
            print(line("cached", cached))
            await pool.close()
    finally:
        archive.configure(None)
        if s3 is not None:
            s3.close()
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
