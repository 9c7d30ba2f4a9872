"""Batched writer throughput against raw COPY of the same rows, on the same database.

    .venv/bin/python -m bench.writer [--messages 20000] [--appenders 200]
    .venv/bin/python -m bench.writer --compare-unpartitioned [--rounds 3]
    .venv/bin/python -m bench.writer --nonce-guard [--rounds 3]

Three ways to store the same N messages, each on a freshly emptied table:
  copy-one     one copy_records_to_table of all N rows in one transaction: the ceiling
  copy-batched copy_records_to_table in transactions of the writer's batch size
  writer       BatchWriter.append from concurrent tasks: group commit, seq allocation
               under row locks, duplicate and membership checks, ack per message
  insert-each  one INSERT transaction per message: what the writer replaces

With --compare-unpartitioned, only the writer runs, in rounds alternating between two
databases on the same server: today's schema (`messages` hash-partitioned by hoomi_id,
16 partitions, migration 0004) and the schema before it (migrations 1..3, one table),
whose idempotency index is widened to today's key (sender_id, client_msg_id, hoomi_id)
so that the same writer runs on both.

With --nonce-guard, only the writer runs, in rounds alternating on one database between
the nonce-reuse guard on (migration 0007's unique index idx_messages_nonce, and the
writer's per-row check against it: invariant 8) and off (the index dropped and the
writer's check query without its nonce lookup): the guard's cost on the same rows.
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
from storage.migrate import migrate
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
    ap.add_argument("--compare-unpartitioned", action="store_true",
                    help="writer rows/s on the partitioned table vs the unpartitioned one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nonce-guard", action="store_true",
                    help="writer rows/s with the nonce-reuse guard and without it")
    args = ap.parse_args()
    if args.compare_unpartitioned:
        await compare_unpartitioned(args)
        return
    if args.nonce_guard:
        await compare_nonce_guard(args)
        return
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
            await pool.execute("TRUNCATE messages CASCADE")
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


async def _population(pool: asyncpg.Pool, args: argparse.Namespace) -> list[AppendRequest]:
    """The same users, Hoomis and messages (by seed) on any database."""
    rng = random.Random(42)
    senders = [await create_user(pool) for _ in range(args.hoomis * 2)]
    hoomis = [await create_hoomi(pool, [Member(senders[2 * i], "admin"),
                                        Member(senders[2 * i + 1], "member")])
              for i in range(args.hoomis)]
    payload = os.urandom(args.size)
    reqs = []
    for _ in range(args.messages):
        i = rng.randrange(args.hoomis)
        reqs.append(AppendRequest(hoomis[i], senders[2 * i + rng.randrange(2)], uuid4(),
                                  payload, os.urandom(12), "s1"))
    return reqs


async def _writer_round(pool: asyncpg.Pool, reqs: list[AppendRequest],
                        args: argparse.Namespace) -> tuple[float, list[float]]:
    """Empty table, then every request through one BatchWriter: (rows/s, ack latencies)."""
    await pool.execute("TRUNCATE messages CASCADE")
    await pool.execute("UPDATE hoomis SET last_seq = 0")
    await pool.execute("CHECKPOINT")
    writer = BatchWriter(pool, max_batch=args.batch, max_delay=args.delay_ms / 1000)
    writer.start()
    latencies: list[float] = []
    queue = [r._replace(client_msg_id=uuid4()) for r in reqs]

    async def appender() -> None:
        while queue:
            r = queue.pop()
            t0 = time.perf_counter()
            await writer.append(r)
            latencies.append(time.perf_counter() - t0)

    t = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(args.appenders)))
    rate = len(reqs) / (time.perf_counter() - t)
    await writer.close()
    assert await pool.fetchval("SELECT count(*) FROM messages") == len(reqs)
    return rate, latencies


async def compare_unpartitioned(args: argparse.Namespace) -> None:
    """Writer rows/s, partitioned vs unpartitioned `messages`, same server, same run."""
    async with fresh_database() as dsn:
        admin = await asyncpg.connect(dsn)
        here = await admin.fetchval("SELECT current_database()")
        name = f"{here}_flat"
        await admin.execute(f"CREATE DATABASE {name}")
        flat_dsn = dsn.replace(f"/{here}", f"/{name}", 1)
        try:
            conn = await asyncpg.connect(flat_dsn)
            await migrate(conn, target=3)  # the schema before 0004: one table
            await conn.execute("DROP INDEX idx_messages_sender")
            await conn.execute("CREATE UNIQUE INDEX idx_messages_sender "
                               "ON messages(sender_id, client_msg_id, hoomi_id)")
            await conn.close()
            pools = {"partitioned": await asyncpg.create_pool(dsn, min_size=2, max_size=4),
                     "unpartitioned": await asyncpg.create_pool(flat_dsn, min_size=2,
                                                                max_size=4)}
            parts = await pools["partitioned"].fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass")
            reqs = {k: await _population(p, args) for k, p in pools.items()}
            rates: dict[str, list[float]] = {k: [] for k in pools}
            lat: dict[str, list[float]] = {k: [] for k in pools}
            for round_ in range(args.rounds):
                order = list(pools) if round_ % 2 == 0 else list(reversed(pools))
                for k in order:
                    rate, latencies = await _writer_round(pools[k], reqs[k], args)
                    rates[k].append(rate)
                    lat[k] += latencies
            for p in pools.values():
                await p.close()
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.close()
    print(f"messages={args.messages} appenders={args.appenders} hoomis={args.hoomis} "
          f"batch={args.batch} delay_ms={args.delay_ms} size={args.size}B "
          f"rounds={args.rounds} partitions={parts}")
    for k in rates:
        ls = sorted(lat[k])
        print(f"  {k:13s} writer {statistics.median(rates[k]):8.0f} rows/s (median; rounds "
              f"{', '.join(f'{r:.0f}' for r in rates[k])}), ack p50 "
              f"{ls[len(ls) // 2] * 1000:.1f} ms, p99 {ls[int(len(ls) * 0.99)] * 1000:.1f} ms")
    ratio = statistics.median(rates["partitioned"]) / statistics.median(rates["unpartitioned"])
    print(f"  partitioned / unpartitioned: {ratio:.0%}")


async def compare_nonce_guard(args: argparse.Namespace) -> None:
    """Writer rows/s and ack latency with the nonce guard (index + check) and without."""
    import storage.writer as writer_module

    guarded = writer_module._CHECK_ROWS
    unguarded = guarded.replace(
        """EXISTS (SELECT 1 FROM messages n WHERE n.hoomi_id = t.hoomi_id
               AND n.session_id = t.session_id AND n.nonce = t.nonce)""", "false")
    assert unguarded != guarded
    on = "CREATE UNIQUE INDEX idx_messages_nonce ON messages (hoomi_id, session_id, nonce)"
    off = "DROP INDEX idx_messages_nonce"
    results: dict[str, list[float]] = {"guard on": [], "guard off": []}
    p99s: dict[str, list[float]] = {"guard on": [], "guard off": []}
    async with fresh_database() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        reqs = await _population(pool, args)
        guard = True
        for _ in range(args.rounds):
            for name in ("guard on", "guard off"):
                want = name == "guard on"
                if want != guard:
                    await pool.execute(on if want else off)
                    guard = want
                writer_module._CHECK_ROWS = guarded if want else unguarded
                rate, lat = await _writer_round(pool, reqs, args)
                lat.sort()
                results[name].append(rate)
                p99s[name].append(lat[int(len(lat) * 0.99)] * 1000)
        writer_module._CHECK_ROWS = guarded
        if not guard:
            await pool.execute(on)
        await pool.close()
    print(f"messages={args.messages} appenders={args.appenders} hoomis={args.hoomis} "
          f"batch={args.batch} size={args.size}B rounds={args.rounds}")
    for name in results:
        print(f"  {name:9s} writer {statistics.median(results[name]):8.0f} rows/s (median; "
              f"rounds {', '.join(f'{r:.0f}' for r in results[name])}), ack p99 "
              f"{statistics.median(p99s[name]):.1f} ms")
    cost = 1 - statistics.median(results["guard on"]) / statistics.median(results["guard off"])
    # Rounds run back to back in pairs: the median of the pairs' ratios is less exposed to
    # a neighbour's load than the ratio of medians.
    paired = 1 - statistics.median(a / b for a, b in zip(results["guard on"],
                                                          results["guard off"], strict=True))
    print(f"  the guard costs {cost:.1%} of the writer's throughput (ratio of medians), "
          f"{paired:.1%} (median of paired rounds)")


if __name__ == "__main__":
    asyncio.run(main())
