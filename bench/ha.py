"""Highly available PostgreSQL (Patroni + etcd, synchronous replication) against a single
server, and what a failover costs, in one run.

    .venv/bin/python -m bench.ha [--seconds 10] [--connections 50] [--window 8]

Both databases are Patroni clusters from server/testing/patroni.py on loopback, same
PostgreSQL build and settings: "single" has one node (no standby, so a commit is local),
"sync" has two with synchronous_mode (a commit waits for the standby's flush). The same
load as bench.hub (`--connections` sockets in two-member Hoomis, `--window` sends in flight each,
a 200-byte ciphertext) runs against one hub on each.

Then, on the sync cluster, with SDK clients on two hubs (multi-host DATABASE_URL,
target_session_attrs=read-write) sending with a ledger of acks:
  kill        SIGKILL the leader (Patroni and all of its PostgreSQL)
  freeze      SIGSTOP the leader (a hung machine: TCP accepted, nothing answers)
  switchover  a planned switchover through Patroni's REST API
each reporting: the time from the event to the first new ack, the part of it until the
new leader took writes (Patroni's: its ttl, 20 s at least), the rest (the hub's: pool,
writer, client retries), the time until every send pending at that moment was acked,
errors the applications saw, and acked messages missing from the new leader.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx

from bench.hub import _start, drive
from hoomi_client.sdk import HoomiClient, HubError
from server.testing.loopback import free_port
from server.testing.patroni import HACluster, wait_writable
from server.testing.replica import ADMIN_TOKEN, JWT_SECRET
from server.testing.valkey import Valkey
from storage.migrate import migrate

DATABASE = "hoomi"


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def start_hub(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`hoomi serve` with its output in `log` (bench.hub's _start drops it otherwise)."""
    return _start([sys.executable, "-m", "server.cli", "serve"],
                  {**env, "HOOMI_PORT": str(port)}, port, log)


def hub_env(dsn: str, redis_url: str | None) -> dict[str, str]:
    env = {**os.environ, "HOOMI_JWT_SECRET": JWT_SECRET, "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
           "HOOMI_LOG_LEVEL": "warning", "HOOMI_SEND_RATE": "100000",
           "HOOMI_SEND_BURST": "100000", "DATABASE_URL": dsn,
           # Every client of the bench shares one address: no per-address caps.
           "HOOMI_MAX_UNAUTHENTICATED_PER_ADDRESS": "100000", "HOOMI_HELLO_RATE": "100000",
           "HOOMI_HELLO_BURST": "100000", "HOOMI_HTTP_RATE": "100000",
           "HOOMI_HTTP_BURST": "100000"}
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


async def prepare(cluster: HACluster) -> str:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(cluster.dsn(DATABASE))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return cluster.dsn(DATABASE)


async def users_and_hoomis(http: str, n: int) -> tuple[list[str], list[UUID]]:
    """`n` users in n/2 two-member Hoomis; their tokens."""
    async with httpx.AsyncClient(base_url=http, timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        users = [(await admin.post("/v1/admin/users", json={})).json()["id"] for _ in range(n)]
        hoomis = []
        for k in range(0, n, 2):
            members = [{"user_id": u, "role": "admin"} for u in users[k:k + 2]]
            r = await admin.post("/v1/admin/hoomis", json={"members": members})
            hoomis.append(UUID(r.json()["id"]))
        tokens = [(await admin.post("/v1/admin/tokens", json={
            "user_id": u, "ttl_seconds": 3600})).json()["token"] for u in users]
    return tokens, hoomis


async def throughput(nodes: int, args: argparse.Namespace) -> dict[str, float]:
    cluster = HACluster(nodes=nodes)
    hub = None
    try:
        await asyncio.to_thread(cluster.start)
        dsn = await prepare(cluster)
        port = free_port()
        hub = await asyncio.to_thread(start_hub, hub_env(dsn, None), port,
                                      cluster.base / "hub.log")
        say(f"{nodes} node(s): driving {args.seconds} s")
        tokens, hoomis = await users_and_hoomis(f"http://127.0.0.1:{port}", args.connections)
        return await drive([f"ws://127.0.0.1:{port}/v1/ws"], tokens, hoomis, args.seconds,
                           args.window, hub=True)
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait(20)
        await asyncio.to_thread(cluster.close)


class Load:
    """SDK clients (two per Hoomi, one homed on each hub) sending until stopped."""

    def __init__(self, clients: list[HoomiClient], hoomis: list[UUID]) -> None:
        self.clients, self.hoomis = clients, hoomis
        self.acks: dict[UUID, tuple[UUID, UUID, int]] = {}
        self.sent: dict[UUID, float] = {}
        self.acked_at: dict[UUID, float] = {}
        self.errors: list[BaseException] = []
        self.stop = asyncio.Event()

    async def run(self, in_flight: int = 4, per_client: int = 20000) -> None:
        async def sender(k: int) -> None:
            slots = asyncio.Semaphore(in_flight)
            tasks = []

            async def one() -> None:
                cmid = uuid4()
                self.sent[cmid] = time.monotonic()
                try:
                    ack = await self.clients[k].send(self.hoomis[k // 2], os.urandom(48),
                                                     os.urandom(12), "s1", client_msg_id=cmid)
                except HubError as exc:
                    self.errors.append(exc)
                    return
                finally:
                    slots.release()
                self.acks[cmid] = (ack.hoomi_id, ack.id, ack.seq)
                self.acked_at[cmid] = time.monotonic()

            for _ in range(per_client):
                await slots.acquire()
                if self.stop.is_set():
                    break
                tasks.append(asyncio.ensure_future(one()))
            await asyncio.gather(*tasks)

        await asyncio.gather(*(sender(k) for k in range(len(self.clients))))

    def acks_after(self, t: float) -> int:
        return sum(1 for x in self.acked_at.values() if x > t)


async def lost(dsn: str, load: Load) -> int:
    """Acked messages not on the (new) leader as acked, plus rows stored twice."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT client_msg_id, hoomi_id, id, seq FROM messages"
                                " WHERE hoomi_id = ANY($1::uuid[])", list(set(load.hoomis)))
    finally:
        await conn.close()
    stored = {r["client_msg_id"]: (r["hoomi_id"], r["id"], r["seq"]) for r in rows}
    missing = sum(1 for k, v in load.acks.items() if stored.get(k) != v)
    dense = all(sorted(s for hh, _, s in stored.values() if hh == h)
                == list(range(1, 1 + sum(1 for v in stored.values() if v[0] == h)))
                for h in set(load.hoomis))
    return missing + (len(rows) - len(stored)) + (0 if dense else 1_000_000)


async def event(cluster: HACluster, urls: list[str], admin_http: str, what: str,
                dsn: str) -> dict[str, Any]:
    tokens, hoomis = await users_and_hoomis(admin_http, 4)
    clients = [HoomiClient(urls[k % 2:] + urls[:k % 2], tokens[k], backoff_max=0.5)
               for k in range(4)]
    for c in clients:
        await c.start()
    load = Load(clients, hoomis)
    running = asyncio.ensure_future(load.run())
    old = await asyncio.to_thread(cluster.wait_leader)
    (new,) = [n for n in cluster.nodes if n is not old]
    try:
        while len(load.acks) < 200:
            await asyncio.sleep(0.05)
        at = time.monotonic()
        say(f"{what}: {old.name} (leader) at {len(load.acks)} acks")
        if what == "kill":
            await asyncio.to_thread(old.kill)
        elif what == "freeze":
            await asyncio.to_thread(old.freeze)
        else:
            await asyncio.to_thread(cluster.switchover, new)
        writable = await wait_writable(new, 120)
        say(f"{what}: {new.name} writable after {writable - at:.2f} s")
        while load.acks_after(writable) < 200:
            assert time.monotonic() - at < 180, "sending did not resume"
            await asyncio.sleep(0.05)
    finally:
        load.stop.set()
        say(f"{what}: stopping the load at {len(load.acks)} acks")
        await asyncio.wait_for(running, 120)
        for c in clients:
            await c.close()
    times = sorted(t for t in load.acked_at.values() if t > at - 1)
    first = max(zip(times, times[1:], strict=False), key=lambda g: g[1] - g[0])[1]
    pending = [load.acked_at[k] for k, t in load.sent.items() if t < writable and
               load.acked_at.get(k, 0) > writable]
    result = {"event": what, "to_first_ack_s": first - at, "to_writable_s": writable - at,
              "hub_share_s": first - writable,
              "drained_s": (max(pending) - writable) if pending else 0.0,
              "acked": len(load.acks), "errors": len(load.errors),
              "lost": await lost(dsn, load)}
    if what == "freeze":  # the hung machine dies for good; the test harness rejoins it
        await asyncio.to_thread(old.kill)
    if what in ("kill", "freeze"):
        await asyncio.to_thread(old.start)
    await asyncio.to_thread(cluster.wait_healthy, 120)
    return result


async def failovers(events: list[str]) -> list[dict[str, Any]]:
    cluster = HACluster(nodes=2)
    valkey = Valkey()
    hubs = []
    try:
        await asyncio.to_thread(cluster.start)
        valkey.start()
        dsn = await prepare(cluster)
        ports = [free_port(), free_port()]
        logs = Path(tempfile.mkdtemp(prefix="hoomi-bench-ha-"))
        say(f"hub logs in {logs}")
        for p in ports:
            hubs.append(await asyncio.to_thread(start_hub, hub_env(dsn, valkey.url), p,
                                                logs / f"hub-{p}.log"))
        urls = [f"ws://127.0.0.1:{p}/v1/ws" for p in ports]
        return [await event(cluster, urls, f"http://127.0.0.1:{ports[0]}", what, dsn)
                for what in events]
    finally:
        for hub in hubs:
            hub.terminate()
            hub.wait(20)
        valkey.stop()
        await asyncio.to_thread(cluster.close)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--events", default="kill,freeze,switchover",
                    help="comma-separated failovers to measure ('' for none)")
    ap.add_argument("--no-throughput", action="store_true")
    args = ap.parse_args()
    results = {}
    if not args.no_throughput:
        for name, nodes in (("single", 1), ("sync", 2)):
            results[name] = await throughput(nodes, args)
    print(f"connections={args.connections} window={args.window} seconds={args.seconds} "
          f"payload=200B cores={os.cpu_count()}")
    for name, res in results.items():
        print(f"  {name:6s} {res['rate']:7.0f} acked msg/s  p50 {res['p50']:6.2f} ms  "
              f"p99 {res['p99']:6.2f} ms  ({res['n']} acks)")
    if len(results) == 2:
        ratio = results["sync"]["rate"] / results["single"]["rate"]
        print(f"  sync/single throughput: {ratio:.0%}")
    events = [e for e in args.events.split(",") if e]
    for r in await failovers(events) if events else []:
        print(f"  {r['event']:10s} first new ack after {r['to_first_ack_s']:5.2f} s "
              f"(leader writable after {r['to_writable_s']:5.2f} s, hub {r['hub_share_s']:5.2f} s)"
              f"; every pending send acked {r['drained_s']:.2f} s after; acked {r['acked']}, "
              f"errors seen {r['errors']}, acked lost {r['lost']}")


if __name__ == "__main__":
    tempfile.tempdir = None
    asyncio.run(main())
