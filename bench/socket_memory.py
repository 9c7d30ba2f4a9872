"""Where an idle socket's memory goes: tracemalloc in the server, per socket, against the
bare broadcast server (bench/broadcast_app.py) in the same run.

    .venv/bin/python -m bench.socket_memory [--sockets 500] [--frames 1] [--top 15]

Each server runs under bench/traced.py (tracemalloc on; SIGUSR1 writes a snapshot).
`--sockets` sockets (each its own user, all in one Hoomi) open, send `hello` and read the
welcome; one snapshot before, one with all of them open and idle. Reported per socket:
Python allocations traced (the difference of the snapshots), resident memory (RSS, which
also holds what tracemalloc cannot see: the kernel's socket buffers are not in it, but
the allocator's slack is), and the top allocation sites (`--frames` frames each).
tracemalloc slows the server; the figures are sizes, not times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import asyncpg
import websockets

from bench.common import fresh_database
from bench.fanout import rss_kib
from bench.hub import ROOT, _wait_port
from hoomi_protocol import Hello, encode_client
from server import auth
from server.testing.loopback import free_port
from server.testing.replica import ADMIN_TOKEN, JWT_SECRET
from storage.hoomis import create_hoomi
from storage.records import Member
from storage.users import create_user


async def _snapshot(proc: subprocess.Popen[bytes], out: str, k: int) -> tracemalloc.Snapshot:
    proc.send_signal(10)  # SIGUSR1
    path = Path(f"{out}.{k}")
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no snapshot")
        await asyncio.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))


async def measure(name: str, args: list[str], env: dict[str, str], port: int,
                  tokens: list[str], frames: int, top: int) -> dict[str, Any]:
    out = tempfile.mktemp(prefix=f"hoomi-snap-{name}-")
    proc = subprocess.Popen([sys.executable, "-m", "bench.traced", *args], cwd=ROOT,
                            env={**env, "HOOMI_TRACE_OUT": out,
                                 "HOOMI_TRACE_FRAMES": str(frames)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socks = []
    try:
        _wait_port(port)
        await asyncio.sleep(1.0)
        url = f"ws://127.0.0.1:{port}/v1/ws"
        # Warm up: the first socket's imports and caches are not a per-socket cost.
        warm = await websockets.connect(url, compression=None, ping_interval=None)
        await warm.send(encode_client(Hello(token=tokens[0])))
        await warm.recv()
        await warm.close()
        await asyncio.sleep(0.5)
        before_rss = rss_kib(proc.pid)
        before = await _snapshot(proc, out, 1)

        async def open_one(token: str) -> websockets.ClientConnection:
            ws = await websockets.connect(url, compression=None, open_timeout=60,
                                          ping_interval=None)
            await ws.send(encode_client(Hello(token=token)))
            await ws.recv()  # welcome
            return ws

        for chunk in range(0, len(tokens), 100):
            socks += await asyncio.gather(*(open_one(t) for t in tokens[chunk:chunk + 100]))
        await asyncio.sleep(1.0)
        after_rss = rss_kib(proc.pid)
        after = await _snapshot(proc, out, 2)
    finally:
        for ws in socks:
            await ws.close()
        proc.terminate()
        proc.wait(20)
    n = len(tokens)
    stats = after.compare_to(before, "traceback")
    traced = sum(s.size_diff for s in stats)
    lines = []
    for s in stats[:top]:
        where = " <- ".join(f"{_rel(f.filename)}:{f.lineno}" for f in s.traceback)
        lines.append(f"    {s.size_diff / n / 1024:6.2f} KiB {s.count_diff / n:5.1f} blocks  "
                     f"{where}")
    return {"traced": traced / n / 1024, "rss": (after_rss - before_rss) / n,
            "top": "\n".join(lines)}


def _rel(path: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=500)
    ap.add_argument("--frames", type=int, default=1, help="traceback depth per site")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    env = {**os.environ, "HOOMI_JWT_SECRET": JWT_SECRET, "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
           "HOOMI_LOG_LEVEL": "warning", "HOOMI_MAX_UNAUTHENTICATED_PER_ADDRESS": "100000",
           "HOOMI_HELLO_RATE": "100000", "HOOMI_HELLO_BURST": "100000"}
    env.pop("REDIS_URL", None)
    async with fresh_database() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        users = [await create_user(pool) for _ in range(args.sockets)]
        await create_hoomi(pool, [Member(u, "member") for u in users])
        await pool.close()
        tokens = [auth.issue(JWT_SECRET, u, 3600) for u in users]
        port = free_port()
        results = {"hub": await measure(
            "hub", ["server.cli", "serve"],
            {**env, "DATABASE_URL": dsn, "HOOMI_PORT": str(port)}, port, tokens,
            args.frames, args.top)}
    port = free_port()
    results["broadcast"] = await measure(
        "broadcast", ["uvicorn", "bench.broadcast_app:app", "--port", str(port), "--ws",
                      "websockets-sansio", "--ws-per-message-deflate", "false", "--log-level",
                      "warning"], env, port, tokens, args.frames, args.top)
    print(f"sockets={args.sockets} idle after hello/welcome, one Hoomi; cores={os.cpu_count()}")
    for name, r in results.items():
        print(f"  {name:9s} {r['traced']:6.1f} KiB traced per socket, "
              f"{r['rss']:6.1f} KiB RSS per socket")
        print(r["top"])
    ratio = results["hub"]["traced"] / results["broadcast"]["traced"]
    print(f"  hub/broadcast traced: {ratio:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
