"""Batched writer throughput against raw COPY of the same rows, on the same database.

    .venv/bin/python -m bench.writer [--messages 20000] [--appenders 200]

Three ways to store the same N messages, each on a freshly emptied table:
  copy-one     one copy_records_to_table of all N rows in one transaction: the ceiling
  copy-batched copy_records_to_table in transactions of the writer's batch size
  writer       BatchWriter.append from concurrent tasks: group commit, seq allocation
               under row locks, duplicate and membership checks, ack per message
  insert-each  one INSERT transaction per message: what the writer replaces
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from uuid import uuid4

import asyncpg

from bench.common import fresh_database
from storage.hoomis import create_hoomi
from storage.ids import uuid7
from storage.records import AppendRequest, Member
from storage.users import create_user
from storage.writer import BatchWriter

COLUMNS = ["id", "hoomi_id", "seq", "sender_id", "client_msg_id", "content", "nonce",
           "session_id"]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--appenders", type=int, default=200)
    ap.add_argument("--hoomis", type=int, default=25)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--delay-ms", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=200, help="ciphertext bytes per message")
    args = ap.parse_args()
    rng = random.Random(42)

    async with fresh_database() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        senders = [await create_user(pool) for _ in range(args.hoomis * 2)]
        hoomis = [
            await create_hoomi(pool, [Member(senders[2 * i], "admin"),
                                      Member(senders[2 * i + 1], "member")])
            for i in range(args.hoomis)
        ]
        payload = os.urandom(args.size)
        reqs = []
        for _ in range(args.messages):
            i = rng.randrange(args.hoomis)
            reqs.append(AppendRequest(hoomis[i], senders[2 * i + rng.randrange(2)], uuid4(),
                                      payload, os.urandom(12), "s1"))

        async def reset() -> None:
            await pool.execute("TRUNCATE messages")
            await pool.execute("UPDATE hoomis SET last_seq = 0")
            await pool.execute("CHECKPOINT")

        def rows() -> list[tuple]:
            counters: dict = {}
            out = []
            for r in reqs:
                counters[r.hoomi_id] = counters.get(r.hoomi_id, 0) + 1
                out.append((uuid7(), r.hoomi_id, counters[r.hoomi_id], r.sender_id,
                            r.client_msg_id, r.content, r.nonce, r.session_id))
            return out

        results: dict[str, float] = {}

        await reset()
        data = rows()
        t = time.perf_counter()
        async with pool.acquire() as conn:
            await conn.copy_records_to_table("messages", records=data, columns=COLUMNS)
        results["copy-one"] = len(data) / (time.perf_counter() - t)

        await reset()
        data = rows()
        t = time.perf_counter()
        async with pool.acquire() as conn:
            for k in range(0, len(data), args.batch):
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "messages", records=data[k:k + args.batch], columns=COLUMNS)
        results["copy-batched"] = len(data) / (time.perf_counter() - t)

        await reset()
        sizes: list[int] = []
        writer = BatchWriter(pool, max_batch=args.batch, max_delay=args.delay_ms / 1000,
                             observer=lambda n, _s: sizes.append(n))
        writer.start()
        latencies: list[float] = []
        queue = list(reqs)

        async def appender() -> None:
            while queue:
                r = queue.pop()
                t0 = time.perf_counter()
                await writer.append(r)
                latencies.append(time.perf_counter() - t0)

        t = time.perf_counter()
        await asyncio.gather(*(appender() for _ in range(args.appenders)))
        results["writer"] = len(reqs) / (time.perf_counter() - t)
        await writer.close()
        stored = await pool.fetchval("SELECT count(*) FROM messages")
        assert stored == len(reqs), (stored, len(reqs))

        await reset()
        n_each = min(2000, len(reqs))
        t = time.perf_counter()
        async with pool.acquire() as conn:
            for r in reqs[:n_each]:
                async with conn.transaction():
                    seq = await conn.fetchval(
                        "UPDATE hoomis SET last_seq = last_seq + 1 WHERE id = $1 "
                        "RETURNING last_seq", r.hoomi_id)
                    await conn.execute(
                        "INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id,"
                        " content, nonce, session_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
                        uuid7(), r.hoomi_id, seq, r.sender_id, r.client_msg_id, r.content,
                        r.nonce, r.session_id)
        results["insert-each"] = n_each / (time.perf_counter() - t)
        await pool.close()

    latencies.sort()
    print(f"messages={args.messages} appenders={args.appenders} hoomis={args.hoomis} "
          f"batch={args.batch} delay_ms={args.delay_ms} size={args.size}B")
    for name, rate in results.items():
        print(f"  {name:13s} {rate:10.0f} rows/s  ({rate / results['copy-one']:.0%} of copy-one)")
    print(f"  writer batches: {len(sizes)}, mean size {statistics.mean(sizes):.1f}, "
          f"max {max(sizes)}")
    print(f"  writer ack latency: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
