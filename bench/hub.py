"""Acked messages per second and ack latency of the hub, against a bare echo server.

    .venv/bin/python -m bench.hub [--seconds 10] [--connections 50] [--window 8]
                                  [--half] [--half-rounds 1] [--rounds 2]
                                  [--profile]

Both servers run as separate uvicorn processes on loopback. The same client code drives
both: `--connections` sockets, pairs of them in two-member Hoomis (50 connections →
25 Hoomis), each keeping up to `--window` requests in flight for `--seconds`.
  hub   a `send` of a 200-byte ciphertext, timed until its `ack` (stored, committed),
        while every message is also pushed to both members of its Hoomi
  echo  the same encoded frame, timed until the server sends it back
The client shares the machine's two cores with the server: numbers are for comparison
within one run, not absolute capacity. Each run also reports the server's CPU time per
message (and, with the embedded PostgreSQL, its server's), the clients' own CPU time per
message, which the machine's load disturbs less than rates, the share of the run the hub
and the clients spent waiting for a CPU (/proc schedstat), and the rows per committed
batch (the first hub's hoomi_writer_batch_size from /metrics, and the shares of the
hub's own acks and batch commits over 2, 5 and 10 ms from hoomi_ack_seconds and
hoomi_writer_batch_seconds); `--half` runs the echo paced at the same rate as `hub
half`, for the latency the machine alone adds; `--rounds` repeats echo and hub batch
back to back, `--half-rounds` the paced hub run.

The client is kept lean because it shares the cores and was the echo's bottleneck: with
a task per message (asyncio.wait_for) and uuid4 the echo made 25 000 round trips/s,
without them 37 000, and with bench/wsload.py's callback client on uvloop instead of the
`websockets` client 85 000-99 000 (client CPU per round trip 26 → 10 µs), on the same
machine. Before the hub runs the PostgreSQL server gets the WAL a server in service has
(`warm_wal`: segment files made ahead, and a CHECKPOINT before each run so they are
recycled): a new server creates and zero-fills a 16 MiB segment inside a commit every
16 MiB of WAL, which held one commit in ~500 past 10 ms at half load. `--cold-wal`
measures without that; each hub run prints the segments created during it.
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
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import msgpack
import redis.asyncio as aioredis

from bench import wsload
from bench.common import fresh_database
from bench.profile import Profile
from hoomi_protocol import (
    Ack,
    Hello,
    MessageBody,
    Send,
    decode_server,
    decode_server_stream,
    encode_client,
    split_stream,
)
from server.testing.loopback import free_port
from server.testing.replica import ADMIN_TOKEN, JWT_SECRET

ROOT = Path(__file__).resolve().parent.parent
# WAL segment files made before the runs (16 MiB each): more than one run writes.
WARM_SEGMENTS = 24


def _start(args: list[str], env: dict[str, str], port: int,
           log: Path | None = None) -> subprocess.Popen:
    """Run a server and wait for its /healthz; its output goes to `log` (or nowhere)."""
    # The child keeps its own copy of the log's file descriptor.
    with open(log, "ab") if log is not None else contextlib.nullcontext(
            subprocess.DEVNULL) as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    where = f"; see {log}" if log is not None else ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited{where}") from None
            time.sleep(0.1)
    raise TimeoutError(f"server did not start{where}")


def _wait_port(port: int) -> None:
    import socket
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("echo server did not start")


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


def cpu_s(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) a process has used; with `children`, also its live
    children's and its exited children's (a PostgreSQL postmaster and its backends).
    CPU is what this shared VM's noise disturbs least: wall-clock rates swing 2x between
    runs, CPU per message much less."""
    def fields(p: int) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    own = fields(pid)
    total = int(own[11]) + int(own[12])
    if children:
        total += int(own[13]) + int(own[14])
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    f = fields(int(entry))
                except OSError:
                    continue
                if int(f[1]) == pid:
                    total += int(f[11]) + int(f[12])
    return total / tick


def run_delay_s(pid: int) -> float:
    """Seconds the process's threads have spent runnable but waiting for a CPU
    (/proc/PID/task/*/schedstat, second field): on a machine whose cores the hub,
    PostgreSQL and the clients share, the part of a latency that is only the wait for a
    core."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except OSError:
            continue
    return total / 1e9


async def postmaster_pid(dsn: str) -> int | None:
    """The PostgreSQL server's main process, if it runs on this machine (embedded)."""
    conn = await asyncpg.connect(dsn)
    try:
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        # Read while the backend lives: once the connection closes, it is gone.
        with open(f"/proc/{backend}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None
    finally:
        await conn.close()


async def wal_segments_created(dsn: str) -> int | None:
    """WAL segment files PostgreSQL has created and zero-filled so far, all processes
    (pg_stat_io, PostgreSQL 18; None before that). A backend that needs a new segment
    writes its 16 MiB before its commit returns: tens of milliseconds here. A server that
    has checkpointed recycles old segments instead (renamed, not written)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT sum(writes) FROM pg_stat_io WHERE object = 'wal' AND context = 'init'"))
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()


async def warm_wal(dsn: str, segments: int = 0) -> bool:
    """Have PostgreSQL's WAL as a server in service has it: `segments` new segment files
    (a WAL record and a switch each, so each switch moves on), then a CHECKPOINT, after
    which the files written so far are recycled for the WAL to come instead of new ones
    created and zero-filled in the middle of a commit. False if this role may not
    (superuser, or pg_checkpoint and EXECUTE on pg_switch_wal)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(segments):
            await conn.execute("SELECT pg_logical_emit_message(false, 'bench.hub', '')")
            await conn.execute("SELECT pg_switch_wal()")
        await conn.execute("CHECKPOINT")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


async def broker_figures(valkey: Any) -> tuple[float, float]:
    """The Valkey server's CPU seconds so far and the PUBLISH commands it has run (INFO
    commandstats); zeros without one."""
    if valkey is None or valkey.proc is None:
        return 0.0, 0.0
    client = aioredis.Redis.from_url(valkey.url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return cpu_s(valkey.proc.pid), float(stats.get("cmdstat_publish", {}).get("calls", 0))


def hub_metrics(port: int) -> dict[str, float]:
    """The hub's /metrics samples by name with labels: 'hoomi_ack_seconds_bucket{le="0.01"}'."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("hoomi_"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def writer_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Over a run: rows per committed batch, and the shares of acks (the hub's own
    measure: send read -> ack queued) and of batch commits that took over 10 ms, which
    tell whether a tail seen by the client is the writer's or comes after it."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)
    batches = max(1.0, delta("hoomi_writer_batch_size_count"))
    acks = max(1.0, delta("hoomi_ack_seconds_count"))
    return {
        "rows_per_batch": delta("hoomi_writer_batch_size_sum") / batches,
        "acks_over_10ms": 1 - delta('hoomi_ack_seconds_bucket{le="0.01"}') / acks,
        "acks_over_5ms": 1 - delta('hoomi_ack_seconds_bucket{le="0.005"}') / acks,
        "acks_over_2ms": 1 - delta('hoomi_ack_seconds_bucket{le="0.002"}') / acks,
        "batches_over_10ms": 1 - delta('hoomi_writer_batch_seconds_bucket{le="0.01"}') / batches,
        "batches_over_2ms": 1 - delta('hoomi_writer_batch_seconds_bucket{le="0.002"}') / batches,
    }


async def drive(urls: list[str], tokens: list[str], hoomis: list, seconds: float, window: int,
                hub: bool, batch: bool = False, rate: float = 0.0, raw: bool = False
                ) -> dict[str, float]:
    """`batch`: the hello asks for "batch" (SPEC 7.2) and messages are read as streams.
    `raw`: hub frames are read as plain msgpack maps, as the echo client reads its own
    (else each is decoded and validated into a typed frame, protocol.decode_server).
    `rate` > 0: each connection sends at rate/connections per second (paced, open loop,
    still at most `window` in flight) instead of as fast as acks come back.

    Each connection is a bench/wsload.py socket driven by callbacks: a send goes from the
    ack that frees its slot (or from the pacing timer), with no task per message."""
    rng = random.Random(7)
    # Each run its own session_id: the same seeded nonces again would meet the nonce guard.
    session_id = uuid4().hex[:12]
    # client_msg_ids: seeded afresh each run (a repeat of an earlier run's would be a retry).
    ids = random.Random(uuid4().int)
    payload = os.urandom(200)
    latencies: list[float] = []
    # Send → push at the *other* member: the sender's clock rides in the first 8 bytes of
    # the (opaque to the hub) content; both members are in this process.
    deliveries: list[float] = []
    pushes = 0
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    period = len(tokens) / rate if rate > 0 else 0.0

    async def one(k: int) -> None:
        # Connection k and k+1 share a Hoomi; with two replicas they sit on different ones.
        ws = await wsload.connect(urls[k % len(urls)], random.Random(k))
        me_str = ""
        if hub:
            ws.send(encode_client(Hello(token=tokens[k],
                                        features=("batch",) if batch else ())))
            welcome = decode_server(split_stream(await ws.recv())[0])
            me_str = str(getattr(welcome, "user_id", None))
        me = UUID(me_str) if hub else None
        h = hoomis[k // 2]
        sent_at: dict[int, float] = {}
        finished: asyncio.Future[None] = loop.create_future()
        i = 0
        due = 0  # paced sends whose time came while the window was full
        ended = False

        def send_one() -> None:
            nonlocal i
            i += 1
            sent_at[i] = time.perf_counter()
            content = struct.pack(">d", sent_at[i]) + payload[8:]
            # Ids from the seeded generator: uuid4() reads the kernel's random source,
            # a system call per message.
            frame = Send(hoomi_id=h, client_msg_id=UUID(int=ids.getrandbits(128), version=4),
                         content=content, nonce=rng.randbytes(12), session_id=session_id,
                         ref=i)
            ws.send(encode_client(frame))

        def more() -> None:
            """Send what the window and the pacing allow now; end once all is acked."""
            nonlocal due
            if ended or loop.time() >= stop_at:
                if not sent_at and not finished.done():
                    finished.set_result(None)
                return
            if not period:
                while len(sent_at) < window:
                    send_one()
                return
            while due and len(sent_at) < window:
                due -= 1
                send_one()

        def tick(at: float) -> None:
            nonlocal due, ended
            if at >= stop_at:
                ended = True  # the last tick: even if the loop's timer ran it a bit early
                more()
                return
            due += 1
            more()
            loop.call_at(at + period, tick, at + period)

        def on_message(data: bytes) -> None:
            nonlocal pushes
            if not hub:  # the echo of our own send frame
                refs = [msgpack.unpackb(data)["ref"]]
            elif raw:  # as little decoding as the echo client does: maps, no checks
                refs = []
                unpacker = msgpack.Unpacker(raw=False)
                unpacker.feed(data)
                for m in unpacker:
                    kind = m["type"]
                    if kind == "message":
                        pushes += 1
                        if m["sender_id"] != me_str and m.get("content") is not None:
                            (t0,) = struct.unpack_from(">d", m["content"])
                            deliveries.append(time.perf_counter() - t0)
                    elif kind == "ack":
                        refs.append(m["ref"])
                    else:
                        raise RuntimeError(f"unexpected {m}")
            else:
                refs = []
                for frame in (decode_server_stream(data) if batch else [decode_server(data)]):
                    if isinstance(frame, MessageBody):
                        pushes += 1
                        if frame.sender_id != me and frame.content is not None:
                            (t0,) = struct.unpack_from(">d", frame.content)
                            deliveries.append(time.perf_counter() - t0)
                        continue
                    if not isinstance(frame, Ack):
                        raise RuntimeError(f"unexpected {frame}")
                    refs.append(frame.ref)
            now = time.perf_counter()
            for ref in refs:
                latencies.append(now - sent_at.pop(ref))
            more()

        def guarded(data: bytes) -> None:
            try:
                on_message(data)
            except Exception as exc:  # a bad frame ends the run loudly
                if not finished.done():
                    finished.set_exception(exc)

        ws.listen(guarded)  # pushes that came after the welcome first
        if period:
            start = loop.time() + rng.random() * period
            loop.call_at(start, tick, start)
        else:
            more()
        try:
            # No ack for 10 s after the end: fail loudly.
            async with asyncio.timeout(seconds + 10):
                await asyncio.wait((finished, ws.closed), return_when=asyncio.FIRST_COMPLETED)
            if not finished.done():
                raise RuntimeError(f"connection {k} closed with {len(sent_at)} sends unacked"
                                   f" ({ws.error or 'by the server'})")
            finished.result()
        finally:
            await ws.close()

    started = time.monotonic()
    client_cpu = time.process_time()  # this process runs only the clients
    await asyncio.gather(*(one(k) for k in range(len(tokens))))
    elapsed = time.monotonic() - started
    client_cpu = time.process_time() - client_cpu
    latencies.sort()
    deliveries.sort()
    return {"rate": len(latencies) / elapsed, "p50": pct(latencies, 0.5),
            "p99": pct(latencies, 0.99), "n": len(latencies), "pushes": pushes / elapsed,
            "client_cpu": client_cpu / max(1, len(latencies)),
            "d50": pct(deliveries, 0.5) if deliveries else 0.0,
            "d99": pct(deliveries, 0.99) if deliveries else 0.0}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--no-v1", action="store_true",
                    help="skip the hub run without batching (one frame per message)")
    ap.add_argument("--half", action="store_true",
                    help="then a paced run at half the batched hub's msg/s: ack p99 there")
    ap.add_argument("--half-rounds", type=int, default=1,
                    help="paced half runs of the hub (its p99 swings between runs)")
    ap.add_argument("--half-rate", type=float, default=0.0,
                    help="pace the half runs at this msg/s instead of half the measured "
                    "rate (to compare trees at one load)")
    ap.add_argument("--cold-wal", action="store_true",
                    help="no WAL segments made ahead and no CHECKPOINT before each hub run: "
                         "PostgreSQL then creates and zero-fills a segment every 16 MiB of "
                         "WAL, in a commit, instead of recycling one")
    ap.add_argument("--validate", action="store_true",
                    help="the hub client decodes and validates every frame (decode_server) "
                         "instead of reading plain msgpack maps as the echo client does")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy over the (first) hub during each hub run (bench/profile.py)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="echo and hub batch this many times, back to back: the ratio per "
                         "round and its median (the VM's load drifts within minutes)")
    ap.add_argument("--replicas", type=int, choices=[1, 2], default=1,
                    help="2: two hub processes and a Valkey; each Hoomi spans both")
    args = ap.parse_args()
    env = {**os.environ, "HOOMI_JWT_SECRET": JWT_SECRET, "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN,
           "HOOMI_LOG_LEVEL": "warning", "HOOMI_SEND_RATE": "100000",
           "HOOMI_SEND_BURST": "100000",
           # every bench socket comes from 127.0.0.1, all at once
           "HOOMI_MAX_UNAUTHENTICATED_PER_ADDRESS": "100000", "HOOMI_HELLO_RATE": "100000",
           "HOOMI_HELLO_BURST": "100000", "HOOMI_HTTP_RATE": "100000",
           "HOOMI_HTTP_BURST": "100000"}
    env.pop("REDIS_URL", None)
    valkey = None
    if args.replicas == 2:
        from server.testing.valkey import Valkey
        valkey = Valkey()
        valkey.start()
        env["REDIS_URL"] = valkey.url
    async with fresh_database() as dsn:
        hub_ports = [free_port() for _ in range(args.replicas)]
        hub_port, echo_port = hub_ports[0], free_port()
        hubs = [_start([sys.executable, "-m", "server.cli", "serve"],
                       {**env, "DATABASE_URL": dsn, "HOOMI_PORT": str(p)}, p)
                for p in hub_ports]
        echo = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.echo_app:app", "--port", str(echo_port),
             "--ws", "websockets-sansio", "--ws-per-message-deflate", "false",
             "--log-level", "warning"], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(echo_port)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hub_port}",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
                                         ) as admin:
                users = [(await admin.post("/v1/admin/users", json={})).json()["id"]
                         for _ in range(args.connections)]
                hoomis = []
                for k in range(0, len(users), 2):
                    members = [{"user_id": u, "role": "admin"} for u in users[k:k + 2]]
                    r = await admin.post("/v1/admin/hoomis", json={"members": members})
                    hoomis.append(r.json()["id"])
                tokens = [(await admin.post("/v1/admin/tokens", json={
                    "user_id": u, "ttl_seconds": 3600})).json()["token"] for u in users]
            from uuid import UUID
            hoomi_ids = [UUID(h) for h in hoomis]
            urls = [f"ws://127.0.0.1:{p}/v1/ws" for p in hub_ports]
            postgres = await postmaster_pid(dsn)
            results: dict[str, dict[str, float]] = {}
            profiles = []
            rounds: list[tuple[float, float, float]] = []  # (msg/s, hub CPU, PG CPU) / echo

            async def echo_run(name: str, window: int, rate: float = 0.0) -> None:
                before = cpu_s(echo.pid)
                results[name] = await drive([f"ws://127.0.0.1:{echo_port}/v1/ws"], tokens,
                                            hoomi_ids, args.seconds, window, hub=False,
                                            rate=rate)
                results[name]["cpu"] = (cpu_s(echo.pid) - before) / results[name]["n"]

            async def run(name: str, window: int, batch: bool, rate: float = 0.0) -> None:
                with contextlib.ExitStack() as stack:
                    if args.profile:
                        prof = stack.enter_context(Profile(hubs[0].pid, name.replace(" ", "-")))
                    metrics0 = hub_metrics(hub_port)
                    before = [cpu_s(h.pid) for h in hubs]
                    waits = (run_delay_s(hubs[0].pid), run_delay_s(os.getpid()))
                    pg_before = cpu_s(postgres, children=True) if postgres else 0.0
                    broker_before = await broker_figures(valkey)
                    if not args.cold_wal:
                        await warm_wal(dsn)  # recycle the last run's segments for this one
                    segments0 = await wal_segments_created(dsn)
                    res = await drive(urls, tokens, hoomi_ids, args.seconds, window,
                                      hub=True, batch=batch, rate=rate, raw=not args.validate)
                    res["cpu"] = sum(cpu_s(h.pid) - b for h, b in zip(hubs, before,
                                                                      strict=True)) / res["n"]
                    res["hub_wait"] = (run_delay_s(hubs[0].pid) - waits[0]) / args.seconds
                    # Stats reach pg_stat_io within a second of the run's commits.
                    await asyncio.sleep(1.2)
                    segments = await wal_segments_created(dsn)
                    if segments is not None and segments0 is not None:
                        res["wal_segments"] = segments - segments0
                    res["client_wait"] = (run_delay_s(os.getpid()) - waits[1]) / args.seconds
                    # The first hub's writer in this run.
                    res.update(writer_figures(metrics0, hub_metrics(hub_port)))
                    if postgres:
                        res["pg_cpu"] = (cpu_s(postgres, children=True) - pg_before) / res["n"]
                    if valkey is not None:
                        broker_after = await broker_figures(valkey)
                        res["valkey_cpu"] = (broker_after[0] - broker_before[0]) / res["n"]
                        res["publishes"] = (broker_after[1] - broker_before[1]) / res["n"]
                    results[name] = res
                if args.profile:
                    profiles.append(prof.report(per=int(results[name]["n"])))

            # A server in service has checkpointed and recycles its old WAL segments. This
            # one is new: each 16 MiB of WAL would be a segment created and zero-filled in
            # the middle of a commit, >10 ms (bench/RESULTS.md, fifth pass).
            if not args.cold_wal and not await warm_wal(dsn, WARM_SEGMENTS):
                print("  (this role may not switch WAL or CHECKPOINT: the hub runs are cold)")
            await echo_run("echo", args.window)
            if not args.no_v1:
                await run("hub v1", args.window, batch=False)
            await run("hub batch", args.window, batch=True)
            for k in range(2, args.rounds + 1):
                # Echo and hub again, back to back: a ratio per round, then the median.
                await echo_run(f"echo #{k}", args.window)
                await run(f"hub batch #{k}", args.window, batch=True)
            for k in range(1, args.rounds + 1):
                e = results["echo" if k == 1 else f"echo #{k}"]
                h = results["hub batch" if k == 1 else f"hub batch #{k}"]
                rounds.append((h["rate"] / e["rate"], h["cpu"] / e["cpu"],
                               h.get("pg_cpu", 0.0) / e["cpu"]))
            if args.half:
                # Half of the lower median of the rounds' rates: one fast round must not
                # pace the half run past what the machine gives now.
                rates = sorted(results["hub batch" if k == 1 else f"hub batch #{k}"]["rate"]
                               for k in range(1, args.rounds + 1))
                half = args.half_rate or rates[(len(rates) - 1) // 2] / 2
                for k in range(1, args.half_rounds + 1):
                    name = "hub half" if k == 1 else f"hub half #{k}"
                    await run(name, 64, batch=True, rate=half)
                    results[name]["target"] = half
                # The same pacing through the bare echo: the latency this machine adds.
                await echo_run("echo half", 64, rate=half)
                results["echo half"]["target"] = half
            conn = await asyncpg.connect(dsn)
            stored = await conn.fetchval("SELECT count(*) FROM messages")
            await conn.close()
        finally:
            for proc in [*hubs, echo]:
                proc.terminate()
            for proc in [*hubs, echo]:
                proc.wait(20)
            if valkey is not None:
                valkey.stop()
    print(f"replicas={args.replicas} connections={args.connections} hoomis={len(hoomis)} "
          f"window={args.window} client={'validating' if args.validate else 'raw maps'} "
          f"seconds={args.seconds} payload=200B cores={os.cpu_count()}")
    for name, res in results.items():
        extra = (f", pushes {res['pushes']:.0f}/s; send→other member's push p50 "
                 f"{res['d50']:.2f} ms p99 {res['d99']:.2f} ms"
                 ) if not name.startswith("echo") else ""
        if "target" in res:
            extra += f"; paced at {res['target']:.0f} msg/s"
        if "hub_wait" in res:
            extra += (f"; waiting for a CPU: hub {res['hub_wait']:.0%}, clients "
                      f"{res['client_wait']:.0%} of the run")
        if "wal_segments" in res:
            extra += f"; WAL segments created {res['wal_segments']:.0f}"
        if "rows_per_batch" in res:
            extra += (f"; {res['rows_per_batch']:.1f} rows per batch; in the hub, acks over "
                      f"2/5/10 ms {res['acks_over_2ms']:.1%}/{res['acks_over_5ms']:.1%}/"
                      f"{res['acks_over_10ms']:.1%}, batches over 2/10 ms "
                      f"{res['batches_over_2ms']:.1%}/{res['batches_over_10ms']:.1%}")
        cpu = f"; server CPU {res['cpu'] * 1e6:.0f} µs" + (
            f" + PostgreSQL {res['pg_cpu'] * 1e6:.0f} µs" if "pg_cpu" in res else "") + (
            f" + Valkey {res['valkey_cpu'] * 1e6:.0f} µs ({res['publishes']:.2f} PUBLISH "
            "per message)" if "valkey_cpu" in res else "") + (
            f", client CPU {res['client_cpu'] * 1e6:.0f} µs")
        print(f"  {name:9s} {res['rate']:8.0f} msg/s  p50 {res['p50']:6.2f} ms  "
              f"p99 {res['p99']:6.2f} ms  ({res['n']} round trips{cpu}{extra})")
    acked = sum(res["n"] for name, res in results.items() if not name.startswith("echo"))
    for name, res in results.items():
        if not name.startswith("echo") and "target" not in res and "#" not in name:
            print(f"  {name}/echo throughput: {res['rate'] / results['echo']['rate']:.0%}; "
                  f"server CPU per message {res['cpu'] / results['echo']['cpu']:.1f}x the "
                  f"echo's per round trip")
    if args.rounds > 1:
        ratios = sorted(r[0] for r in rounds)
        print(f"  hub batch/echo throughput by round: "
              f"{', '.join(f'{r[0]:.0%}' for r in rounds)}; median {ratios[len(ratios) // 2]:.0%}"
              f"; hub CPU/echo CPU: {', '.join(f'{r[1]:.1f}x' for r in rounds)}")
    print(f"  stored rows: {stored} (acked: {acked})")
    for report in profiles:
        print(report)


if __name__ == "__main__":
    tempfile.tempdir = None
    import uvloop
    uvloop.run(main())
