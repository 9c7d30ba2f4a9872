"""Fan-out to a large Hoomi, and what each open socket costs, against a bare broadcast.

    .venv/bin/python -m bench.fanout [--members 1000] [--messages 200] [--rate 10]
                                     [--rounds 2] [--profile]

`--members` sockets join one Hoomi (each with its own user and token); one of them sends
`--messages` ciphertexts at `--rate` per second. For every message the bench records
when each member's push arrived (the sender's clock rides inside the content, which the
hub never reads), and reports:
  delivery   send → push, over every (message, member) pair: p50 / p99
  last       send → push at the *last* member, per message: p50 / p99 (what the slowest
             member of a big group sees)
  memory     the server's resident memory before the sockets opened and with all of
             them open and welcomed, per socket
  connect    sockets opened and welcomed per second
  CPU        the server's CPU time while the messages went, per push delivered
The same client drives a bare Starlette broadcast server (bench/broadcast_app.py) on
the same uvicorn and WebSocket implementation: no storage, no ordering, no queues.
Everything shares the machine's cores; compare within one run (`--rounds`: hub and
broadcast again, back to back, with the ratio of each round).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import websockets

from bench.common import fresh_database
from bench.hub import ROOT, _start, _wait_port, cpu_s, pct
from bench.profile import Profile
from hoomi_protocol import (
    Hello,
    MessageBody,
    Send,
    decode_client,
    decode_server_stream,
    encode_client,
)
from server import auth
from server.testing.loopback import free_port
from server.testing.replica import ADMIN_TOKEN, JWT_SECRET
from storage.hoomis import create_hoomi
from storage.records import Member
from storage.users import create_user


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def drive(url: str, pid: int, tokens: list[str], hoomi_id: UUID, messages: int,
                rate: float, read: Callable[[bytes], list[bytes]],
                features: tuple[str, ...] = (), profile: str = "") -> dict[str, Any]:
    """Open every socket, then send from the first; `read` returns the pushes' contents
    in one WebSocket message (none for frames that are not pushes). `profile`: py-spy
    over the server while the messages go (bench/profile.py), reported per message."""
    before = rss_kib(pid)
    started = time.perf_counter()
    socks = []
    for chunk in range(0, len(tokens), 100):  # in waves: a burst of SYNs overflows backlog
        async def open_one(token: str) -> websockets.ClientConnection:
            ws = await websockets.connect(url, max_queue=None, compression=None,
                                          open_timeout=60, ping_interval=None)
            await ws.send(encode_client(Hello(token=token, features=features)))
            await ws.recv()  # welcome
            return ws
        socks += await asyncio.gather(*(open_one(t) for t in tokens[chunk:chunk + 100]))
    connect_s = time.perf_counter() - started
    await asyncio.sleep(1.0)
    during = rss_kib(pid)

    arrivals: dict[int, list[float]] = {i: [] for i in range(messages)}

    async def listen(ws: websockets.ClientConnection) -> None:
        got = 0
        while got < messages:
            try:
                data = await asyncio.wait_for(ws.recv(decode=False), 20)
            except (TimeoutError, websockets.ConnectionClosed):
                return
            for content in read(data):
                i, t0 = struct.unpack_from(">Id", content)
                arrivals[i].append(time.perf_counter() - t0)
                got += 1

    prof = Profile(pid, profile) if profile else None
    if prof is not None:
        prof.__enter__()
    cpu_before = cpu_s(pid)
    listeners = [asyncio.ensure_future(listen(ws)) for ws in socks]
    sender = socks[0]
    payload = os.urandom(200)
    tick = 1 / rate
    start = time.perf_counter()
    for i in range(messages):
        await asyncio.sleep(max(0.0, start + i * tick - time.perf_counter()))
        content = struct.pack(">Id", i, time.perf_counter()) + payload[12:]
        await sender.send(encode_client(Send(
            hoomi_id=hoomi_id, client_msg_id=uuid4(), content=content, nonce=os.urandom(12),
            session_id="s1", ref=i)))
    await asyncio.gather(*listeners)
    cpu = cpu_s(pid) - cpu_before
    if prof is not None:
        prof.__exit__(None, None, None)
    for ws in socks:
        await ws.close()
    every = sorted(d for ds in arrivals.values() for d in ds)
    complete = [ds for ds in arrivals.values() if len(ds) == len(socks)]
    last = sorted(max(ds) for ds in complete)
    return {"connect_rate": len(socks) / connect_s, "rss_before": before, "rss": during,
            "per_socket_kib": (during - before) / len(socks),
            "d50": pct(every, 0.5), "d99": pct(every, 0.99),
            "last50": pct(last, 0.5) if last else float("nan"),
            "last99": pct(last, 0.99) if last else float("nan"),
            "delivered": len(every), "expected": messages * len(socks),
            "complete": len(complete), "cpu_per_push": cpu / max(1, len(every)),
            "profile": prof.report(per=messages) if prof is not None else ""}


def _hub_push(data: bytes) -> list[bytes]:
    """Every push in one message: one frame, or a "batch" stream of them (SPEC 7.2)."""
    return [frame.content for frame in decode_server_stream(data)
            if isinstance(frame, MessageBody) and frame.content is not None]


def _echoed_send(data: bytes) -> list[bytes]:
    try:
        frame = decode_client(data)
    except Exception:
        return []  # the welcome
    return [frame.content] if isinstance(frame, Send) else []


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--rate", type=float, default=10, help="messages per second")
    ap.add_argument("--rounds", type=int, default=1,
                    help="hub then broadcast this many times: the ratio per round, median")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy over the hub while the messages go (bench/profile.py)")
    args = ap.parse_args()
    env = {**os.environ, "HOOMI_JWT_SECRET": JWT_SECRET, "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
           "HOOMI_LOG_LEVEL": "warning", "HOOMI_SEND_RATE": "100000",
           "HOOMI_SEND_BURST": "100000",
           # every bench socket comes from 127.0.0.1, a hundred at a time
           "HOOMI_MAX_UNAUTHENTICATED_PER_ADDRESS": "100000", "HOOMI_HELLO_RATE": "100000",
           "HOOMI_HELLO_BURST": "100000"}
    env.pop("REDIS_URL", None)
    results = {}
    async with fresh_database() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        users = [await create_user(pool) for _ in range(args.members)]
        hoomi_id = await create_hoomi(pool, [Member(u, "member") for u in users])
        await pool.close()
        tokens = [auth.issue(JWT_SECRET, u, 3600) for u in users]

        for k in range(1, args.rounds + 1):
            suffix = "" if k == 1 else f" #{k}"
            port = free_port()
            hub = _start([sys.executable, "-m", "server.cli", "serve"],
                         {**env, "DATABASE_URL": dsn, "HOOMI_PORT": str(port)}, port)
            try:
                results["hub" + suffix] = await drive(
                    f"ws://127.0.0.1:{port}/v1/ws", hub.pid, tokens, hoomi_id,
                    args.messages, args.rate, _hub_push, features=("batch",),
                    profile=f"fanout-hub{suffix.replace(' #', '-')}" if args.profile else "")
            finally:
                hub.terminate()
                hub.wait(20)
            port = free_port()
            base = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "bench.broadcast_app:app", "--port",
                 str(port), "--ws", "websockets-sansio", "--ws-per-message-deflate", "false",
                 "--log-level", "warning"], cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_port(port)
                results["broadcast" + suffix] = await drive(
                    f"ws://127.0.0.1:{port}/v1/ws", base.pid, tokens, hoomi_id,
                    args.messages, args.rate, _echoed_send)
            finally:
                base.terminate()
                base.wait(20)
    print(f"members={args.members} messages={args.messages} rate={args.rate}/s "
          f"payload=200B cores={os.cpu_count()}")
    for name, r in results.items():
        print(f"  {name:9s} delivery p50 {r['d50']:7.2f} ms p99 {r['d99']:7.2f} ms | last member "
              f"p50 {r['last50']:7.2f} ms p99 {r['last99']:7.2f} ms | "
              f"{r['delivered']}/{r['expected']} pushes")
        print(f"  {'':9s} RSS {r['rss_before'] / 1024:.1f} -> {r['rss'] / 1024:.1f} MiB, "
              f"{r['per_socket_kib']:.1f} KiB per socket; {r['connect_rate']:.0f} sockets "
              f"opened and welcomed per second; server CPU {r['cpu_per_push'] * 1e6:.1f} µs "
              f"per push")
    ratios = []
    for k in range(1, args.rounds + 1):
        suffix = "" if k == 1 else f" #{k}"
        hub_r, base_r = results["hub" + suffix], results["broadcast" + suffix]
        ratios.append((hub_r["d50"] / base_r["d50"],
                       hub_r["cpu_per_push"] / base_r["cpu_per_push"]))
    print(f"  hub/broadcast delivery p50 by round: {', '.join(f'{r[0]:.2f}x' for r in ratios)}"
          f" (median {sorted(r[0] for r in ratios)[len(ratios) // 2]:.2f}x); server CPU per "
          f"push: {', '.join(f'{r[1]:.2f}x' for r in ratios)}")
    for r in results.values():
        if r["profile"]:
            print(r["profile"])


if __name__ == "__main__":
    asyncio.run(main())
