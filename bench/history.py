"""Infinite scroll: history pages per second and page latency, against the bare query.

    .venv/bin/python -m bench.history [--messages 200000] [--readers 20] [--seconds 8]

One Hoomi holds `--messages` stored messages (200-byte ciphertexts, loaded with COPY).
`--readers` members each scroll from a random point back towards the oldest message,
page after page of `--limit`, for `--seconds`:
  query   storage.messages.history() straight on an asyncpg pool from this process:
          the database's own cost and the floor for the rest
  socket  `history` frames over each reader's WebSocket to one hub replica
  http    GET /v1/hoomis/{id}/messages?before=&limit= with the reader's token
Pages are verified: `limit` messages, seqs descending without a gap, next_before as
documented. Everything shares the machine's cores; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

import asyncpg
import httpx
import websockets

from bench.common import fresh_database
from bench.hub import _start, pct
from protocol import Hello, History, Page, decode_server, encode_client
from server import auth
from storage import messages as message_store
from storage.hoomis import create_hoomi
from storage.ids import uuid7s
from storage.records import Member
from storage.users import create_user
from tests.cluster import ADMIN_TOKEN, JWT_SECRET, free_port

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


async def scroll(fetches: list[Fetch], n: int, limit: int, seconds: float
                 ) -> dict[str, float]:
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

    started = time.monotonic()
    await asyncio.gather(*(reader(k, f) for k, f in enumerate(fetches)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"rate": len(latencies) / elapsed, "p50": pct(latencies, 0.5),
            "p99": pct(latencies, 0.99), "pages": len(latencies)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--readers", type=int, default=20)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=8)
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
    async with fresh_database() as dsn:
        loaded = time.perf_counter()
        h, users = await load(dsn, args.messages, args.readers)
        load_s = time.perf_counter() - loaded
        tokens = [auth.issue(JWT_SECRET, u, 3600) for u in users]

        pool = await asyncpg.create_pool(dsn, min_size=args.readers, max_size=args.readers)

        def query_fetch() -> Fetch:
            async def fetch(before: int | None) -> list[int]:
                page = await message_store.history(pool, h, before, args.limit)
                return [m.seq for m in page.messages]
            return fetch

        results["query"] = await scroll([query_fetch() for _ in users], args.messages,
                                        args.limit, args.seconds)
        await pool.close()

        port = free_port()
        hub = _start([sys.executable, "-m", "server.cli", "serve"],
                     {**env, "DATABASE_URL": dsn, "HOOMI_PORT": str(port)}, port)
        try:
            socks = []
            for t in tokens:
                ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", max_size=2**24,
                                              compression=None)
                await ws.send(encode_client(Hello(token=t)))
                await ws.recv()
                socks.append(ws)

            def socket_fetch(ws: websockets.ClientConnection) -> Fetch:
                async def fetch(before: int | None) -> list[int]:
                    await ws.send(encode_client(History(hoomi_id=h, before=before,
                                                        limit=args.limit, ref=1)))
                    page = decode_server(await ws.recv(decode=False))
                    assert isinstance(page, Page), page
                    return [m.seq for m in page.messages]
                return fetch

            results["socket"] = await scroll([socket_fetch(ws) for ws in socks],
                                             args.messages, args.limit, args.seconds)
            for ws in socks:
                await ws.close()

            clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         headers={"Authorization": f"Bearer {t}"})
                       for t in tokens]

            def http_fetch(client: httpx.AsyncClient) -> Fetch:
                async def fetch(before: int | None) -> list[int]:
                    params = {"limit": args.limit, **({"before": before} if before else {})}
                    r = await client.get(f"/v1/hoomis/{h}/messages", params=params)
                    r.raise_for_status()
                    return [m["seq"] for m in r.json()["messages"]]
                return fetch

            results["http"] = await scroll([http_fetch(c) for c in clients], args.messages,
                                           args.limit, args.seconds)
            for c in clients:
                await c.aclose()
        finally:
            hub.terminate()
            hub.wait(20)
    print(f"messages={args.messages} (loaded by COPY in {load_s:.1f} s) readers={args.readers} "
          f"limit={args.limit} seconds={args.seconds} cores={os.cpu_count()}")
    base = results["query"]["rate"]
    for name, r in results.items():
        print(f"  {name:6s} {r['rate']:8.0f} pages/s ({r['rate'] * args.limit:9.0f} messages/s)"
              f"  p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  ({r['rate'] / base:.0%} of "
              f"the bare query)")


if __name__ == "__main__":
    asyncio.run(main())
