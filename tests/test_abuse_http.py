"""Abuse bounds of the HTTP API (issue 14), against real replicas with small limits.

Pages a client asks for and never reads are held open with raw asyncio streams whose
receive buffer is tiny, so the replica's response stays unsent for as long as the test
likes; what the replica holds meanwhile is read from its /proc/<pid>/status.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from server.testing.replica import Replica
from storage.db import create_pool
from storage.writer import BatchWriter
from tests import factories
from tests.wsclient import own_replica

BIG = 65536  # the default HOOMI_MAX_CONTENT_BYTES: the largest message a client may send
LIFTED = str(1 << 30)  # HOOMI_PAGE_MAX_BYTES lifted: a page is `limit` messages, whatever size


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def fill(dsn: str, h: UUID, sender: UUID, n: int = 100) -> None:
    """`n` messages of the largest size, stored through the writer."""
    pool = await create_pool(dsn, min_size=1, max_size=2)
    writer = BatchWriter(pool)
    writer.start()
    await asyncio.gather(*(writer.append(factories.request(h, sender, size=BIG))
                           for _ in range(n)))
    await writer.close()
    await pool.close()


@asynccontextmanager
async def unread_pages(r: Replica, token: str, h: UUID, n: int
                       ) -> AsyncIterator[list[bytes]]:
    """`n` connections that each ask for a 100-message page and read only its status
    line; their responses stay unsent until the block exits. Yields the status lines."""
    writers: list[asyncio.StreamWriter] = []
    try:
        readers = []
        for _ in range(n):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", r.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
            writers.append(writer)
            writer.write(f"GET /v1/hoomis/{h}/messages?limit=100 HTTP/1.1\r\n"
                         f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            readers.append(reader)
        yield [await asyncio.wait_for(rd.readline(), 30) for rd in readers]
    finally:
        for w in writers:
            w.close()


def rss_mib(r: Replica) -> float:
    assert r.proc is not None
    for line in Path(f"/proc/{r.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def until_status(http: httpx.AsyncClient, path: str, token: str, status: int,
                       timeout: float = 10) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = await http.get(path, headers=bearer(token))
        if r.status_code == status or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.05)


# -- item 6: per-user rate, per-address failed authentications, per-user reads --------------

async def test_http_requests_are_rate_limited_per_user(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "http-rate",
                           HOOMI_HTTP_RATE="1", HOOMI_HTTP_BURST="3") as (r, admin):
        alice, bob = await admin.user(), await admin.user()
        a_tok, b_tok = await admin.token(alice), await admin.token(bob)
        async with httpx.AsyncClient(base_url=r.http, timeout=10) as http:
            got = [await http.get("/v1/hoomis", headers=bearer(a_tok)) for _ in range(5)]
            assert [g.status_code for g in got] == [200, 200, 200, 429, 429]
            refused = got[3]
            assert refused.json()["error"] == "rate_limited" and refused.json()["message"]
            assert refused.headers["retry-after"] == "1"  # 1/s: at most a second, rounded up
            # Per user: bob is not affected, nor are the operator routes.
            assert (await http.get("/v1/hoomis", headers=bearer(b_tok))).status_code == 200
            await admin.token(alice)
            # And alice goes on once her bucket refills.
            assert (await until_status(http, "/v1/hoomis", a_tok, 200)).status_code == 200


async def test_failed_authentications_block_the_address(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "auth-fail",
                           HOOMI_AUTH_FAILURE_RATE="0.01",
                           HOOMI_AUTH_FAILURE_BURST="3") as (r, admin):
        alice = await admin.user()
        good = await admin.token(alice)
        async with httpx.AsyncClient(base_url=r.http, timeout=10) as http:
            # A bad user token, a missing one and a bad operator token: three 401s.
            assert (await http.get("/v1/hoomis", headers=bearer("nonsense"))).status_code == 401
            assert (await http.get("/v1/hoomis")).status_code == 401
            r401 = await http.post("/v1/admin/users", json={}, headers=bearer("guess"))
            assert r401.status_code == 401
            # Over budget: refused before the token is looked at, even a good one.
            for headers in (bearer("another-guess"), bearer(good)):
                refused = await http.get("/v1/hoomis", headers=headers)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"] == "rate_limited"
                assert 1 <= int(refused.headers["retry-after"]) <= 100  # 0.01/s: <= 100 s
            refused = await http.post("/v1/admin/users", json={},
                                      headers=bearer(r.env["HOOMI_ADMIN_TOKEN"]))
            assert refused.status_code == 429
            # Health stays open to the load balancer.
            assert (await http.get("/healthz")).status_code == 200


async def test_one_user_holds_at_most_user_max_reads_pages(module_dsn, valkey):
    """A page holds its user's read slot until it is sent: with HOOMI_USER_MAX_READS=1, a
    page alice never reads makes her next page 429 (Retry-After 1) while bob reads on."""
    async with own_replica(module_dsn, valkey.url, "reads",
                           HOOMI_USER_MAX_READS="1", HOOMI_PAGE_MAX_BYTES=LIFTED) as (r, admin):
        alice, bob = await admin.user(), await admin.user()
        h = await admin.hoomi([alice], [bob])
        await fill(module_dsn, h, alice)
        a_tok, b_tok = await admin.token(alice), await admin.token(bob)
        page = f"/v1/hoomis/{h}/messages?limit=2"
        async with httpx.AsyncClient(base_url=r.http, timeout=10) as http:
            async with unread_pages(r, a_tok, h, 1) as status:
                assert status == [b"HTTP/1.1 200 OK\r\n"]
                refused = await http.get(page, headers=bearer(a_tok))
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"] == "rate_limited"
                assert (await http.get(page, headers=bearer(b_tok))).status_code == 200
                # Other routes are not reads.
                assert (await http.get("/v1/hoomis", headers=bearer(a_tok))).status_code == 200
            # The connection closed: its slot is back.
            assert (await until_status(http, page, a_tok, 200)).status_code == 200


# -- item 3: requests in flight per replica, page bytes ---------------------------------------

async def test_requests_in_flight_are_bounded_per_replica(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "inflight",
                           HOOMI_HTTP_MAX_INFLIGHT="2", HOOMI_PAGE_MAX_BYTES=LIFTED) as (r, admin):
        alice, bob = await admin.user(), await admin.user()
        h = await admin.hoomi([alice], [bob])
        await fill(module_dsn, h, alice)
        b_tok = await admin.token(bob)
        async with httpx.AsyncClient(base_url=r.http, timeout=10) as http:
            async with unread_pages(r, await admin.token(alice), h, 2) as status:
                assert status == [b"HTTP/1.1 200 OK\r\n"] * 2
                busy = await http.get("/v1/hoomis", headers=bearer(b_tok))
                assert busy.status_code == 503, busy.text
                assert busy.headers["retry-after"] == "1"
                assert busy.json()["error"] == "unavailable" and busy.json()["message"]
                busy = await http.post("/v1/admin/users", json={},
                                       headers=bearer(r.env["HOOMI_ADMIN_TOKEN"]))
                assert busy.status_code == 503
                for path in ("/healthz", "/readyz", "/metrics"):
                    assert (await http.get(path)).status_code == 200, path
            assert (await until_status(http, "/v1/hoomis", b_tok, 200)).status_code == 200


async def _held_by_unread_pages(module_dsn: str, valkey, page_max_bytes: str,
                                n: int = 24) -> tuple[float, int]:
    """MiB the replica's RSS grows by while `n` 100-message pages of 64 KiB messages are
    left unread, and the bytes of one such page as a client gets it."""
    async with own_replica(module_dsn, valkey.url, f"rss-{page_max_bytes}", process=True,
                           HOOMI_PAGE_MAX_BYTES=page_max_bytes,
                           HOOMI_USER_MAX_READS=str(n)) as (r, admin):
        alice = await admin.user()
        h = await admin.hoomi([alice])
        await fill(module_dsn, h, alice)
        tok = await admin.token(alice)
        async with httpx.AsyncClient(base_url=r.http, timeout=30) as http:
            for _ in range(3):  # warm up: the allocator's arenas, the pool's connections
                one = await http.get(f"/v1/hoomis/{h}/messages?limit=100", headers=bearer(tok))
        before = rss_mib(r)
        async with unread_pages(r, tok, h, n) as status:
            assert status == [b"HTTP/1.1 200 OK\r\n"] * n
            held = rss_mib(r) - before
        return held, len(one.content)


async def test_unread_pages_hold_bounded_memory(module_dsn, valkey):
    """24 unread 100-message pages: with the 1 MiB page bound each is ~1.4 MB of JSON and
    the replica's RSS stays within 64 MiB of where it was; the same with the bound lifted
    (HOOMI_PAGE_MAX_BYTES=1 GiB, what the hub did before) holds some 200 MiB."""
    held, page = await _held_by_unread_pages(module_dsn, valkey, str(1 << 20))
    print(f"\npage bound 1 MiB: page {page / 2**20:.1f} MiB, 24 unread hold {held:.0f} MiB")
    assert page < 1.5 * 2**20
    assert held < 64
    lifted, page = await _held_by_unread_pages(module_dsn, valkey, LIFTED)
    print(f"page bound lifted: page {page / 2**20:.1f} MiB, 24 unread hold {lifted:.0f} MiB")
    assert page > 8 * 2**20
    assert lifted > 2 * held


# -- item 9 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [None, "s3cret-metrics"])
async def test_metrics_token(module_dsn, valkey, token):
    env = {"HOOMI_METRICS_TOKEN": token} if token else {}
    async with own_replica(module_dsn, valkey.url, "metrics", **env) as (r, _admin):
        async with httpx.AsyncClient(base_url=r.http, timeout=10) as http:
            open_ = await http.get("/metrics")
            if token is None:  # unset: open, as before (nginx keeps it off the public side)
                assert open_.status_code == 200 and "hoomi_connections" in open_.text
                return
            assert open_.status_code == 401 and open_.json()["error"] == "unauthorized"
            assert open_.json()["field"] == "authorization"
            wrong = await http.get("/metrics", headers=bearer("s3cret-metricz"))
            assert wrong.status_code == 401
            ok = await http.get("/metrics", headers=bearer(token))
            assert ok.status_code == 200 and "hoomi_connections" in ok.text
            # Health stays open for the load balancer.
            assert (await http.get("/healthz")).status_code == 200
