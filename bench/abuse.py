"""What abuse costs a replica (issue 14): memory held, time to release, requests refused.

    .venv/bin/python -m bench.abuse [--only N[,N...]] [--soak MINUTES] [--hub-src DIR]

Each item starts its own `hoomi serve` replica (on one shared, fresh database) and
attacks it from this process, only on 127.0.0.1 (attackers that must look like other
hosts bind 127.0.0.2-127.0.0.9 as their source address). Every loop is bounded in count
and in time. Items:
  1  ping flood: one socket sends WebSocket pings, never hello, never reads
  2  40 sockets of one user ask for big history pages and never read
  3  24 HTTP connections ask for big history pages and never read
  4  slowloris: idle TCP connections, half-sent upgrades, stalled request bodies
  5  hello-less sockets fill HOOMI_MAX_CONNECTIONS=30 while a real user connects
  6  HTTP page flood, hello flood, and a quiet user's ack latency under a send flood
`--soak M` instead runs M minutes of churning connections, steady sends and all the
abuse patterns in rotation, sampling the replica's RSS and open descriptors every 10 s
and again just before each abuse round (when the previous one has been let go), and
prints their least-squares slopes (the between-rounds ones are the steadier trend).
`--hub-src DIR` runs the replica from another checkout (e.g. a worktree of an older
commit) with this venv's Python.

RSS is the replica's VmRSS; "conns" are the replica's TCP connections on its port that
are not closed (from /proc/net/tcp). The machine is small and shared: the figures are
for before/after comparison within one run, not capacities.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import msgpack
import websockets

from bench.common import fresh_database
from hoomi_protocol import Ack, Error, Hello, Send, Welcome, decode_server, encode_client

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "bench-abuse-secret-" + "x" * 32
ADMIN_TOKEN = "bench-abuse-operator-token"
BIG = 60_000  # bytes of ciphertext per message of the big history
BIG_MESSAGES = 100  # one page of limit=100: ~6 MB of ciphertext before page cuts
Row = tuple[str, str, str]  # item, figure, value


# -- the database and the replica ----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Hub:
    """One `hoomi serve` process on 127.0.0.1."""

    def __init__(self, dsn: str, src: Path, logdir: Path, **env: str) -> None:
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/ws"
        full = {**os.environ, "DATABASE_URL": dsn, "HOOMI_PORT": str(self.port),
                "HOOMI_HOST": "127.0.0.1", "HOOMI_JWT_SECRET": JWT_SECRET,
                "HOOMI_ADMIN_TOKEN": ADMIN_TOKEN, "HOOMI_LOG_LEVEL": "warning",
                "PYTHONPATH": str(src), **env}
        full.pop("REDIS_URL", None)
        self.log = logdir / f"hub-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"],
                                         cwd=src, env=full, stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.http + "/healthz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"hub exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise TimeoutError("hub did not start")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def conns(self) -> int:
        """TCP connections on the hub's port not closed (LISTEN and TIME_WAIT excluded)."""
        n = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with suppress(FileNotFoundError):
                for line in Path(table).read_text().splitlines()[1:]:
                    f = line.split()
                    if int(f[1].rsplit(":", 1)[1], 16) == self.port and f[3] not in ("0A", "06"):
                        n += 1
        return n

    async def metric(self, name: str) -> float | None:
        async with httpx.AsyncClient(timeout=5) as c:
            text = (await c.get(self.http + "/metrics")).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.split()[-1])
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Operator:
    def __init__(self, hub: Hub) -> None:
        self.http = httpx.AsyncClient(base_url=hub.http, timeout=30,
                                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    async def user(self) -> UUID:
        r = await self.http.post("/v1/admin/users", json={})
        r.raise_for_status()
        return UUID(r.json()["id"])

    async def hoomi(self, users: list[UUID]) -> UUID:
        members = [{"user_id": str(u), "role": "admin"} for u in users]
        r = await self.http.post("/v1/admin/hoomis", json={"members": members})
        r.raise_for_status()
        return UUID(r.json()["id"])

    async def token(self, user: UUID) -> str:
        r = await self.http.post("/v1/admin/tokens",
                                 json={"user_id": str(user), "ttl_seconds": 86400})
        r.raise_for_status()
        token: str = r.json()["token"]
        return token

    async def close(self) -> None:
        await self.http.aclose()


class World:
    """Users, tokens and Hoomis made once, on the first replica, for every item."""

    async def build(self, hub: Hub) -> World:
        op = Operator(hub)
        try:
            self.users = [await op.user() for _ in range(8)]
            self.tokens = [await op.token(u) for u in self.users]
            # users 0 (the hoarder) and 1 (the filler) share `big`: 100 messages of 60 KB.
            self.big = await op.hoomi(self.users[:2])
            # 2: quiet, 3: flooder, 4-5: steady senders; 6: churn; 7: the real user.
            self.quiet = await op.hoomi([self.users[2]])
            self.flood = await op.hoomi([self.users[3]])
            self.steady = await op.hoomi(self.users[4:6])
            self.churn = await op.hoomi([self.users[6], self.users[7]])
        finally:
            await op.close()
        ws = await connect(hub.ws, self.tokens[1])
        for k in range(BIG_MESSAGES):
            await ack(ws, send_frame(self.big, BIG, k))
        await ws.close()
        return self


# -- clients ------------------------------------------------------------------------------

def send_frame(hoomi: UUID, size: int, ref: int) -> bytes:
    return encode_client(Send(hoomi_id=hoomi, client_msg_id=uuid4(), content=os.urandom(size),
                              nonce=os.urandom(12), session_id="bench", ref=ref))


async def connect(url: str, token: str, timeout: float = 10,
                  source: str = "127.0.0.1") -> websockets.ClientConnection:
    ws = await asyncio.wait_for(websockets.connect(url, max_size=2**24, compression=None,
                                                   open_timeout=timeout,
                                                   local_addr=(source, 0)), timeout)
    await ws.send(encode_client(Hello(token=token)))
    while True:
        frame = decode_server(await asyncio.wait_for(ws.recv(decode=False), timeout))
        if isinstance(frame, Welcome):
            return ws
        if isinstance(frame, Error):
            await ws.close()
            raise RuntimeError(f"hello refused: {frame.code.value}")


async def ack(ws: websockets.ClientConnection, frame: bytes, timeout: float = 10) -> float:
    """Send one frame; seconds until its ack (pushes and other frames skipped)."""
    ref = msgpack.unpackb(frame)["ref"]
    started = time.perf_counter()
    await ws.send(frame)
    while True:
        got = decode_server(await asyncio.wait_for(ws.recv(decode=False), timeout))
        if getattr(got, "ref", None) == ref:
            if isinstance(got, Ack):
                return time.perf_counter() - started
            raise RuntimeError(f"send refused: {got}")


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (mask key zero: the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


UPGRADE = (b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


class Raw:
    """A TCP connection with a tiny receive buffer, read only when asked to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1", rcvbuf: int = 4096,
                   timeout: float = 5) -> Raw:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((source, 0))
        s.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                s, ("127.0.0.1", port)), timeout)
        except BaseException:
            s.close()
            raise
        reader, writer = await asyncio.open_connection(sock=s, limit=4096)
        return cls(reader, writer)

    async def upgrade(self, timeout: float = 5) -> None:
        self.writer.write(UPGRADE)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))

    async def frame(self, timeout: float = 5) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)
        return await asyncio.wait_for(read(), timeout)

    async def hello(self, token: str) -> str:
        """'welcome', or the error code / close code that came instead."""
        self.writer.write(ws_frame(2, encode_client(Hello(token=token))))
        while True:
            opcode, payload = await self.frame()
            if opcode == 8:
                return f"close {int.from_bytes(payload[:2], 'big')}"
            if opcode == 2:
                got = decode_server(payload)
                if isinstance(got, Welcome):
                    return "welcome"
                if isinstance(got, Error):
                    return got.code.value

    def closed_by_peer(self) -> bool:
        """Whether the server has closed (EOF or reset) — without consuming data."""
        sock = self.writer.get_extra_info("socket")
        if self.reader.at_eof() or self.writer.is_closing():
            return True
        try:
            raw = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return True
        try:
            raw.setblocking(False)
            return raw.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            raw.close()

    def close(self) -> None:
        with suppress(Exception):
            self.writer.transport.abort()


async def bounded(coros: Sequence[Awaitable[Any]], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with gate:
            try:
                return await c
            except Exception as exc:  # noqa: BLE001 - an attack's failures are counted
                return exc
    return await asyncio.gather(*(one(c) for c in coros))


def why(exc: BaseException) -> str:
    """An attack's failure, short: the HTTP status of a refused upgrade, else the type."""
    if isinstance(exc, websockets.InvalidStatus):
        body = (exc.response.body or b"").decode(errors="replace")
        return f"HTTP {exc.response.status_code} {body[:60]}".strip()
    if isinstance(exc, ConnectionError) and str(exc).startswith("HTTP/"):
        return str(exc)[:30]
    return type(exc).__name__


# -- the items -----------------------------------------------------------------------------

async def ping_flood(hub: Hub, w: World, seconds: float = 6) -> list[Row]:
    item = "1 ping flood"
    before = hub.rss_mib()
    raw = await Raw.open(hub.port)
    await raw.upgrade()
    chunk = ws_frame(9, b"p" * 125) * 512  # 67 KB of pings, each answered by a pong
    sent, peak, dropped_at = 0, before, None
    started = time.monotonic()
    while time.monotonic() - started < seconds and sent < 400 * 2**20:
        try:
            raw.writer.write(chunk)
            await asyncio.wait_for(raw.writer.drain(), 1)
            sent += len(chunk)
        except TimeoutError:
            pass  # the hub stopped reading us: good, keep the socket as it is
        except (ConnectionError, OSError):
            dropped_at = time.monotonic() - started
            break
        peak = max(peak, hub.rss_mib())
    during, elapsed = hub.rss_mib(), time.monotonic() - started
    still = not raw.closed_by_peer()
    raw.close()
    await asyncio.sleep(5)
    return [(item, "RSS before / peak during / 5 s after close",
             f"{before:.0f} / {max(peak, during):.0f} / {hub.rss_mib():.0f} MiB"),
            (item, "pings written", f"{sent / 2**20:.0f} MiB in {elapsed:.1f} s"),
            (item, "hub dropped the socket",
             f"after {dropped_at:.1f} s" if dropped_at is not None
             else ("no (still open at the end)" if still else "yes (closed at the end)"))]


async def hoarding_sockets(hub: Hub, w: World, n: int = 40, pages: int = 20) -> list[Row]:
    item = "2 unread pages (WS)"
    before = hub.rss_mib()
    token = w.tokens[0]
    socks: list[Raw] = []
    outcomes: dict[str, int] = {}

    async def one(k: int) -> None:
        # From 8 addresses, as a botnet would: per-address bounds are not what is measured.
        raw = await Raw.open(hub.port, f"127.0.0.{2 + k % 8}")
        socks.append(raw)
        await raw.upgrade()
        got = await raw.hello(token)
        outcomes[got] = outcomes.get(got, 0) + 1
        if got == "welcome":
            history = {"type": "history", "hoomi_id": str(w.big), "limit": 100}
            for k in range(pages):
                raw.writer.write(ws_frame(2, msgpack.packb({**history, "ref": k})))

    results = await bounded([one(k) for k in range(n)], 40)
    for r in results:
        if isinstance(r, Exception):
            outcomes[why(r)] = outcomes.get(why(r), 0) + 1
    t0 = time.monotonic()
    peak = before
    while time.monotonic() - t0 < 10:
        await asyncio.sleep(0.5)
        peak = max(peak, hub.rss_mib())
    held, conns, gauge = hub.rss_mib(), hub.conns(), await hub.metric("hoomi_connections")
    await asyncio.sleep(max(0.0, 35 - (time.monotonic() - t0)))
    late, late_gauge = hub.conns(), await hub.metric("hoomi_connections")
    for raw in socks:
        raw.close()
    await asyncio.sleep(5)
    return [(item, "outcome of 40 hellos (HOOMI_MAX_SOCKETS_PER_USER=32)",
             ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))),
            (item, "RSS before / peak / at 10 s / 5 s after close",
             f"{before:.0f} / {peak:.0f} / {held:.0f} / {hub.rss_mib():.0f} MiB"),
            (item, "TCP conns open at 10 s; hoomi_connections", f"{conns}; {gauge}"),
            (item, "TCP conns open at 35 s; hoomi_connections", f"{late}; {late_gauge}"),
            (item, "TCP conns open 5 s after the clients closed", f"{hub.conns()}")]


async def hoarding_http(hub: Hub, w: World, n: int = 24) -> list[Row]:
    item = "3 unread pages (HTTP)"
    before = hub.rss_mib()
    request = (f"GET /v1/hoomis/{w.big}/messages?limit=100 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {w.tokens[0]}\r\n\r\n").encode()
    socks: list[Raw] = []

    async def one() -> None:
        raw = await Raw.open(hub.port)
        socks.append(raw)
        raw.writer.write(request)

    await bounded([one() for _ in range(n)], n)
    peak = before
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        await asyncio.sleep(0.5)
        peak = max(peak, hub.rss_mib())
    held, conns = hub.rss_mib(), hub.conns()
    await asyncio.sleep(max(0.0, 35 - (time.monotonic() - t0)))
    late = hub.conns()
    for raw in socks:
        raw.close()
    await asyncio.sleep(5)
    return [(item, "RSS before / peak / at 10 s / 5 s after close",
             f"{before:.0f} / {peak:.0f} / {held:.0f} / {hub.rss_mib():.0f} MiB"),
            (item, f"TCP conns open at 10 s; at 35 s (of {n})", f"{conns}; {late}")]


async def slowloris(hub: Hub, w: World, idle: int = 200, half: int = 100, body: int = 50,
                    watch: float = 25) -> list[Row]:
    item = "4 slowloris"
    kinds: dict[str, list[Raw]] = {"idle TCP": [], "half-sent upgrade": [], "stalled body": []}
    stalled = (f"POST /v1/admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
               f"{ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000"
               "\r\n\r\n{\"x\": ").encode()

    async def open_kind(kind: str, data: bytes) -> None:
        raw = await Raw.open(hub.port)
        kinds[kind].append(raw)
        if data:
            raw.writer.write(data)

    await bounded([open_kind("idle TCP", b"") for _ in range(idle)]
                  + [open_kind("half-sent upgrade", UPGRADE[:60]) for _ in range(half)]
                  + [open_kind("stalled body", stalled) for _ in range(body)], 50)
    t0 = time.monotonic()
    dropped: dict[int, float] = {}
    real = "not tried"
    while time.monotonic() - t0 < watch:
        await asyncio.sleep(0.5)
        for raws in kinds.values():
            for raw in raws:
                if id(raw) not in dropped and raw.closed_by_peer():
                    dropped[id(raw)] = time.monotonic() - t0
        if real == "not tried" and time.monotonic() - t0 > 2:
            started = time.perf_counter()
            try:
                ws = await connect(hub.ws, w.tokens[7], timeout=5)
                await ws.close()
                real = f"yes, welcomed in {(time.perf_counter() - started) * 1000:.0f} ms"
            except Exception as exc:  # noqa: BLE001
                real = f"no ({why(exc)})"
    rows = []
    for kind, raws in kinds.items():
        times = sorted(dropped[id(r)] for r in raws if id(r) in dropped)
        when = (f" after {times[0]:.1f}-{times[-1]:.1f} s" if times else "")
        rows.append((item, f"{kind}: dropped within {watch:.0f} s",
                     f"{len(times)}/{len(raws)}{when}"))
        for raw in raws:
            raw.close()
    rows.append((item, "a real client's hello at t=2 s", real))
    return rows


async def full_of_strangers(hub: Hub, w: World, seconds: float = 12, attackers: int = 60,
                            attempts: int = 20) -> list[Row]:
    item = "5 hello-less sockets, MAX_CONNECTIONS=30"
    stop = time.monotonic() + seconds
    opened = 0

    async def squatter(k: int) -> None:
        nonlocal opened
        source = f"127.0.0.{2 + k % 8}"
        while time.monotonic() < stop and opened < 3000:
            opened += 1
            try:
                raw = await Raw.open(hub.port, source)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            try:
                await raw.upgrade(timeout=2)
                while time.monotonic() < stop and not raw.closed_by_peer():
                    await asyncio.sleep(0.2)
            except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.2)  # refused: try again soon, not in a busy loop
            finally:
                raw.close()

    async def real_user() -> list[str]:
        await asyncio.sleep(2)  # let the squatters fill the replica
        outcomes = []
        for _ in range(attempts):
            try:
                ws = await connect(hub.ws, w.tokens[7], timeout=3)
                await ws.close()
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001
                outcomes.append(why(exc))
            await asyncio.sleep(max(0.0, (seconds - 3) / attempts - 0.1))
        return outcomes

    squatters = [asyncio.ensure_future(squatter(k)) for k in range(attackers)]
    outcomes = await real_user()
    for t in squatters:
        t.cancel()
    await asyncio.gather(*squatters, return_exceptions=True)
    ok = outcomes.count("ok")
    others = {o: outcomes.count(o) for o in outcomes if o != "ok"}
    return [(item, f"real user's connects that got a welcome (of {attempts})",
             f"{ok}" + (f" (others: {others})" if others else "")),
            (item, "squatter connections opened", f"{opened}")]


async def floods(hub: Hub, w: World, pages: int = 400, hellos: int = 300) -> list[Row]:
    item = "6 floods"
    rows: list[Row] = []
    auth = {"Authorization": f"Bearer {w.tokens[6]}"}
    async with httpx.AsyncClient(base_url=hub.http, headers=auth, timeout=10) as http:
        results = await bounded([http.get(f"/v1/hoomis/{w.churn}/messages?limit=1")
                                 for _ in range(pages)], 16)
    codes: dict[str, int] = {}
    for r in results:
        key = str(r.status_code) if isinstance(r, httpx.Response) else why(r)
        codes[key] = codes.get(key, 0) + 1
    rows.append((item, f"HTTP page flood: statuses of {pages} (one user, 16 at once)",
                 ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))))

    async def hello_once(k: int) -> str:  # from 127.0.0.9, so the others' hellos still pass
        raw = await Raw.open(hub.port, "127.0.0.9", rcvbuf=65536)
        try:
            await raw.upgrade()
            return await raw.hello(w.tokens[6])
        except ConnectionError as exc:
            return str(exc)[:40]
        finally:
            raw.close()

    results = await bounded([hello_once(k) for k in range(hellos)], 16)
    outcomes: dict[str, int] = {}
    for r in results:
        key = r if isinstance(r, str) else why(r)
        outcomes[key] = outcomes.get(key, 0) + 1
    rows.append((item, f"hello flood: outcomes of {hellos} (one address, 16 at once)",
                 ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))))
    await asyncio.sleep(1)

    async def quiet(seconds: float) -> list[float]:
        ws = await connect(hub.ws, w.tokens[2])
        lat = []
        end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < end:
            k += 1
            lat.append(await ack(ws, send_frame(w.quiet, 200, k)))
            await asyncio.sleep(0.02)
        await ws.close()
        return sorted(lat)

    def pct(xs: list[float]) -> str:
        return (f"p50 {xs[len(xs) // 2] * 1000:.1f} ms, "
                f"p99 {xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000:.1f} ms (n={len(xs)})")

    alone = await quiet(3)
    # The flood runs in a child process, so that its sending does not slow this one's
    # quiet client: what the quiet user sees is the hub's doing.
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.abuse", "--flood", hub.ws, w.tokens[3], str(w.flood),
        "6.5", cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(1)
    crowded = await quiet(5)
    out, _ = await asyncio.wait_for(child.communicate(), 30)
    acked, refused = (int(x) for x in out.split()[-2:])
    rows.append((item, "quiet user's ack, alone", pct(alone)))
    rows.append((item, "quiet user's ack, while 4 sockets of another flood sends",
                 pct(crowded)))
    rows.append((item, "flood sends acked / refused (rate_limited etc.)",
                 f"{acked} / {refused}"))
    return rows


async def flood_child(url: str, token: str, hoomi: UUID, seconds: float) -> tuple[int, int]:
    """4 sockets of one user send as fast as they can; (acked, refused)."""
    refused = acked = 0
    stop = time.monotonic() + seconds

    async def flooder() -> None:
        nonlocal refused, acked
        ws = await connect(url, token)
        frames = [send_frame(hoomi, 200, k) for k in range(64)]

        async def reader() -> None:
            nonlocal refused, acked
            while True:
                got = decode_server(await ws.recv(decode=False))
                if isinstance(got, Error):
                    refused += 1
                elif isinstance(got, Ack):
                    acked += 1
        task = asyncio.ensure_future(reader())
        try:
            while time.monotonic() < stop:
                for f in frames:
                    await ws.send(f)
                await asyncio.sleep(0)
        except websockets.ConnectionClosed:
            pass
        finally:
            task.cancel()
            with suppress(Exception):
                await ws.close()

    await asyncio.gather(*(flooder() for _ in range(4)), return_exceptions=True)
    return acked, refused


ITEMS: dict[int, tuple[Callable[[Hub, World], Awaitable[list[Row]]], dict[str, str]]] = {
    1: (ping_flood, {}),
    2: (hoarding_sockets, {}),
    3: (hoarding_http, {}),
    4: (slowloris, {}),
    5: (full_of_strangers, {"HOOMI_MAX_CONNECTIONS": "30"}),
    6: (floods, {}),
}


# -- the soak ------------------------------------------------------------------------------

def slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def soak(hub: Hub, w: World, minutes: float) -> list[Row]:
    end = time.monotonic() + minutes * 60
    samples: list[tuple[float, float, int]] = []
    between: list[tuple[float, float, int]] = []  # taken between abuse rounds
    counts = {"churned": 0, "steady acks": 0, "abuse rounds": 0, "errors": 0}
    t0 = time.monotonic()

    async def sampler() -> None:
        while time.monotonic() < end:
            samples.append(((time.monotonic() - t0) / 60, hub.rss_mib(), hub.fds()))
            print(f"  soak t={samples[-1][0] * 60:5.0f} s  RSS {samples[-1][1]:6.1f} MiB  "
                  f"fds {samples[-1][2]}", flush=True)
            await asyncio.sleep(min(10, max(0.0, end - time.monotonic())))

    async def churn() -> None:
        k = 0
        while time.monotonic() < end and k < 100_000:
            k += 1
            try:
                ws = await connect(hub.ws, w.tokens[6 + k % 2], timeout=5)
                await ack(ws, send_frame(w.churn, 200, k))
                await ws.close()
                counts["churned"] += 1
            except Exception:  # noqa: BLE001 - counted; the soak goes on
                counts["errors"] += 1
            await asyncio.sleep(0.1)

    async def steady(u: int) -> None:
        k = 0
        while time.monotonic() < end:
            try:
                ws = await connect(hub.ws, w.tokens[u])
                while time.monotonic() < end and k < 1_000_000:
                    k += 1
                    await ack(ws, send_frame(w.steady, 500, k))
                    counts["steady acks"] += 1
                    await asyncio.sleep(0.05)
                await ws.close()
            except Exception:  # noqa: BLE001
                counts["errors"] += 1
                await asyncio.sleep(1)

    async def abuse() -> None:
        rotation: list[Callable[[], Awaitable[Any]]] = [
            lambda: ping_flood(hub, w, seconds=3),
            lambda: hoarding_sockets(hub, w, n=40, pages=5),
            lambda: hoarding_http(hub, w, n=12),
            lambda: slowloris(hub, w, idle=50, half=25, body=10, watch=18),
            lambda: floods(hub, w, pages=100, hellos=60),
        ]
        k = 0
        while time.monotonic() < end - 30:
            between.append(((time.monotonic() - t0) / 60, hub.rss_mib(), hub.fds()))
            try:
                await asyncio.wait_for(rotation[k % len(rotation)](), 60)
            except Exception:  # noqa: BLE001
                counts["errors"] += 1
            counts["abuse rounds"] += 1
            k += 1
            await asyncio.sleep(2)

    await asyncio.gather(sampler(), churn(), steady(4), steady(5), abuse())
    xs = [s[0] for s in samples]
    late = between[len(between) // 2:]
    half = len(samples) // 2
    rows: list[Row] = [
        ("soak", f"{minutes:g} min, samples every 10 s", f"{len(samples)} samples"),
        ("soak", "RSS first / max / last", f"{samples[0][1]:.0f} / "
         f"{max(s[1] for s in samples):.0f} / {samples[-1][1]:.0f} MiB"),
        ("soak", "fds first / max / last", f"{samples[0][2]} / "
         f"{max(s[2] for s in samples)} / {samples[-1][2]}"),
        ("soak", "RSS slope (all; second half)",
         f"{slope(xs, [s[1] for s in samples]):+.2f}; "
         f"{slope(xs[half:], [s[1] for s in samples[half:]]):+.2f} MiB/min"),
        ("soak", "fds slope (all; second half)",
         f"{slope(xs, [float(s[2]) for s in samples]):+.2f}; "
         f"{slope(xs[half:], [float(s[2]) for s in samples[half:]]):+.2f} fds/min"),
        ("soak", "between abuse rounds: RSS / fds, each round",
         " ".join(f"{r:.0f}/{f}" for _, r, f in between)),
        ("soak", "between abuse rounds: RSS slope; fds slope (all rounds)",
         f"{slope([b[0] for b in between], [b[1] for b in between]):+.2f} MiB/min; "
         f"{slope([b[0] for b in between], [float(b[2]) for b in between]):+.2f} fds/min"),
        ("soak", "between abuse rounds: RSS slope; fds slope (second half, warm)",
         f"{slope([b[0] for b in late], [b[1] for b in late]):+.2f} MiB/min; "
         f"{slope([b[0] for b in late], [float(b[2]) for b in late]):+.2f} fds/min"),
        ("soak", "work done", ", ".join(f"{k}: {v}" for k, v in counts.items())),
    ]
    return rows


# -- main ----------------------------------------------------------------------------------

def print_rows(rows: list[Row]) -> None:
    width = max(len(f"{i}  {f}") for i, f, _ in rows)
    for i, f, v in rows:
        print(f"  {f'{i}  {f}':<{width}}  {v}", flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated items to run (1-6)")
    ap.add_argument("--soak", type=float, default=0.0, metavar="MINUTES")
    ap.add_argument("--hub-src", type=Path, default=ROOT,
                    help="the checkout whose server/ runs the replica")
    ap.add_argument("--flood", nargs=4, help=argparse.SUPPRESS)  # item 6's child process
    args = ap.parse_args()
    if args.flood:
        url, token, hoomi, seconds = args.flood
        acked, refused = await flood_child(url, token, UUID(hoomi), float(seconds))
        print(acked, refused)
        return
    only = sorted({int(x) for x in args.only.split(",") if x.strip()}) or sorted(ITEMS)
    src = args.hub_src.resolve()
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    print(f"hub from {src} at {commit}{' (+ uncommitted changes)' if dirty else ''}; "
          f"cores={os.cpu_count()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="hoomi-abuse-logs-") as logs:
        async with fresh_database(migrated=False) as dsn:
            first = Hub(dsn, src, Path(logs))
            try:
                w = await World().build(first)
            finally:
                first.stop()
            rows: list[Row] = []
            if args.soak:
                hub = Hub(dsn, src, Path(logs))
                try:
                    rows = await soak(hub, w, args.soak)
                finally:
                    hub.stop()
                print_rows(rows)
                return
            for n in only:
                fn, env = ITEMS[n]
                started = time.monotonic()
                replica: Hub | None = None
                try:
                    replica = Hub(dsn, src, Path(logs), **env)
                    got = await asyncio.wait_for(fn(replica, w), 120)
                except Exception as exc:  # noqa: BLE001 - report, go on with the next item
                    got = [(f"{n}", "failed", f"{type(exc).__name__}: {exc}"[:200])]
                finally:
                    if replica is not None:
                        replica.stop()
                got.append((got[0][0], "item took", f"{time.monotonic() - started:.0f} s"))
                print_rows(got)
                rows += got
            print("\nsummary")
            print_rows(rows)


if __name__ == "__main__":
    tempfile.tempdir = None
    asyncio.run(main())
