"""This replica's fan-out: which local sockets belong to which Hoomi, pushed in seq order.

Invariant, per Hoomi: this replica pushes messages to its sockets in ascending seq
with no gap, starting after the `last_seq` it read once subscribed (the rule itself is
server/sequencer.py's, one Sequencer per feed). Messages come from this replica's own
commits (delivered locally at once) and from the broker (other replicas' commits, and
the echo of ours, dropped by seq). A message ahead of a missing seq waits `gap_grace` for
the missing one, then the gap is read from PostgreSQL: since seqs commit in order, every
seq below a published one is already in the database. A periodic
reconcile reads the Hoomis whose `last_seq` moved (and the users whose memberships
changed) since its previous round and compares them with what was pushed, which covers
a publish that never happened (a replica died between commit and publish) or was lost
(Redis down).

Each socket keeps its own cursor per Hoomi (server/session.py), so a socket that is still
catching up from the database never gets a push twice or out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from storage import changes as change_store
from storage import hoomis as hoomi_store
from storage import messages as message_store
from storage.records import AppendRequest, AppendResult, EditedMessage, StoredMessage

from . import events
from .broker import CONTROL_CHANNEL, Broker, hoomi_channel
from .sequencer import Sequencer

_log = logging.getLogger(__name__)

FILL_PAGE = 500
# A feed with more sockets than this gets its pushes handed over one socket at a time,
# each written at once (`Hub._fan_out`), at the event loop's next turn: its first member's
# push does not wait for all the others' to be queued.
FAN_OUT_AT = 32
MEMBERSHIP_PAGE = 5000
# Reconcile reads what changed since its watermark (storage/changes.py); it reads
# everything on its first round and when its last success is older than this (the
# change rows it would need may have been pruned), and prunes them every PRUNE_EVERY_S.
FULL_AFTER_S = change_store.KEPT_S / 2
PRUNE_EVERY_S = 300.0


class Socket(Protocol):
    @property
    def user_id(self) -> UUID: ...

    # Bumped by every membership change the socket applies: a reconcile that read the
    # database before a change it has since applied must not undo it.
    @property
    def membership_epoch(self) -> int: ...

    # What the Hub hands each socket (server/ws.py Connection, then its Session).
    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None: ...
    def on_deletion(self, hoomi_id: UUID, seq: int, frame: bytes) -> None: ...
    def on_joined(self, hoomi_id: UUID, role: str) -> None: ...
    def on_left(self, hoomi_id: UUID) -> None: ...
    def on_user_gone(self) -> None: ...
    def on_memberships(self, roles: dict[UUID, str]) -> None: ...
    # A receipt or typing notice (kind "receipt" / "typing") by `user_id`: not a message.
    def on_signal(self, hoomi_id: UUID, user_id: UUID, kind: str, frame: bytes) -> None: ...
    # Write what the socket has queued now, if its transport takes it without waiting
    # (else its writer waits for the peer, as after any push).
    def flush(self) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


class _Feed:
    """One Hoomi on this replica: its sockets, and its order (server/sequencer.py), not
    started until its `last_seq` has been read once subscribed (`ready`)."""

    __slots__ = ("sockets", "order", "filler", "ready", "pending")

    def __init__(self) -> None:
        self.sockets: set[Socket] = set()
        self.order: Sequencer[bytes] = Sequencer(started=False)
        self.filler: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        # What the order let through and the sockets have not been handed yet (a big
        # feed's pushes wait for the next turn: `Hub._fan_out`), in seq order.
        self.pending: list[tuple[int, bytes]] = []


class Hub:
    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: Broker,
        *,
        gap_grace: float = 0.03,
        on_gap_fill: Callable[[int], None] | None = None,
        presence_ttl: float = 30.0,
    ) -> None:
        self._pool = pool
        self._broker = broker
        self._grace = gap_grace
        self._on_gap_fill = on_gap_fill
        # Who is online on the other replicas; this one's are `_users` (server/presence.py).
        self.presence = broker.presence(presence_ttl)
        self._feeds: dict[UUID, _Feed] = {}
        # Every socket of this replica, from accept to gone (server/ws.py), and the
        # authenticated ones by user: the one registry of sockets.
        self._sockets: set[Socket] = set()
        self._users: dict[UUID, set[Socket]] = {}
        self._to_publish: asyncio.Queue[list[tuple[str, bytes]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        # Big feeds with pushes to hand over at the next turn (`_fan_out`).
        self._fan_outs: list[tuple[UUID, _Feed]] = []
        self._publisher: asyncio.Task[None] | None = None
        # Reconcile's watermark (storage/changes.py), when it last succeeded and pruned.
        self._watermark: int | None = None
        self._reconciled_at = 0.0
        self._pruned_at = time.monotonic()

    async def start(self) -> None:
        await self._broker.start(self.on_broker, self.reconcile)
        await self.presence.start(lambda: list(self._users))
        self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())

    async def close(self) -> None:
        # Publish what is queued for other replicas before going.
        try:
            await asyncio.wait_for(self._to_publish.join(), 5)
        except TimeoutError:
            _log.warning("closing with %d unpublished broadcast batches", self._to_publish.qsize())
        for task in [self._publisher, *self._tasks, *(f.filler for f in self._feeds.values())]:
            if task is not None:
                task.cancel()
        self._feeds.clear()
        await self.presence.close()
        await self._broker.close()

    @property
    def feeds(self) -> int:
        return len(self._feeds)

    def delivered(self, hoomi_id: UUID) -> int:
        feed = self._feeds.get(hoomi_id)
        return feed.order.delivered if feed is not None else 0

    # -- sockets ---------------------------------------------------------------------------

    @property
    def connected(self) -> int:
        """How many sockets this replica holds, authenticated or not."""
        return len(self._sockets)

    def all_sockets(self) -> list[Socket]:
        return list(self._sockets)

    def register(self, sock: Socket) -> None:
        """An accepted socket: counted from now until `unregister`."""
        self._sockets.add(sock)

    def unregister(self, sock: Socket) -> None:
        """The socket is gone: out of every index."""
        self._sockets.discard(sock)
        self.detach(sock, [])

    def sockets_of(self, user_id: UUID) -> int:
        """How many sockets of this user are attached to this replica."""
        return len(self._users.get(user_id, ()))

    def attach(self, sock: Socket) -> None:
        """An authenticated socket: its user's membership changes reach it."""
        if sock.user_id not in self._users:
            self.presence.online(sock.user_id)
        self._users.setdefault(sock.user_id, set()).add(sock)

    def detach(self, sock: Socket, hoomi_ids: Iterable[UUID]) -> None:
        users = self._users.get(sock.user_id)
        if users is not None:
            users.discard(sock)
            if not users:
                del self._users[sock.user_id]
                self.presence.offline(sock.user_id)
        for h in list(hoomi_ids):
            self.leave(sock, h)

    async def join(self, sock: Socket, hoomi_ids: list[UUID]) -> None:
        """Route these Hoomis' pushes to `sock`; returns once each feed is live."""
        new: list[UUID] = []
        feeds: list[_Feed] = []
        for h in hoomi_ids:
            feed = self._feeds.get(h)
            if feed is None:
                feed = self._feeds[h] = _Feed()
                new.append(h)
            feed.sockets.add(sock)
            feeds.append(feed)
        if new:
            await self._open(new)
        for h, feed in zip(hoomi_ids, feeds, strict=True):
            if not feed.ready.is_set():
                await feed.ready.wait()
            if self._feeds.get(h) is not feed:
                # Another socket's subscribe for this Hoomi failed: so does ours.
                raise ConnectionError(f"feed for {h} could not be opened")

    async def _open(self, new: list[UUID]) -> None:
        try:
            for h in new:
                await self._broker.subscribe(hoomi_channel(h.hex))
            # Read after subscribing: a seq above this arrives as a broadcast or via a fill.
            last = await hoomi_store.last_seqs(self._pool, new)
        except BaseException:
            for h in new:
                feed = self._feeds.pop(h, None)
                if feed is not None:
                    feed.ready.set()
            raise
        for h in new:
            feed = self._feeds.get(h)
            if feed is None:
                continue
            ready = feed.order.start(last.get(h, 0))
            feed.ready.set()
            self._push(h, feed, ready)

    def leave(self, sock: Socket, hoomi_id: UUID) -> None:
        feed = self._feeds.get(hoomi_id)
        if feed is None:
            return
        feed.sockets.discard(sock)
        if not feed.sockets and feed.ready.is_set():
            del self._feeds[hoomi_id]
            if feed.filler is not None:
                feed.filler.cancel()
            self._spawn(self._unsubscribe(hoomi_id))

    async def _unsubscribe(self, hoomi_id: UUID) -> None:
        if hoomi_id not in self._feeds:
            await self._broker.unsubscribe(hoomi_channel(hoomi_id.hex))

    # -- publishing --------------------------------------------------------------------------

    def committed(self, batch: list[tuple[AppendRequest, AppendResult]]) -> None:
        """Called by the writer after each commit: push locally now, publish for the rest."""
        shared = self._broker.shared  # a lone replica builds no broadcasts
        by_hoomi: dict[UUID, list[tuple[int, bytes]]] = {}
        for req, res in batch:
            if res.duplicate:
                continue  # its first commit published it; reconcile covers a lost one
            frame = events.message_frame(StoredMessage(
                res.id, res.hoomi_id, res.seq, req.sender_id, req.content, req.nonce,
                req.session_id, res.created_at, None, req.scheme, res.created_at))
            self.on_message(res.hoomi_id, res.seq, frame)
            if shared:
                by_hoomi.setdefault(res.hoomi_id, []).append((res.seq, frame))
        if by_hoomi:
            # One broadcast per Hoomi: its messages of this batch, in seq order (a batch
            # allocates each Hoomi's seqs in its order).
            self._to_publish.put_nowait([
                (hoomi_channel(h.hex), payload)
                for h, items in by_hoomi.items() for payload in events.pack_messages(h, items)])

    def publish_deletion(self, hoomi_id: UUID, message_id: UUID, seq: int) -> None:
        """A message was deleted for everyone: tell this replica's sockets and the others."""
        payload = events.pack_deleted(hoomi_id, message_id, seq)
        self._on_deleted(events.unpack(payload))
        self._to_publish.put_nowait([(hoomi_channel(hoomi_id.hex), payload)])

    def publish_edit(self, edited: EditedMessage) -> None:
        """A message's new version (edit, reencryption): this replica's sockets, the others.
        It travels like a deletion: each socket sends it after the message it changes."""
        payload = events.pack_edited(edited)
        self._on_deleted(events.unpack(payload))
        self._to_publish.put_nowait([(hoomi_channel(edited.hoomi_id.hex), payload)])

    def publish_receipt(self, origin: Socket | None, hoomi_id: UUID, user_id: UUID,
                        seq: int) -> None:
        """`user_id` has read up to `seq`: every socket of the Hoomi's members but
        `origin` (the one that sent the `read`), here and on the other replicas."""
        self._signal(origin, events.pack_receipt(hoomi_id, user_id, seq))

    def publish_typing(self, origin: Socket | None, hoomi_id: UUID, user_id: UUID) -> None:
        """`user_id` is typing: the other members' sockets, here and elsewhere. Never
        stored; lost with a broker outage (it is stale a second later anyway)."""
        self._signal(origin, events.pack_typing(hoomi_id, user_id))

    def _signal(self, origin: Socket | None, payload: bytes) -> None:
        signal = events.unpack_signal(payload)
        self._on_signal(signal, origin)
        self._to_publish.put_nowait([(hoomi_channel(signal.hoomi_id.hex), payload)])

    async def online(self, user_ids: list[UUID]) -> set[UUID]:
        """Those of `user_ids` with an authenticated socket on any replica: this
        replica's sockets, then Redis for the rest (server/presence.py). With Redis
        unreachable, this replica's view alone."""
        here = {u for u in user_ids if u in self._users}
        rest = [u for u in user_ids if u not in here]
        if rest:
            try:
                here |= await self.presence.who(rest)
            except Exception as exc:
                _log.warning("presence: cannot ask Redis (%s); answering with this "
                             "replica's sockets only", type(exc).__name__)
        return here

    def publish_control(self, change: events.Control) -> None:
        """A membership change: apply it to this replica's sockets, tell the others."""
        self._on_control(change)
        self._to_publish.put_nowait([(CONTROL_CHANNEL, events.pack_control(change))])

    async def _publish_loop(self) -> None:
        while True:
            batch = await self._to_publish.get()
            taken = 1
            while not self._to_publish.empty():
                batch.extend(self._to_publish.get_nowait())
                taken += 1
            try:
                await self._broker.publish(batch)
            except Exception as exc:
                # Local sockets already have these; other replicas catch up by reconcile.
                _log.warning("publish of %d broadcasts failed: %s", len(batch), exc)
            for _ in range(taken):
                self._to_publish.task_done()

    # -- receiving -----------------------------------------------------------------------------

    def on_broker(self, channel: str, payload: bytes) -> None:
        if channel == CONTROL_CHANNEL:
            self._on_control(events.unpack_control(payload))
            return
        if events.is_signal(payload):
            self._on_signal(events.unpack_signal(payload), None)
            return
        if payload[:1] == events.MESSAGES:
            hoomi_id, items = events.unpack_messages(payload)
            for seq, frame in items:
                self.on_message(hoomi_id, seq, frame)
            return
        broadcast = events.unpack(payload)
        if broadcast.kind == events.MESSAGE:
            self.on_message(broadcast.hoomi_id, broadcast.seq, broadcast.frame)
        elif broadcast.kind in (events.DELETED, events.EDITED):
            self._on_deleted(broadcast)

    def on_message(self, hoomi_id: UUID, seq: int, frame: bytes) -> None:
        feed = self._feeds.get(hoomi_id)
        if feed is not None:
            self._push(hoomi_id, feed, feed.order.offer(seq, frame))

    def _on_deleted(self, deletion: events.Broadcast) -> None:
        feed = self._feeds.get(deletion.hoomi_id)
        if feed is not None:
            # Each socket orders it after the message it deletes (Session.on_deletion).
            for sock in list(feed.sockets):
                sock.on_deletion(deletion.hoomi_id, deletion.seq, deletion.frame)

    def _on_signal(self, signal: events.Signal, origin: Socket | None) -> None:
        # Outside the Hoomi's seq order: straight to each socket, which drops it unless
        # it asked for signals (Session.on_signal).
        feed = self._feeds.get(signal.hoomi_id)
        if feed is not None:
            kind = "typing" if signal.kind == events.TYPING else "receipt"
            for sock in list(feed.sockets):
                if sock is not origin:
                    sock.on_signal(signal.hoomi_id, signal.user_id, kind, signal.frame)

    def _on_control(self, change: events.Control) -> None:
        for sock in list(self._users.get(change.user_id, ())):
            if change.kind == "user_gone":
                sock.on_user_gone()
            elif change.kind == "joined" and change.hoomi_id and change.role:
                sock.on_joined(change.hoomi_id, change.role)
            elif change.kind == "left" and change.hoomi_id:
                sock.on_left(change.hoomi_id)

    def _push(self, hoomi_id: UUID, feed: _Feed, ready: list[tuple[int, bytes]]) -> None:
        """Push what the order let through; start a fill if it names a gap.

        A small feed's sockets get it now, and are written by the loop's shared flush
        (server/ws.py) at the next turn, with whatever else the turn queued for them (the
        sender's ack, the other pushes of a batch). A big feed's (over FAN_OUT_AT sockets)
        are handed over at the next turn instead, one socket at a time, each written at
        once: handing the frame to 500 sessions took 2 ms, which the first member waited
        for before its write. Still one write per socket for what this turn queued: the
        acks of the batch are queued by then, and every frame pending for the feed is
        handed over before the socket's write."""
        if ready:
            if feed.pending or len(feed.sockets) > FAN_OUT_AT:
                if not feed.pending:
                    if not self._fan_outs:
                        asyncio.get_running_loop().call_soon(self._fan_out)
                    self._fan_outs.append((hoomi_id, feed))
                feed.pending.extend(ready)
            else:
                for seq, frame in ready:
                    for sock in list(feed.sockets):
                        sock.on_message(hoomi_id, seq, frame)
        if feed.filler is None and feed.order.gap() is not None:
            feed.filler = asyncio.get_running_loop().create_task(self._fill(hoomi_id, feed))

    def _fan_out(self) -> None:
        """The big feeds' pushes of the previous turn: each socket is handed its frames
        (in seq order) and written before the next socket's turn."""
        fan_outs, self._fan_outs = self._fan_outs, []
        for hoomi_id, feed in fan_outs:
            ready, feed.pending = feed.pending, []
            if self._feeds.get(hoomi_id) is not feed:
                continue  # every socket left it meanwhile
            for sock in list(feed.sockets):
                # One socket's failure is not the others' (this runs as a loop callback).
                try:
                    for seq, frame in ready:
                        sock.on_message(hoomi_id, seq, frame)
                    sock.flush()
                except Exception:
                    _log.exception("push to one socket failed")

    async def _fill(self, hoomi_id: UUID, feed: _Feed) -> None:
        """Read the missing seqs from PostgreSQL, after a grace for late broadcasts."""
        try:
            await asyncio.sleep(self._grace)
            backoff = 0.05
            while (gap := feed.order.gap()) is not None and self._feeds.get(hoomi_id) is feed:
                after, known = gap
                upto = min(known, after + FILL_PAGE)
                try:
                    rows = await message_store.between(self._pool, hoomi_id, after, upto)
                except Exception as exc:
                    _log.warning("gap fill for %s failed: %s", hoomi_id, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                if self._on_gap_fill is not None:
                    self._on_gap_fill(len(rows))
                self._push(hoomi_id, feed, feed.order.fill(
                    [(row.seq, events.message_frame(row)) for row in rows], upto))
        finally:
            feed.filler = None

    async def reconcile(self) -> None:
        """Apply what pub/sub did not bring (an event lost while the broker was down, or
        never published by a replica that died): the Hoomis whose last_seq moved and the
        users whose memberships changed since the previous round's snapshot
        (storage/changes.py), so an idle round is one query returning one row, whatever
        the number of feeds and sockets. The first round, and one after a long failure,
        read every live feed and every connected user instead."""
        now = time.monotonic()
        full = self._watermark is None or now - self._reconciled_at > FULL_AFTER_S
        # The watermark is read first: what commits after it is read by the next round.
        changes = await change_store.since(self._pool, None if full else self._watermark)
        if full:
            ids = [h for h, f in self._feeds.items() if f.ready.is_set()]
            last = await hoomi_store.last_seqs(self._pool, ids) if ids else {}
            users = list(self._users)
        else:
            last = changes.last_seqs
            users = [u for u in changes.users if u in self._users]
        for h, seq in last.items():
            feed = self._feeds.get(h)
            if feed is not None and feed.ready.is_set():
                feed.order.expect(seq)
                self._push(h, feed, [])
        await self._reconcile_memberships(users)
        if self._watermark is None or changes.watermark > self._watermark or full:
            self._watermark = changes.watermark
        self._reconciled_at = now
        if now - self._pruned_at > PRUNE_EVERY_S:
            self._pruned_at = now
            await change_store.prune(self._pool)

    async def _reconcile_memberships(self, users: list[UUID]) -> None:
        # A removed member must stop receiving even if its `left` event was lost; the
        # database is the truth, read for these connected users in a few round trips.
        for start in range(0, len(users), MEMBERSHIP_PAGE):
            chunk = users[start:start + MEMBERSHIP_PAGE]
            epochs = {sock: sock.membership_epoch
                      for u in chunk for sock in self._users.get(u, ())}
            existing, roles = await hoomi_store.memberships(self._pool, chunk)
            for user_id in chunk:
                for sock in list(self._users.get(user_id, ())):
                    if epochs.get(sock) != sock.membership_epoch:
                        continue  # changed while we read: the next round checks it
                    if user_id not in existing:
                        sock.on_user_gone()
                    else:
                        sock.on_memberships(roles.get(user_id, {}))

    async def reconcile_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except Exception as exc:
                _log.warning("reconcile failed: %s", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
