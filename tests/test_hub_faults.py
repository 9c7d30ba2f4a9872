"""Fault tests: kill a replica, stop one (processes: `Replica`); lose the database or Redis
(in-process replicas behind a `FaultProxy` that cuts and restores the network)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from hoomi_protocol import Ack, Error, ErrorCode, Membership, Send
from server.testing.inprocess import InProcessReplica
from server.testing.loopback import until_ok
from server.testing.proxy import FaultProxy
from server.testing.replica import ADMIN_TOKEN, JWT_SECRET, ROOT, Replica
from tests.wsclient import Admin, Peer, joined, messages, send


@pytest.fixture
async def pair(dsn, valkey):
    replicas = [Replica(dsn, valkey.url, name=n, HOOMI_RECONCILE_INTERVAL_S="0.5")
                for n in ("ka", "kb")]
    for r in replicas:
        r.start()
    admin = Admin(replicas[1].http)
    yield replicas, admin
    await admin.close()
    for r in replicas:
        r.stop()


@pytest.fixture
async def inprocess_pair(dsn, valkey):
    replicas = [InProcessReplica(dsn, valkey.url, name=n, HOOMI_RECONCILE_INTERVAL_S="0.5")
                for n in ("ia", "ib")]
    for r in replicas:
        await r.start()
    admin = Admin(replicas[1].http)
    yield replicas, admin
    await admin.close()
    for r in replicas:
        await r.stop()


async def stored(dsn: str, hoomi) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT id, seq, client_msg_id FROM messages WHERE hoomi_id = $1 ORDER BY seq", hoomi)
    finally:
        await conn.close()


async def test_sigkill_replica_loses_no_acked_message_and_clients_resume(dsn, pair):
    (ra, rb), admin = pair
    alice, bob = await admin.user(), await admin.user()
    h = await admin.hoomi([alice], [bob])
    pb, _ = await joined(rb.ws, await admin.token(bob))
    pa, _ = await joined(ra.ws, await admin.token(alice))
    frames = [send(h, ref=i) for i in range(200)]
    acked: dict[int, Ack] = {}
    forty = asyncio.Event()

    async def sender() -> None:
        for f in frames:
            await pa.send(f)
            await asyncio.sleep(0.001)

    async def reader() -> None:
        try:
            while True:
                frame = await pa.recv()
                if isinstance(frame, Ack):
                    acked[frame.ref] = frame
                    if len(acked) >= 40:
                        forty.set()
        except Exception:
            return

    sending = asyncio.ensure_future(sender())
    reading = asyncio.ensure_future(reader())
    await asyncio.wait_for(forty.wait(), 10)
    ra.kill()
    await asyncio.gather(sending, reading, return_exceptions=True)
    assert 40 <= len(acked) < 200
    # Alice reconnects to the other replica and retries every send she has no ack for.
    pa2, _ = await joined(rb.ws, await admin.token(alice))
    for f in frames:
        if f.ref not in acked:
            await pa2.send(f)
    while len(acked) < 200:
        frame = await pa2.recv()
        if isinstance(frame, Ack):
            acked[frame.ref] = frame
    rows = await stored(dsn, h)
    assert [r["seq"] for r in rows] == list(range(1, 201))
    assert len({r["client_msg_id"] for r in rows}) == 200
    assert {r["id"] for r in rows} == {a.id for a in acked.values()}
    # Bob, on the surviving replica all along, saw every message once, in order.
    got = await messages(pb, 200)
    assert [m.seq for m in got] == list(range(1, 201))
    await pa2.close()
    await pb.close()


async def test_sigterm_acks_what_was_queued_then_closes_1012(dsn, pair):
    (ra, rb), admin = pair
    alice = await admin.user()
    h = await admin.hoomi([alice])
    pa, _ = await joined(ra.ws, await admin.token(alice))
    for i in range(100):
        await pa.send(send(h, ref=i))
    await asyncio.sleep(0.05)
    ra.proc.send_signal(15)
    code, frames = await pa.closed()
    assert code == 1012
    assert ra.proc.wait(20) in (0, -15)  # uvicorn re-raises SIGTERM once it is done
    assert "Traceback" not in ra.output()
    acks = [f for f in frames if isinstance(f, Ack)]
    rows = await stored(dsn, h)
    assert {a.id for a in acks} <= {r["id"] for r in rows}
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    # A fresh socket to the drained replica is refused; the other replica serves.
    with pytest.raises(OSError):
        await Peer.connect(ra.ws)


async def test_ctrl_c_stops_the_hub_cleanly_without_a_traceback(dsn, valkey):
    replica = Replica(dsn, valkey.url, name="ctrlc")
    replica.start()
    try:
        replica.proc.send_signal(signal.SIGINT)
        # 130 as a shell reports a command ended by Ctrl+C; 0 when the SIGINT uvicorn
        # re-raises after its shutdown lands once asyncio's runner has already finished.
        assert replica.proc.wait(20) in (0, 130)
        out = replica.output()
        assert "Traceback" not in out and "KeyboardInterrupt" not in out
    finally:
        replica.stop()


async def test_database_down_gives_unavailable_then_retry_stores_once(dsn, valkey):
    db = await FaultProxy.in_front_of(dsn).start()
    ra = await InProcessReplica(db.url(dsn), valkey.url, name="dbdown").start()
    admin = Admin(ra.http)
    try:
        alice = await admin.user()
        h = await admin.hoomi([alice])
        pa, _ = await joined(ra.ws, await admin.token(alice))
        await db.cut()  # PostgreSQL unreachable: its connections reset, new ones refused
        frame = send(h, ref="down")
        await pa.send(frame)
        err = await pa.recv(timeout=30)
        assert isinstance(err, Error) and err.code == ErrorCode.UNAVAILABLE
        assert err.retry_after_ms and err.ref == "down"
        async with httpx.AsyncClient() as http:
            ready = await http.get(ra.http + "/readyz")
        assert ready.status_code == 503 and ready.json()["database"].startswith("down")
        await db.resume()
        await until_ok(ra.http + "/readyz", 20, ra.output)  # its pool reconnected
        retry = Send(hoomi_id=h, client_msg_id=frame.client_msg_id, content=frame.content,
                     nonce=frame.nonce, session_id="s1", ref="retry")
        await pa.send(retry)
        got, _ = await pa.recv_until(Ack, timeout=30)  # its own push may come first
        assert got.seq == 1 and got.ref == "retry", got
        assert len(await stored(dsn, h)) == 1
        await pa.close()
    finally:
        await admin.close()
        await ra.stop()
        await db.close()


async def test_redis_outage_still_delivers_across_replicas(dsn, valkey):
    broker = await FaultProxy.in_front_of(valkey.url).start()
    replicas = [InProcessReplica(dsn, broker.url(valkey.url), name=n,
                                 HOOMI_RECONCILE_INTERVAL_S="0.3") for n in ("va", "vb")]
    for r in replicas:
        await r.start()
    admin = Admin(replicas[0].http)
    try:
        alice, bob = await admin.user(), await admin.user()
        h = await admin.hoomi([alice], [bob])
        pa, _ = await joined(replicas[0].ws, await admin.token(alice))
        pb, _ = await joined(replicas[1].ws, await admin.token(bob))
        await pa.send(send(h, ref=1))
        assert [m.seq for m in await messages(pb, 1)] == [1]
        await broker.cut()  # Valkey unreachable: pub/sub connections reset, new ones refused
        for i in range(2, 6):
            await pa.send(send(h, ref=i))
        # No pub/sub: the other replica finds them by reconcile against PostgreSQL.
        assert [m.seq for m in await messages(pb, 4, )] == [2, 3, 4, 5]
        await broker.resume()
        for i in range(6, 9):
            await pa.send(send(h, ref=i))
        assert [m.seq for m in await messages(pb, 3)] == [6, 7, 8]
        await pa.close()
        await pb.close()
    finally:
        await admin.close()
        for r in replicas:
            await r.stop()
        await broker.close()


async def test_membership_changes_that_skip_pub_sub_still_reach_sockets(dsn, inprocess_pair):
    # Written straight to PostgreSQL, as if the replica that made them died before
    # publishing (or Redis was down): only the reconcile can tell the sockets.
    replicas, admin = inprocess_pair
    alice, bob, carol = await admin.user(), await admin.user(), await admin.user()
    h1 = await admin.hoomi([alice], [bob])
    h2 = await admin.hoomi([alice], [])
    pb, _ = await joined(replicas[0].ws, await admin.token(bob))
    pc, _ = await joined(replicas[0].ws, await admin.token(carol))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM hoomi_members WHERE hoomi_id = $1 AND user_id = $2",
                           h1, bob)
        await conn.execute("INSERT INTO hoomi_members (hoomi_id, user_id, role) "
                           "VALUES ($1, $2, 'member')", h2, bob)
        await conn.execute("DELETE FROM users WHERE id = $1", carol)
    finally:
        await conn.close()
    changes = set()
    while len(changes) < 2:
        frame, _ = await pb.recv_until(Membership)
        changes.add((frame.hoomi_id, frame.state))
    assert changes == {(h1, "left"), (h2, "joined")}
    code, _ = await pc.closed()
    assert code == 4401
    # Bob now gets h2's messages and no longer h1's.
    pa, _ = await joined(replicas[1].ws, await admin.token(alice))
    await pa.send(send(h1, ref=1))
    await pa.send(send(h2, ref=2))
    got = await messages(pb, 1)
    assert [(m.hoomi_id, m.seq) for m in got] == [(h2, 1)]
    await pa.close()
    await pb.close()


def _ignores_sigpipe(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGPIPE - 1)))
    raise AssertionError("no SigIgn line")


async def test_hub_ignores_sigpipe(pair):
    # With SIGPIPE's default action, a write to a socket the peer had just reset (a
    # client gone, PostgreSQL crashing) kills the whole hub; it must get EPIPE instead.
    (ra, rb), _ = pair
    assert ra.proc is not None and rb.proc is not None
    assert _ignores_sigpipe(ra.proc.pid) and _ignores_sigpipe(rb.proc.pid)


async def test_hub_waits_for_its_database_at_start_up(dsn):
    # Like a database still starting next to the hub: connections refused for a while.
    db = await FaultProxy.in_front_of(dsn).start()
    await db.refuse()
    hub = Replica(db.url(dsn), None, name="wait", HOOMI_DB_WAIT_S="30")
    hub.spawn()
    try:
        deadline = time.monotonic() + 20
        while "waiting for PostgreSQL" not in hub.output():
            assert hub.proc.poll() is None and time.monotonic() < deadline, hub.output()
            await asyncio.sleep(0.05)
        assert hub.proc.poll() is None  # it waits, it does not exit
        await db.resume()
        await until_ok(hub.http + "/readyz", 30, hub.output)
    finally:
        await asyncio.to_thread(hub.stop)  # the proxy, in this loop, carries its goodbyes
        await db.close()


def test_hub_that_cannot_reach_its_database_exits_with_one_clear_line():
    env = {**os.environ, "DATABASE_URL": "postgresql://hoomi:s3cret-pw@127.0.0.1:1/hoomi",
           "HOOMI_DB_WAIT_S": "1", "HOOMI_JWT_SECRET": JWT_SECRET,
           "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN, "HOOMI_PORT": "1"}
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("hoomi: cannot start: PostgreSQL at 127.0.0.1:1/hoomi")
    assert "Traceback" not in done.stderr and "s3cret-pw" not in done.stderr


async def test_replica_started_before_redis_serves_and_joins_pub_sub_later(dsn, valkey):
    broker = await FaultProxy.in_front_of(valkey.url).start()
    await broker.refuse()  # Valkey not up yet: its port refuses connections
    replicas = [InProcessReplica(dsn, broker.url(valkey.url), name=n,
                                 HOOMI_RECONCILE_INTERVAL_S="0.3") for n in ("ra", "rb")]
    for r in replicas:
        await r.start()
    admin = Admin(replicas[0].http)
    try:
        async with httpx.AsyncClient() as http:
            ready = await http.get(replicas[0].http + "/readyz")
            assert ready.status_code == 503 and ready.json()["broker"].startswith("down")
            alice, bob = await admin.user(), await admin.user()
            h = await admin.hoomi([alice], [bob])
            pa, _ = await joined(replicas[0].ws, await admin.token(alice))
            pb, _ = await joined(replicas[1].ws, await admin.token(bob))
            await pa.send(send(h, ref=1))
            # Served without pub/sub: the other replica reconciles from PostgreSQL.
            assert [m.seq for m in await messages(pb, 1)] == [1]
            await broker.resume()
            await until_ok(replicas[1].http + "/readyz", 20, replicas[1].output)
        for i in range(2, 5):
            await pa.send(send(h, ref=i))
        assert [m.seq for m in await messages(pb, 3)] == [2, 3, 4]
        await pa.close()
        await pb.close()
    finally:
        await admin.close()
        for r in replicas:
            await r.stop()
        await broker.close()


async def test_json_logs_are_one_object_per_line(dsn):
    import json
    hub = Replica(dsn, None, name="json", HOOMI_LOG_FORMAT="json",
                  HOOMI_LOG_LEVEL="info").start()
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.get(hub.http + "/healthz")).status_code == 200
        await asyncio.sleep(0.2)
    finally:
        hub.stop()
    lines = [ln for ln in hub.output().splitlines() if ln.strip()]
    entries = [json.loads(ln) for ln in lines]  # every line parses
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    messages_ = [e["message"] for e in entries]
    assert any(m.startswith("Hoomi hub listening on") for m in messages_)
    assert any("GET /healthz" in m for m in messages_)  # uvicorn's access log too


def _open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files line")


async def test_hub_lifts_its_open_files_limit_for_its_sockets(dsn):
    import resource

    def low_soft_limit() -> None:  # as on many hosts: soft 1024 (here 256), hard higher
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hub = Replica(dsn, None, name="nofile", HOOMI_MAX_CONNECTIONS="5000")
    hub.spawn(preexec_fn=low_soft_limit)
    try:
        await until_ok(hub.http + "/healthz", 30, hub.output)
        assert _open_files_limit(hub.proc.pid) == min(5000 + 256, hard)
    finally:
        hub.stop()
