"""Fairness of the batched writer: a quiet sender's ack latency while another floods.

    .venv/bin/python -m bench.fairness [--seconds 8] [--flood 2000] [--interval-ms 20]

One fresh database, one BatchWriter with the hub's defaults (batches of 256, 1 ms of
waiting for company), 200-byte ciphertexts. Two runs, in this order:
  alone  the quiet sender alone: one append every --interval-ms, each ack timed
  flood  the same, while a flooding sender keeps --flood appends queued all the time
         (each of its --flood tasks appends again as soon as its ack comes)
The flooder and the quiet sender write to Hoomis of their own, so they share only the
writer and the database. Prints the quiet sender's ack p50/p99/max per run and the
flooder's acked rows/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from uuid import UUID, uuid4

import asyncpg

from bench.common import fresh_database
from storage.hoomis import create_hoomi
from storage.records import AppendRequest, Member
from storage.users import create_user
from storage.writer import BatchWriter


def _request(hoomi: UUID, sender: UUID, size: int) -> AppendRequest:
    return AppendRequest(hoomi, sender, uuid4(), os.urandom(size), os.urandom(12), "s1")


def _percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * q))]


async def _quiet(writer: BatchWriter, hoomi: UUID, sender: UUID, seconds: float,
                 interval: float, size: int) -> list[float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await writer.append(_request(hoomi, sender, size))
        took = time.perf_counter() - t0
        latencies.append(took * 1000)
        await asyncio.sleep(max(0.0, interval - took))
    return sorted(latencies)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--flood", type=int, default=2000, help="appends the flooder keeps queued")
    ap.add_argument("--interval-ms", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=200, help="ciphertext bytes per message")
    args = ap.parse_args()

    async with fresh_database() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        quiet, flooder = await create_user(pool), await create_user(pool)
        calm = await create_hoomi(pool, [Member(quiet, "admin")])
        flooded = await create_hoomi(pool, [Member(flooder, "admin")])
        sizes: list[int] = []
        writer = BatchWriter(pool, max_batch=256, max_delay=0.001,
                             observer=lambda n, _s: sizes.append(n))
        writer.start()

        alone = await _quiet(writer, calm, quiet, args.seconds, args.interval_ms / 1000,
                             args.size)

        stop = False
        flooded_acks = 0

        async def flood_task() -> None:
            nonlocal flooded_acks
            while not stop:
                await writer.append(_request(flooded, flooder, args.size))
                flooded_acks += 1

        flooders = [asyncio.create_task(flood_task()) for _ in range(args.flood)]
        await asyncio.sleep(1.0)  # let the flood fill the queue first
        started, acked_before = time.perf_counter(), flooded_acks
        during = await _quiet(writer, calm, quiet, args.seconds, args.interval_ms / 1000,
                              args.size)
        flood_rate = (flooded_acks - acked_before) / (time.perf_counter() - started)
        queued = writer.queued
        stop = True
        await asyncio.gather(*flooders)
        await writer.close()
        await pool.close()

    print(f"seconds={args.seconds} flood={args.flood} interval_ms={args.interval_ms} "
          f"size={args.size}B batch=256 delay=1ms")
    for name, lat in (("alone", alone), ("flood", during)):
        print(f"  {name:6s} quiet sender: {len(lat)} acks, p50 {_percentile(lat, 0.5):.1f} ms, "
              f"p99 {_percentile(lat, 0.99):.1f} ms, max {lat[-1]:.1f} ms")
    print(f"  flooder: {flood_rate:.0f} acked rows/s, {queued} appends queued at the end; "
          f"batches {len(sizes)}, mean size {sum(sizes) / len(sizes):.0f}")


if __name__ == "__main__":
    asyncio.run(main())
