"""`/v1/ws`: the socket around one Session (server/session.py), speaking protocol v1.

The Session decides everything a client can observe (state, order, outbox, cursors);
this module only moves frames and time in and out of it: it accepts (or refuses) the
socket, runs the read loop and the write loop, the hello and token timers, carries out
the requests the session hands back through server/actions.py, and the effects it asks
for (join or leave a Hoomi's feed on the Hub, read a cursor's gap from PostgreSQL).

After every call into the session, `_react()` wakes the writer, starts the close the
session decided (its outbox says "too slow" as a verdict; the socket is closed here), and
starts the effects.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from hoomi_protocol import (
    ClientFrame,
    CloseCode,
    Delete,
    Edit,
    ErrorCode,
    Hello,
    History,
    HoomiError,
    Presence,
    Read,
    Reencrypt,
    Search,
    Send,
    Sync,
    Typing,
)

from . import actions, auth, catch_up, errors
from .flags import Flag
from .limits import KeyedCounter
from .services import Services
from .session import Effect, Session, State
from .transport import EXTENSION as TRANSPORT

if TYPE_CHECKING:
    from storage.records import AppendResult

    from .transport import HubWebSocketProtocol

_log = logging.getLogger(__name__)

# A read refused because the user already runs HOOMI_USER_MAX_READS: retry soon.
READ_RETRY_MS = 100


class _Gate:
    """Sockets of one replica that have not completed `hello`, in all and per address,
    oldest first (`pending`: socket -> when it was let in)."""

    __slots__ = ("waiting", "by_address", "pending")

    def __init__(self, per_address: int) -> None:
        self.waiting = 0
        self.by_address = KeyedCounter(per_address)
        self.pending: dict[Connection, float] = {}

    def oldest_idle(self, now: float, after: float) -> Connection | None:
        """The socket that has waited longest for its hello, if that is over `after`
        seconds: a real client says hello within milliseconds of the upgrade."""
        for conn, since in self.pending.items():
            return conn if now - since >= after else None
        return None


# When the budget of sockets before hello is full, a new one takes the place of the one
# that has waited longest without saying hello, if that one has waited this long: sockets
# held open without hello (reopened at each deadline) cannot keep real users out.
EVICT_PENDING_AFTER_S = 1.0


# One gate per replica's hub (Services is not hashable); gone with it.
_gates: weakref.WeakKeyDictionary[object, _Gate] = weakref.WeakKeyDictionary()


def _gate(services: Services) -> _Gate:
    gate = _gates.get(services.hub)
    if gate is None:
        gate = _gates[services.hub] = _Gate(services.settings.max_unauthenticated_per_address)
    return gate


class _Flush:
    """The sockets of one event loop with frames to write, written together by one
    callback at the loop's next turn instead of a writer task each: a push to a
    500-member Hoomi was 500 tasks created, scheduled and run. Frames queued during a
    turn still leave together (the callback runs after that turn's callbacks)."""

    __slots__ = ("conns",)

    def __init__(self) -> None:
        self.conns: list[Connection] = []

    def add(self, conn: Connection) -> None:
        if not self.conns:
            asyncio.get_running_loop().call_soon(self.run)
        self.conns.append(conn)

    def run(self) -> None:
        conns, self.conns = self.conns, []
        for conn in conns:
            try:
                conn.flush()
            except Exception:
                _log.exception("write failed")


_flushes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flush] = (
    weakref.WeakKeyDictionary())
# A Connection's writer: queued for its loop's flush (else None, a Task, or False).
_FLUSH = True


def _flush_of_loop() -> _Flush:
    loop = asyncio.get_running_loop()
    flush = _flushes.get(loop)
    if flush is None:
        flush = _flushes[loop] = _Flush()
    return flush


class _Metrics:
    """The session's Observer: its counts go to the replica's Prometheus metrics."""

    __slots__ = ("metrics",)

    def __init__(self, services: Services) -> None:
        self.metrics = services.metrics

    def frame_in(self, frame: ClientFrame) -> None:
        self.metrics.count_in(type(frame))

    def frame_out(self, kind: str) -> None:
        self.metrics.count_out(kind)

    def error(self, code: ErrorCode) -> None:
        self.metrics.errors.labels(code.value).inc()

    def closed(self, code: CloseCode) -> None:
        self.metrics.closes.labels(str(int(code))).inc()


class Connection:
    """One accepted socket: the Hub's `Socket` (server/hub.py) around a Session."""

    # Slots and lean flags (server/flags.py): a replica holds tens of thousands of these.
    __slots__ = ("ws", "services", "session", "_writer", "_flush", "_room", "_drained", "_sends",
                 "_send_room", "_tasks", "_closing", "_expiry", "_transport", "address",
                 "_waiting", "__weakref__")

    def __init__(self, ws: WebSocket, services: Services) -> None:
        self.ws = ws
        self.services = services
        self.session = Session(services.settings, services.limits,
                               observer=_Metrics(services))
        # Who writes the outbox: None (empty, nobody), _FLUSH (the loop's shared flush,
        # `flush`), a Task (`_write_loop`: the peer's buffer is full, it waits), or False
        # once a write failed or the socket ended: no writer again. An idle socket holds
        # no task.
        self._writer: asyncio.Task[None] | None | bool = None
        self._flush = _flush_of_loop()  # looked up once: react() runs per frame
        self._room = Flag(True)  # set when the outbox is below half: catch-up may go on
        self._drained = Flag(True)  # set while the outbox is empty
        # Sends submitted and not decided yet: at most HOOMI_MAX_INFLIGHT_SENDS, then the
        # read loop waits for `_send_room` (made on the first wait).
        self._sends = 0
        self._send_room: Flag | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False  # the close the session decided has been started
        self._expiry: asyncio.TimerHandle | None = None
        # The transport under the socket (server/transport.py; None under another server):
        # the socket counts against every cap until it is gone. Both read in run().
        self._transport: HubWebSocketProtocol | None = None
        self.address = ""  # the ASGI client address (behind a trusted proxy: X-F-F)
        self._waiting = False  # holds a place in the gate until welcomed or gone

    @property
    def user_id(self) -> UUID:
        return self.session.user_id

    @property
    def membership_epoch(self) -> int:
        return self.session.membership_epoch

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        services, settings = self.services, self.services.settings
        self._transport = (self.ws.scope.get("extensions") or {}).get(TRANSPORT)
        client = self.ws.scope.get("client")
        self.address = client[0] if client else ""
        gate = _gate(services)
        why = None
        if services.draining:
            why = "replica shutting down"
        elif services.hub.connected >= settings.max_connections:
            why = "replica full"
        elif gate.waiting >= settings.unauthenticated_budget and not self._evict_idle(gate):
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
        gate.pending[self] = asyncio.get_running_loop().time()
        self._waiting = True
        services.hub.register(self)
        services.metrics.connections.inc()
        try:
            await self.ws.accept()
            if await self._hello():
                await self._read_loop()
        except WebSocketDisconnect:
            pass
        finally:
            await self._end()

    async def _end(self) -> None:
        """Stop the socket's work at once; let its close go out within HOOMI_CLOSE_TIMEOUT_S
        (or abort the transport); only then give back its places under the caps."""
        services = self.services
        deadline = asyncio.get_running_loop().time() + services.settings.close_timeout_s
        if self._expiry is not None:
            self._expiry.cancel()
        close = self.session.close_request
        for h in self.session.closed():
            services.hub.leave(self, h)  # no more pushes; the user's count stays until gone
        for task in self._tasks:
            task.cancel()
        if self._writer is _FLUSH and close is not None:
            self.flush()  # what was queued before the close (e.g. an error) goes first
        writer = self._writer
        if writer is _FLUSH:
            self._writer = False
        if isinstance(writer, asyncio.Task):
            if close is not None:
                # Let the writer flush what was queued before the close (e.g. an error).
                try:
                    await asyncio.wait_for(writer, min(2.0, self._left(deadline)))
                except (TimeoutError, asyncio.CancelledError, Exception):
                    pass
            writer.cancel()
        if close is not None:
            try:
                await asyncio.wait_for(self._close_now(*close), self._left(deadline))
            except TimeoutError:
                pass
        t = self._transport
        if t is not None and not t.gone.done():
            try:
                await asyncio.wait_for(asyncio.shield(t.gone), self._left(deadline))
            except TimeoutError:
                # The close could not be written and answered: drop the connection and
                # the buffer it holds.
                services.metrics.aborted.inc()
                t.abort()
                try:
                    await asyncio.wait_for(asyncio.shield(t.gone), 1.0)
                except TimeoutError:
                    _log.warning("transport still there after abort")
        services.metrics.connections.dec()
        services.hub.unregister(self)
        self._leave_gate()

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def _leave_gate(self) -> None:
        if self._waiting:
            self._waiting = False
            gate = _gate(self.services)
            gate.waiting -= 1
            gate.pending.pop(self, None)
            gate.by_address.release(self.address)

    def _evict_idle(self, gate: _Gate) -> bool:
        """Make room under the budget by closing the socket that has waited longest
        without hello (4401, as at its deadline); False if none has waited long enough."""
        victim = gate.oldest_idle(asyncio.get_running_loop().time(), EVICT_PENDING_AFTER_S)
        if victim is None:
            return False
        self.services.metrics.refused.labels("evicted before hello").inc()
        victim._leave_gate()
        victim.session.no_hello()
        victim.react()
        return True

    async def _deny(self, why: str) -> None:
        self.services.metrics.refused.labels(why).inc()
        body = {"error": ErrorCode.UNAVAILABLE.value, "message": f"{why}; try again"}
        try:
            await self.ws.send_denial_response(
                JSONResponse(body, status_code=503, headers={"Retry-After": "1"}))
        except RuntimeError:  # a server without the denial-response extension
            await self.ws.accept()
            await self._close_now(CloseCode.TRY_AGAIN_LATER, why)

    def close(self, code: int, reason: str) -> None:
        """Ask for the socket to close after what is already queued (the replica's drain)."""
        self.session.close(CloseCode(code), reason)
        self.react()

    def react(self) -> None:
        """After any call into the session: write, close and carry out what it decided."""
        session = self.session
        if session.outbox.frames:
            self._drained.clear()
            if self._writer is None:
                self._writer = _FLUSH
                self._flush.add(self)
        if session.close_request is not None and not self._closing:
            self._closing = True
            if session.state is not State.CLOSED:
                # Wake the reader too: it is parked in receive().
                self.spawn(self._close_after_flush())
        for task in session.take_effects():
            if task.effect is Effect.LEAVE:
                self.services.hub.leave(self, task.hoomi_id)
            elif task.effect is Effect.JOIN:
                self.spawn(catch_up.join(self, task))
            else:
                self.spawn(catch_up.catch_up(self, task.hoomi_id, task.generation))

    async def _close_after_flush(self) -> None:
        timeout = self.services.settings.close_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            await asyncio.wait_for(self._drained.wait(), min(2.0, timeout))
        except TimeoutError:
            pass  # a reader this slow gets the close without the rest
        assert self.session.close_request is not None
        try:
            await asyncio.wait_for(self._close_now(*self.session.close_request),
                                   self._left(deadline))
        except TimeoutError:
            # Not even the close frame fits in what the peer reads: drop the transport,
            # which wakes the reader (disconnect) and ends the socket.
            if self._transport is not None:
                self.services.metrics.aborted.inc()
                self._transport.abort()

    async def _close_now(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code=code, reason=reason)
        except Exception:
            pass

    def flush(self) -> None:
        """The shared flush's turn (`_Flush`): write the outbox now, as long as the
        transport takes it without waiting; what is left (the peer's buffer is full, or
        no transport of ours) goes to a writer task that waits for it."""
        if self._writer is not _FLUSH:
            return  # the socket ended meanwhile
        self._writer = None
        session, t = self.session, self._transport
        if t is not None:
            try:
                while t.can_send_now() and (data := session.data_to_send()) is not None:
                    t.send_now(data)
            except Exception:
                self._writer = False  # as a failed write in _write_loop: the socket is going
                raise
            if not session.outbox.frames:
                if not self._room.is_set():
                    self._room.set()
                self._drained.set()
                return
            if t.disconnected or t.close_sent:
                self._writer = False  # nobody reads it any more: _end sees to the rest
                return
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        """Write until the outbox is empty, then end (react() starts the next one). What
        piles up while a write waits for the peer leaves together, as one message under
        "batch" (Session.data_to_send)."""
        ws, session = self.ws, self.session
        try:
            while (data := session.data_to_send()) is not None:
                await ws.send_bytes(data)
                if not self._room.is_set() and not session.outbox.half_full():
                    self._room.set()
        except asyncio.CancelledError:
            self._writer = False
            raise
        except Exception:
            # A failed write (the peer is gone: WebSocketDisconnect): the socket is going,
            # _end and the reader see to it. Not raised into the task, which nobody awaits
            # when the socket ends without a close of ours ("exception never retrieved").
            self._writer = False
            return
        self._writer = None
        self._drained.set()

    async def room_for_catch_up(self) -> None:
        """Catch-up from the database waits for room instead of overflowing the outbox."""
        while self.session.outbox.half_full() and not self._closing:
            self._room.clear()
            await self._room.wait()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- hello -----------------------------------------------------------------------------

    async def _hello(self) -> bool:
        try:
            data = await asyncio.wait_for(self._receive(),
                                          self.services.settings.hello_timeout_s)
        except TimeoutError:
            self.session.no_hello()
            self.react()
            return False
        frame = self.session.receive(data)
        self.react()
        if not isinstance(frame, Hello):
            return False
        try:
            await self._authenticate(frame)
        except actions.TryAgainLater as err:
            self.session.refuse(err, frame.ref, CloseCode.TRY_AGAIN_LATER, err.reason)
        except auth.AuthError as err:
            self.session.refuse(err, frame.ref, CloseCode.UNAUTHORIZED, err.message)
        except Exception as exc:
            _log.warning("hello failed: %s", exc)
            self.session.refuse(errors.unavailable(), frame.ref, CloseCode.SERVICE_RESTART,
                                "storage unavailable")
        self.react()
        return self.session.state is State.LIVE

    async def _authenticate(self, hello: Hello) -> None:
        who = await actions.authenticate(self.services, self.address, hello.token)
        # The socket lives as long as its token (on the session's clock): a stolen token
        # must not keep a socket open forever. The client reconnects with a new one and
        # resumes, so nothing is missed.
        expires_at = self.session.clock() + (who.expires_at - time.time())
        await self._welcome(hello, self.session.authenticated(who.user_id, expires_at,
                                                              who.hoomis))
        left = self.session.expires_in()
        if left is not None and self.session.state is State.LIVE:
            self._expiry = asyncio.get_running_loop().call_later(left, self._token_expired)

    async def _welcome(self, hello: Hello, first: list[UUID]) -> None:
        services, hub = self.services, self.services.hub
        hub.attach(self)
        self._leave_gate()  # authenticated: counted as the user's socket from here
        await hub.join(self, first)
        # Read again once subscribed: this last_seq is the edge between catch-up and pushes.
        mine = await actions.my_hoomis(services, self.user_id)
        gone, added = self.session.membership_at_hello(mine)
        for h in gone:
            hub.leave(self, h)
        if added:
            await hub.join(self, added)
        behind = self.session.welcome(hello, mine, hub.delivered)
        for i in range(0, len(behind), catch_up.BATCH):
            self.spawn(catch_up.catch_up_batch(self, behind[i:i + catch_up.BATCH]))
        self.react()

    def _token_expired(self) -> None:
        self.session.token_expired()
        self.react()

    # -- the Hub's side (its Socket protocol) -----------------------------------------------

    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        self.session.on_message(hoomi_id, seq, frame)
        self.react()

    def on_deletion(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        self.session.on_deletion(hoomi_id, seq, frame)
        self.react()

    def on_joined(self, hoomi_id: UUID, role: str) -> None:
        self.session.on_joined(hoomi_id, role)
        self.react()

    def on_left(self, hoomi_id: UUID) -> None:
        self.session.on_left(hoomi_id)
        self.react()

    def on_memberships(self, roles: dict[UUID, str]) -> None:
        self.session.on_memberships(roles)
        self.react()

    def on_user_gone(self) -> None:
        self.session.on_user_gone()
        self.react()

    def on_signal(self, hoomi_id: UUID, user_id: UUID, kind: str, frame: bytes) -> None:
        self.session.on_signal(hoomi_id, user_id, kind, frame)
        self.react()

    # -- requests ----------------------------------------------------------------------------

    async def _receive(self) -> bytes | None:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        return msg.get("bytes")  # type: ignore[no-any-return]

    async def _read_loop(self) -> None:
        session = self.session
        while session.state is State.LIVE:
            frame = session.receive(await self._receive())
            self.react()
            if session.hold_reading_ms:
                # Refused for its rate: read nothing more until a token is back (TCP
                # holds the flood on the client's side; see Session.hold_reading_ms).
                await asyncio.sleep(session.hold_reading_ms / 1000)
                session.hold_reading_ms = 0
            if frame is None:
                continue
            if isinstance(frame, Send):
                if self._sends >= self.services.settings.max_inflight_sends:
                    await self._wait_send_room()
                self._send(frame)
            elif isinstance(frame, History | Sync | Search):
                # Pages and searches are the costly reads: one user runs at most
                # HOOMI_USER_MAX_READS at once, over all their sockets (and the HTTP API).
                reads = self.services.user_reads
                if not reads.acquire(self.user_id):
                    session.fail(HoomiError(
                        ErrorCode.RATE_LIMITED, "too many reads at once for this user; "
                        "retry later", None, READ_RETRY_MS), frame.ref)
                    self.react()
                    continue
                try:
                    await self._request(frame)
                finally:
                    reads.release(self.user_id)
            elif isinstance(frame, Delete | Edit | Reencrypt | Read | Presence):
                await self._request(frame)
            elif isinstance(frame, Typing):
                self.services.hub.publish_typing(self, frame.hoomi_id, self.user_id)

    async def _wait_send_room(self) -> None:
        limit = self.services.settings.max_inflight_sends
        while self._sends >= limit:
            room = self._send_room
            if room is None:
                room = self._send_room = Flag()
            room.clear()
            await room.wait()

    def _send(self, frame: Send) -> None:
        started = time.perf_counter()
        self._sends += 1
        try:
            # A callback the writer calls right after its commit hook, not a future's
            # done-callback: the ack is queued in the same event-loop turn as the pushes
            # of its batch, so both leave in one write per socket (one flush), and the hot
            # path creates and schedules nothing per message.
            actions.submit_send(self.services, self.user_id, frame,
                                lambda result, err: self._acked(frame, result, err, started))
        except HoomiError as err:
            self._decided()
            self.session.fail(err, frame.ref)
            self.react()

    def _decided(self) -> None:
        self._sends -= 1
        if self._send_room is not None:
            self._send_room.set()

    def _acked(self, frame: Send, result: AppendResult | None, err: HoomiError | None,
               started: float) -> None:
        self._decided()
        if result is not None:
            self.session.answer_send(frame, result)
            self.services.metrics.ack_seconds.observe(time.perf_counter() - started)
        else:
            self.session.fail(err or errors.unavailable("storage failed; retry"), frame.ref)
        self.react()

    async def _request(self, frame: History | Sync | Delete | Edit | Reencrypt | Search
                       | Read | Presence) -> None:
        services, session = self.services, self.session
        try:
            if isinstance(frame, History):
                session.answer_page(frame, await actions.history(
                    services, self.user_id, frame.hoomi_id, frame.before, frame.limit,
                    scheme_below=frame.scheme_below))
            elif isinstance(frame, Sync):
                session.answer_page(frame, await actions.sync(
                    services, self.user_id, frame.hoomi_id, frame.after, frame.limit,
                    scheme_below=frame.scheme_below))
            elif isinstance(frame, Edit):
                session.answer_edit(frame, await actions.edit_message(
                    services, self.user_id, frame))
            elif isinstance(frame, Reencrypt):
                session.answer_reencrypt(frame, await actions.reencrypt(
                    services, self.user_id, frame))
            elif isinstance(frame, Read):
                session.answer_read(frame, await actions.mark_read(
                    services, self, self.user_id, frame.hoomi_id, frame.seq))
            elif isinstance(frame, Presence):
                session.answer_presence(frame, await actions.presence(
                    services, self.user_id, frame.hoomi_id))
            elif isinstance(frame, Search):
                session.answer_search(frame, await actions.search(
                    services, self.user_id, frame.hoomi_id, frame.tokens, frame.before,
                    frame.limit))
            else:
                session.answer_delete(frame, await actions.delete_message(
                    services, self.user_id, frame.hoomi_id, frame.id, field="id"))
        except Exception as exc:
            mapped = errors.as_hoomi_error(exc)
            if mapped is None:
                raise
            session.fail(mapped, frame.ref)
        self.react()


async def endpoint(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    await Connection(ws, services).run()
