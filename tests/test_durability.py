"""PostgreSQL crashes under load: every acked message survives crash recovery, stored
once, with dense seqs, and the clients' retries finish the rest."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from uuid import uuid4

import asyncpg
import pytest

from hoomi_client.sdk import HoomiClient
from server.testing.replica import Replica
from storage.embedded import start_embedded
from tests.pg import crash_and_restart, stop_postgres
from tests.wsclient import Admin


@pytest.fixture
def own_postgres(tmp_path: Path):
    server = start_embedded(tmp_path)
    yield server
    stop_postgres(server)


@pytest.mark.timeout(180)
async def test_acked_messages_survive_a_postgres_crash_under_load(own_postgres):
    hub = Replica(own_postgres.dsn, None, name="crash", HOOMI_SEND_RATE="100000",
                  HOOMI_SEND_BURST="100000").start()
    admin = Admin(hub.http)
    try:
        alice, bob = await admin.user(), await admin.user()
        h = await admin.hoomi([alice, bob])
        clients = [HoomiClient(hub.ws, await admin.token(u), backoff_max=0.5)
                   for u in (alice, bob)]
        for c in clients:
            await c.start()
        total, in_flight = 400, asyncio.Semaphore(40)
        acks: dict = {}
        crashed = asyncio.Event()

        async def one(i: int) -> None:
            c = clients[i % 2]
            cmid = uuid4()
            async with in_flight:
                ack = await c.send(h, os.urandom(48), os.urandom(12), "s1", client_msg_id=cmid)
            acks[cmid] = ack
            if len(acks) == total // 3 and not crashed.is_set():
                crashed.set()
                await asyncio.to_thread(crash_and_restart, own_postgres)

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), 120)
        assert crashed.is_set()
        # The crash really hit sends in flight: the hub answered some with `unavailable`.
        metrics = (await admin.http.get("/metrics")).text
        (count,) = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith('hoomi_errors_total{code="unavailable"}')]
        assert count > 0
        conn = await asyncpg.connect(own_postgres.dsn)
        try:
            rows = await conn.fetch(
                "SELECT id, seq, client_msg_id FROM messages WHERE hoomi_id = $1 ORDER BY seq", h)
            last_seq = await conn.fetchval("SELECT last_seq FROM hoomis WHERE id = $1", h)
        finally:
            await conn.close()
        # Every send acked, each stored exactly once, seqs 1..N with no gap or repeat.
        assert len(acks) == total
        assert [r["seq"] for r in rows] == list(range(1, total + 1)) and last_seq == total
        stored = {r["client_msg_id"]: (r["id"], r["seq"]) for r in rows}
        assert stored == {cmid: (a.id, a.seq) for cmid, a in acks.items()}
        assert hub.proc is not None and hub.proc.poll() is None  # the hub lived through it
        for c in clients:
            await c.close()
    finally:
        await admin.close()
        hub.stop()
