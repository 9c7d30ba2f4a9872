"""Infinite scroll: history pages per second and page latency, against the bare query.

    .venv/bin/python -m bench.history [--messages 200000] [--readers 20] [--seconds 8]
                                      [--read-standby [--write-rate 0]]

One Hoomi holds `--messages` stored messages (200-byte ciphertexts, loaded with COPY).
`--readers` members each scroll from a random point back towards the oldest message,
page after page of `--limit`, for `--seconds`:
  query   storage.messages.history() straight on a pool from this process (made by
          storage.db.create_pool, as the hub's): the database's own cost and the floor
          for the rest (the issue's baseline)
  query-as-hub  the query the hub runs for a page (storage.messages.wire_history for
          the reader, bounded by HOOMI_PAGE_MAX_BYTES: membership check and byte cut in
          SQL, rows in wire form) on the same kind of pool: the hub's own floor
  socket  `history` frames over each reader's WebSocket to one hub replica
  http    GET /v1/hoomis/{id}/messages?before=&limit= with the reader's token
With `--read-standby` (embedded PostgreSQL only, not with DATABASE_URL) a streaming
standby of the database is started (server/testing/standby.py: pg_basebackup -R, on loopback) and
the socket and http runs are made twice in the same run: the hub without
HOOMI_READ_DATABASE_URL (the baseline), then with it pointing at the standby; the standby's
share is counted from pg_stat_database (transactions per page on the primary and on the
standby; a page on the standby is a few statements there and a shared
pg_current_wal_lsn() on the primary), and the hub's own count of pages read on each
(hoomi_page_reads_total). `--write-rate N` stores N messages/s in another Hoomi (a
BatchWriter on the same database) during the hub runs: with writes, the standby is
always a little behind the primary's position, and the pages it had not replayed go to
the primary.
Pages are verified: `limit` messages, seqs descending without a gap, next_before as
documented. Everything shares the machine's cores; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import msgpack

from bench import httpload, wsload
from bench.common import fresh_database
from bench.hub import _start, pct
from bench.profile import Profile
from hoomi_protocol import Hello, History, Page, decode_server, encode_client
from server import auth
from server.testing.loopback import free_port
from server.testing.replica import ADMIN_TOKEN, JWT_SECRET
from server.testing.standby import Standby
from storage import messages as message_store
from storage.db import create_pool
from storage.embedded import start_embedded
from storage.hoomis import create_hoomi
from storage.ids import uuid7s
from storage.migrate import migrate
from storage.records import AppendRequest, Member
from storage.users import create_user
from storage.writer import BatchWriter

Fetch = Callable[[int | None], Awaitable[list[int]]]  # before -> seqs of the page


async def load(dsn: str, n: int, readers: int) -> tuple[UUID, list[UUID]]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    users = [await create_user(pool) for _ in range(readers)]
    h = await create_hoomi(pool, [Member(u, "member") for u in users])
    payload = os.urandom(200)
    async with pool.acquire() as conn:
        for start in range(0, n, 50_000):
            count = min(50_000, n - start)
            ids = uuid7s(count)
            rows = [(ids[k], h, start + k + 1, users[k % readers], uuid4(), payload,
                     os.urandom(12), "s1") for k in range(count)]
            await conn.copy_records_to_table(
                "messages", records=rows,
                columns=["id", "hoomi_id", "seq", "sender_id", "client_msg_id", "content",
                         "nonce", "session_id"])
        await conn.execute("UPDATE hoomis SET last_seq = $2 WHERE id = $1", h, n)
        await conn.execute("ANALYZE messages")
    await pool.close()
    return h, users


def cpu_seconds(pid: int = 0) -> float:
    """CPU time (user + system) used so far by process `pid` (0: this one), from /proc: a
    page's cost in CPU, which other load on the machine inflates far less than it
    lowers pages/s."""
    if not pid:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scroll(fetches: list[Fetch], n: int, limit: int, seconds: float, pid: int = 0
                 ) -> dict[str, float]:
    """Pages/s and latencies of `fetches` scrolling for `seconds`, and `cpu_us`: the CPU
    time process `pid` (0: this one) spent per page meanwhile."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def reader(k: int, fetch: Fetch) -> None:
        rng = random.Random(k)
        before: int | None = rng.randrange(limit + 1, n + 1)
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            seqs = await fetch(before)
            latencies.append(time.perf_counter() - t0)
            top = (n + 1 if before is None else before) - 1
            want = list(range(top, max(0, top - limit), -1))
            if seqs != want:
                raise AssertionError(f"page before {before}: {seqs[:3]}... != {want[:3]}...")
            before = seqs[-1] if seqs and seqs[-1] > 1 else rng.randrange(limit + 1, n + 1)

    started, cpu, mine = time.monotonic(), cpu_seconds(pid), time.process_time()
    await asyncio.gather(*(reader(k, f) for k, f in enumerate(fetches)))
    elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu
    mine = time.process_time() - mine
    latencies.sort()
    return {"rate": len(latencies) / elapsed, "p50": pct(latencies, 0.5),
            "p99": pct(latencies, 0.99), "pages": len(latencies),
            "cpu_us": cpu / max(1, len(latencies)) * 1e6,
            "client_us": mine / max(1, len(latencies)) * 1e6}


@asynccontextmanager
async def database(read_standby: bool) -> AsyncIterator[tuple[str, Standby | None]]:
    """fresh_database(), or with --read-standby an embedded server of our own and a
    streaming standby of it (its handle is needed for pg_basebackup)."""
    if not read_standby:
        async with fresh_database() as dsn:
            yield dsn, None
        return
    if os.environ.get("DATABASE_URL"):
        raise SystemExit("--read-standby starts its own embedded PostgreSQL: unset DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="hoomi-bench-") as tmp:
        server = start_embedded(Path(tmp))
        standby: Standby | None = None
        try:
            admin = await asyncpg.connect(server.dsn)
            await admin.execute("CREATE DATABASE bench")
            await admin.close()
            dsn = server._handle.get_uri(database="bench")
            conn = await asyncpg.connect(dsn)
            await migrate(conn)
            await conn.close()
            standby = await Standby(server).start()
            yield dsn, standby
        finally:
            if standby is not None:
                standby.close()
            server.stop()


async def transactions(dsn: str) -> int:
    """Transactions committed in the database (pg_stat_database, flushed within 1 s)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def page_reads(port: int) -> dict[str, float]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    found = re.findall(r'^hoomi_page_reads_total\{server="(\w+)"\} (\S+)$', text, re.M)
    return {server: float(n) for server, n in found}


async def write_load(dsn: str, rate: float) -> None:
    """`rate` messages/s into a Hoomi of its own (no reader is a member), until
    cancelled."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    sender = await create_user(pool)
    h = await create_hoomi(pool, [Member(sender, "admin")])
    writer = BatchWriter(pool)
    writer.start()
    pending: set[asyncio.Future[Any]] = set()
    try:
        tick = 0.01
        owed = 0.0
        while True:
            owed += rate * tick
            while owed >= 1:
                owed -= 1
                fut = writer.submit(AppendRequest(h, sender, uuid4(), os.urandom(200),
                                                  os.urandom(12), "s1"))
                pending.add(fut)
                fut.add_done_callback(_settled(pending))
            await asyncio.sleep(tick)
    finally:
        await writer.close()
        await pool.close()


def _settled(pending: set[asyncio.Future[Any]]) -> Any:
    def done(fut: asyncio.Future[Any]) -> None:
        pending.discard(fut)
        if not fut.cancelled():
            fut.exception()  # a send cut short by the end of the run
    return done


async def hub_runs(port: int, h: UUID, tokens: list[str], args: argparse.Namespace,
                   pid: int = 0) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    socks = []
    for k, t in enumerate(tokens):
        ws = await wsload.connect(f"ws://127.0.0.1:{port}/v1/ws", random.Random(k))
        ws.send(encode_client(Hello(token=t)))
        await ws.recv()
        socks.append(ws)

    def socket_fetch(ws: wsload.LeanSocket) -> Fetch:
        async def fetch(before: int | None) -> list[int]:
            ws.send(encode_client(History(hoomi_id=h, before=before, limit=args.limit,
                                          ref=1)))
            data = await ws.recv()
            if not args.validate:  # a msgpack map per message, as the query's a record
                raw = msgpack.unpackb(data)
                assert raw["type"] == "page", raw
                return [m["seq"] for m in raw["messages"]]
            page = decode_server(data)
            assert isinstance(page, Page), page
            return [m.seq for m in page.messages]
        return fetch

    with contextlib.ExitStack() as stack:
        prof = stack.enter_context(Profile(pid, "history-socket")) if args.profile else None
        results["socket"] = await scroll([socket_fetch(ws) for ws in socks],
                                         args.messages, args.limit, args.seconds, pid)
    if prof is not None:
        print(_per_page(prof.report(per=int(results["socket"]["pages"]))))
    for ws in socks:
        await ws.close()

    clients = [await httpload.connect(f"http://127.0.0.1:{port}",
                                      {"Authorization": f"Bearer {t}"})
               for t in tokens]

    def http_fetch(client: httpload.LeanHttp) -> Fetch:
        async def fetch(before: int | None) -> list[int]:
            query = f"limit={args.limit}" + (f"&before={before}" if before else "")
            status, body = await client.get(f"/v1/hoomis/{h}/messages?{query}")
            if status != 200:
                raise AssertionError(f"HTTP {status}: {body[:200]!r}")
            return [m["seq"] for m in json.loads(body)["messages"]]
        return fetch

    with contextlib.ExitStack() as stack:
        prof = stack.enter_context(Profile(pid, "history-http")) if args.profile else None
        results["http"] = await scroll([http_fetch(c) for c in clients], args.messages,
                                       args.limit, args.seconds, pid)
    if prof is not None:
        print(_per_page(prof.report(per=int(results["http"]["pages"]))))
    for c in clients:
        c.close()
    return results


def _per_page(report: str) -> str:
    return report.replace("per message", "per page").replace("µs/msg", "µs/page")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--readers", type=int, default=20)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--validate", action="store_true",
                    help="the socket client decodes and validates each page (decode_server) "
                         "instead of reading its msgpack maps")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy over the hub during the socket and http runs "
                         "(bench/profile.py)")
    ap.add_argument("--read-standby", action="store_true",
                    help="also run the hub with HOOMI_READ_DATABASE_URL on a standby")
    ap.add_argument("--write-rate", type=float, default=0,
                    help="messages/s stored in another Hoomi during the hub runs")
    args = ap.parse_args()
    env = {**os.environ, "HOOMI_JWT_SECRET": JWT_SECRET, "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
           "HOOMI_LOG_LEVEL": "warning",
           # Measure throughput, not the per-socket request limit (50/s by default), the
           # per-user HTTP limit (50/s) or the per-user concurrent reads (4).
           "HOOMI_REQUEST_RATE": "1000000", "HOOMI_REQUEST_BURST": "1000000",
           "HOOMI_HTTP_RATE": "1000000", "HOOMI_HTTP_BURST": "1000000",
           "HOOMI_USER_MAX_READS": "10000"}
    env.pop("REDIS_URL", None)
    results: dict[str, dict[str, float]] = {}
    per_page: dict[str, tuple[float, float]] = {}
    served: dict[str, dict[str, float]] = {}
    async with database(args.read_standby) as (dsn, standby):
        loaded = time.perf_counter()
        h, users = await load(dsn, args.messages, args.readers)
        load_s = time.perf_counter() - loaded
        tokens = [auth.issue(JWT_SECRET, u, 3600) for u in users]

        # The hub's kind of pool (storage.db: a page's connection goes back without
        # asyncpg's reset), so both sides pay the same per statement.
        pool = await create_pool(dsn, min_size=args.readers, max_size=args.readers)

        def query_fetch() -> Fetch:
            async def fetch(before: int | None) -> list[int]:
                page = await message_store.history(pool, h, before, args.limit)
                return [m.seq for m in page.messages]
            return fetch

        def hub_query_fetch(reader: UUID) -> Fetch:
            async def fetch(before: int | None) -> list[int]:
                page = await message_store.wire_history(pool, h, before, args.limit,
                                                        reader=reader, max_bytes=1 << 20)
                return [m.seq for m in page.messages]
            return fetch

        results["query"] = await scroll([query_fetch() for _ in users], args.messages,
                                        args.limit, args.seconds)
        results["query-as-hub"] = await scroll([hub_query_fetch(u) for u in users],
                                               args.messages, args.limit, args.seconds)
        await pool.close()

        runs: list[tuple[str, dict[str, str]]] = [("", {})]
        if standby is not None:
            await standby.caught_up(dsn)
            runs.append(("+standby", {"HOOMI_READ_DATABASE_URL": standby.dsn("bench")}))
        for suffix, extra in runs:
            port = free_port()
            hub = _start([sys.executable, "-m", "server.cli", "serve"],
                         {**env, **extra, "DATABASE_URL": dsn, "HOOMI_PORT": str(port)}, port)
            writing = (asyncio.get_running_loop().create_task(
                write_load(dsn, args.write_rate)) if args.write_rate else None)
            try:
                dsns = [dsn] + ([standby.dsn("bench")] if standby else [])
                await asyncio.sleep(1.5)  # statistics are flushed within a second
                before = [await transactions(d) for d in dsns]
                got = await hub_runs(port, h, tokens, args, hub.pid)
                for name, r in got.items():
                    results[name + suffix] = r
                if standby is not None:
                    await asyncio.sleep(1.5)
                    pages = sum(r["pages"] for r in got.values())
                    after = [await transactions(d) for d in dsns]
                    per_page[suffix or "baseline"] = (
                        (after[0] - before[0]) / pages, (after[1] - before[1]) / pages)
                    served[suffix or "baseline"] = await page_reads(port)
            finally:
                if writing is not None:
                    writing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await writing
                hub.terminate()
                hub.wait(20)
    print(f"messages={args.messages} (loaded by COPY in {load_s:.1f} s) readers={args.readers} "
          f"limit={args.limit} seconds={args.seconds} write-rate={args.write_rate:g}/s "
          f"cores={os.cpu_count()}")
    base, as_hub = results["query"]["rate"], results["query-as-hub"]["rate"]
    for name, r in results.items():
        print(f"  {name:14s} {r['rate']:8.0f} pages/s ({r['rate'] * args.limit:9.0f} "
              f"messages/s)  p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  "
              f"({r['rate'] / base:.0%} of the bare query, {r['rate'] / as_hub:.0%} of "
              f"query-as-hub); CPU per page {r['cpu_us']:4.0f} us "
              + ("(this client)" if name.startswith("query") else
                 f"(the hub), client {r['client_us']:4.0f} us"))
    for run, (primary, on_standby) in per_page.items():
        reads = served.get(run, {})
        total = sum(reads.values()) or 1
        print(f"  {run}: per page, {primary:.2f} transactions on the primary, "
              f"{on_standby:.2f} on the standby; pages read on the standby "
              f"{reads.get('standby', 0) / total:.1%} (hoomi_page_reads_total)")


if __name__ == "__main__":
    import uvloop  # the hub runs on it: the bare query's pool too, and the clients
    uvloop.run(main())
