"""Blind-index search over 1M messages in one Hoomi: the plan and the latency.

    .venv/bin/python -m bench.search [--messages 1000000] [--words 6] [--queries 300]

One Hoomi holds --messages messages; each carries --words search tokens drawn from a
20 000-word vocabulary with Zipf-like frequencies (word of rank r with weight 1/r, as in
natural text: the most common word is in about half the messages, most words in a
handful), HMAC'd by the client's own function (client/hoomi_client/search.py). Rows go in by COPY
(the writer's path is bench/writer.py's business). Then storage.messages.search, the
function the socket's `search` calls (membership check, rarest-token choice, the walk),
runs for query shapes from the easiest to the worst:

  rare            one word of rank 5 000+ (a few hundred matches)
  common          one word of rank 1-10 (hundreds of thousands of matches)
  common+rare     a common and a rare word (the walk follows the rare one)
  two-common      two words of rank 1-10 (dense intersection)
  mid+mid         two words of rank 200-400, independent: each in ~1% of messages,
                  together in ~0.01%: the walk checks every entry of the rarer one
  deep            `common`, asking for the page before seq 10 000 (the oldest 1%)

and prints p50/p99 per shape (limit 50) and EXPLAIN (ANALYZE, BUFFERS) of the worst.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from uuid import UUID, uuid4

import asyncpg

from bench.common import fresh_database
from hoomi_client.keys import GroupKey
from hoomi_client.search import search_key, token
from storage import messages
from storage.hoomis import create_hoomi
from storage.ids import uuid7s
from storage.records import Member
from storage.users import create_user

VOCAB = 20_000
CHUNK = 50_000


def _weights() -> list[float]:
    return [1.0 / r for r in range(1, VOCAB + 1)]


async def load(dsn: str, n: int, words: int, rng: random.Random,
               tokens: list[bytes]) -> tuple[UUID, UUID]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    user = await create_user(pool)
    h = await create_hoomi(pool, [Member(user, "admin")])
    weights = _weights()
    payload = os.urandom(120)
    started = time.perf_counter()
    async with pool.acquire() as conn:
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            ids = uuid7s(count)
            rows = [(ids[k], h, start + k + 1, user, uuid4(), payload, os.urandom(12), "s1")
                    for k in range(count)]
            await conn.copy_records_to_table(
                "messages", records=rows,
                columns=["id", "hoomi_id", "seq", "sender_id", "client_msg_id", "content",
                         "nonce", "session_id"])
            drawn = rng.choices(range(VOCAB), weights, k=count * words)
            trows = []
            for k in range(count):
                for w in set(drawn[k * words:(k + 1) * words]):
                    trows.append((h, tokens[w], start + k + 1))
            await conn.copy_records_to_table("message_tokens", records=trows,
                                             columns=["hoomi_id", "token", "seq"])
            print(f"  loaded {start + count} messages ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        await conn.execute("UPDATE hoomis SET last_seq = $2 WHERE id = $1", h, n)
        await conn.execute("VACUUM ANALYZE messages")
        await conn.execute("VACUUM ANALYZE message_tokens")
    await pool.close()
    return h, user


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--words", type=int, default=6, help="word draws per message")
    ap.add_argument("--queries", type=int, default=300, help="queries per shape")
    args = ap.parse_args()
    rng = random.Random(7)
    hoomi_key = GroupKey("k1", bytes(32))
    async with fresh_database() as dsn:
        h0 = uuid4()  # the search key's Hoomi only labels the tokens here
        skey = search_key(hoomi_key, h0)
        tokens = [token(skey, f"word{r}") for r in range(VOCAB)]
        t0 = time.perf_counter()
        h, user = await load(dsn, args.messages, args.words, rng, tokens)
        load_s = time.perf_counter() - t0
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        size = await pool.fetchval(
            "SELECT pg_size_pretty(pg_total_relation_size('message_tokens'))")
        rows = await pool.fetchval("SELECT count(*) FROM message_tokens")
        shapes = {
            "rare": lambda: ([tokens[rng.randrange(5000, VOCAB)]], None),
            "common": lambda: ([tokens[rng.randrange(0, 10)]], None),
            "common+rare": lambda: ([tokens[rng.randrange(0, 10)],
                                     tokens[rng.randrange(5000, VOCAB)]], None),
            "two-common": lambda: (rng.sample(tokens[:10], 2), None),
            "mid+mid": lambda: (rng.sample(tokens[200:400], 2), None),
            "deep": lambda: ([tokens[rng.randrange(0, 10)]], 10_000),
        }
        print(f"messages={args.messages} words/message={args.words} token rows={rows} "
              f"({size}); load {load_s:.0f} s; {args.queries} queries per shape, limit 50")
        worst: tuple[float, str, list[bytes], int | None] = (0.0, "", [], None)
        for name, make in shapes.items():
            lat, found = [], []
            for _ in range(args.queries):
                toks, before = make()
                t = time.perf_counter()
                page = await messages.search(pool, h, toks, before, 50, user)
                dt = time.perf_counter() - t
                lat.append(dt)
                found.append(len(page.messages))
                if dt > worst[0]:
                    worst = (dt, name, toks, before)
            print(f"  {name:12s} p50 {pct(lat, 0.5):7.2f} ms  p99 {pct(lat, 0.99):7.2f} ms  "
                  f"max {max(lat) * 1000:7.2f} ms  matches/page {statistics.mean(found):5.1f}")
        _, name, toks, before = worst
        ordered = sorted(toks, key=lambda t: tokens.index(t), reverse=True)  # rarest first
        plan = await pool.fetch(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + messages._SEARCH, h, ordered[0],
            2**63 - 1 if before is None else before, ordered[1:], 51)
        print(f"\nplan of the slowest query ({name}, {len(toks)} tokens):")
        for r in plan:
            print("  " + r[0])
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
