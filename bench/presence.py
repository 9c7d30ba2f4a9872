"""What presence costs Redis (issue 13 part 1): server/presence.py against a real Valkey.

    .venv/bin/python -m bench.presence [--users 20000] [--members 1000] [--cluster]

One RedisPresence holds `--users` connected users (as one replica whose sockets belong
to that many users). Measured: the time of one refresh of them all (what a replica does
every HOOMI_PRESENCE_TTL_S / 3), the Redis memory they take (INFO used_memory, and
MEMORY USAGE of one key), and the time of one `who` over `--members` users (a
`presence` request in a Hoomi of that many members, none on the asking replica).
With `--cluster`, the same on a 3-master Valkey Cluster (keys spread over the shards).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any
from uuid import UUID, uuid4

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from server.presence import RedisPresence, presence_key
from server.testing.valkey import Valkey
from server.testing.valkey_cluster import ValkeyCluster


async def used_memory(client: Any) -> int:
    if isinstance(client, RedisCluster):  # {node name: its info}, one per master
        info = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return sum(int(v["used_memory"]) for v in info.values())
    return int((await client.info("memory"))["used_memory"])


async def measure(client: Any, users: int, members: int) -> None:
    here = [uuid4() for _ in range(users)]
    presence = RedisPresence(client, ttl=30.0, replica=os.urandom(8))
    presence._local = lambda: here  # the replica's users, as Hub.start hands them over
    before = await used_memory(client)
    t = time.perf_counter()
    await presence._write({}, refresh=True)  # the first refresh creates the keys
    first = time.perf_counter() - t
    t = time.perf_counter()
    await presence._write({}, refresh=True)
    again = time.perf_counter() - t
    after = await used_memory(client)
    key_bytes = await client.memory_usage(presence_key(here[0]))
    asked: list[UUID] = here[:members // 2] + [uuid4() for _ in range(members - members // 2)]
    t = time.perf_counter()
    found = await presence.who(asked)
    ask = time.perf_counter() - t
    assert found == set(here[:members // 2])
    print(f"  users {users}: refresh {first * 1000:.0f} ms (first), {again * 1000:.0f} ms "
          f"(again) = {again / users * 1e6:.1f} us/user; every 10 s at TTL 30 s: "
          f"{3 * users / 10:.0f} commands/s")
    print(f"  memory {(after - before) / users:.0f} B/user (used_memory), one key "
          f"{key_bytes} B (MEMORY USAGE)")
    print(f"  presence over {members} members (half online elsewhere): {ask * 1000:.1f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--cluster", action="store_true")
    args = ap.parse_args()
    if args.cluster:
        cluster = ValkeyCluster().start()
        try:
            client = RedisCluster.from_url(cluster.url)
            print("Valkey Cluster, 3 masters:")
            await measure(client, args.users, args.members)
            await client.aclose()
        finally:
            cluster.stop()
        return
    server = Valkey()
    server.start()
    try:
        single = aioredis.Redis.from_url(server.url)
        print("one Valkey:")
        await measure(single, args.users, args.members)
        await single.aclose()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
