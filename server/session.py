"""One socket's protocol v1, Sans-I/O: frames in, frames and effects out, no asyncio.

server/ws.py owns the socket: it hands each frame read to `receive`, carries out what it
returns (a request), and after every call to this object it takes `data_to_send()`,
`take_effects()` (feeds to join or leave, catch-up reads to do) and `close_request`.
Everything a client can observe about order and state is decided here.

States: AWAITING_HELLO -> LIVE (welcome queued) -> DRAINING (a close was decided: what
is queued still goes out, nothing more is queued) -> CLOSED (the socket is gone).

Invariants (tests/test_session.py checks them over random sequences):
1. Before `welcome`, nothing is queued but the reply to hello (an error, then a close).
2. Per Hoomi, `message` pushes are queued in strictly ascending seq, without a repeat or
   a gap that still exists in PostgreSQL (each cursor is a server/sequencer.py Sequencer:
   what it cannot push in order it reads, as a `READ` effect).
3. A `deleted` is never queued before the message it deletes, nor an `edited` before the
   message it changes (the hub hands both to `on_deletion`, which holds either).
4. A push that would overflow the outbox (frames or bytes) is not queued: the verdict is
   `TOO_SLOW`, the session drains and asks to close with CloseCode.TOO_SLOW.
5. A cursor has a generation: a read or join that finishes after its cursor was dropped
   (the member left, or left and joined again) changes nothing.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from hoomi_protocol import (
    Ack,
    ClientFrame,
    CloseCode,
    Delete,
    Edit,
    EditAck,
    ErrorCode,
    Hello,
    History,
    HoomiError,
    HoomiState,
    Limits,
    Membership,
    Ping,
    Pong,
    Presence,
    PresenceReply,
    ProtocolError,
    Read,
    ReadAck,
    Reencrypt,
    ReencryptAck,
    Search,
    Send,
    ServerFrame,
    Sync,
    Typing,
    Welcome,
    decode_client,
    encode_server,
)
from hoomi_protocol.codec import encode_ack
from storage.records import (
    AppendResult,
    DeletedMessage,
    EditedMessage,
    HistoryPage,
    HoomiSummary,
    Reencrypted,
    SearchPage,
    SyncPage,
)

from .config import Settings
from .errors import wire_error
from .events import ms, page_frame
from .limits import Clock, TokenBucket
from .sequencer import Sequencer

# Deletions of messages this socket has not been sent yet, held to follow their message.
# Past this many the rest are dropped: catch-up reads those messages as tombstones.
MAX_HELD_DELETIONS = 1024
# Pushes held per cursor while it reads a gap; past it they are read with the gap.
MAX_HELD_PUSHES = 256
# The requests `receive` hands back, besides `send` and `hello` (server/ws.py runs them).
SERVED = (History, Sync, Delete, Edit, Reencrypt, Search, Read, Presence)
# The hello `features` this hub accepts: "signals" = receipt and typing pushes (v1.1),
# "batch" = several frames per WebSocket message, a msgpack stream (SPEC 7.2).
FEATURES = ("signals", "batch")
# A batch message: frames are packed until the next would take it past this many bytes
# (a frame larger than it goes alone, as in v1).
BATCH_MAX_BYTES = 64 * 1024
# `typing` frames handed on per socket and Hoomi: at most one per this many seconds.
TYPING_INTERVAL_S = 1.0


_last_time: tuple[datetime, int] = (datetime.min, 0)


def _ms(t: datetime) -> int:
    """events.ms, remembered for the last time seen: every row of a batch carries the
    same `created_at` object, and its acks are answered one after the other."""
    global _last_time
    last, value = _last_time
    if t is not last:
        value = ms(t)
        _last_time = (t, value)
    return value


class State(enum.Enum):
    AWAITING_HELLO = "awaiting hello"
    LIVE = "live"
    DRAINING = "draining"
    CLOSED = "closed"


class SessionError(RuntimeError):
    """A call the session's state does not allow: a bug in its caller (server/ws.py)."""


class Verdict(enum.Enum):
    """What became of a frame handed to the outbox."""

    QUEUED = "queued"
    DROPPED = "dropped"  # the session is draining or closed: nobody will read it
    TOO_SLOW = "too slow"  # it would overflow the outbox: the session closes


class Effect(enum.Enum):
    JOIN = "join"  # route this Hoomi's pushes here, read its edge, then `joined_at`
    LEAVE = "leave"  # stop routing this Hoomi's pushes here
    READ = "read"  # the cursor has a gap: `read_range`, read, `rows_read` (until None)


@dataclass(frozen=True, slots=True)
class Task:
    effect: Effect
    hoomi_id: UUID
    generation: int


class Observer(Protocol):
    """Where the session reports what it counts (server/ws.py: the metrics)."""

    def frame_in(self, frame: ClientFrame) -> None: ...
    def frame_out(self, kind: str) -> None: ...
    def error(self, code: ErrorCode) -> None: ...
    def closed(self, code: CloseCode) -> None: ...


class Outbox:
    """Frames waiting for the writer, bounded in frames and in bytes (push frames are
    shared between sockets, but pages are not: a client that asks for pages without
    reading them must not make the replica hold gigabytes)."""

    __slots__ = ("frames", "size", "max_frames", "max_bytes")

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        # A list, not a deque: an empty deque holds a 64-slot block (~600 bytes) on every
        # idle socket; taking from the front of a list is a memmove of at most max_frames
        # pointers, and a batch takes its frames in one slice.
        self.frames: list[bytes] = []
        self.size = 0
        self.max_frames = max_frames
        self.max_bytes = max_bytes

    def put(self, frame: bytes) -> bool:
        """Queue `frame`; False (and nothing queued) when it would overflow."""
        if len(self.frames) >= self.max_frames or (
                self.frames and self.size + len(frame) > self.max_bytes):
            return False
        self.frames.append(frame)
        self.size += len(frame)
        return True

    def take(self) -> bytes | None:
        if not self.frames:
            return None
        frame = self.frames.pop(0)
        self.size -= len(frame)
        return frame

    def take_batch(self, max_bytes: int) -> bytes | None:
        """The queued frames, oldest first, as one msgpack stream of at most `max_bytes`
        (or the first frame alone, if larger): SPEC 7.2 "batch"."""
        frames = self.frames
        if len(frames) < 2:
            return self.take()
        size = len(frames[0])
        k = 1
        while k < len(frames) and size + len(frames[k]) <= max_bytes:
            size += len(frames[k])
            k += 1
        self.size -= size
        if k == 1:
            return frames.pop(0)
        batch = b"".join(frames[:k])
        del frames[:k]
        return batch

    def half_full(self) -> bool:
        """Catch-up waits below this, so it never overflows the outbox itself."""
        return len(self.frames) >= self.max_frames // 2 or self.size >= self.max_bytes // 2


class Cursor:
    """What this socket has been sent of one Hoomi."""

    __slots__ = ("generation", "order", "deletions", "reading", "typed_at")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        # Not started until the Hoomi's edge is known (welcome, or joined_at).
        self.order: Sequencer[bytes] = Sequencer(started=False, max_held=MAX_HELD_PUSHES)
        self.deletions: dict[int, bytes] = {}  # seq -> `deleted` frame, above `sent`
        self.reading = False  # a READ effect is out for it
        self.typed_at = float("-inf")  # the last `typing` handed on, on the session clock

    @property
    def sent(self) -> int:
        return self.order.delivered


class _Quiet:
    def frame_in(self, frame: ClientFrame) -> None: ...
    def frame_out(self, kind: str) -> None: ...
    def error(self, code: ErrorCode) -> None: ...
    def closed(self, code: CloseCode) -> None: ...


class Session:
    def __init__(self, settings: Settings, limits: Limits, *, clock: Clock = time.monotonic,
                 wall_clock: Clock = time.time, observer: Observer | None = None) -> None:
        self.state = State.AWAITING_HELLO
        self.wall_clock = wall_clock  # for the times on the wire (ms since the epoch)
        self.user_id = UUID(int=0)
        self.limits = limits
        self.clock = clock
        self.observer: Observer = observer or _Quiet()
        self.outbox = Outbox(settings.send_queue_frames, int(settings.send_queue_mb * (1 << 20)))
        self.cursors: dict[UUID, Cursor] = {}
        self.sends = TokenBucket(settings.send_rate, settings.send_burst, clock)
        # history, sync and delete each cost a database round trip: bounded on their own.
        self.requests = TokenBucket(settings.request_rate, settings.request_burst, clock)
        # Set when a send or request was refused for its rate: the caller reads nothing
        # more from this socket for that long, so a client that ignores retry_after_ms is
        # slowed by TCP itself and costs one error per refill, not one per frame.
        self.hold_reading_ms = 0
        self.close_request: tuple[CloseCode, str] | None = None
        self.expires_at: float | None = None  # on `clock`, once authenticated
        # Bumped by every membership change applied: a reconcile that read the database
        # before a change applied since must not undo it (server/hub.py).
        self.membership_epoch = 0
        self._generations = 0
        self._effects: list[Task] = []
        # Membership changes that arrive during hello, applied after welcome, in order.
        self._early: list[tuple[UUID, str | None]] = []
        # The hello features accepted (FEATURES): without "signals", no receipt or
        # typing push reaches this socket (a v1 client sees v1).
        self.features: frozenset[str] = frozenset()
        self.batch = False  # "batch" accepted: data_to_send packs frames (SPEC 7.2)

    # -- output -----------------------------------------------------------------------------

    def data_to_send(self) -> bytes | None:
        """The next WebSocket message to write, None when the outbox is empty: one frame,
        or under "batch" every queued frame up to BATCH_MAX_BYTES (a msgpack stream)."""
        if self.batch:
            return self.outbox.take_batch(BATCH_MAX_BYTES)
        return self.outbox.take()

    def take_effects(self) -> Sequence[Task]:
        """The feeds to join or leave and the reads to do, each handed out once."""
        if not self._effects:
            return ()
        effects, self._effects = self._effects, []
        return effects

    def queue(self, frame: bytes, kind: str) -> Verdict:
        """Queue an encoded frame (a push, or a reply) for the writer."""
        if self.state in (State.DRAINING, State.CLOSED):
            return Verdict.DROPPED
        if not self.outbox.put(frame):
            self.close(CloseCode.TOO_SLOW, "too slow to read pushes; reconnect and resume")
            return Verdict.TOO_SLOW
        self.observer.frame_out(kind)
        return Verdict.QUEUED

    def reply(self, frame: ServerFrame, kind: str) -> Verdict:
        return self.queue(encode_server(frame), kind)

    def fail(self, err: HoomiError, ref: Any) -> Verdict:
        """Answer the request `ref` with the error frame for `err` (server/errors.py)."""
        self.observer.error(err.code)
        return self.reply(wire_error(err, ref), "error")

    def answer_send(self, frame: Send, result: AppendResult) -> Verdict:
        """The `send` committed (possibly before: a retry gets the first commit's ack).
        Encoded straight from the result (codec.encode_ack: the bytes of an Ack frame)."""
        return self.queue(encode_ack(frame.ref, result.id, result.hoomi_id, result.seq,
                                     _ms(result.created_at)), "ack")

    def answer_page(self, frame: History | Sync, page: HistoryPage | SyncPage) -> Verdict:
        # Encoded straight from the rows (events.page_frame): no MessageBody per row.
        if isinstance(page, HistoryPage):
            data = page_frame(frame.ref, frame.hoomi_id, page.messages,
                              next_before=page.next_before)
        else:
            data = page_frame(frame.ref, frame.hoomi_id, page.messages,
                              has_more=page.has_more)
        return self.queue(data, "page")

    def answer_edit(self, frame: Edit, edited: EditedMessage) -> Verdict:
        return self.reply(EditAck(ref=frame.ref, id=edited.id, hoomi_id=edited.hoomi_id,
                                  seq=edited.seq, updated_at=ms(edited.updated_at)), "ack")

    def answer_reencrypt(self, frame: Reencrypt, done: Reencrypted) -> Verdict:
        return self.reply(ReencryptAck(ref=frame.ref, hoomi_id=frame.hoomi_id,
                                       updated=len(done.updated), skipped=done.skipped), "ack")

    def answer_search(self, frame: Search, page: SearchPage) -> Verdict:
        return self.queue(page_frame(frame.ref, frame.hoomi_id, page.messages,
                                     next_before=page.next_before), "page")

    def answer_read(self, frame: Read, read_seq: int) -> Verdict:
        return self.reply(ReadAck(ref=frame.ref, hoomi_id=frame.hoomi_id, seq=read_seq), "ack")

    def answer_presence(self, frame: Presence, user_ids: list[UUID]) -> Verdict:
        return self.reply(PresenceReply(ref=frame.ref, hoomi_id=frame.hoomi_id,
                                        user_ids=user_ids), "presence")

    def answer_delete(self, frame: Delete, done: DeletedMessage) -> Verdict:
        # The ack's time is when the deletion was answered (the message keeps its own).
        return self.reply(Ack(ref=frame.ref, id=done.id, hoomi_id=done.hoomi_id, seq=done.seq,
                              created_at=int(self.wall_clock() * 1000)), "ack")

    def close(self, code: CloseCode, reason: str) -> None:
        """Decide the close: what is queued still goes out, then the writer closes."""
        if self.state in (State.DRAINING, State.CLOSED):
            return
        self.state = State.DRAINING
        self.close_request = (code, reason)
        self.observer.closed(code)

    def refuse(self, err: HoomiError, ref: Any, code: CloseCode, reason: str) -> None:
        """An error reply, then the close (a refused hello, the token expired)."""
        self.fail(err, ref)
        self.close(code, reason)

    def closed(self) -> list[UUID]:
        """The socket is gone: the Hoomis whose feeds it must leave."""
        self.state = State.CLOSED
        left = list(self.cursors)
        self.cursors.clear()
        self._effects.clear()
        return left

    # -- frames in --------------------------------------------------------------------------

    def receive(self, data: bytes | None) -> ClientFrame | None:
        """A frame read from the socket (None: a text frame). Returns the request the
        caller must carry out (hello before welcome; send, history, sync, delete after),
        or None when it is answered here (pong, an error, a rate limit) or closing."""
        if self.state is not State.AWAITING_HELLO and self.state is not State.LIVE:
            return None
        if data is None:
            self.close(CloseCode.BAD_FRAME, "frames must be binary msgpack maps")
            return None
        try:
            frame = decode_client(data, self.limits)
        except ProtocolError as err:
            self.fail(err, err.ref)
            if self.state is State.AWAITING_HELLO:
                self.close(err.close or CloseCode.UNAUTHORIZED, "expected hello")
            elif err.close is not None:
                self.close(err.close, err.message)
            return None
        self.observer.frame_in(frame)
        if self.state is State.AWAITING_HELLO:
            if isinstance(frame, Hello):
                return frame
            self.refuse(HoomiError(ErrorCode.UNAUTHORIZED, "type: the first frame must be hello"),
                        frame.ref, CloseCode.UNAUTHORIZED, "expected hello")
            return None
        if isinstance(frame, Send):
            wait_ms = self.sends.take()
            if wait_ms:
                self.fail(HoomiError(ErrorCode.RATE_LIMITED, "too many sends; retry later",
                                     None, wait_ms), frame.ref)
                self.hold_reading_ms = wait_ms
                return None
            return frame
        if isinstance(frame, Ping):
            self.reply(Pong(ref=frame.ref), "pong")
            return None
        if isinstance(frame, Hello):
            self.fail(HoomiError(ErrorCode.INVALID, "type: hello was already received"),
                      frame.ref)
            return None
        if isinstance(frame, Typing):
            return self._typing(frame)
        wait_ms = self.requests.take()
        if wait_ms:
            self.fail(HoomiError(ErrorCode.RATE_LIMITED, "too many requests; retry later",
                                 None, wait_ms), frame.ref)
            self.hold_reading_ms = wait_ms
            return None
        if not isinstance(frame, SERVED):
            # A frame of a newer protocol version that this hub decodes but does not
            # carry out yet: answered, so the client does not wait for ever.
            self.fail(HoomiError(ErrorCode.INVALID, f"type: {type(frame).__name__.lower()} "
                                 "is not served by this hub yet"), frame.ref)
            return None
        return frame

    def _typing(self, frame: Typing) -> Typing | None:
        """A member's `typing`, handed on at most once per TYPING_INTERVAL_S per Hoomi;
        the ones in between are dropped without a word (clients send it on keystrokes)."""
        cursor = self.cursors.get(frame.hoomi_id)
        if cursor is None:
            self.fail(HoomiError(ErrorCode.FORBIDDEN, "not a member of this hoomi"), frame.ref)
            return None
        now = self.clock()
        if now - cursor.typed_at < TYPING_INTERVAL_S:
            return None
        cursor.typed_at = now
        return frame

    def no_hello(self) -> None:
        self.close(CloseCode.UNAUTHORIZED, "no hello within the time limit")

    # -- hello ------------------------------------------------------------------------------

    def authenticated(self, user_id: UUID, expires_at: float, first: Iterable[HoomiSummary],
                      ) -> list[UUID]:
        """The token is good: cursors exist (not started) before the feeds open, so no
        push is lost in between. Returns the Hoomis to join before `welcome`."""
        self._during_hello("authenticated")
        self.user_id = user_id
        self.expires_at = expires_at
        for s in first:
            self._cursor(s.hoomi_id)
        return list(self.cursors)

    def membership_at_hello(self, mine: Iterable[HoomiSummary]) -> tuple[list[UUID], list[UUID]]:
        """The user's Hoomis read again once subscribed: (to leave, to join)."""
        self._during_hello("membership_at_hello")
        current = {s.hoomi_id for s in mine}
        gone = [h for h in self.cursors if h not in current]
        for h in gone:
            del self.cursors[h]
        added = [h for h in current if h not in self.cursors]
        for h in added:
            self._cursor(h)
        return gone, added

    def welcome(self, hello: Hello, mine: list[HoomiSummary],
                delivered: Callable[[UUID], int]) -> list[UUID]:
        """Queue `welcome` and start each cursor at its edge: the client's resume point,
        or the Hoomi's end. Returns the Hoomis behind, whose first page the caller reads
        in batches (`rows_read`); `delivered` is the feed's last pushed seq per Hoomi."""
        self._during_hello("welcome")
        accepted = [f for f in dict.fromkeys(hello.features) if f in FEATURES]
        self.features = frozenset(accepted)
        self.batch = "batch" in self.features
        self.reply(Welcome(user_id=self.user_id, ref=hello.ref, hoomis=[
            HoomiState(hoomi_id=s.hoomi_id, last_seq=s.last_seq, role=s.role,
                       read_seq=s.read_seq) for s in mine],
            max_content_bytes=self.limits.max_content_bytes,
            features=accepted if hello.features else None), "welcome")
        if self.state is State.AWAITING_HELLO:
            self.state = State.LIVE
        behind: list[UUID] = []
        for s in mine:
            cursor = self.cursors.get(s.hoomi_id)
            if cursor is None:
                continue
            seen = hello.resume.get(s.hoomi_id)
            # A client claiming more than exists gets pushes from the real edge on.
            start = s.last_seq if seen is None else min(seen, s.last_seq)
            cursor.order.expect(max(s.last_seq, delivered(s.hoomi_id)))
            self._push(cursor, cursor.order.start(start))  # and what was held above it
            if cursor.sent < s.last_seq:
                cursor.reading = True  # its first page comes in a batch
                behind.append(s.hoomi_id)
            else:
                self._read_if_gap(s.hoomi_id, cursor)
        early, self._early = self._early, []
        for hoomi_id, role in early:
            if role is None:
                self.on_left(hoomi_id)
            else:
                self.on_joined(hoomi_id, role)
        return behind

    # -- pushes from the hub ----------------------------------------------------------------

    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        cursor = self.cursors.get(hoomi_id)
        if cursor is None or self.state is State.CLOSED:
            return
        self._push(cursor, cursor.order.offer(seq, frame))
        self._read_if_gap(hoomi_id, cursor)

    def on_deletion(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        # A client must never see `deleted` before the message it deletes (it would then
        # show that message's content): held until the message has been queued.
        cursor = self.cursors.get(hoomi_id)
        if cursor is None:
            return
        if self.state is State.LIVE and seq <= cursor.sent:
            self.queue(frame, "deleted")
        elif len(cursor.deletions) < MAX_HELD_DELETIONS:
            cursor.deletions[seq] = frame

    def on_signal(self, hoomi_id: UUID, user_id: UUID, kind: str, frame: bytes) -> None:
        """A `receipt` or `typing` push: only to a socket that asked for "signals", of a
        Hoomi it is live in; never one's own typing. Ephemeral: dropped rather than let
        it fill the outbox of a slow reader (it never closes a socket as too slow)."""
        if (self.state is not State.LIVE or "signals" not in self.features
                or hoomi_id not in self.cursors or self.outbox.half_full()
                or (kind == "typing" and user_id == self.user_id)):
            return
        self.queue(frame, kind)

    def on_joined(self, hoomi_id: UUID, role: str) -> None:
        if self.state is State.AWAITING_HELLO:
            self._early.append((hoomi_id, role))
            return
        if hoomi_id in self.cursors or self.state is not State.LIVE:
            return
        self.membership_epoch += 1
        cursor = self._cursor(hoomi_id)
        self._effects.append(Task(Effect.JOIN, hoomi_id, cursor.generation))

    def joined_at(self, hoomi_id: UUID, generation: int, last_seq: int) -> None:
        """The JOIN is done: the feed is live and `last_seq` was read after it opened."""
        cursor = self._current(hoomi_id, generation)
        if cursor is None:
            return  # left while we read
        self.reply(Membership(hoomi_id=hoomi_id, state="joined"), "membership")
        self._push(cursor, cursor.order.start(last_seq))
        self._read_if_gap(hoomi_id, cursor)

    def on_left(self, hoomi_id: UUID) -> None:
        if self.state is State.AWAITING_HELLO:
            self._early.append((hoomi_id, None))
            return
        if self.cursors.pop(hoomi_id, None) is None:
            return
        self.membership_epoch += 1
        self._effects.append(Task(Effect.LEAVE, hoomi_id, 0))
        self.reply(Membership(hoomi_id=hoomi_id, state="left"), "membership")

    def on_memberships(self, roles: dict[UUID, str]) -> None:
        """The hub's reconcile: the user's Hoomis as PostgreSQL has them now."""
        if self.state is not State.LIVE:
            return
        for hoomi_id in [h for h in self.cursors if h not in roles]:
            self.on_left(hoomi_id)
        for hoomi_id, role in roles.items():
            if hoomi_id not in self.cursors:
                self.on_joined(hoomi_id, role)

    def on_user_gone(self) -> None:
        self.close(CloseCode.UNAUTHORIZED, "user deleted")

    def expires_in(self) -> float | None:
        return None if self.expires_at is None else max(0.0, self.expires_at - self.clock())

    def token_expired(self) -> None:
        self.refuse(HoomiError(ErrorCode.UNAUTHORIZED,
                               "token expired; reconnect with a new token"),
                    None, CloseCode.UNAUTHORIZED, "token expired")

    # -- catch-up from PostgreSQL -----------------------------------------------------------

    def generation(self, hoomi_id: UUID) -> int | None:
        cursor = self.cursors.get(hoomi_id)
        return None if cursor is None else cursor.generation

    def read_range(self, hoomi_id: UUID, generation: int,
                   delivered: int) -> tuple[int, int] | None:
        """What the READ must fetch now: seqs after `after`, known up to `upto` (read
        from the feed's `delivered` BEFORE the query); None when the read is over."""
        cursor = self._current(hoomi_id, generation)
        if cursor is None:
            return None
        cursor.order.expect(delivered)
        gap = cursor.order.gap() if self.state is State.LIVE else None
        if gap is None:
            cursor.reading = False
        return gap

    def rows_read(self, hoomi_id: UUID, generation: int, rows: list[tuple[int, bytes]],
                  upto: int) -> bool:
        """Rows read for (sent, upto], ascending: queue them. Seqs of that range not among
        them were purged and are skipped. False when the cursor is gone or dropped."""
        cursor = self._current(hoomi_id, generation)
        if cursor is None or self.state is not State.LIVE:
            return False
        self._push(cursor, cursor.order.fill(rows, upto))
        return True

    def read_failed(self, hoomi_id: UUID, generation: int) -> None:
        """The READ gave up (storage down): the client must reconnect and resume."""
        if self._current(hoomi_id, generation) is not None:
            self.close(CloseCode.SERVICE_RESTART, "storage unavailable")

    # -- inside -----------------------------------------------------------------------------

    def _during_hello(self, operation: str) -> None:
        # DRAINING is allowed: the replica may start draining while hello reads.
        if self.state is State.LIVE or self.state is State.CLOSED:
            raise SessionError(f"{operation}: only during hello, and the session is "
                               f"{self.state.value}")

    def _cursor(self, hoomi_id: UUID) -> Cursor:
        self._generations += 1
        cursor = self.cursors[hoomi_id] = Cursor(self._generations)
        return cursor

    def _current(self, hoomi_id: UUID, generation: int) -> Cursor | None:
        cursor = self.cursors.get(hoomi_id)
        return cursor if cursor is not None and cursor.generation == generation else None

    def _push(self, cursor: Cursor, ready: list[tuple[int, bytes]]) -> None:
        for _, frame in ready:
            if self.queue(frame, "message") is not Verdict.QUEUED:
                return
        if cursor.deletions and self.state is State.LIVE:
            for seq in sorted(s for s in cursor.deletions if s <= cursor.sent):
                self.queue(cursor.deletions.pop(seq), "deleted")

    def _read_if_gap(self, hoomi_id: UUID, cursor: Cursor) -> None:
        if (not cursor.reading and self.state is State.LIVE
                and cursor.order.gap() is not None):
            cursor.reading = True
            self._effects.append(Task(Effect.READ, hoomi_id, cursor.generation))
