"""What idle replicas' reconcile costs the database (issue 11, part 4).

    .venv/bin/python -m bench.reconcile [--replicas 10] [--hoomis 50000] [--sockets 20000]
                                        [--rounds 3] [--changes 0]
    .venv/bin/python -m bench.reconcile --writer-cost [--rounds 3]

A real PostgreSQL (embedded unless DATABASE_URL is set) holds `--hoomis` Hoomis and
`--sockets` users, each user a member of 5 Hoomis (every Hoomi has members). `--replicas`
Hub instances (server/hub.py, LocalBroker) run in this process, each as a replica holding
one fake socket per user (`--sockets`, attached and joined to the user's Hoomis), so each
follows every Hoomi. Then `--rounds` rounds of `Hub.reconcile()` on every replica, with
the database otherwise idle (or, with `--changes N`, N Hoomis getting a message and N
users a membership change before each round, the Hoomis' new seqs delivered to every
replica as the broker would: rows read by the server then include the changes' own
few thousand). Counted on each replica's own pool (a
Connection subclass): statements and rows returned; pg_stat_database's tup_returned +
tup_fetched (rows the server read) once the pools are closed (a backend flushes its
statistics when it exits). Reported per round of all replicas and per second at
HOOMI_RECONCILE_INTERVAL_S = 2.

--writer-cost: what migration 0009 costs the writer (each commit's UPDATE of hoomis now
fires the changed_xid trigger and updates its index, so it is no longer a HOT update):
BatchWriter rounds of 20 000 messages from 200 appenders into 25 two-member Hoomis,
alternating on one database between the trigger enabled and disabled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from uuid import UUID, uuid4

import asyncpg

from bench.common import fresh_database
from server.broker import LocalBroker
from server.hub import Hub
from server.testing.counting import CountingConnection
from storage.db import connect
from storage.hoomis import create_hoomi
from storage.records import AppendRequest, Member
from storage.users import create_user
from storage.writer import BatchWriter

INTERVAL_S = 2.0
PER_USER = 5


class FakeSocket:
    def __init__(self, user_id: UUID) -> None:
        self.user_id = user_id
        self.membership_epoch = 0
        self.pushed = 0

    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        self.pushed += 1

    def on_deletion(self, hoomi_id: UUID, seq: int, frame: bytes) -> None: ...
    def on_joined(self, hoomi_id: UUID, role: str) -> None: ...
    def on_left(self, hoomi_id: UUID) -> None: ...
    def on_user_gone(self) -> None: ...
    def on_signal(self, hoomi_id: UUID, user_id: UUID, kind: str, frame: bytes) -> None: ...
    def flush(self) -> None: ...
    def on_memberships(self, roles: dict[UUID, str]) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


async def load(dsn: str, hoomis: int, users: int) -> tuple[list[UUID], dict[UUID, list[UUID]]]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO hoomis (id) SELECT gen_random_uuid() "
                           "FROM generate_series(1, $1)", hoomis)
        await conn.execute("INSERT INTO users (id) SELECT gen_random_uuid() "
                           "FROM generate_series(1, $1)", users)
        await conn.execute(f"""
            WITH h AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM hoomis),
                 u AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM users),
                 g AS (SELECT generate_series(0, {PER_USER - 1}) AS j)
            INSERT INTO hoomi_members (hoomi_id, user_id, role)
            SELECT DISTINCT ON (h.id, u.id) h.id, u.id, 'member'
            FROM u CROSS JOIN g JOIN h ON h.k = (u.k * {PER_USER} + g.j) % $1""", hoomis)
        await conn.execute("ANALYZE")
        rows = await conn.fetch("SELECT user_id, hoomi_id FROM hoomi_members")
    finally:
        await conn.close()
    by_user: dict[UUID, list[UUID]] = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r["hoomi_id"])
    return list(by_user), by_user


async def server_reads(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT tup_returned + tup_fetched FROM pg_stat_database "
            "WHERE datname = current_database()"))
    finally:
        await conn.close()


async def change(dsn: str, n: int, hoomis: list[UUID], users: list[UUID], rnd: int
                 ) -> list[tuple[UUID, int]]:
    """n Hoomis get a message's seq (as the writer's commit moves last_seq) and n users a
    membership change: what a busy database shows the reconcile. Returns the new seqs,
    which the broker would have delivered."""
    if not n:
        return []
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("UPDATE hoomis SET last_seq = last_seq + 1 WHERE id = "
                                "ANY($1::uuid[]) RETURNING id, last_seq",
                                hoomis[rnd * n:(rnd + 1) * n])
        await conn.execute("UPDATE hoomi_members SET role = CASE role WHEN 'admin' THEN "
                           "'member' ELSE 'admin' END WHERE user_id = ANY($1::uuid[])",
                           users[rnd * n:(rnd + 1) * n])
    finally:
        await conn.close()
    return [(r["id"], r["last_seq"]) for r in rows]


async def writer_cost(rounds: int) -> None:
    async with fresh_database() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        senders = [await create_user(pool) for _ in range(50)]
        hoomis = [await create_hoomi(pool, [Member(senders[2 * i], "admin"),
                                            Member(senders[2 * i + 1], "member")])
                  for i in range(25)]
        payload = os.urandom(200)
        rates: dict[str, list[float]] = {"trigger on": [], "trigger off": []}
        for rnd in range(rounds * 2):
            mode = "trigger on" if rnd % 2 == 0 else "trigger off"
            await pool.execute("TRUNCATE messages CASCADE")
            await pool.execute("UPDATE hoomis SET last_seq = 0")
            await pool.execute("ALTER TABLE hoomis " + ("ENABLE" if mode == "trigger on"
                                                        else "DISABLE") + " TRIGGER hoomis_changed")
            await pool.execute("VACUUM hoomis")
            await pool.execute("CHECKPOINT")
            reqs = [AppendRequest(hoomis[k % 25], senders[2 * (k % 25)], uuid4(), payload,
                                  os.urandom(12), "s1") for k in range(20_000)]
            writer = BatchWriter(pool)
            writer.start()

            async def appender(writer: BatchWriter, reqs: list[AppendRequest]) -> None:
                while reqs:
                    await writer.append(reqs.pop())

            t = time.perf_counter()
            await asyncio.gather(*(appender(writer, reqs) for _ in range(200)))
            rates[mode].append(20_000 / (time.perf_counter() - t))
            await writer.close()
        await pool.close()
    for mode, got in rates.items():
        print(f"  {mode:11s} " + ", ".join(f"{r:,.0f}" for r in got) + " messages/s "
              f"(median {sorted(got)[len(got) // 2]:,.0f})")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--hoomis", type=int, default=50_000)
    ap.add_argument("--sockets", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--changes", type=int, default=0)
    ap.add_argument("--writer-cost", action="store_true",
                    help="writer messages/s with migration 0009's trigger and without")
    args = ap.parse_args()
    if args.writer_cost:
        await writer_cost(args.rounds)
        return
    async with fresh_database() as dsn:
        t0 = time.perf_counter()
        users, by_user = await load(dsn, args.hoomis, args.sockets)
        print(f"loaded {args.hoomis} Hoomis, {len(users)} users x {PER_USER} in "
              f"{time.perf_counter() - t0:.1f} s")
        setup = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        hubs = []
        t0 = time.perf_counter()
        for _ in range(args.replicas):
            hub = Hub(setup, LocalBroker())
            await hub.start()
            everything = FakeSocket(users[0])
            await hub.join(everything, [h for hs in by_user.values() for h in hs])
            for u in users:
                sock = FakeSocket(u)
                hub.register(sock)
                hub.attach(sock)
                await hub.join(sock, by_user[u])
            hub.leave(everything, by_user[users[0]][0])  # only the users' sockets count
            await hub.reconcile()  # a first round, as after start: not measured
            hubs.append(hub)
        print(f"{args.replicas} replicas x {sum(h.feeds for h in hubs) // len(hubs)} feeds x "
              f"{args.sockets} sockets set up in {time.perf_counter() - t0:.1f} s")
        pools = []
        for hub in hubs:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2,
                                             connect=connect, connection_class=CountingConnection)
            hub._pool = pool  # measure the rounds alone
            pools.append(pool)
        await setup.close()
        await asyncio.sleep(1)
        reads0 = await server_reads(dsn)
        CountingConnection.reset_counts()
        busy = 0.0
        every = sorted({h for hs in by_user.values() for h in hs})
        for rnd in range(args.rounds):
            for h, seq in await change(dsn, args.changes, every, users, rnd):
                for hub in hubs:  # the broadcast arrived: nothing for a fill to read
                    hub.on_message(h, seq, b"")
            for hub in hubs:
                t = time.perf_counter()
                await hub.reconcile()
                busy += time.perf_counter() - t
        for pool in pools:
            await pool.close()
        for hub in hubs:
            await hub.close()
        await asyncio.sleep(1)
        reads = await server_reads(dsn) - reads0
    r = args.rounds
    print(f"replicas={args.replicas} hoomis={args.hoomis} sockets={args.sockets} "
          f"rounds={r} changes/round={args.changes} cores={os.cpu_count()}")
    statements, rows = CountingConnection.statements, CountingConnection.rows
    print(f"  per round of all replicas: {statements / r:.0f} statements, "
          f"{rows / r:.0f} rows returned, {reads / r:.0f} rows read by the server, "
          f"{busy / r * 1000:.0f} ms of reconcile")
    print(f"  at one round per {INTERVAL_S:g} s: {statements / r / INTERVAL_S:.1f} "
          f"statements/s, {rows / r / INTERVAL_S:.0f} rows/s returned, "
          f"{reads / r / INTERVAL_S:.0f} rows/s read by the server")


if __name__ == "__main__":
    asyncio.run(main())
