"""Everything fails at once, under load: Valkey killed and restarted, a replica SIGKILLed
and restarted, PostgreSQL crashed, while SDK clients on both replicas keep sending.

The invariants that must still hold at the end: every send acked; the database holds
exactly the acked messages, with their acked ids and seqs, 1..N per Hoomi; and every
member's client consumed every message of its Hoomi exactly once, in seq order."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import pytest

from hoomi_client.sdk import HoomiClient
from hoomi_protocol import MessageBody
from server.testing.replica import Replica
from server.testing.valkey import Valkey
from storage.embedded import start_embedded
from tests.pg import crash_and_restart, stop_postgres
from tests.wsclient import Admin

PER_CLIENT = 120


@pytest.mark.timeout(240)
async def test_no_acked_message_is_lost_or_repeated_through_every_failure(tmp_path: Path):
    pg = start_embedded(tmp_path)
    valkey = Valkey()
    valkey.start()
    replicas = [Replica(pg.dsn, valkey.url, name=n, HOOMI_RECONCILE_INTERVAL_S="0.3",
                        HOOMI_SEND_RATE="100000", HOOMI_SEND_BURST="100000").start()
                for n in ("xa", "xb")]
    urls = [r.ws for r in replicas]
    admin = Admin(replicas[1].http)
    clients: list[HoomiClient] = []
    try:
        users = [await admin.user() for _ in range(4)]
        # Two Hoomis, each with one member on each replica.
        hoomis = [await admin.hoomi([users[0], users[1]]), await admin.hoomi([users[2], users[3]])]
        home = {0: 0, 1: 1, 2: 0, 3: 1}  # which replica each client tries first
        for k, u in enumerate(users):
            order = urls[home[k]:] + urls[:home[k]]
            clients.append(HoomiClient(order, await admin.token(u), backoff_max=0.3))
        for c in clients:
            await c.start()

        received: list[dict[UUID, list[int]]] = [{} for _ in clients]

        async def consume(k: int) -> None:
            while True:
                event = await clients[k].next_event()
                if isinstance(event, MessageBody):
                    received[k].setdefault(event.hoomi_id, []).append(event.seq)

        consumers = [asyncio.ensure_future(consume(k)) for k in range(len(clients))]
        acks: dict[UUID, tuple[UUID, UUID, int]] = {}  # client_msg_id -> (hoomi, id, seq)
        progress = asyncio.Event()

        async def sender(k: int) -> None:
            h = hoomis[k // 2]
            slots = asyncio.Semaphore(8)

            async def one() -> None:
                cmid = uuid4()
                async with slots:
                    ack = await clients[k].send(h, os.urandom(48), os.urandom(12), "s1",
                                                client_msg_id=cmid)
                acks[cmid] = (h, ack.id, ack.seq)
                if len(acks) % 40 == 0:
                    progress.set()

            await asyncio.gather(*(one() for _ in range(PER_CLIENT)))

        async def step() -> None:
            """Wait for some more acks before the next failure."""
            progress.clear()
            await asyncio.wait_for(progress.wait(), 60)

        sending = asyncio.ensure_future(asyncio.gather(*(sender(k) for k in range(4))))
        await step()
        valkey.stop()  # SIGKILL: pub/sub gone, replicas reconcile from PostgreSQL
        await step()
        valkey.start()
        await step()
        replicas[0].kill()  # its clients fail over to the other replica
        await step()
        replicas[0].start()
        await step()
        await asyncio.to_thread(crash_and_restart, pg)
        await asyncio.wait_for(sending, 120)

        total = PER_CLIENT * 4
        assert len(acks) == total
        conn = await asyncpg.connect(pg.dsn)
        try:
            rows = await conn.fetch("SELECT client_msg_id, hoomi_id, id, seq FROM messages")
        finally:
            await conn.close()
        assert {r["client_msg_id"]: (r["hoomi_id"], r["id"], r["seq"]) for r in rows} == acks
        assert len(rows) == total
        for h in hoomis:
            seqs = sorted(seq for hh, _, seq in acks.values() if hh == h)
            assert seqs == list(range(1, PER_CLIENT * 2 + 1))
        # Every member consumed its Hoomi's messages once each, in order, with no gap.
        deadline = asyncio.get_running_loop().time() + 60
        want = list(range(1, PER_CLIENT * 2 + 1))
        while any(received[k].get(hoomis[k // 2]) != want for k in range(4)):
            assert asyncio.get_running_loop().time() < deadline, [
                (len(received[k].get(hoomis[k // 2], [])), sorted(received[k])) for k in range(4)]
            await asyncio.sleep(0.1)
        for k in range(4):
            assert set(received[k]) == {hoomis[k // 2]}  # nothing from the other Hoomi
        for task in consumers:
            task.cancel()
    finally:
        for c in clients:
            await c.close()
        await admin.close()
        for r in replicas:
            r.stop()
        valkey.stop()
        stop_postgres(pg)
