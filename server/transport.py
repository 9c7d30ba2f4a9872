"""What one TCP connection may hold: uvicorn's protocols with the bounds of issue 14.

`hoomi serve` hands these classes to uvicorn (`uvicorn.Config(http=..., ws=...)`, built by
`protocols(settings)`), so a replica exposed directly needs no proxy to be safe:

- HTTP (before any upgrade): the request head must arrive within HOOMI_HEADER_TIMEOUT_S of
  the connection (or, on a keep-alive connection, of the next request's first byte), a
  body within HOOMI_BODY_TIMEOUT_S of its head, and a response the client does not read
  (writes paused) for HOOMI_RESPONSE_TIMEOUT_S is aborted. Idle keep-alive is uvicorn's
  own `timeout_keep_alive` (HOOMI_IDLE_TIMEOUT_S). Connections not upgraded count against
  HOOMI_MAX_HTTP_CONNECTIONS; past it a new one is reset at once.
- WebSocket: while the transport's writes are paused (the peer does not read) the socket
  is not read either, whatever it sends (uvicorn pauses reading for data frames only, and
  answers every ping straight into the write buffer), and a peer that sends control frames
  beyond PING_RATE/PING_BURST is closed 1008. Once the connection is closing, it is
  aborted if it is still there HOOMI_CLOSE_TIMEOUT_S later: `transport.close()` alone
  waits forever for a buffer the peer never drains. The protocol object is put in the
  ASGI scope as `extensions["hoomi.transport"]`: its `gone` future is set when the
  transport is gone, and `abort()` drops it; server/ws.py counts a socket until then.
- A text frame that is not UTF-8 reaches the app as text (undecodable bytes replaced), so
  it closes 4400 like any text frame instead of uvicorn's traceback and 1007.

Coupling: these subclass uvicorn 0.54's `HttpToolsProtocol` and `WebSocketsSansIOProtocol`
and rely on their internals: the parser callbacks, `handle_websocket_upgrade`,
`pause_writing`/`resume_writing`, `loop`, `transport`, `scope`, `queue`, `read_paused`,
`close_sent`, `disconnected`, `close_timeout`, `conn`, `frames`, `curr_msg_data_type`,
`handle_connect`, `handle_ping`, `handle_pong`, `handle_close`, `keepalive_timeout`,
`send_receive_event_to_app`, `receive`, `send`, `handshake_complete`, `initial_response`
and `run_asgi`. uvicorn is not pinned;
tests/test_abuse_socket.py attacks a real replica through each of them, so a uvicorn
release that renames one fails there, not in production.
"""

from __future__ import annotations

import asyncio
import struct
from asyncio import TimerHandle
from typing import Any, ClassVar

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.protocol import State as WsState

from .config import Settings
from .flags import Flag, Inbox
from .limits import TokenBucket

EXTENSION = "hoomi.transport"
# Control frames (ping, pong) a peer may send: a client pings every few seconds at most.
PING_RATE = 10.0
PING_BURST = 100
# Close code for a peer flooding control frames (RFC 6455 policy violation).
POLICY_VIOLATION = 1008

# The head of an unmasked binary frame, FIN set (RFC 6455 5.2), by payload length.
_HEAD_7 = struct.Struct(">BB")
_HEAD_16 = struct.Struct(">BBH")
_HEAD_64 = struct.Struct(">BBQ")
# Messages up to this size are framed once for every socket that writes the same bytes.
FRAME_ONCE_BELOW = 1 << 16


def binary_frame(data: bytes) -> bytes:
    """`data` as one server-to-client binary frame: the bytes websockets writes for
    `send_binary(data)` without extensions (a server's frames are not masked)."""
    n = len(data)
    if n < 126:
        return _HEAD_7.pack(0x82, n) + data
    if n < 65536:
        return _HEAD_16.pack(0x82, 126, n) + data
    return _HEAD_64.pack(0x82, 127, n) + data


class _Framed:
    """The last message framed, and its frame: a push to a big Hoomi writes the same
    bytes to every socket one after the other (a message that is one shared frame)."""

    __slots__ = ("data", "frame")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.frame = b""


_framed = _Framed()


def protocols(settings: Settings) -> tuple[type[HttpToolsProtocol], type[WebSocketsSansIOProtocol]]:
    """The HTTP and WebSocket protocol classes for one server, bound to its settings."""

    class Http(HubHttpProtocol):
        pass

    class Ws(HubWebSocketProtocol):
        pass

    Http.settings = Ws.settings = settings
    Http.open = set()  # this server's connections not upgraded, shared by its instances
    return Http, Ws


class HubHttpProtocol(HttpToolsProtocol):
    settings: ClassVar[Settings] = Settings()
    open: ClassVar[set[HubHttpProtocol]] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.settings.idle_timeout_s  # type: ignore[assignment]
        self._deadline: TimerHandle | None = None  # header or body
        self._unread: TimerHandle | None = None  # response not read by the client

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.open) >= self.settings.max_http_connections:
            transport.abort()  # refused at once: no file descriptor held for it
            return
        self.open.add(self)
        self._arm(self.settings.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open.discard(self)
        self._disarm()
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._drop)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _drop(self) -> None:
        self._deadline = self._unread = None
        self.transport.abort()

    # The head: from the connection (first request) or the first byte (next ones) ...
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm(self.settings.header_timeout_s)

    # ... to its end; then the body, if any, until the message is complete.
    def on_headers_complete(self) -> None:
        self._arm(self.settings.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        self.open.discard(self)  # the WebSocket caps (server/ws.py) count it from here
        super().handle_websocket_upgrade()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._unread is None:
            self._unread = self.loop.call_later(self.settings.response_timeout_s, self._drop)

    def resume_writing(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        super().resume_writing()


class HubWebSocketProtocol(WebSocketsSansIOProtocol):
    settings: ClassVar[Settings] = Settings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's asyncio.Queue and asyncio.Event, as leaner equivalents (server/flags.py):
        # about 3 KiB less per socket, the same calls.
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag(True)  # type: ignore[assignment]
        self.close_timeout = self.settings.close_timeout_s
        self.gone: asyncio.Future[None] = self.loop.create_future()
        self._writes_paused = False
        self._control = TokenBucket(PING_RATE, PING_BURST)
        self._abort_timer: TimerHandle | None = None

    # -- lifetime ------------------------------------------------------------------------------

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the app task has been created, not run yet
            scope["extensions"][EXTENSION] = self

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        super().connection_lost(exc)
        if not self.gone.done():
            self.gone.set_result(None)

    # -- writing without a task (server/ws.py's shared flush) --------------------------------

    def can_send_now(self) -> bool:
        """Whether `send_now` may write: accepted, open, not closing, writes not paused
        (what uvicorn's `send` would otherwise wait for or refuse)."""
        return (not self._writes_paused and not self.disconnected and self.handshake_complete
                and not self.close_sent and self.initial_response is None
                and self.conn.state is WsState.OPEN and not self.transport.is_closing())

    def send_now(self, data: bytes) -> None:
        """One binary message, written as uvicorn's `send` writes it (the same bytes),
        without awaiting: only after `can_send_now()`. The write may pause writes (the
        peer's buffer full). Framed here, not by websockets (its Frame object, serialize
        and list of writes were a fifth of the write's Python cost), and a message the
        previous write sent too (the same bytes object: a push shared by the sockets of a
        Hoomi) is not framed again."""
        conn = self.conn
        if conn.extensions or conn.writes or conn.expect_continuation_frame:
            # Not the plain case (an extension, bytes websockets has queued): its way.
            conn.send_binary(data)
            self.transport.write(b"".join(conn.data_to_send()))
            return
        framed = _framed
        if framed.data is data:
            self.transport.write(framed.frame)
            return
        frame = binary_frame(data)
        if len(data) < FRAME_ONCE_BELOW:
            framed.data, framed.frame = data, frame
        self.transport.write(frame)

    def abort(self) -> None:
        """Drop the connection now, and its write buffer with it."""
        self._abort_timer = None
        if not self.disconnected:
            self.transport.abort()

    def _abort_later(self) -> None:
        """The connection is closing: it must be gone within the close timeout."""
        if self._abort_timer is None and not self.disconnected:
            self._abort_timer = self.loop.call_later(self.close_timeout, self.abort)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.close":
            self._abort_later()
        elif message["type"] == "websocket.accept" and self.handshake_complete:
            # The upgrade request and our response (their headers) are only read before
            # the handshake completes: not kept for the socket's life (~4 KiB).
            self.request = self.response = None  # type: ignore[assignment]

    async def run_asgi(self) -> None:
        await super().run_asgi()
        self._abort_later()

    def handle_close(self, event: Frame) -> None:
        super().handle_close(event)
        self._abort_later()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self._abort_later()

    # -- flow control: a peer that does not read is not read ------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._writes_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writes_paused = False
        if not self.read_paused:
            self.transport.resume_reading()

    async def receive(self) -> ASGIReceiveEvent:
        # uvicorn's, except that reading stays paused while writes are.
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self._writes_paused:
                self.transport.resume_reading()
        return message

    # -- control frames ------------------------------------------------------------------------

    def handle_ping(self) -> None:
        if self._control.take():
            # websockets has queued a pong for every ping it parsed (even once closing):
            # past the budget they are dropped, not buffered.
            self.conn.data_to_send()
            self._fail(POLICY_VIOLATION, "too many control frames")
        else:
            super().handle_ping()

    def handle_pong(self, event: Frame) -> None:
        if self._control.take():
            self._fail(POLICY_VIOLATION, "too many control frames")
        else:
            super().handle_pong(event)

    def _fail(self, code: int, reason: str) -> None:
        if self.close_sent or self.transport.is_closing():
            return
        self.conn.fail(code, reason)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()
        self._abort_later()

    # -- text frames -----------------------------------------------------------------------------

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text":
            # Any text frame closes 4400 (server/ws.py); one that is not UTF-8 too, without
            # uvicorn's ERROR traceback and 1007.
            self.frames = [b"".join(self.frames).decode("utf-8", "replace").encode()]
        super().send_receive_event_to_app()
