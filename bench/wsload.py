"""A lean WebSocket client for load generation: what bench.hub drives the hub and the echo
with.

The load generator shares the machine's two cores with the server it measures, so every
microsecond it spends is one the server does not get. The `websockets` client costs
about 60 µs per paced message here (a task wake-up per frame received, its Python frame
parser, a kernel random read per mask); this one does per message what the protocol
needs and no more:

- `asyncio.Protocol` callbacks, no task: a received message goes straight to the
  `listen` callback;
- client frames masked (RFC 6455 5.3) with keys from a seeded generator and websockets'
  C `apply_mask`;
- binary frames, fragmented or not, pings answered with pongs, a close answered and ended.

Text frames, compression and subprotocols are not spoken: a server that sends a text
frame or anything unexpected ends the connection (`closed` is set, `error` says why).
Not a general client: bench only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.speedups import apply_mask

from bench.httpload import read_head

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEAD_7 = struct.Struct(">BB")
_HEAD_16 = struct.Struct(">BBH")
_HEAD_64 = struct.Struct(">BBQ")
_LEN_16 = struct.Struct(">H")
_LEN_64 = struct.Struct(">Q")
BINARY, CONTINUATION, CLOSE, PING, PONG = 0x2, 0x0, 0x8, 0x9, 0xA


class LeanSocket(asyncio.Protocol):
    """One client WebSocket. Until `listen(callback)`, binary messages are kept for
    `recv()` (a handshake's reply: the hub's welcome); from then on each goes to the
    callback as it arrives."""

    def __init__(self, key: bytes, host: str, path: str, rng: random.Random) -> None:
        self.on_message: Callable[[bytes], None] = self._keep
        self._kept: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._key = key
        self._request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self._rng = rng
        self._buf = bytearray()
        self._parts: list[bytes] = []  # a fragmented message so far
        self._close_sent = False
        self.error: ConnectionError | None = None  # why the client ended the connection
        self._transport: asyncio.Transport | None = None

    # -- out -----------------------------------------------------------------------------------

    def send(self, payload: bytes, opcode: int = BINARY) -> None:
        assert self._transport is not None
        n = len(payload)
        if n < 126:
            head = _HEAD_7.pack(0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = _HEAD_16.pack(0x80 | opcode, 0xFE, n)
        else:
            head = _HEAD_64.pack(0x80 | opcode, 0xFF, n)
        mask = self._rng.randbytes(4)
        self._transport.write(head + mask + apply_mask(payload, mask))

    async def close(self, timeout: float = 5.0) -> None:
        """Send a close frame (1000) and wait for the server to end the connection."""
        if self._transport is not None and not self.closed.done():
            self.send(struct.pack(">H", 1000), CLOSE)
            self._close_sent = True
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self.closed)
            except TimeoutError:
                self._transport.abort()

    # -- in ------------------------------------------------------------------------------------

    async def recv(self) -> bytes:
        """The next message not read yet (before `listen`)."""
        while not self._kept:
            if self.closed.done():
                raise self.error or ConnectionError("connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._waiter, self.closed),
                               return_when=asyncio.FIRST_COMPLETED)
        return self._kept.pop(0)

    def listen(self, callback: Callable[[bytes], None]) -> None:
        """Hand every message to `callback`: those kept and not read first, then each as
        it arrives (no task, no queue)."""
        kept, self._kept = self._kept, []
        self.on_message = callback
        for data in kept:
            callback(data)

    def _keep(self, data: bytes) -> None:
        self._kept.append(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self._transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionError("connection closed")
        if not self.opened.done():
            self.opened.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self.opened.done():
            head = read_head(self._buf)
            if head is None:
                return
            status, headers = head
            accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
            if " 101 " not in status + " " or headers.get("sec-websocket-accept") != accept:
                self._fail(f"handshake refused: {status}")
                return
            self.opened.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                if b1 & 0x80:
                    self._fail("masked frame from the server")
                    return
                n, at = b1 & 0x7F, pos + 2
                if n == 126:
                    if len(buf) - at < 2:
                        break
                    (n,), at = _LEN_16.unpack_from(buf, at), at + 2
                elif n == 127:
                    if len(buf) - at < 8:
                        break
                    (n,), at = _LEN_64.unpack_from(buf, at), at + 8
                if len(buf) - at < n:
                    break
                payload = bytes(buf[at:at + n])
                pos = at + n
                self._frame(b0 & 0x80, b0 & 0x0F, payload)
        finally:
            del buf[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == BINARY and fin and not self._parts:
            self.on_message(payload)
        elif opcode in (BINARY, CONTINUATION):
            if (opcode == BINARY) == bool(self._parts):
                self._fail("bad fragmentation")
                return
            self._parts.append(payload)
            if fin:
                whole, self._parts = b"".join(self._parts), []
                self.on_message(whole)
        elif opcode == PING:
            self.send(payload, PONG)
        elif opcode == PONG:
            pass
        elif opcode == CLOSE:
            if self._transport is not None:
                if not self._close_sent:  # the server's close: echo its code
                    self.send(payload[:2], CLOSE)
                    self._close_sent = True
                self._transport.close()
        else:
            self._fail(f"unexpected opcode {opcode}")

    def _fail(self, why: str) -> None:
        self.error = ConnectionError(why)
        if not self.opened.done():
            self.opened.set_exception(self.error)
        if not self.closed.done():
            self.closed.set_result(None)
        if self._transport is not None:
            self._transport.abort()


async def connect(url: str, rng: random.Random) -> LeanSocket:
    """Open a WebSocket to `url` (ws://host:port/path)."""
    parts = urlsplit(url)
    assert parts.scheme == "ws" and parts.hostname and parts.port
    key = base64.b64encode(rng.randbytes(16))
    loop = asyncio.get_running_loop()
    _, sock = await loop.create_connection(
        lambda: LeanSocket(key, parts.netloc, parts.path or "/", rng),
        parts.hostname, parts.port)
    await sock.opened
    return sock
