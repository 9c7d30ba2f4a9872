"""Fan-out to a large Hoomi, and what each open socket costs, against a bare broadcast.

    .venv/bin/python -m bench.fanout [--members 1000] [--messages 200] [--rate 10]
                                     [--rounds 2] [--profile] [--compare TREE]
                                     [--interleave] [--validate]

`--members` sockets join one Hoomi (each with its own user and token); one of them sends
`--messages` ciphertexts at `--rate` per second (in all: with `--interleave`, shared by
the servers). For every message the bench records
when each member's push arrived (the sender's clock rides inside the content, which the
hub never reads), and reports:
  delivery   send → push, over every (message, member) pair: p50 / p99
  last       send → push at the *last* member, per message: p50 / p99 (what the slowest
             member of a big group sees)
  memory     the server's resident memory before the sockets opened and with all of
             them open and welcomed, per socket
  connect    sockets opened and welcomed per second
  CPU        the server's CPU time while the messages went, per push delivered
The client is bench/wsload.py's (callbacks on uvloop, as bench.hub's: the `websockets`
client's own cost per push counted as delivery latency). It drives a bare Starlette
broadcast server (bench/broadcast_app.py) on
the same uvicorn and WebSocket implementation: no storage, no ordering, no queues.
Everything shares the machine's cores; compare within one run (`--rounds`: hub and
broadcast again, back to back, with the ratio of each round). `--compare TREE` runs the
hub of another checkout too, in each round (`git worktree add
/tmp/before <commit>`), first in odd rounds, second in even ones: the two trees against
the same broadcast in the same run. `--interleave` runs a round's servers at once, their
messages taking turns (hub, broadcast, hub, ...): a drift of the machine's load between
two servers' runs, which moved the broadcast's p50 by 1.5x from one round to the next,
then falls on all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import msgpack

from bench import wsload
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


class Target:
    """One server's sockets, opened and welcomed, and what it delivered to them."""

    def __init__(self, name: str, pid: int, read: Callable[[bytes], list[bytes]],
                 messages: int, hoomi_id: UUID) -> None:
        self.name, self.pid, self.read, self.hoomi_id = name, pid, read, hoomi_id
        self.socks: list[wsload.LeanSocket] = []
        self.arrivals: dict[int, list[float]] = {i: [] for i in range(messages)}
        self.rss_before = self.rss = 0
        self.connect_s = self.cpu = 0.0
        self.prof: Profile | None = None

    async def open(self, url: str, tokens: list[str], features: tuple[str, ...]) -> None:
        self.rss_before = rss_kib(self.pid)
        started = time.perf_counter()
        for chunk in range(0, len(tokens), 100):  # in waves: a burst of SYNs overflows backlog
            async def open_one(k: int, token: str) -> wsload.LeanSocket:
                ws = await wsload.connect(url, random.Random(k))
                ws.send(encode_client(Hello(token=token, features=features)))
                async with asyncio.timeout(60):
                    await ws.recv()  # welcome
                return ws
            self.socks += await asyncio.gather(*(open_one(chunk + k, t) for k, t in
                                                 enumerate(tokens[chunk:chunk + 100])))
        self.connect_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        self.rss = rss_kib(self.pid)

    async def listen(self, ws: wsload.LeanSocket, messages: int) -> None:
        """Record each push's arrival, by callback (no task wake-up per message), until
        `messages` came, the socket closed, or none came for 20 s."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        got = 0
        last = loop.time()

        def on_message(data: bytes) -> None:
            nonlocal got, last
            now = time.perf_counter()
            last = loop.time()
            for content in self.read(data):
                i, t0 = struct.unpack_from(">Id", content)
                self.arrivals[i].append(now - t0)
                got += 1
            if got >= messages and not done.done():
                done.set_result(None)

        ws.listen(on_message)
        while not done.done() and not ws.closed.done():
            await asyncio.wait((done, ws.closed), timeout=max(0.1, last + 20 - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if loop.time() - last >= 20:
                return

    def result(self, messages: int) -> dict[str, Any]:
        every = sorted(d for ds in self.arrivals.values() for d in ds)
        complete = [ds for ds in self.arrivals.values() if len(ds) == len(self.socks)]
        last = sorted(max(ds) for ds in complete)
        return {"connect_rate": len(self.socks) / self.connect_s,
                "rss_before": self.rss_before, "rss": self.rss,
                "per_socket_kib": (self.rss - self.rss_before) / len(self.socks),
                "d50": pct(every, 0.5), "d99": pct(every, 0.99),
                "last50": pct(last, 0.5) if last else float("nan"),
                "last99": pct(last, 0.99) if last else float("nan"),
                "delivered": len(every), "expected": messages * len(self.socks),
                "complete": len(complete), "cpu_per_push": self.cpu / max(1, len(every)),
                "profile": self.prof.report(per=messages) if self.prof is not None else ""}


async def drive(targets: list[Target], messages: int, rate: float,
                profile: bool = False) -> None:
    """Send `messages` from each target's first socket, the targets taking turns message
    by message at `rate` messages per second in all (one target: the old bench), while
    every socket listens. `profile`: py-spy over each hub (bench/profile.py)."""
    listeners = [asyncio.ensure_future(t.listen(ws, messages))
                 for t in targets for ws in t.socks]
    for t in targets:
        if profile and t.name.split()[0] != "broadcast":
            t.prof = Profile(t.pid, f"fanout-{t.name.replace(' #', '-')}").__enter__()
        t.cpu = cpu_s(t.pid)
    payload = os.urandom(200)
    tick = 1 / rate
    start = time.perf_counter()
    n = 0
    for i in range(messages):
        for t in targets:
            await asyncio.sleep(max(0.0, start + n * tick - time.perf_counter()))
            n += 1
            content = struct.pack(">Id", i, time.perf_counter()) + payload[12:]
            t.socks[0].send(encode_client(Send(
                hoomi_id=t.hoomi_id, client_msg_id=uuid4(), content=content,
                nonce=os.urandom(12), session_id="s1", ref=i)))
    await asyncio.gather(*listeners)
    for t in targets:
        t.cpu = cpu_s(t.pid) - t.cpu
        if t.prof is not None:
            t.prof.__exit__(None, None, None)
        for ws in t.socks:
            await ws.close()


# The client reads both servers' frames as plain msgpack maps (~1 µs each). Decoding them
# into typed frames (`--validate`) cost it 6.3 µs per hub push against 3.1 µs per echoed
# send: 1.6 ms more of the client's time per message to 500 members, which counted as
# the hub's delivery latency.

def _maps(data: bytes) -> list[dict[str, Any]]:
    """The maps of one WebSocket message: one frame, or a "batch" stream (SPEC 7.2)."""
    try:
        return [msgpack.unpackb(data)]
    except msgpack.ExtraData:
        unpacker = msgpack.Unpacker()
        unpacker.feed(data)
        return list(unpacker)


def _hub_push(data: bytes) -> list[bytes]:
    """Every push's content in one message."""
    return [m["content"] for m in _maps(data)
            if m.get("type") == "message" and m.get("content") is not None]


def _echoed_send(data: bytes) -> list[bytes]:
    m = msgpack.unpackb(data)
    return [m["content"]] if m.get("type") == "send" else []  # not the welcome


def _hub_push_typed(data: bytes) -> list[bytes]:
    return [frame.content for frame in decode_server_stream(data)
            if isinstance(frame, MessageBody) and frame.content is not None]


def _echoed_send_typed(data: bytes) -> list[bytes]:
    try:
        frame = decode_client(data)
    except Exception:
        return []  # the welcome
    return [frame.content] if isinstance(frame, Send) else []


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--rate", type=float, default=10, help="messages per second, in all")
    ap.add_argument("--rounds", type=int, default=1,
                    help="hub then broadcast this many times: the ratio per round, median")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy over the hub while the messages go (bench/profile.py)")
    ap.add_argument("--compare", metavar="TREE",
                    help="also run the hub of this checkout, in each round (before/after)")
    ap.add_argument("--validate", action="store_true",
                    help="decode every frame into typed frames (the client's cost per "
                         "push is then not the same for both servers)")
    ap.add_argument("--interleave", action="store_true",
                    help="every server of a round up at once, taking turns message by "
                         "message: the VM's load drifts alike for all of them")
    args = ap.parse_args()
    env = {**os.environ, "HOOMI_JWT_SECRET": JWT_SECRET, "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
           "HOOMI_LOG_LEVEL": "warning", "HOOMI_SEND_RATE": "100000",
           "HOOMI_SEND_BURST": "100000",
           # every bench socket comes from 127.0.0.1, a hundred at a time
           "HOOMI_MAX_UNAUTHENTICATED_PER_ADDRESS": "100000", "HOOMI_HELLO_RATE": "100000",
           "HOOMI_HELLO_BURST": "100000"}
    env.pop("REDIS_URL", None)
    hubs: list[tuple[str, list[str]]] = [("hub", [sys.executable, "-m", "server.cli", "serve"])]
    if args.compare:
        tree = os.path.abspath(args.compare)
        # The other tree's server package first on the path (this one's is the cwd).
        hubs.insert(0, ("compared", [
            sys.executable, "-c", f"import runpy, sys; sys.path.insert(0, {tree!r}); "
            "runpy.run_module('server.cli', run_name='__main__', alter_sys=True)", "serve"]))
    names = [name for name, _ in hubs] + ["broadcast"]
    results: dict[str, dict[str, Any]] = {}
    async with fresh_database() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        # Users and a Hoomi per hub: hubs up at once (`--interleave`) on one database must
        # not share a Hoomi's seqs, nor a user's sockets (each would get the other's
        # messages too, by reconcile). The broadcast takes the last hub's tokens.
        hoomi_ids: dict[str, UUID] = {}
        tokens: dict[str, list[str]] = {}
        for name, _ in hubs:
            users = [await create_user(pool) for _ in range(args.members)]
            hoomi_ids[name] = await create_hoomi(pool, [Member(u, "member") for u in users])
            tokens[name] = [auth.issue(JWT_SECRET, u, 3600) for u in users]
        hoomi_ids["broadcast"], tokens["broadcast"] = hoomi_ids[name], tokens[name]
        await pool.close()

        async def up(name: str, stack: contextlib.ExitStack) -> Target:
            port = free_port()
            if name == "broadcast":
                proc = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "bench.broadcast_app:app", "--port",
                     str(port), "--ws", "websockets-sansio", "--ws-per-message-deflate",
                     "false", "--log-level", "warning"], cwd=ROOT,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                stack.callback(_stop, proc)
                _wait_port(port)
                target = Target(name, proc.pid,
                                _echoed_send_typed if args.validate else _echoed_send,
                                args.messages, hoomi_ids[name])
                await target.open(f"ws://127.0.0.1:{port}/v1/ws", tokens[name], ())
            else:
                proc = _start(dict(hubs)[name], {**env, "DATABASE_URL": dsn,
                                                 "HOOMI_PORT": str(port)}, port)
                stack.callback(_stop, proc)
                target = Target(name, proc.pid,
                                _hub_push_typed if args.validate else _hub_push,
                                args.messages, hoomi_ids[name])
                await target.open(f"ws://127.0.0.1:{port}/v1/ws", tokens[name],
                                  ("batch",))
            return target

        for k in range(1, args.rounds + 1):
            suffix = "" if k == 1 else f" #{k}"
            # The trees take turns at going first (the VM's load drifts within a round).
            order = names if k % 2 or len(hubs) < 2 else [hubs[1][0], hubs[0][0], "broadcast"]
            groups = [order] if args.interleave else [[name] for name in order]
            for group in groups:
                with contextlib.ExitStack() as stack:
                    targets = [await up(name, stack) for name in group]
                    for t in targets:
                        t.name += suffix
                    await drive(targets, args.messages, args.rate, args.profile)
                    for t in targets:
                        results[t.name] = t.result(args.messages)
    print(f"members={args.members} messages={args.messages} rate={args.rate}/s "
          f"payload=200B cores={os.cpu_count()}"
          + (" interleaved" if args.interleave else ""))
    for name, r in results.items():
        print(f"  {name:9s} delivery p50 {r['d50']:7.2f} ms p99 {r['d99']:7.2f} ms | last member "
              f"p50 {r['last50']:7.2f} ms p99 {r['last99']:7.2f} ms | "
              f"{r['delivered']}/{r['expected']} pushes")
        print(f"  {'':9s} RSS {r['rss_before'] / 1024:.1f} -> {r['rss'] / 1024:.1f} MiB, "
              f"{r['per_socket_kib']:.1f} KiB per socket; {r['connect_rate']:.0f} sockets "
              f"opened and welcomed per second; server CPU {r['cpu_per_push'] * 1e6:.1f} µs "
              f"per push")
    for name, _ in hubs:
        ratios = []
        for k in range(1, args.rounds + 1):
            suffix = "" if k == 1 else f" #{k}"
            hub_r, base_r = results[name + suffix], results["broadcast" + suffix]
            ratios.append((hub_r["d50"] / base_r["d50"],
                           hub_r["cpu_per_push"] / base_r["cpu_per_push"]))
        print(f"  {name}/broadcast delivery p50 by round: "
              f"{', '.join(f'{r[0]:.2f}x' for r in ratios)} (median "
              f"{sorted(r[0] for r in ratios)[len(ratios) // 2]:.2f}x); server CPU per "
              f"push: {', '.join(f'{r[1]:.2f}x' for r in ratios)}")
    for r in results.values():
        if r["profile"]:
            print(r["profile"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(20)


if __name__ == "__main__":
    import uvloop
    uvloop.run(main())
