"""HOOMI_READ_DATABASE_URL (SPEC §7.1): history, sync and HTTP pages are read on a real
streaming standby (server/testing/standby.py) when it has replayed the primary's WAL position of
the request's start, and from the primary otherwise: with the standby's replay paused,
pages still show every message sent and every deletion made before them."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import httpx
import pytest

from hoomi_protocol import Ack, Deleted, History, Page, Sync
from server.testing.inprocess import InProcessReplica
from server.testing.standby import Standby
from tests.wsclient import Admin, joined, send


@pytest.fixture(scope="module")
async def standby(pg_server, module_dsn) -> AsyncIterator[Standby]:
    server = await Standby(pg_server).start()
    try:
        await server.caught_up(module_dsn)  # module_dsn's database exists there
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
async def replica(module_dsn, standby) -> AsyncIterator[tuple[InProcessReplica, Admin, str]]:
    database = urlsplit(module_dsn).path.lstrip("/")
    read_dsn = standby.dsn(database)
    r = await InProcessReplica(module_dsn, None, name="reads",
                               HOOMI_READ_DATABASE_URL=read_dsn).start()
    admin = Admin(r.http)
    try:
        yield r, admin, read_dsn
    finally:
        await admin.close()
        await r.stop()


async def page_reads(r: InProcessReplica) -> dict[str, float]:
    """hoomi_page_reads_total by server, from the replica's /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(r.http + "/metrics")).text
    found = re.findall(r'^hoomi_page_reads_total\{server="(\w+)"\} (\S+)$', text, re.M)
    return {server: float(n) for server, n in found}


async def standby_reads(read_dsn: str) -> int:
    """Transactions committed on the standby's database (pg_stat_database there)."""
    conn = await asyncpg.connect(read_dsn)
    try:
        return int(await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def sent(peer, hoomi: UUID, n: int) -> list[Ack]:
    for i in range(n):
        await peer.send(send(hoomi, ref=i))
    acks: list[Ack] = []
    while len(acks) < n:
        got = await peer.recv()
        if isinstance(got, Ack):
            acks.append(got)
    return acks


async def test_pages_come_from_the_standby_when_it_has_replayed(replica, standby, module_dsn):
    r, admin, read_dsn = replica
    alice = await admin.user()
    token = await admin.token(alice)
    h = await admin.hoomi([alice])
    peer, _ = await joined(r.ws, token)
    await sent(peer, h, 5)
    await standby.caught_up(module_dsn)
    before = await standby_reads(read_dsn)
    counted = await page_reads(r)
    async with httpx.AsyncClient(base_url=r.http, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(10):
            page = (await http.get(f"/v1/hoomis/{h}/messages")).json()
            assert [m["seq"] for m in page["messages"]] == [5, 4, 3, 2, 1]
    await peer.send(Sync(hoomi_id=h, after=2, ref="s"))
    got, _ = await peer.recv_until(Page)
    assert [m.seq for m in got.messages] == [3, 4, 5]
    # The hub's page transactions show on the standby (statistics are flushed lazily).
    deadline = 50
    while await standby_reads(read_dsn) < before + 11 and deadline:
        deadline -= 1
        await standby.caught_up(module_dsn)  # a short wait on a real condition
    assert await standby_reads(read_dsn) >= before + 11
    now = await page_reads(r)
    assert now["standby"] - counted["standby"] == 11
    assert now["primary"] == counted["primary"]
    await peer.close()


async def test_pages_stay_complete_and_fresh_while_replay_is_paused(replica, standby):
    r, admin, _ = replica
    alice, bob = await admin.user(), await admin.user()
    a_tok, b_tok = await admin.token(alice), await admin.token(bob)
    h = await admin.hoomi([alice], [bob])
    peer, _ = await joined(r.ws, a_tok)
    reader, _ = await joined(r.ws, b_tok)
    first = await sent(peer, h, 3)
    await standby.pause()
    counted = await page_reads(r)
    try:
        later = await sent(peer, h, 3)  # seqs 4..6: not replayed on the standby
        async with httpx.AsyncClient(base_url=r.http, timeout=10,
                                     headers={"Authorization": f"Bearer {a_tok}"}) as http:
            dead = next(a for a in first if a.seq == 2)
            assert (await http.delete(f"/v1/hoomis/{h}/messages/{dead.id}")).status_code == 204
            while not isinstance(await peer.recv(), Deleted):
                pass
            page = (await http.get(f"/v1/hoomis/{h}/messages",
                                   headers={"Authorization": f"Bearer {b_tok}"})).json()
        assert [m["seq"] for m in page["messages"]] == [6, 5, 4, 3, 2, 1]
        assert page["messages"][4].get("deleted") is True
        await reader.send(History(hoomi_id=h, ref="h"))
        got, _ = await reader.recv_until(Page)
        assert [m.seq for m in got.messages] == [6, 5, 4, 3, 2, 1]
        assert [m.id for m in got.messages[:3]] == [a.id for a in reversed(later)]
        await reader.send(Sync(hoomi_id=h, after=3, ref="s"))
        got, _ = await reader.recv_until(Page)
        assert [m.seq for m in got.messages] == [4, 5, 6]
        now = await page_reads(r)
        assert now["primary"] - counted["primary"] == 3
        assert now["standby"] == counted["standby"]
    finally:
        await standby.resume()
    await peer.close()
    await reader.close()


async def test_pages_come_from_the_primary_when_the_standby_is_gone(replica, standby):
    # Last in the module: it stops the module's standby.
    r, admin, _ = replica
    alice = await admin.user()
    token = await admin.token(alice)
    h = await admin.hoomi([alice])
    peer, _ = await joined(r.ws, token)
    await sent(peer, h, 2)
    standby.close()
    async with httpx.AsyncClient(base_url=r.http, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(3):
            got = await http.get(f"/v1/hoomis/{h}/messages")
            assert got.status_code == 200, got.text
            assert [m["seq"] for m in got.json()["messages"]] == [2, 1]
    await peer.send(History(hoomi_id=h, ref="h"))
    page, _ = await peer.recv_until(Page)
    assert [m.seq for m in page.messages] == [2, 1]
    await peer.close()
