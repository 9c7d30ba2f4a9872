"""`/v1/ws`: one Connection per socket, speaking protocol v1.

A connection reads frames, turns each into a reply through protocol/ and storage/, and
owns a bounded queue of outgoing frames drained by its own sender task. Pushes never
block the hub: when the queue is full the client is too slow and is closed with 4408
(it reconnects and resumes). Per Hoomi the connection keeps a cursor, the last seq it
queued; a push is queued only if it is the cursor's next seq, otherwise the connection
catches up from PostgreSQL, so pushes reach the client in seq order without gaps.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol import (
    Ack,
    CloseCode,
    Delete,
    Error,
    ErrorCode,
    Hello,
    History,
    HoomiState,
    Membership,
    Page,
    Ping,
    Pong,
    ProtocolError,
    Send,
    Sync,
    Welcome,
    decode_client,
    encode_server,
)
from storage import hoomis as hoomi_store
from storage import messages as message_store
from storage.errors import StorageError, is_outage
from storage.records import AppendRequest, HoomiSummary

from . import auth, events
from .limits import KeyedCounter, TokenBucket
from .services import Services
from .transport import EXTENSION as TRANSPORT

if TYPE_CHECKING:
    from .transport import HubWebSocketProtocol

_log = logging.getLogger(__name__)

RETRY_AFTER_MS = 1000
CATCH_UP_PAGE = 200
# Deletions of messages this socket has not been sent yet, held to follow their message.
# Past this many the rest are dropped: catch-up reads those messages as tombstones.
MAX_HELD_DELETIONS = 1024
# Hoomis behind at hello are caught up this many at a time, this many messages each, in one
# query (a user in 300 Hoomis must not cost 300 round trips); the rest page on their own.
CATCH_UP_BATCH = 10
CATCH_UP_BATCH_PAGE = 20
# A read refused because the user already runs HOOMI_USER_MAX_READS: retry soon.
READ_RETRY_MS = 100


class _Gate:
    """Sockets of one replica that have not completed `hello`, in all and per address."""

    __slots__ = ("waiting", "by_address")

    def __init__(self, per_address: int) -> None:
        self.waiting = 0
        self.by_address = KeyedCounter(per_address)


# One gate per replica's hub (Services is not hashable); gone with it.
_gates: weakref.WeakKeyDictionary[object, _Gate] = weakref.WeakKeyDictionary()


def _gate(services: Services) -> _Gate:
    gate = _gates.get(services.hub)
    if gate is None:
        gate = _gates[services.hub] = _Gate(services.settings.max_unauthenticated_per_address)
    return gate


class _Cursor:
    __slots__ = ("sent", "catching_up", "held")

    def __init__(self, sent: int, catching_up: bool = False) -> None:
        self.sent = sent
        self.catching_up = catching_up
        self.held: dict[int, bytes] = {}  # seq -> `deleted` frame, for seqs above `sent`


class Connection:
    def __init__(self, ws: WebSocket, services: Services) -> None:
        self.ws = ws
        self.s = services
        self.user_id: UUID = UUID(int=0)
        self.cursors: dict[UUID, _Cursor] = {}
        self._out: deque[bytes] = deque()
        self._max_out = services.settings.send_queue_frames
        # Bytes too: push frames are shared between sockets, but history pages are not,
        # and a client that asks for pages without reading them must not make this
        # replica hold gigabytes (up to 1024 pages of 100 messages of 64 KiB).
        self._out_bytes = 0
        self._max_out_bytes = int(services.settings.send_queue_mb * (1 << 20))
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()  # set while the outgoing queue is empty
        self._drained.set()
        self._inflight = asyncio.Semaphore(services.settings.max_inflight_sends)
        self._bucket = TokenBucket(services.settings.send_rate, services.settings.send_burst)
        # history, sync and delete each cost a database round trip: bounded on their own.
        self._reads = TokenBucket(services.settings.request_rate, services.settings.request_burst)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: tuple[int, str] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._attached = False
        # Nothing but the reply to hello goes out before `welcome`: membership changes
        # that arrive during hello are applied after it, in order.
        self._welcomed = False
        self._early: list[tuple[UUID, str | None]] = []
        self.membership_epoch = 0
        # The transport under the socket (server/transport.py; None under another server):
        # the socket counts against every cap until it is gone. Both read in run().
        self._transport: HubWebSocketProtocol | None = None
        self.address = ""  # the ASGI client address (behind a trusted proxy: X-F-F)
        self._waiting = False  # holds a place in the gate until welcomed or gone
        self._ended = False

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        m, st = self.s.metrics, self.s.settings
        self._transport = (self.ws.scope.get("extensions") or {}).get(TRANSPORT)
        client = self.ws.scope.get("client")
        self.address = client[0] if client else ""
        gate = _gate(self.s)
        why = None
        if self.s.draining:
            why = "replica shutting down"
        elif len(self.s.sockets) >= st.max_connections:
            why = "replica full"
        elif gate.waiting >= st.unauthenticated_budget:
            # Sockets before `hello` have a budget of their own, and one per address: a
            # client holding hello-less sockets cannot fill the replica for real users.
            why = "too many sockets waiting for hello"
        elif not gate.by_address.acquire(self.address):
            why = "too many sockets waiting for hello from this address"
        if why is not None:
            # Refuse the upgrade itself with 503: a load balancer retries the handshake on
            # another replica (nginx: proxy_next_upstream http_503) and the client never
            # notices; a direct client backs off and tries again.
            await self._deny(why)
            return
        gate.waiting += 1
        self._waiting = True
        self.s.sockets.add(self)
        m.connections.inc()
        sender: asyncio.Task[None] | None = None
        try:
            await self.ws.accept()
            sender = asyncio.get_running_loop().create_task(self._send_loop())
            if await self._hello():
                await self._read_loop()
        except WebSocketDisconnect:
            pass
        finally:
            await self._end(sender)

    async def _end(self, sender: asyncio.Task[None] | None) -> None:
        """Stop the socket's work at once; let its close go out within HOOMI_CLOSE_TIMEOUT_S
        (or abort the transport); only then give back its places under the caps."""
        self._ended = True
        deadline = asyncio.get_running_loop().time() + self.s.settings.close_timeout_s
        if self._expiry is not None:
            self._expiry.cancel()
        for h in list(self.cursors):
            self.s.hub.leave(self, h)  # no more pushes; the user's count stays until gone
        self.cursors.clear()
        for task in self._tasks:
            task.cancel()
        if sender is not None:
            if self._closing is not None:
                # Let the sender flush what was queued before the close (e.g. an error).
                self._wake.set()
                try:
                    await asyncio.wait_for(sender, min(2.0, self._left(deadline)))
                except (TimeoutError, asyncio.CancelledError, Exception):
                    pass
            sender.cancel()
        if self._closing is not None:
            try:
                await asyncio.wait_for(self._close_now(*self._closing), self._left(deadline))
            except TimeoutError:
                pass
        t = self._transport
        if t is not None and not t.gone.done():
            try:
                await asyncio.wait_for(asyncio.shield(t.gone), self._left(deadline))
            except TimeoutError:
                # The close could not be written and answered: drop the connection and
                # the buffer it holds.
                self.s.metrics.aborted.inc()
                t.abort()
                try:
                    await asyncio.wait_for(asyncio.shield(t.gone), 1.0)
                except TimeoutError:
                    _log.warning("transport still there after abort")
        self.s.metrics.connections.dec()
        self.s.sockets.discard(self)
        if self._attached:
            self.s.hub.detach(self, [])
        self._leave_gate()

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def _leave_gate(self) -> None:
        if self._waiting:
            self._waiting = False
            gate = _gate(self.s)
            gate.waiting -= 1
            gate.by_address.release(self.address)

    async def _deny(self, why: str) -> None:
        self.s.metrics.refused.labels(why).inc()
        body = {"error": ErrorCode.UNAVAILABLE.value, "message": f"{why}; try again"}
        try:
            await self.ws.send_denial_response(
                JSONResponse(body, status_code=503, headers={"Retry-After": "1"}))
        except RuntimeError:  # a server without the denial-response extension
            await self.ws.accept()
            await self._close_now(CloseCode.TRY_AGAIN_LATER, why)

    def _token_expired(self) -> None:
        self._error(ErrorCode.UNAUTHORIZED, "token expired; reconnect with a new token", None)
        self.close(CloseCode.UNAUTHORIZED, "token expired")

    def close(self, code: int, reason: str) -> None:
        """Ask for the socket to close after what is already queued."""
        if self._closing is None and not self._ended:
            self._closing = (code, reason)
            self.s.metrics.closes.labels(str(code)).inc()
            self._wake.set()
            # Wake the reader: it is parked in receive().
            self._spawn(self._close_after_flush())

    async def _close_after_flush(self) -> None:
        timeout = self.s.settings.close_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            await asyncio.wait_for(self._drained.wait(), min(2.0, timeout))
        except TimeoutError:
            pass  # a reader this slow gets the close without the rest
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._close_now(*self._closing), self._left(deadline))
        except TimeoutError:
            # Not even the close frame fits in what the peer reads: drop the transport,
            # which wakes the reader (disconnect) and ends the socket.
            if self._transport is not None:
                self.s.metrics.aborted.inc()
                self._transport.abort()

    async def _close_now(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code=code, reason=reason)
        except Exception:
            pass

    async def _send_loop(self) -> None:
        ws = self.ws
        out = self._out
        low = self._max_out // 2
        while True:
            if not out:
                self._drained.set()
                if self._closing is not None:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            frame = out.popleft()
            self._out_bytes -= len(frame)
            await ws.send_bytes(frame)
            if not self._room.is_set() and len(out) <= low and not self._half_full_bytes():
                self._room.set()

    def _enqueue(self, frame: bytes, kind: str) -> None:
        if self._closing is not None:
            return
        if len(self._out) >= self._max_out or (
                self._out and self._out_bytes + len(frame) > self._max_out_bytes):
            self.close(CloseCode.TOO_SLOW, "too slow to read pushes; reconnect and resume")
            return
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._drained.clear()
        self.s.metrics.frame_out(kind).inc()
        self._wake.set()

    async def _room_for_catch_up(self) -> None:
        """Catch-up from the database waits for room instead of overflowing the queue."""
        while ((len(self._out) >= self._max_out // 2 or self._half_full_bytes())
               and self._closing is None):
            self._room.clear()
            await self._room.wait()

    def _half_full_bytes(self) -> bool:
        return self._out_bytes >= self._max_out_bytes // 2

    def _reply(self, frame: Any, kind: str) -> None:
        self._enqueue(encode_server(frame), kind)

    def _error(self, code: ErrorCode, message: str, ref: str | int | None,
               retry_after_ms: int | None = None) -> None:
        self.s.metrics.errors.labels(code.value).inc()
        self._reply(Error(code=code, message=message, ref=ref, retry_after_ms=retry_after_ms),
                    "error")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- hello -----------------------------------------------------------------------------

    async def _hello(self) -> bool:
        try:
            data = await asyncio.wait_for(self._receive(), self.s.settings.hello_timeout_s)
        except TimeoutError:
            self.close(CloseCode.UNAUTHORIZED, "no hello within the time limit")
            return False
        if data is None:
            return False
        try:
            frame = decode_client(data, self.s.limits)
        except ProtocolError as err:
            self._error(err.code, err.message, err.ref)
            self.close(err.close or CloseCode.UNAUTHORIZED, "expected hello")
            return False
        self.s.metrics.frame_in(type(frame)).inc()
        if not isinstance(frame, Hello):
            self._error(ErrorCode.UNAUTHORIZED, "type: the first frame must be hello", frame.ref)
            self.close(CloseCode.UNAUTHORIZED, "expected hello")
            return False
        # Per client address: hellos are bounded (each costs a token check and queries),
        # and an address past its failed authentications is refused without a check.
        wait_ms = self.s.hellos.take(self.address)
        why = "too many hellos from this address"
        if not wait_ms:
            wait_ms = self.s.auth_failures.blocked(self.address)
            why = "too many failed authentications from this address"
        if wait_ms:
            self._error(ErrorCode.RATE_LIMITED, f"{why}; retry later", frame.ref, wait_ms)
            self.close(CloseCode.TRY_AGAIN_LATER, why)
            return False
        try:
            st = self.s.settings
            try:
                claims = auth.verify_claims(st.jwt_secret, frame.token, issuer=st.jwt_issuer,
                                            audience=st.jwt_audience)
                self.user_id = claims.user_id
                # A valid signature is not enough: a deleted user's tokens die with it.
                first = await hoomi_store.user_with_hoomis(self.s.pool, self.user_id)
                if first is None:
                    raise auth.AuthError(ErrorCode.UNAUTHORIZED, "unknown user")
            except auth.AuthError:
                self.s.auth_failures.take(self.address)
                raise
            if self.s.hub.sockets_of(self.user_id) >= self.s.settings.max_sockets_per_user:
                # One account must not hold a replica's sockets (a leaking client, a
                # stolen token): refuse the newest, keep the ones in use.
                self._error(ErrorCode.RATE_LIMITED, "too many open sockets for this user",
                            frame.ref, RETRY_AFTER_MS)
                self.close(CloseCode.TRY_AGAIN_LATER, "too many sockets for this user")
                return False
            await self._welcome(frame, first)
            # The socket lives as long as its token: a stolen or revoked-by-expiry token
            # must not keep a socket open forever. The client reconnects with a new one
            # and resumes, so nothing is missed.
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, claims.expires_at - time.time()), self._token_expired)
        except auth.AuthError as err:
            self._error(err.code, err.message, frame.ref)
            self.close(CloseCode.UNAUTHORIZED, err.message)
            return False
        except Exception as exc:
            _log.warning("hello failed: %s", exc)
            self._error(ErrorCode.UNAVAILABLE, "storage unavailable", frame.ref, RETRY_AFTER_MS)
            self.close(CloseCode.SERVICE_RESTART, "storage unavailable")
            return False
        return True

    async def _welcome(self, hello: Hello, first: list[HoomiSummary]) -> None:
        pool, hub = self.s.pool, self.s.hub
        # Cursors exist (catching up) before the feeds open, so no push is lost in between.
        for s in first:
            self.cursors[s.hoomi_id] = _Cursor(0, catching_up=True)
        hub.attach(self)
        self._attached = True
        self._leave_gate()  # authenticated: counted as the user's socket from here
        await hub.join(self, [s.hoomi_id for s in first])
        # Read again once subscribed: this last_seq is the edge between catch-up and pushes.
        mine = await hoomi_store.user_hoomis(pool, self.user_id)
        current = {s.hoomi_id for s in mine}
        for h in [h for h in self.cursors if h not in current]:
            del self.cursors[h]
            hub.leave(self, h)
        added = [s.hoomi_id for s in mine if s.hoomi_id not in self.cursors]
        for h in added:
            self.cursors[h] = _Cursor(0, catching_up=True)
        if added:
            await hub.join(self, added)
        self._reply(Welcome(user_id=self.user_id, ref=hello.ref, hoomis=[
            HoomiState(hoomi_id=s.hoomi_id, last_seq=s.last_seq, role=s.role) for s in mine],
            max_content_bytes=self.s.limits.max_content_bytes), "welcome")
        behind: list[tuple[UUID, _Cursor]] = []
        for s in mine:
            cursor = self.cursors[s.hoomi_id]
            seen = hello.resume.get(s.hoomi_id)
            # A client claiming more than exists gets pushes from the real edge on.
            cursor.sent = s.last_seq if seen is None else min(seen, s.last_seq)
            self._release_held(cursor)
            if cursor.sent < s.last_seq:
                behind.append((s.hoomi_id, cursor))
            elif cursor.sent >= hub.delivered(s.hoomi_id):
                # Current, and no push came while we read: nothing to read at all. Every
                # later seq is pushed to the cursor in order (hub.py's invariant).
                cursor.catching_up = False
            else:
                self._spawn(self._catch_up(s.hoomi_id, cursor))
        for i in range(0, len(behind), CATCH_UP_BATCH):
            self._spawn(self._catch_up_batch(behind[i:i + CATCH_UP_BATCH]))
        self._welcomed = True
        early, self._early = self._early, []
        for hoomi_id, role in early:
            if role is None:
                self.left(hoomi_id)
            else:
                self.joined(hoomi_id, role)

    # -- the hub's side (Socket protocol) ---------------------------------------------------

    def deliver(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        cursor = self.cursors.get(hoomi_id)
        if cursor is None or cursor.catching_up or seq <= cursor.sent:
            return
        if seq == cursor.sent + 1:
            self._send_message(cursor, seq, frame)
        else:
            cursor.catching_up = True
            self._spawn(self._catch_up(hoomi_id, cursor))

    def _send_message(self, cursor: _Cursor, seq: int, frame: bytes) -> None:
        cursor.sent = seq
        self._enqueue(frame, "message")
        if cursor.held:
            self._release_held(cursor)

    def _release_held(self, cursor: _Cursor) -> None:
        """Queue the held deletions whose message the client now has."""
        for seq in sorted(s for s in cursor.held if s <= cursor.sent):
            self._enqueue(cursor.held.pop(seq), "deleted")

    def deleted(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        # A client must never see `deleted` before the message it deletes (it would then
        # show that message's content): hold it until the message has been queued.
        cursor = self.cursors.get(hoomi_id)
        if cursor is None:
            return
        if self._welcomed and seq <= cursor.sent:
            self._enqueue(frame, "deleted")
        elif len(cursor.held) < MAX_HELD_DELETIONS:
            cursor.held[seq] = frame

    def joined(self, hoomi_id: UUID, role: str) -> None:
        if not self._welcomed:
            self._early.append((hoomi_id, role))
            return
        if hoomi_id in self.cursors or self._closing is not None or self._ended:
            return
        self.membership_epoch += 1
        cursor = self.cursors[hoomi_id] = _Cursor(0, catching_up=True)
        self._spawn(self._join(hoomi_id, cursor))

    async def _join(self, hoomi_id: UUID, cursor: _Cursor) -> None:
        try:
            await self.s.hub.join(self, [hoomi_id])
            if self.cursors.get(hoomi_id) is not cursor:
                return
            last = await hoomi_store.last_seqs(self.s.pool, [hoomi_id])
        except Exception as exc:
            # Without its feed this socket would miss the Hoomi silently: make the client
            # reconnect (and resume) instead.
            _log.warning("join failed: %s", exc)
            self.close(CloseCode.SERVICE_RESTART, "storage unavailable")
            return
        if self.cursors.get(hoomi_id) is not cursor:
            return  # left while we read
        cursor.sent = last.get(hoomi_id, 0)
        self._reply(Membership(hoomi_id=hoomi_id, state="joined"), "membership")
        await self._catch_up(hoomi_id, cursor)

    def left(self, hoomi_id: UUID) -> None:
        if not self._welcomed:
            self._early.append((hoomi_id, None))
            return
        if self.cursors.pop(hoomi_id, None) is None:
            return
        self.membership_epoch += 1
        self.s.hub.leave(self, hoomi_id)
        self._reply(Membership(hoomi_id=hoomi_id, state="left"), "membership")

    def memberships(self, roles: dict[UUID, str]) -> None:
        """The hub's reconcile: the user's Hoomis as PostgreSQL has them now."""
        if not self._welcomed or self._closing is not None or self._ended:
            return
        for hoomi_id in [h for h in self.cursors if h not in roles]:
            self.left(hoomi_id)
        for hoomi_id, role in roles.items():
            if hoomi_id not in self.cursors:
                self.joined(hoomi_id, role)

    def gone(self) -> None:
        self.close(CloseCode.UNAUTHORIZED, "user deleted")

    async def _catch_up_batch(self, group: list[tuple[UUID, _Cursor]]) -> None:
        """The first catch-up page of several Hoomis in one query; a Hoomi with more (or
        pushed to meanwhile) goes on paging alone."""
        try:
            pages = await message_store.since_each(
                self.s.pool, {h: c.sent for h, c in group}, CATCH_UP_BATCH_PAGE)
        except Exception as exc:
            _log.debug("batched catch-up failed, paging alone: %s", exc)
            for h, cursor in group:
                if self.cursors.get(h) is cursor:
                    self._spawn(self._catch_up(h, cursor))
            return
        for h, cursor in group:
            page = pages.get(h)
            for m in page.messages if page is not None else ():
                await self._room_for_catch_up()
                if self.cursors.get(h) is not cursor or m.seq <= cursor.sent:
                    continue
                self._send_message(cursor, m.seq, events.message_frame(m))
            if self.cursors.get(h) is not cursor:
                continue
            if page is None or page.has_more or cursor.sent < self.s.hub.delivered(h):
                self._spawn(self._catch_up(h, cursor))
            else:
                cursor.catching_up = False

    async def _catch_up(self, hoomi_id: UUID, cursor: _Cursor) -> None:
        """Queue what the database has after the cursor, until it meets the live pushes."""
        cursor.catching_up = True
        failures = 0
        try:
            while self.cursors.get(hoomi_id) is cursor:
                try:
                    page = await message_store.since(self.s.pool, hoomi_id, cursor.sent,
                                                     CATCH_UP_PAGE)
                except Exception as exc:
                    failures += 1
                    if failures >= 5:
                        _log.warning("catch-up failed: %s", exc)
                        self.close(CloseCode.SERVICE_RESTART, "storage unavailable")
                        return
                    await asyncio.sleep(0.1 * 2**failures)
                    continue
                failures = 0
                for m in page.messages:
                    await self._room_for_catch_up()
                    # Re-checked after the wait: the member may have left meanwhile.
                    if self.cursors.get(hoomi_id) is not cursor or m.seq <= cursor.sent:
                        continue
                    self._send_message(cursor, m.seq, events.message_frame(m))
                if page.has_more:
                    continue
                live = self.s.hub.delivered(hoomi_id)
                if cursor.sent >= live:
                    return
                if not page.messages:
                    cursor.sent = live  # purged meanwhile: nothing left to send below it
                    self._release_held(cursor)
                    return
        finally:
            cursor.catching_up = False

    # -- requests ----------------------------------------------------------------------------

    async def _receive(self) -> bytes | None:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        data = msg.get("bytes")
        if data is None:
            self.close(CloseCode.BAD_FRAME, "frames must be binary msgpack maps")
            return None
        return data  # type: ignore[no-any-return]

    async def _read_loop(self) -> None:
        limits = self.s.limits
        frames_in = self.s.metrics.frame_in
        while self._closing is None:
            data = await self._receive()
            if data is None:
                return
            try:
                frame = decode_client(data, limits)
            except ProtocolError as err:
                self._error(err.code, err.message, err.ref)
                if err.close is not None:
                    self.close(err.close, err.message)
                    return
                continue
            frames_in(type(frame)).inc()
            if isinstance(frame, Send):
                wait_ms = self._bucket.take()
                if wait_ms:
                    self._error(ErrorCode.RATE_LIMITED, "too many sends; retry later",
                                frame.ref, wait_ms)
                    continue
                await self._inflight.acquire()
                try:
                    self._on_send(frame)
                except BaseException:
                    self._inflight.release()
                    raise
            elif isinstance(frame, Ping):
                self._reply(Pong(ref=frame.ref), "pong")
            elif not isinstance(frame, Hello) and (wait_ms := self._reads.take()):
                self._error(ErrorCode.RATE_LIMITED, "too many requests; retry later",
                            frame.ref, wait_ms)
            elif isinstance(frame, History | Sync):
                # Pages are the costly reads: one user runs at most HOOMI_USER_MAX_READS
                # at once, over all their sockets (and the HTTP API).
                reads = self.s.user_reads
                if not reads.acquire(self.user_id):
                    self._error(ErrorCode.RATE_LIMITED,
                                "too many reads at once for this user; retry later",
                                frame.ref, READ_RETRY_MS)
                    continue
                try:
                    await self._request(frame)
                finally:
                    reads.release(self.user_id)
            else:
                await self._request(frame)

    def _on_send(self, frame: Send) -> None:
        started = time.perf_counter()
        request = AppendRequest(frame.hoomi_id, self.user_id, frame.client_msg_id,
                                frame.content, frame.nonce, frame.session_id)
        try:
            future = self.s.writer.submit(request)
        except StorageError as err:
            self._inflight.release()
            self._storage_error(err, frame.ref)
            return
        # A done-callback, not a task per send: the ack is queued the moment the batch
        # commits, and the hot path creates and schedules nothing per message.
        future.add_done_callback(lambda f: self._acked(frame, f, started))

    def _acked(self, frame: Send, future: asyncio.Future[Any], started: float) -> None:
        self._inflight.release()
        if future.cancelled():
            return
        err = future.exception()
        if err is not None:
            if isinstance(err, StorageError):
                self._storage_error(err, frame.ref)
            else:
                _log.error("send failed: %r", err)
                self._error(ErrorCode.UNAVAILABLE, "storage failed; retry", frame.ref,
                            RETRY_AFTER_MS)
            return
        result = future.result()
        self._reply(Ack(ref=frame.ref, id=result.id, hoomi_id=result.hoomi_id, seq=result.seq,
                        created_at=events.ms(result.created_at)), "ack")
        self.s.metrics.ack_seconds.observe(time.perf_counter() - started)

    def _storage_error(self, err: StorageError, ref: str | int | None) -> None:
        retry = RETRY_AFTER_MS if err.code == ErrorCode.UNAVAILABLE else None
        self._error(err.code, err.message, ref, retry)

    async def _request(self, frame: Hello | History | Sync | Delete) -> None:
        try:
            if isinstance(frame, Hello):
                self._error(ErrorCode.INVALID, "type: hello was already received", frame.ref)
            elif isinstance(frame, History):
                hp = await message_store.history(self.s.pool, frame.hoomi_id, frame.before,
                                                 frame.limit, reader=self.user_id,
                                                 max_bytes=self.s.settings.page_max_bytes)
                self._reply(Page(ref=frame.ref, hoomi_id=frame.hoomi_id,
                                 messages=[events.message_body(m) for m in hp.messages],
                                 next_before=hp.next_before), "page")
            elif isinstance(frame, Sync):
                sp = await message_store.since(self.s.pool, frame.hoomi_id, frame.after,
                                               frame.limit, reader=self.user_id,
                                               max_bytes=self.s.settings.page_max_bytes)
                self._reply(Page(ref=frame.ref, hoomi_id=frame.hoomi_id,
                                 messages=[events.message_body(m) for m in sp.messages],
                                 has_more=sp.has_more), "page")
            elif isinstance(frame, Delete):
                done = await message_store.delete_for_everyone(
                    self.s.pool, frame.hoomi_id, frame.id, self.user_id)
                self._reply(Ack(ref=frame.ref, id=done.id, hoomi_id=done.hoomi_id, seq=done.seq,
                                created_at=int(time.time() * 1000)), "ack")
                if done.changed:
                    self.s.hub.deleted(done.hoomi_id, done.id, done.seq)
        except StorageError as err:
            self._storage_error(err, frame.ref)
        except Exception as exc:
            if not is_outage(exc):
                raise
            _log.warning("request failed: %s", exc)
            self._error(ErrorCode.UNAVAILABLE, "storage unavailable", frame.ref, RETRY_AFTER_MS)


async def endpoint(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    await Connection(ws, services).run()
