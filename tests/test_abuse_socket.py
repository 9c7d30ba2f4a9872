"""Issue 14, the connection layer: attacks on a real `hoomi serve` over real sockets.

Each test starts its own replica with small bounds, attacks it the way the report did
(raw TCP and hand-made WebSocket frames where a library would read for us), and measures
the replica process itself: its RSS and open file descriptors from /proc, and its
Prometheus counters.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import time
from uuid import UUID

import asyncpg
import httpx
import pytest

from hoomi_protocol import (
    Ack,
    Error,
    ErrorCode,
    Hello,
    History,
    Page,
    Welcome,
    decode_server,
    encode_client,
)
from server import ws as ws_module
from server.testing.replica import Replica
from storage.hoomis import create_hoomi
from storage.records import Member
from tests.wsclient import joined, own_replica, send

# -- a WebSocket client by hand: it reads only when told to ------------------------------------


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def tcp(cls, port: int) -> Raw:
        # A tiny receive buffer: a client that does not read fills it at once.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(*await asyncio.open_connection(sock=sock))

    @classmethod
    async def ws(cls, port: int, headers: str = "") -> tuple[Raw, int]:
        """Upgrade; returns the client and the HTTP status of the answer."""
        raw = await cls.tcp(port)
        raw.writer.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n".encode())
        head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), 10)
        return raw, int(head.split()[1])

    def send(self, f: object) -> None:
        self.writer.write(frame(0x2, encode_client(f)))

    async def read_frame(self, timeout: float = 10) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await self.reader.readexactly(n)

    async def reply(self) -> object:
        """The next data frame decoded, or ("close", code)."""
        while True:
            op, data = await self.read_frame()
            if op == 0x8:
                return ("close", struct.unpack("!H", data[:2])[0])
            if op == 0x2:
                return decode_server(data)

    def abort(self) -> None:
        self.writer.transport.abort()


# -- the replica, measured ---------------------------------------------------------------------


def rss_mib(r: Replica) -> float:
    assert r.proc is not None
    with open(f"/proc/{r.proc.pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def held(r: Replica, raws: list[Raw]) -> int:
    """How many of these clients' connections the replica still holds a descriptor for
    (its open fds matched to /proc/net/tcp by inode)."""
    assert r.proc is not None
    fd_dir = f"/proc/{r.proc.pid}/fd"
    inodes = set()
    for fd in os.listdir(fd_dir):
        try:
            inodes.add(os.readlink(f"{fd_dir}/{fd}"))
        except FileNotFoundError:
            pass
    ports = {raw.port for raw in raws}
    found = 0
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            parts = line.split()
            local, remote = (int(a.split(":")[1], 16) for a in parts[1:3])
            if local == r.port and remote in ports and f"socket:[{parts[9]}]" in inodes:
                found += 1
    return found


async def metric(r: Replica, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(r.http + "/metrics")).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def until(check, timeout: float, what: str) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


# -- 1. ping flood ------------------------------------------------------------------------------


@pytest.mark.parametrize("closing", [False, True], ids=["open", "closing"])
async def test_ping_flood_without_hello_holds_no_memory(module_dsn, valkey, closing):
    """A socket that never reads floods pings: while open, before any hello; or once the
    hub has closed it (a text frame: 4400) without answering that close."""
    async with own_replica(module_dsn, valkey.url, "pings", process=True,
                           HOOMI_CLOSE_TIMEOUT_S="1") as (r, _):
        before = rss_mib(r)
        raw, status = await Raw.ws(r.port)
        assert status == 101
        if closing:
            raw.writer.write(frame(0x1, b"hello?"))
            assert await raw.reply() == ("close", 4400)
        # Pings with the largest payload (125 bytes): each pong echoes it.
        chunk = frame(0x9, os.urandom(125)) * 2000
        sent = 0
        started = time.monotonic()
        try:
            while sent < 1_000_000 and time.monotonic() - started < 5:
                raw.writer.write(chunk)
                await asyncio.wait_for(raw.writer.drain(), 1)
                sent += 2000
        except (ConnectionError, TimeoutError):
            pass  # the replica stopped reading, or dropped us: both are the point
        await asyncio.sleep(0.5)  # what it read by now has been answered
        grown = rss_mib(r) - before
        print(f"ping flood ({'closing' if closing else 'open'}): {sent} pings written, "
              f"replica RSS +{grown:.1f} MiB")
        assert grown < 20, f"{sent} pings grew the replica by {grown:.0f} MiB"

        # It closed the flooder and let go of the connection we still do not read.
        async def released() -> bool:
            return held(r, [raw]) == 0
        took = await until(released, 5, "flooding socket released")
        print(f"flooding socket released after {took:.2f} s")
        raw.abort()


async def big_hoomi(r: Replica, admin) -> tuple[UUID, str]:
    """A Hoomi holding 16 messages of 60 kB (a full page is ~1 MB) and its admin's token."""
    a = await admin.user()
    h = await admin.hoomi([a])
    tok = await admin.token(a)
    peer, _ = await joined(r.ws, tok)
    for i in range(16):
        await peer.send(send(h, ref=i, body=os.urandom(60_000)))
        await peer.recv_until(Ack)
    await peer.close()
    return h, tok


# -- 2. slow readers: counted until their transport is gone, then aborted ------------------------


async def test_slow_readers_count_until_gone_and_are_aborted(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "slowread", process=True,
                           HOOMI_CLOSE_TIMEOUT_S="1",
                           HOOMI_MAX_SOCKETS_PER_USER="4", HOOMI_SEND_QUEUE_MB="1",
                           HOOMI_USER_MAX_READS="100") as (r, admin):
        h, tok = await big_hoomi(r, admin)

        welcomed, refused, raws = 0, 0, []
        for _ in range(8):
            raw, status = await Raw.ws(r.port)
            assert status == 101
            raws.append(raw)
            raw.send(Hello(token=tok))
            got = await raw.reply()
            if isinstance(got, Welcome):
                welcomed += 1
                for i in range(12):  # ~12 MB of pages, never read
                    raw.send(History(hoomi_id=h, ref=i, limit=16))
                await raw.writer.drain()
                # Wait for this socket's 4408 (the replica closes it) before the next one.
                await until(lambda n=welcomed: _closes_4408(r, n), 10, "4408")
            else:
                assert isinstance(got, Error) and got.code == ErrorCode.RATE_LIMITED, got
                refused += 1
        print(f"8 sockets of one user, cap 4, each closed 4408 at once: "
              f"{welcomed} welcomed, {refused} refused")
        assert welcomed == 4 and refused == 4

        async def gone() -> bool:
            return held(r, raws) == 0 and await metric(r, "hoomi_connections") == 0
        took = await until(gone, 5, "slow readers' transports gone")
        print(f"all transports gone {took:.2f} s after the last socket (close timeout 1 s); "
              f"aborted: {await metric(r, 'hoomi_aborted_sockets_total'):.0f}")
        for raw in raws:
            raw.abort()


async def _closes_4408(r: Replica, n: int) -> bool:
    return await metric(r, 'hoomi_closes_total{code="4408"}') >= n


# -- 4. slowloris -----------------------------------------------------------------------------


async def test_idle_and_stalled_http_connections_are_dropped(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "loris", process=True,
                           HOOMI_HEADER_TIMEOUT_S="1",
                           HOOMI_BODY_TIMEOUT_S="1", HOOMI_IDLE_TIMEOUT_S="1",
                           HOOMI_MAX_HTTP_CONNECTIONS="30") as (r, admin):
        idle = [await Raw.tcp(r.port) for _ in range(10)]  # nothing sent
        half = [await Raw.tcp(r.port) for _ in range(10)]  # half an upgrade head
        for raw in half:
            raw.writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        body = [await Raw.tcp(r.port) for _ in range(5)]  # a body that never ends
        for raw in body:
            raw.writer.write(b"POST /v1/admin/users HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        kept = [await Raw.tcp(r.port) for _ in range(5)]  # one request, then idle keep-alive
        for raw in kept:
            raw.writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await raw.reader.readuntil(b"\r\n\r\n")
        # The budget (30) is taken: the next connection is refused at once.
        extra = await Raw.tcp(r.port)
        refused = await asyncio.wait_for(extra.reader.read(1), 2) == b""
        print(f"31st connection past HOOMI_MAX_HTTP_CONNECTIONS=30 refused at once: {refused}")
        assert refused

        async def dropped(raws: list[Raw]) -> bool:
            return all(raw.reader.at_eof() for raw in raws)
        for what, raws in [("idle", idle), ("half head", half), ("stalled body", body),
                           ("keep-alive", kept)]:
            for raw in raws:  # reading is how the client learns of the drop
                asyncio.get_running_loop().create_task(raw.reader.read())
            took = await until(lambda raws=raws: dropped(raws), 5, what)
            print(f"{what} connections dropped within {took:.2f} s more")

        everyone = [*idle, *half, *body, *kept, extra]

        async def released() -> bool:
            return held(r, everyone) == 0
        await until(released, 5, "descriptors released")
        # A real client gets in once the attackers are gone.
        peer, _ = await joined(r.ws, await admin.token(await admin.user()))
        await peer.close()
        for raw in everyone:
            raw.abort()


async def test_unread_http_responses_are_aborted(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "unread", process=True,
                           HOOMI_RESPONSE_TIMEOUT_S="1",
                           HOOMI_USER_MAX_READS="100") as (r, admin):
        h, tok = await big_hoomi(r, admin)
        raw = await Raw.tcp(r.port)
        request = (f"GET /v1/hoomis/{h}/messages?limit=100 HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {tok}\r\n\r\n").encode()
        raw.writer.write(request * 12)  # ~17 MB of pages, pipelined, never read
        started = time.monotonic()

        async def answering() -> bool:
            return held(r, [raw]) == 1
        await until(answering, 5, "connection accepted")

        async def released() -> bool:
            return held(r, [raw]) == 0
        took = await until(released, 10, "unread response aborted")
        print(f"unread HTTP responses: connection aborted {took:.2f} s after the requests "
              f"(HOOMI_RESPONSE_TIMEOUT_S=1; {time.monotonic() - started:.2f} s in all)")
        raw.abort()


# -- 5. hello-less sockets ----------------------------------------------------------------------


async def test_hello_less_sockets_cannot_lock_out_real_users(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "nohello", HOOMI_MAX_CONNECTIONS="30",
                           HOOMI_MAX_UNAUTHENTICATED="10",
                           HOOMI_MAX_UNAUTHENTICATED_PER_ADDRESS="4") as (r, admin):
        tok = await admin.token(await admin.user())

        async def attack(address: str, n: int) -> tuple[list[Raw], list[int]]:
            # Behind the trusted proxy (loopback), X-Forwarded-For is the client address.
            raws, statuses = [], []
            for _ in range(n):
                raw, status = await Raw.ws(r.port, f"X-Forwarded-For: {address}\r\n")
                raws.append(raw)
                statuses.append(status)
            return raws, statuses

        async def real_user(tries: int) -> int:
            failures = 0
            for _ in range(tries):
                try:
                    peer, _ = await joined(r.ws, tok)  # from 127.0.0.1
                    await peer.close()
                except Exception:
                    failures += 1
            return failures

        # One client holds 30 hello-less sockets (the replica's HOOMI_MAX_CONNECTIONS).
        held, statuses = await attack("198.51.100.1", 30)
        print(f"one address: {statuses.count(101)} of 30 accepted, "
              f"{statuses.count(503)} refused 503")
        failed = await real_user(29)
        print(f"a real user meanwhile: {failed} failures of 29")
        assert statuses.count(101) == 4 and statuses.count(503) == 26
        assert failed == 0

        for raw in held:
            raw.abort()
        await asyncio.sleep(0.5)  # the replica sees the resets and frees their places

        # Many addresses together fill the replica's budget for sockets before hello (10);
        # past it, and while none has waited long, new sockets are refused.
        more = [await attack(f"198.51.100.{i}", 4) for i in (2, 3, 4)]
        accepted = sum(st.count(101) for _, st in more)
        print(f"three more addresses, 4 each: {accepted} of 12 accepted (budget 10)")
        assert accepted == 10
        # The budget stays full of idle sockets, yet a real user gets in: the socket that
        # has waited longest without hello gives up its place (closed 4401). Before, every
        # real user got 503 until the attackers' hello deadline, and they reopen at it.
        await asyncio.sleep(ws_module.EVICT_PENDING_AFTER_S + 0.2)
        failed = await real_user(5)
        print(f"a real user with the budget full of idle sockets: {failed} failures of 5")
        assert failed == 0
        for raw in [raw for raws, _ in more for raw in raws]:
            raw.abort()


# -- 6. hellos and failed authentications per address -------------------------------------------


async def test_hellos_and_auth_failures_are_limited_per_address(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "hellos", HOOMI_HELLO_RATE="0.1",
                           HOOMI_HELLO_BURST="5", HOOMI_AUTH_FAILURE_RATE="0.01",
                           HOOMI_AUTH_FAILURE_BURST="3") as (r, admin):
        tok = await admin.token(await admin.user())

        async def hello(token: str, address: str) -> object:
            raw, status = await Raw.ws(r.port, f"X-Forwarded-For: {address}\r\n")
            assert status == 101
            raw.send(Hello(token=token))
            got = await raw.reply()
            close = await raw.reply() if isinstance(got, Error) else None
            raw.abort()
            return got if close is None else (got, close)

        # Failed token checks: 3, then the address is refused even with a good token.
        got = [await hello("not-a-token", "192.0.2.1") for _ in range(3)]
        assert all(g[0].code == ErrorCode.UNAUTHORIZED and g[1] == ("close", 4401) for g in got)
        err, close = await hello(tok, "192.0.2.1")
        print(f"good token after 3 failures: {err.code.value} then {close}")
        assert err.code == ErrorCode.RATE_LIMITED and err.retry_after_ms > 0
        assert close == ("close", 1013)
        assert isinstance(await hello(tok, "192.0.2.2"), Welcome)  # another address: fine

        # Hellos: 5 at once per address (the one above was the first for 192.0.2.2).
        got = [await hello(tok, "192.0.2.2") for _ in range(5)]
        welcomed = sum(isinstance(g, Welcome) for g in got)
        limited = [g for g in got if not isinstance(g, Welcome)]
        print(f"6 hellos from one address with burst 5: {welcomed + 1} welcomed, "
              f"{len(limited)} rate_limited")
        assert welcomed == 4 and len(limited) == 1
        assert limited[0][0].code == ErrorCode.RATE_LIMITED and limited[0][1] == ("close", 1013)


# -- 9a. a text frame that is not UTF-8 --------------------------------------------------------


async def test_invalid_utf8_text_frame_closes_4400_without_a_traceback(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "utf8") as (r, _):
        raw, status = await Raw.ws(r.port)
        assert status == 101
        raw.writer.write(frame(0x1, b"\xff\xfe not utf-8"))
        assert await raw.reply() == ("close", 4400)
        raw.abort()
        log = r.output()
        assert "Traceback" not in log and "Invalid UTF-8" not in log, log


# -- 9b. hello costs a few transactions, not two per Hoomi ---------------------------------------


_OTHERS = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"


async def _flushed_commits(dsn: str) -> tuple[int, int]:
    """(xact_commit of this database with every backend's counters flushed, the commits
    this call itself adds). A backend flushes its pending counters when it exits (idle
    ones may hold them ~10 s), so the replica's pool connections are ended first: its
    pool opens new ones (one startup transaction each)."""
    conn = await asyncpg.connect(dsn)  # its startup: 1
    try:
        ended = await conn.fetch(f"SELECT pid, pg_terminate_backend(pid) {_OTHERS}")  # 1
        polls = 1
        while await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                                  [r["pid"] for r in ended]):
            polls += 1
            await asyncio.sleep(0.05)
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        return int(value), 3 + polls
    finally:
        await conn.close()


async def test_hello_in_300_current_hoomis_costs_a_few_transactions(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "xacts", HOOMI_RECONCILE_INTERVAL_S="3600",
                           HOOMI_PURGE_INTERVAL_S="86400") as (r, admin):
        a = await admin.user()
        pool = await asyncpg.create_pool(module_dsn, min_size=1, max_size=2)
        try:
            hoomis: list[UUID] = [await create_hoomi(pool, [Member(a, "admin")])
                                  for _ in range(300)]
        finally:
            await pool.close()
        tok = await admin.token(a)
        resume = {h: 0 for h in hoomis}  # every one current (last_seq 0)
        peer, welcome = await joined(r.ws, tok, resume)  # warms the pool and the feeds
        await peer.close()
        before, own = await _flushed_commits(module_dsn)
        for _ in range(3):
            peer, welcome = await joined(r.ws, tok, resume)
            assert len(welcome.hoomis) == 300
            # A page read queues behind any catch-up reads (the pool serves in turn): once
            # it is back, what hello started has run.
            await peer.send(History(hoomi_id=hoomis[0], ref="after"))
            await peer.recv_until(Page)
            await peer.close()
        after, _ = await _flushed_commits(module_dsn)
        per_hello = (after - before - own) / 3
        print(f"hello in 300 current Hoomis, then one page: {per_hello:.0f} transactions")
        assert per_hello <= 20


async def test_hello_catches_up_many_behind_hoomis_in_order(module_dsn, valkey):
    """The batched catch-up: every missed message once, in seq order per Hoomi, including
    a Hoomi with more than one batch page to catch up."""
    async with own_replica(module_dsn, valkey.url, "batch") as (r, admin):
        a = await admin.user()
        tok = await admin.token(a)
        hoomis = [await admin.hoomi([a]) for _ in range(25)]
        peer, _ = await joined(r.ws, tok)
        counts = {h: 3 for h in hoomis}
        counts[hoomis[7]] = 45  # past the 20 a batch reads per Hoomi
        for h, n in counts.items():
            for i in range(n):
                await peer.send(send(h, ref=i))
                await peer.recv_until(Ack)
        await peer.close()
        resume = {h: 1 for h in hoomis}
        peer, welcome = await joined(r.ws, tok, resume)
        assert {s.hoomi_id: s.last_seq for s in welcome.hoomis} == counts
        want = sum(n - 1 for n in counts.values())
        got: dict[UUID, list[int]] = {h: [] for h in hoomis}
        for _ in range(want):
            m = await peer.recv()
            got[m.hoomi_id].append(m.seq)
        assert got == {h: list(range(2, n + 1)) for h, n in counts.items()}
        await peer.send(History(hoomi_id=hoomis[0], ref="end"))  # nothing more came first
        assert isinstance(await peer.recv(), Page)
        await peer.close()


async def test_pages_of_one_user_at_once_are_limited_across_sockets(module_dsn, valkey):
    async with own_replica(module_dsn, valkey.url, "reads", HOOMI_USER_MAX_READS="1",
                           HOOMI_SEND_QUEUE_MB="64") as (r, admin):
        h, tok = await big_hoomi(r, admin)
        peers = [(await joined(r.ws, tok))[0] for _ in range(3)]
        for peer in peers:
            for i in range(15):
                await peer.send(History(hoomi_id=h, ref=i, limit=16))

        async def replies(peer) -> list[object]:
            return [(await peer.recv_until(Page | Error))[0] for _ in range(15)]
        got = [f for fs in await asyncio.gather(*(replies(p) for p in peers)) for f in fs]
        limited = [f for f in got if isinstance(f, Error)]
        print(f"45 pages from 3 sockets of one user, HOOMI_USER_MAX_READS=1: "
              f"{len(got) - len(limited)} read, {len(limited)} rate_limited")
        assert limited and all(e.code == ErrorCode.RATE_LIMITED and e.retry_after_ms == 100
                               for e in limited)
        for peer in peers:
            await peer.close()


async def test_a_send_flood_past_the_rate_costs_one_error_per_refill(module_dsn, valkey):
    """A client that ignores retry_after_ms and floods sends: the replica stops reading
    that socket until its bucket refills, so it answers a handful of rate_limited errors
    instead of one per frame (before: thousands a second, the CPU other users' acks
    needed)."""
    async with own_replica(module_dsn, valkey.url, "flood", HOOMI_SEND_RATE="5",
                           HOOMI_SEND_BURST="5") as (r, admin):
        uid = await admin.user()
        h = await admin.hoomi([uid])
        peer, _ = await joined(r.ws, await admin.token(uid))
        frames = [send(h, ref=i) for i in range(3000)]
        flood = asyncio.get_running_loop().create_task(_send_all(peer, frames))
        errors = acks = 0
        deadline = asyncio.get_running_loop().time() + 3.0
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                got = await peer.recv(timeout=left)
            except TimeoutError:
                break
            if isinstance(got, Error):
                errors += 1
            elif isinstance(got, Ack):
                acks += 1
        flood.cancel()
        print(f"\n3000 sends flooded at HOOMI_SEND_RATE=5: {acks} acked, {errors} "
              "rate_limited in 3 s")
        # About one refusal per token let through; without the hold, one per frame (~3000).
        assert acks >= 5 and errors <= acks + 10
        # Abort: a close handshake would wait its 10 s behind the flood the hub holds back.
        peer.conn.transport.abort()


async def _send_all(peer, frames) -> None:
    for f in frames:
        await peer.send(f)
