"""Batched writer: group commit of appended messages.

Invariants the rest of the hub relies on, kept by this module alone:

1. Ack after commit. `append` returns only once the transaction holding the row has
   committed. If a transaction fails, each of its waiters gets the error and none of its
   rows is stored (the client retries with the same client_msg_id). If it fails in a way
   that leaves COMMIT's outcome unknown (connection lost mid-COMMIT, or during the
   one-statement first try, which PostgreSQL runs to its end for a client that is gone),
   the writer reads back, on a fresh connection and after taking the batch's Hoomi locks
   (so a statement still running for the lost connection ends first), which rows were
   stored: those waiters get their real ack and the commit hook runs for them; the rest
   get `unavailable`.
2. Dense seq in commit order. A Hoomi's seqs are allocated inside the transaction while
   it holds that Hoomi's row lock (`SELECT ... FOR UPDATE`, taken in id order so that two
   writers never deadlock). The lock is held until COMMIT, so the next allocator for that
   Hoomi, in this process or in another replica, reads the committed `last_seq`: seqs are
   1, 2, 3, ... with no gap, and become visible in seq order.
3. Idempotent retries. A batch's first try is one statement (`_APPEND_FIRST`, committed
   by PostgreSQL before it answers) that checks membership only: a unique index that
   refuses a row (a retry's key, or a used nonce) rolls the statement back whole, and
   the batch runs again with the full check (`_CHECK_ROWS`, in a transaction). That
   check runs after the locks are taken, so a retry of a send still in flight in the
   same Hoomi (on any replica) waits for it, then finds it.
   A stored (hoomi, sender, client_msg_id) returns the original (id, seq, created_at).
   The key includes the Hoomi (SPEC §7.1: every unique key of a Hoomi's data does, for
   partitioning and Citus): a retry names the same Hoomi, and a send naming another
   Hoomi with a client_msg_id already used elsewhere is a new message there.
4. Per-sender FIFO. Under load (half a batch waiting while one commits) a second batch
   goes while the first is in flight, each on its own connection (at most PIPELINE),
   but it takes nothing from a sender with an append in flight: that sender's appends
   wait in its own queue until the batch holding its last one has ended, so each
   sender's appends get seqs in their arrival order and messages sent on one connection
   (one sender) keep their order. Batches that share a Hoomi commit in the order they
   took its lock (invariant 2); every batch delivers (commit hook, then its waiters)
   only after the batch formed before it has. That is nearly always the commit order;
   when the second batch's statement took a shared Hoomi's lock first, its seqs there
   are the lower ones and reach the hook just after the first batch's, which the hub's
   Sequencer holds until then (as it does for seqs from other replicas). The second
   batch takes the Hoomis' locks as soon as the first commits, instead of after the hub
   has read that commit and sent the next statement; below half a batch waiting it
   would only split the next batch in two (at half load that lengthened the acks), so
   there is one batch in flight. When a batch's commit is answered and no batch formed
   before it is still undelivered, its senders are free and the next batch starts at
   once, before this one delivers: PostgreSQL works on it while the hub sends this
   one's acks and pushes. A sender's next append then commits after this one (a later
   seq), and delivers after it (the order above).
5. Row-level verdicts. A row whose Hoomi is gone or whose sender is not a member fails
   alone; its neighbours commit. A row the database itself rejects is isolated by
   splitting the batch in halves. A repeat of a (hoomi, sender, client_msg_id) within
   one batch shares its first occurrence's ack only if that one was stored; otherwise
   it is decided alone in the next batch.
6. Fair batches. A batch takes one append from each sender with appends waiting, in
   turn, round and round, until it is full: a sender with thousands queued gets one
   place per turn like everyone else, so another sender's append goes into the next
   batch formed instead of waiting behind the whole flood. (Turns carry over from batch
   to batch, so with more senders than places each still gets its turn in order.)
7. Bounded share. One sender's ciphertext bytes waiting for a batch are at most
   1/SENDER_SHARE of the writer's bound (`max_queued_bytes`); past it that sender's
   appends get `rate_limited`, so a flood from one sender cannot fill the queue and turn
   everyone else's sends away with `unavailable`.
8. Nonce guard. A new row whose (hoomi, session_id, nonce) is already used by a stored
   message, or by an earlier row of the same batch, fails alone with `invalid` naming
   `nonce`, and nothing of it is stored; its neighbours commit. The check runs after the
   locks and after the idempotency check (invariant 3), so a retry still gets its
   original ack. The unique index idx_messages_nonce is the guard itself: should a
   concurrent edit or reencryption take the nonce between check and insert, the
   database refuses the row, the batch is split (invariant 5), and the row alone gets
   the same `invalid` naming `nonce`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from uuid import UUID

import asyncpg

from hoomi_protocol.errors import ErrorCode

from .db import stateless
from .errors import StorageError, forbidden, not_found, unavailable
from .ids import uuid7s
from .records import AppendRequest, AppendResult

_log = logging.getLogger(__name__)

# BEGIN and the Hoomis' row locks in one round trip (a simple query: its statements run
# in order, the lock in the transaction BEGIN opened), with nothing to read back: the
# check below reads each Hoomi's last_seq, under the lock. `{ids}` is a list of UUID
# literals made from integers (hex digits only, `_begin_locking`), never client text.
# Generic plans for the batch's statements: for a batch of a few rows PostgreSQL would
# otherwise plan the check afresh at each execution (its custom plan looks cheaper than
# the generic one for a 1-row array), and planning its two lookups over 16 partitions
# costs ten times running them: 1.03 -> 0.09 ms per 1-row check on the bench VM, the
# same for 30 and 200 rows (their plan was already the generic one). On a populated
# table the generic plan probes the messages indexes in a nested loop, as the custom one.
_BEGIN_LOCKING = """BEGIN;
SET LOCAL plan_cache_mode = force_generic_plan;
SELECT FROM hoomis WHERE id = ANY('{{{ids}}}'::uuid[]) ORDER BY id FOR UPDATE"""

# Runs after the locks, in its own statement (so with a snapshot taken after the lock
# wait): sees every send committed before us in these Hoomis, and their last_seq as the
# lock holder before us left it (NULL: the Hoomi is gone). `now` is read here too, not
# as the transaction's start time: a batch that waited for a Hoomi's lock must not stamp
# an earlier created_at than the seqs before it.
_CHECK_ROWS = """
SELECT t.ord, m.id, m.hoomi_id, m.seq, m.created_at, hm.user_id IS NOT NULL AS is_member,
       EXISTS (SELECT 1 FROM messages n WHERE n.hoomi_id = t.hoomi_id
               AND n.session_id = t.session_id AND n.nonce = t.nonce) AS nonce_used,
       h.last_seq, (SELECT clock_timestamp()) AS now
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bytea[]) WITH ORDINALITY
     AS t(hoomi_id, sender_id, client_msg_id, session_id, nonce, ord)
LEFT JOIN hoomis h ON h.id = t.hoomi_id
LEFT JOIN messages m ON m.hoomi_id = t.hoomi_id AND m.sender_id = t.sender_id
                    AND m.client_msg_id = t.client_msg_id
LEFT JOIN hoomi_members hm ON hm.hoomi_id = t.hoomi_id AND hm.user_id = t.sender_id
"""

# The first try of every batch (invariants 2, 3 and 8): the whole batch in ONE statement
# run outside a transaction block, so PostgreSQL commits it before it answers (asyncpg
# returns at ReadyForQuery, after the implicit COMMIT): one round trip per batch instead
# of four (BEGIN with the locks, the check, the insert, COMMIT). At half load the writer
# was a queue whose batches took as long as the gap between them; each round trip also
# waited for the event loop's turn among the sockets (bench/RESULTS.md, issue 12).
#
# * `locked` takes the Hoomis' row locks in id order (LockRows sits above the Sort), and
#   in READ COMMITTED a row locked after a wait is the newest version: its last_seq is
#   the one the lock holder before us committed (invariant 2). `counters` updates those
#   same row versions (ours to update: we hold their locks).
# * `stamp` reads the clock once every lock is held (it counts `locked` first), as the
#   full check does: a batch that waited for a lock never stamps an earlier created_at
#   than the seqs before it.
# * Membership is read with the statement's snapshot, taken before any lock wait: a
#   member removed during that wait is still seen as one, as a removal committed just
#   after the full check's read would be (removals do not take the Hoomi's lock).
# * Duplicates and used nonces are left to the unique indexes: the plain INSERT raises
#   on a retry's key or a used nonce, the statement is rolled back whole, and the batch
#   runs again with the full check (`_CHECK_ROWS`, `_INSERT_ROWS`).
# * Rows go to the INSERT in the idempotency index's order (see `_allocate`).
# * Data-modifying CTEs run to completion whether or not the final SELECT reads them.
# * The answer is one row of arrays in batch order (each row's seq, NULL if not stored;
#   whether its Hoomi exists): decoded in C, not a Record per row (the ids are ours).
_APPEND_FIRST = """
WITH t AS MATERIALIZED (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bytea[], $5::bytea[],
                         $6::text[], $7::int2[], $8::uuid[]) WITH ORDINALITY
        AS t(hoomi_id, sender_id, client_msg_id, content, nonce, session_id, scheme, id, ord)
), locked AS MATERIALIZED (
    SELECT id, last_seq FROM hoomis WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
), stamp AS MATERIALIZED (
    SELECT clock_timestamp() AS now FROM (SELECT count(*) FROM locked) AS l
), placed AS MATERIALIZED (
    SELECT t.*, l.last_seq + row_number() OVER (PARTITION BY t.hoomi_id ORDER BY t.ord) AS seq
    FROM t JOIN locked l ON l.id = t.hoomi_id
    WHERE EXISTS (SELECT 1 FROM hoomi_members hm
                  WHERE hm.hoomi_id = t.hoomi_id AND hm.user_id = t.sender_id)
), ins AS (
    INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, content, nonce,
                          session_id, scheme, created_at, updated_at)
    SELECT p.id, p.hoomi_id, p.seq, p.sender_id, p.client_msg_id, p.content, p.nonce,
           p.session_id, p.scheme, s.now, s.now
    FROM placed p CROSS JOIN stamp s
    ORDER BY p.sender_id, p.client_msg_id, p.hoomi_id
), counters AS (
    UPDATE hoomis h SET last_seq = c.last_seq
    FROM (SELECT hoomi_id, max(seq) AS last_seq FROM placed GROUP BY hoomi_id) AS c
    WHERE h.id = c.hoomi_id
), tokens AS (
    INSERT INTO message_tokens (hoomi_id, token, seq)
    SELECT p.hoomi_id, k.token, p.seq
    FROM unnest($9::int8[], $10::bytea[]) AS k(ord, token) JOIN placed p ON p.ord = k.ord
    ON CONFLICT DO NOTHING
)
SELECT (SELECT now FROM stamp) AS now, array_agg(p.seq ORDER BY t.ord) AS seqs,
       array_agg(l.id IS NOT NULL ORDER BY t.ord) AS found
FROM t LEFT JOIN locked l ON l.id = t.hoomi_id LEFT JOIN placed p ON p.ord = t.ord
"""

# The new rows, their Hoomis' new last_seq and the rows' search tokens, in one statement
# (the tokens' foreign key is checked at its end, when the messages are in), after the
# full check: a key stored meanwhile is skipped (defensive, `_ConcurrentReuse`).
_INSERT_ROWS = """
WITH ins AS (
    INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, content, nonce,
                          session_id, scheme, created_at, updated_at)
    SELECT t.id, t.hoomi_id, t.seq, t.sender_id, t.client_msg_id, t.content, t.nonce,
           t.session_id, t.scheme, $12, $12
    FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::uuid[], $5::uuid[], $6::bytea[],
                $7::bytea[], $8::text[], $9::int2[])
         AS t(id, hoomi_id, seq, sender_id, client_msg_id, content, nonce, session_id, scheme)
    ON CONFLICT (hoomi_id, sender_id, client_msg_id) DO NOTHING
    RETURNING hoomi_id, seq
), counters AS (
    UPDATE hoomis h SET last_seq = v.last_seq
    FROM unnest($10::uuid[], $11::int8[]) AS v(id, last_seq)
    WHERE h.id = v.id
    RETURNING 1
), tokens AS (
    INSERT INTO message_tokens (hoomi_id, token, seq)
    SELECT t.hoomi_id, t.token, t.seq
    FROM unnest($13::uuid[], $14::bytea[], $15::int8[]) AS t(hoomi_id, token, seq)
    JOIN ins USING (hoomi_id, seq)
    ON CONFLICT DO NOTHING
)
SELECT (SELECT count(*) FROM ins) AS inserted
"""

# After a failure that may have happened after COMMIT was applied: what got stored.
_LOOKUP_STORED = """
SELECT m.sender_id, m.client_msg_id, m.id, m.hoomi_id, m.seq, m.created_at
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS t(hoomi_id, sender_id, client_msg_id)
JOIN messages m ON m.hoomi_id = t.hoomi_id AND m.sender_id = t.sender_id
               AND m.client_msg_id = t.client_msg_id
"""

MAX_SESSION_ID_CHARS = 128
NONCE_BYTES = 12
MAX_TOKENS = 64
TOKEN_BYTES = (8, 32)
# Invariant 7: one sender may hold at most 1/SENDER_SHARE of the queued-bytes bound.
SENDER_SHARE = 4
# A message that finds the writer idle for this long is committed without waiting for
# company (max_delay): at that rate none is coming. Under load (the writer busy, or idle
# between messages less than this) batches still wait max_delay to grow. In bench.fanout
# (10 messages/s) the wait was a millisecond added to every delivery, for nothing.
QUIET_AFTER_S = 0.01
# Batches in flight at once per writer under load, each on its own connection
# (invariant 4). bench.hub, window 8, alternating runs: acked msg/s 45-46 % of the echo
# with one, 46-49 % with two; at half load, the same p99.
PIPELINE = 2


class _Requeue:
    """Outcome of a row this batch could not decide: it goes back to the queue's front."""


_REQUEUE = _Requeue()
Outcome = AppendResult | StorageError | _Requeue


class _ConcurrentReuse(Exception):
    """A row the insert skipped: redo the batch, with the full check. After the first try
    (no duplicate or nonce check) that is a retry or a used nonce; after the full check,
    a key committed meanwhile by someone else (defensive: the key includes the Hoomi,
    whose row lock this batch holds, so it should not happen)."""


# What `submit_notify` calls once an append is decided: (result, None) or (None, error).
Notify = Callable[[AppendResult | None, StorageError | None], None]


class _Notifier:
    """A waiter that is a plain callback (`submit_notify`), with the three calls of an
    asyncio.Future the writer makes: the callback runs at once, inside the writer's
    delivery (after the commit hook), not through the event loop's queue as a future's
    done-callback would."""

    __slots__ = ("_notify",)

    def __init__(self, notify: Notify) -> None:
        self._notify: Notify | None = notify

    def done(self) -> bool:
        return self._notify is None

    def set_result(self, result: AppendResult) -> None:
        self._call(result, None)

    def set_exception(self, error: BaseException) -> None:
        assert isinstance(error, StorageError)
        self._call(None, error)

    def _call(self, result: AppendResult | None, error: StorageError | None) -> None:
        notify, self._notify = self._notify, None
        if notify is None:
            return
        try:
            notify(result, error)
        except Exception:
            # A caller's failure must not stop the delivery of the rest of the batch.
            _log.exception("append notification failed")


class _Pending:
    __slots__ = ("request", "future")

    def __init__(self, request: AppendRequest,
                 future: asyncio.Future[AppendResult] | _Notifier) -> None:
        self.request = request
        self.future = future


class _FairQueue:
    """Appends waiting for a batch: one FIFO per sender, served in turn (invariant 6).

    `turns` lists each sender with appends waiting once; taking an append moves its
    sender to the back. Every operation is O(1) per append.
    """

    __slots__ = ("_by_sender", "_turns", "_len")

    def __init__(self) -> None:
        self._by_sender: dict[UUID, deque[_Pending]] = {}
        self._turns: deque[UUID] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, pending: _Pending) -> None:
        sender = pending.request.sender_id
        queue = self._by_sender.get(sender)
        if queue is None:
            queue = self._by_sender[sender] = deque()
            self._turns.append(sender)
        queue.append(pending)
        self._len += 1

    def push_front(self, items: Sequence[_Pending]) -> None:
        """Put rows back at the front of their senders' queues, in their order; a sender
        with nothing else waiting gets the first turn."""
        for pending in reversed(items):
            sender = pending.request.sender_id
            queue = self._by_sender.get(sender)
            if queue is None:
                queue = self._by_sender[sender] = deque()
                self._turns.appendleft(sender)
            queue.appendleft(pending)
            self._len += 1

    def take(self, n: int, busy: set[UUID] | frozenset[UUID] = frozenset()
             ) -> list[_Pending]:
        """Up to n appends: one per sender per turn, each sender's in arrival order,
        none of a sender in `busy` (those keep their turn, in order, for later)."""
        batch: list[_Pending] = []
        skipped: list[UUID] = []
        while len(batch) < n and self._turns:
            sender = self._turns.popleft()
            if sender in busy:
                skipped.append(sender)
                continue
            queue = self._by_sender[sender]
            batch.append(queue.popleft())
            if queue:
                self._turns.append(sender)
            else:
                del self._by_sender[sender]
        self._turns.extendleft(reversed(skipped))
        self._len -= len(batch)
        return batch


BatchObserver = Callable[[int, float], None]
# Called once per committed batch, before the waiters wake: (request, result) pairs.
CommitHook = Callable[[list[tuple[AppendRequest, AppendResult]]], None]


class BatchWriter:
    """Coalesces concurrent `append` calls into one transaction per batch."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 256,
        max_delay: float = 0.001,
        max_content_bytes: int = 65536,
        max_queued_bytes: int = 64 << 20,
        observer: BatchObserver | None = None,
        on_commit: CommitHook | None = None,
        pipeline: int = PIPELINE,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if pipeline < 1:
            raise ValueError("pipeline must be at least 1")
        self._pool = pool
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._max_content = max_content_bytes
        self._observer = observer
        self._on_commit = on_commit
        self._queue = _FairQueue()
        # Ciphertext bytes waiting for a batch. Each socket bounds its own sends in flight,
        # but many sockets against a slow database could still queue without end: past
        # this bound new sends get `unavailable` (clients retry later) instead of memory.
        self._queued_bytes = 0
        self._max_queued_bytes = max_queued_bytes
        # Invariant 7: bytes queued per sender, and the most one sender may hold.
        self._sender_bytes: dict[UUID, int] = {}
        self._max_sender_bytes = max(max_content_bytes, max_queued_bytes // SENDER_SHARE)
        # Invariant 4: batches not yet delivered (oldest first), how many of them still
        # wait for their commit (at most `pipeline`), and the senders they hold.
        self._pipeline = pipeline
        self._inflight: deque[asyncio.Task[None]] = deque()
        self._committing = 0
        self._busy: set[UUID] = set()
        # Set by an append, a batch that ends, close: something may be taken now.
        self._wakeup = asyncio.Event()
        # Set by a full queue, a batch that ends, close: stop waiting for company.
        self._kick = asyncio.Event()
        # Set by a queue of half a batch, a batch that ends, close: another batch may go.
        self._deep = asyncio.Event()
        self._deep_at = max(1, max_batch // 2)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queued_bytes(self) -> int:
        """Ciphertext bytes waiting for a batch."""
        return self._queued_bytes

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-writer")

    async def close(self) -> None:
        """Stop taking appends and commit everything already queued."""
        self._closing = True
        self._wakeup.set()
        self._kick.set()
        self._deep.set()
        if self._task is not None:
            await self._task
            self._task = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def append(self, request: AppendRequest) -> AppendResult:
        """Store one message; returns after its transaction committed."""
        # If the caller goes away the row may still commit; a retry finds it (invariant 3).
        return await self.submit(request)

    def submit(self, request: AppendRequest) -> asyncio.Future[AppendResult]:
        """Queue one message now (its place in the FIFO is taken at this call)."""
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._enqueue(request, future)
        return future

    def submit_notify(self, request: AppendRequest, notify: Notify) -> None:
        """`submit` without a future: `notify(result, None)` or `notify(None, error)` is
        called once the append is decided, from the writer's delivery, right after the
        commit hook (a socket's ack is then queued in the same event-loop turn as the
        pushes of its batch, and leaves with them). Refusals at the door raise, as in
        `submit`, and `notify` is not called for them."""
        self._enqueue(request, _Notifier(notify))

    def _enqueue(self, request: AppendRequest,
                 future: asyncio.Future[AppendResult] | _Notifier) -> None:
        self._validate(request)
        if self._closing or self._task is None:
            raise unavailable("hub is shutting down; retry with the same client_msg_id")
        size = len(request.content)
        if self._queue and self._queued_bytes + size > self._max_queued_bytes:
            raise unavailable("storage is behind; retry with the same client_msg_id")
        held = self._sender_bytes.get(request.sender_id, 0)
        if held and held + size > self._max_sender_bytes:
            raise StorageError(ErrorCode.RATE_LIMITED, "too many of your sends are waiting "
                               "for storage; retry with the same client_msg_id")
        self._queue.append(_Pending(request, future))
        self._count(request, size)
        self._wakeup.set()
        if len(self._queue) >= self._deep_at:
            self._deep.set()
            if len(self._queue) >= self._max_batch:
                self._kick.set()

    def _count(self, request: AppendRequest, size: int) -> None:
        """Bytes waiting, in all and for this sender (invariant 7)."""
        self._queued_bytes += size
        held = self._sender_bytes.get(request.sender_id, 0) + size
        if held > 0:
            self._sender_bytes[request.sender_id] = held
        else:
            self._sender_bytes.pop(request.sender_id, None)

    def _validate(self, r: AppendRequest) -> None:
        # Storage defends its own invariants even though protocol/ checked the frame.
        if not isinstance(r.hoomi_id, UUID):  # formatted into the lock query (_begin_locking)
            raise StorageError(ErrorCode.INVALID, "hoomi_id: not a UUID", "hoomi_id")
        if not isinstance(r.content, bytes) or not 16 <= len(r.content) <= self._max_content:
            raise StorageError(ErrorCode.INVALID, "content: bad length", "content")
        if not isinstance(r.nonce, bytes) or len(r.nonce) != NONCE_BYTES:
            raise StorageError(ErrorCode.INVALID, "nonce: must be 12 bytes", "nonce")
        sid = r.session_id
        if not isinstance(sid, str) or not 0 < len(sid) <= MAX_SESSION_ID_CHARS or "\x00" in sid:
            raise StorageError(ErrorCode.INVALID, "session_id: bad value", "session_id")
        # A send without tokens (the common case) needs no more than this.
        if r.tokens != () or type(r.scheme) is not int or not 1 <= r.scheme <= 255:
            check_scheme_tokens(r.scheme, r.tokens)

    async def _run(self) -> None:
        # Whether the appends now queued have waited already (a quiet spell before them,
        # or the end of a batch they could not join): they go without waiting for company.
        waited = False
        try:
            while True:
                if not self._may_launch():
                    self._deep.clear()
                    await self._deep.wait()
                    waited = True
                    continue
                if not self._queue:
                    if self._closing and not self._inflight:
                        return
                    idle = not self._inflight
                    self._wakeup.clear()
                    idle_from = time.perf_counter()
                    await self._wakeup.wait()
                    # After a quiet spell no company is coming within max_delay: go at once.
                    waited = idle and time.perf_counter() - idle_from >= QUIET_AFTER_S
                    continue
                if (len(self._queue) < self._max_batch and self._max_delay > 0
                        and not self._closing and not waited):
                    # Let the first message wait a little for company (or for the batch in
                    # flight to end): fewer, larger commits.
                    self._kick.clear()
                    try:
                        await asyncio.wait_for(self._kick.wait(), self._max_delay)
                    except TimeoutError:
                        pass
                batch = self._queue.take(self._max_batch, self._busy)
                if not batch:
                    # Every sender waiting has a batch in flight (invariant 4).
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    waited = True
                    continue
                waited = False
                self._launch(batch)
        except asyncio.CancelledError:
            for task in self._inflight:
                task.cancel()
            raise

    def _may_launch(self) -> bool:
        """Whether another batch may start now: none is committing, or fewer than
        `pipeline` are and half a batch is waiting (below that a second batch would only
        split the next one in two, and wait for the first one's locks anyway)."""
        return not self._committing or (self._committing < self._pipeline
                                         and len(self._queue) >= self._deep_at)

    def _launch(self, batch: list[_Pending]) -> None:
        """Start committing `batch` (taken from the queue) in a task of its own."""
        for p in batch:
            self._count(p.request, -len(p.request.content))
            self._busy.add(p.request.sender_id)
        gate = self._inflight[-1] if self._inflight else None
        self._committing += 1
        self._inflight.append(asyncio.get_running_loop().create_task(
            self._run_batch(batch, gate)))

    async def _run_batch(self, batch: list[_Pending],
                         gate: asyncio.Task[None] | None) -> None:
        """One batch in flight: commit, deliver once the batch before it has delivered
        (`gate`), then free its senders for the next batches.

        Once its commit is answered the batch no longer counts as committing, its senders
        are free, and the next batch starts before this one delivers (`committed`): the
        database works on the next batch while the hub sends this one's acks and pushes,
        instead of waiting for them. The next batch still delivers after this one (its
        gate), and a sender's later send gets a later seq since this commit is done."""
        started = time.perf_counter()
        committing = True

        def release() -> None:
            """Stop counting as committing and free the senders, once (after that they
            may be in the next batch already)."""
            nonlocal committing
            if committing:
                committing = False
                self._committing -= 1
                for p in batch:
                    self._busy.discard(p.request.sender_id)

        async def committed() -> None:
            if gate is not None and not gate.done():
                # A batch formed earlier has yet to deliver: this one waits for it as
                # before (a chain started here could commit while that one waits).
                return
            release()
            if self._queue and self._may_launch():
                next_batch = self._queue.take(self._max_batch, self._busy)
                if next_batch:
                    self._launch(next_batch)
                    # One turn of the loop: the new batch's statement leaves first.
                    await asyncio.sleep(0)

        try:
            await self._commit_isolating(batch, gate, committed)
        finally:
            release()
            self._inflight.remove(asyncio.current_task())  # type: ignore[arg-type]
            self._wakeup.set()
            self._kick.set()
            self._deep.set()
        if self._observer is not None:
            try:
                self._observer(len(batch), time.perf_counter() - started)
            except Exception:
                # Metrics must never stop the writer: every later append would hang.
                _log.exception("batch observer failed")

    async def _commit_isolating(
        self, batch: list[_Pending], gate: asyncio.Task[None] | None = None,
        committed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        try:
            await self._commit_with_retry(batch, gate, committed)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            # Some row the database refuses: find it by halves, so neighbours still commit.
            if len(batch) == 1:
                if is_nonce_conflict(exc):  # invariant 8: a concurrent edit took it
                    _fail(batch, nonce_reused())
                    return
                _log.warning("row rejected by the database: %s", type(exc).__name__)
                _fail(batch, StorageError(ErrorCode.INVALID, "message rejected by storage"))
                return
            mid = len(batch) // 2
            await self._commit_isolating(batch[:mid], gate)
            await self._commit_isolating(batch[mid:], gate)
        except Exception as exc:  # connection lost, server down, pool closed...
            _log.error("batch of %d failed: %s: %s", len(batch), type(exc).__name__, exc)
            await self._settle(batch, gate)

    async def _settle(self, batch: list[_Pending],
                      gate: asyncio.Task[None] | None = None) -> None:
        """After a failure that may have come after COMMIT was applied: ack what is stored.

        Without this, a committed row's waiter would get `unavailable`, its retry would be
        a duplicate, and the hub does not fan out duplicates: nobody would ever see it.
        """
        open_ = [p for p in batch if not p.future.done()]
        if not open_:
            return
        try:
            async with self._pool.acquire() as conn:
                # The batch's Hoomi locks first: a statement PostgreSQL still runs for a
                # client that is gone (the first try's, waiting for a lock: a backend
                # does not notice its client left while it waits) ends before this read,
                # so a row it commits is acked here, not stored after an `unavailable`.
                # (A failure leaves the transaction open: the pool rolls it back.)
                await conn.execute(_begin_locking(p.request.hoomi_id for p in open_))
                rows = await conn.fetch(
                    _LOOKUP_STORED,
                    [p.request.hoomi_id for p in open_],
                    [p.request.sender_id for p in open_],
                    [p.request.client_msg_id for p in open_],
                )
                await conn.execute("COMMIT")
        except Exception as exc:
            _log.error("could not settle a failed batch: %s: %s", type(exc).__name__, exc)
            _fail(open_, unavailable())
            return
        stored = {(r["hoomi_id"], r["sender_id"], r["client_msg_id"]): r for r in rows}
        seen: set[tuple[UUID, UUID, UUID]] = set()
        outcomes: list[AppendResult | StorageError] = []
        for p in open_:
            key = _key(p.request)
            row = stored.get(key)
            if row is None:
                outcomes.append(unavailable())
                continue
            # Reported as new (the hub then publishes it; publishing a seq twice is
            # harmless, the hub drops seqs it already delivered), except for a repeat of
            # the same key within this batch, which was a duplicate in any case.
            outcomes.append(AppendResult(row["id"], row["hoomi_id"], row["seq"],
                                         row["created_at"], key in seen))
            seen.add(key)
        await self._deliver(open_, outcomes, gate)

    async def _commit_with_retry(
        self, batch: list[_Pending], gate: asyncio.Task[None] | None = None,
        committed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Commit and deliver `batch`; `committed` is awaited between the two when every
        row is decided (none goes back to the queue)."""
        full = False  # the first try: one statement, no duplicate check (_APPEND_FIRST)
        for attempt in range(5):
            try:
                outcomes = await self._commit(batch, full)
            except _ConcurrentReuse:
                if full:
                    _log.info("a row of the batch was stored meanwhile; retry %d", attempt)
                full = True
                continue
            except asyncpg.TransactionRollbackError as exc:
                # Deadlock or serialization failure: the transaction was rolled back
                # whole, so nothing of it is stored and running it again is safe.
                _log.info("batch rolled back (%s); retry %d", type(exc).__name__, attempt)
                continue
            if committed is not None and not any(isinstance(o, _Requeue) for o in outcomes):
                await committed()
            await self._deliver(batch, outcomes, gate)
            return
        _fail(batch, unavailable())

    async def _deliver(self, batch: Sequence[_Pending], outcomes: Sequence[Outcome],
                       gate: asyncio.Task[None] | None) -> None:
        """Once the batch formed before this one (`gate`) has delivered (invariant 4:
        commit hooks run in the order the batches were formed; its outcome is its own,
        nothing is raised), run the commit hook for the stored rows, then wake every
        waiter."""
        if gate is not None and not gate.done():
            await asyncio.wait((gate,))
        if self._on_commit is not None:
            committed = [(p.request, o) for p, o in zip(batch, outcomes, strict=True)
                         if isinstance(o, AppendResult)]
            try:
                self._on_commit(committed)
            except Exception:
                _log.exception("commit hook failed")
        # Ahead of everything their senders queued since, in their original order: they
        # keep their place in the sender's FIFO (invariant 4) and are decided on their
        # own next batch.
        again = [p for p, o in zip(batch, outcomes, strict=True) if isinstance(o, _Requeue)]
        self._queue.push_front(again)
        for p in again:
            self._count(p.request, len(p.request.content))
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done() or isinstance(outcome, _Requeue):
                continue
            if isinstance(outcome, StorageError):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    async def _commit(self, batch: Sequence[_Pending], full: bool = True) -> list[Outcome]:
        reqs = [p.request for p in batch]
        # Two rows of this batch with one (hoomi, sender, client_msg_id): the first leads.
        leader_of: dict[tuple[UUID, UUID, UUID], int] = {}
        leaders: list[int] = []
        for i, r in enumerate(reqs):
            key = _key(r)
            if key not in leader_of:
                leader_of[key] = i
                leaders.append(i)

        outcomes: list[Outcome | None] = [None] * len(reqs)
        # `stateless`: the block leaves nothing behind when it ends normally (SET LOCAL
        # ends with the COMMIT), so the pool skips asyncpg's reset query, a further round
        # trip per batch (2 % of the hub's CPU per message); a block that raises is reset.
        async with stateless(self._pool) as conn:
            if not full:
                await _append_first(conn, reqs, leaders, outcomes)
            else:
                # Four round trips: BEGIN with the locks, the check, the insert, COMMIT.
                await conn.execute(_begin_locking(reqs[i].hoomi_id for i in leaders))
                try:
                    await self._store_txn(conn, reqs, leaders, outcomes)
                    await conn.execute("COMMIT")
                except BaseException:
                    await _rollback(conn)
                    raise
        for i, r in enumerate(reqs):
            lead = leader_of[_key(r)]
            if lead != i:
                led = outcomes[lead]
                if isinstance(led, AppendResult):
                    outcomes[i] = led._replace(duplicate=True)
                else:
                    # The leader failed (unknown Hoomi, not a member, ...): decide the
                    # repeat alone, on what the database holds by then.
                    outcomes[i] = _REQUEUE
        return [o for o in outcomes if o is not None]

    @staticmethod
    async def _store_txn(conn: asyncpg.Connection, reqs: list[AppendRequest],
                         leaders: list[int], outcomes: list[Outcome | None]) -> None:
        """The full check: decide and insert the leaders, under their Hoomis' locks (held
        since `_begin_locking`): fills `outcomes`."""
        checks = await conn.fetch(
            _CHECK_ROWS,
            [reqs[i].hoomi_id for i in leaders],
            [reqs[i].sender_id for i in leaders],
            [reqs[i].client_msg_id for i in leaders],
            [reqs[i].session_id for i in leaders],
            [reqs[i].nonce for i in leaders],
        )
        now = checks[0]["now"] if checks else None
        last_seq = {reqs[leaders[row["ord"] - 1]].hoomi_id: row["last_seq"]
                    for row in checks if row["last_seq"] is not None}
        new_rows: list[int] = []
        nonces: set[tuple[UUID, str, bytes]] = set()  # taken by this batch (inv. 8)
        # Sorted by ord: seqs go in batch order, each sender's in arrival order
        # (invariant 4).
        for row in sorted(checks, key=lambda c: c["ord"]):
            i = leaders[row["ord"] - 1]
            r = reqs[i]
            if row["id"] is not None:
                outcomes[i] = AppendResult(
                    row["id"], row["hoomi_id"], row["seq"], row["created_at"], True
                )
            elif r.hoomi_id not in last_seq:
                outcomes[i] = not_found("hoomi", "hoomi_id")
            elif not row["is_member"]:
                outcomes[i] = forbidden("not a member of this hoomi")
            elif row["nonce_used"] or (r.hoomi_id, r.session_id, r.nonce) in nonces:
                outcomes[i] = nonce_reused()
            else:
                nonces.add((r.hoomi_id, r.session_id, r.nonce))
                new_rows.append(i)
        if not new_rows:
            return
        assert now is not None  # rows to insert means some Hoomi row was locked
        args, placed = _allocate(reqs, list(zip(new_rows, uuid7s(len(new_rows)),
                                                strict=True)), last_seq)
        inserted = await conn.fetchval(_INSERT_ROWS, *args, now, *_token_rows(reqs, placed))
        if inserted != len(placed):
            raise _ConcurrentReuse()
        for i, msg_id, seq in placed:
            outcomes[i] = AppendResult(msg_id, reqs[i].hoomi_id, seq, now, False)


async def _append_first(conn: asyncpg.Connection, reqs: list[AppendRequest],
                        leaders: list[int], outcomes: list[Outcome | None]) -> None:
    """The first try: decide, insert and commit the leaders in one statement
    (`_APPEND_FIRST`, outside any transaction block), filling `outcomes`. A unique index
    that refuses a row (a retry's key, a used nonce) rolls the statement back whole and
    raises _ConcurrentReuse: the batch runs again with the full check."""
    # Seqs follow the array order (invariant 4); each row gets its UUIDv7 here, used only
    # if it is stored.
    token_ords: list[int] = []
    tokens: list[bytes] = []
    for n, i in enumerate(leaders, 1):
        for token in set(reqs[i].tokens):
            token_ords.append(n)
            tokens.append(token)
    rows = [reqs[i] for i in leaders]
    ids = uuid7s(len(rows))
    try:
        answer = await conn.fetchrow(
            _APPEND_FIRST,
            [r.hoomi_id for r in rows], [r.sender_id for r in rows],
            [r.client_msg_id for r in rows], [r.content for r in rows],
            [r.nonce for r in rows], [r.session_id for r in rows],
            [r.scheme for r in rows], ids, token_ords, tokens,
        )
    except asyncpg.UniqueViolationError as exc:
        raise _ConcurrentReuse() from exc
    assert answer is not None  # an aggregate: always one row
    now = answer["now"]
    for i, msg_id, seq, found in zip(leaders, ids, answer["seqs"], answer["found"],
                                     strict=True):
        if seq is not None:
            outcomes[i] = AppendResult(msg_id, reqs[i].hoomi_id, seq, now, False)
        elif not found:
            outcomes[i] = not_found("hoomi", "hoomi_id")
        else:
            outcomes[i] = forbidden("not a member of this hoomi")


def _begin_locking(hoomi_ids: Iterable[UUID]) -> str:
    """BEGIN and the row locks of these Hoomis (taken in id order, the query's ORDER BY:
    two writers never deadlock), as one simple query. Each id is formatted from its
    integer, so the literal holds hex digits only whatever the caller passed."""
    return _BEGIN_LOCKING.format(ids=",".join(f"{h.int:032x}" for h in set(hoomi_ids)))


async def _rollback(conn: asyncpg.Connection) -> None:
    """End a failed batch's transaction, if the connection still holds one (a failed
    COMMIT has ended it already; a lost connection is discarded by the pool)."""
    if conn.is_closed() or not conn.is_in_transaction():
        return
    try:
        await conn.execute("ROLLBACK")
    except Exception as exc:
        _log.warning("rollback of a failed batch failed: %s", type(exc).__name__)


def _allocate(
    reqs: list[AppendRequest], new_rows: list[tuple[int, UUID]], last_seq: dict[UUID, int]
) -> tuple[list[list[object]], list[tuple[int, UUID, int]]]:
    """Give each new row the next seq of its Hoomi, in batch order (invariant 4)."""
    columns: list[list[object]] = [[] for _ in range(9)]
    placed: list[tuple[int, UUID, int]] = []
    for i, msg_id in new_rows:
        r = reqs[i]
        seq = last_seq[r.hoomi_id] + 1
        last_seq[r.hoomi_id] = seq
        placed.append((i, msg_id, seq))
    # Rows go to the INSERT in (sender_id, client_msg_id, hoomi_id) order, the unique
    # index's order (idx_messages_sender):
    # two writers whose batches reuse client_msg_ids crosswise then wait for each other
    # in one direction only, instead of deadlocking. Seqs are already assigned above, so
    # row order no longer matters for them.
    # (UUID.int orders as PostgreSQL's uuid comparison does, and much faster than UUIDs.)
    for i, msg_id, seq in sorted(placed, key=lambda p: (reqs[p[0]].sender_id.int,
                                                         reqs[p[0]].client_msg_id.int,
                                                         reqs[p[0]].hoomi_id.int)):
        r = reqs[i]
        row = (msg_id, r.hoomi_id, seq, r.sender_id, r.client_msg_id, r.content, r.nonce,
               r.session_id, r.scheme)
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    touched = sorted({reqs[i].hoomi_id for i, _, _ in placed})
    return [*columns, list(touched), [last_seq[h] for h in touched]], placed


def _token_rows(reqs: list[AppendRequest], placed: list[tuple[int, UUID, int]]
                ) -> tuple[list[UUID], list[bytes], list[int]]:
    """message_tokens rows for the placed rows: (hoomi_ids, tokens, seqs)."""
    hoomis: list[UUID] = []
    tokens: list[bytes] = []
    seqs: list[int] = []
    for i, _, seq in placed:
        for token in set(reqs[i].tokens):
            hoomis.append(reqs[i].hoomi_id)
            tokens.append(token)
            seqs.append(seq)
    return hoomis, tokens, seqs


def check_scheme_tokens(scheme: object, tokens: object, field: str = "tokens") -> None:
    """Storage's own check of `scheme` (1-255) and search tokens (<= 64, 8-32 bytes)."""
    if type(scheme) is not int or not 1 <= scheme <= 255:
        raise StorageError(ErrorCode.INVALID, "scheme: must be an integer from 1 to 255",
                           "scheme")
    if not isinstance(tokens, tuple | list) or len(tokens) > MAX_TOKENS or not all(
            isinstance(t, bytes) and TOKEN_BYTES[0] <= len(t) <= TOKEN_BYTES[1]
            for t in tokens):
        raise StorageError(ErrorCode.INVALID, f"{field}: at most {MAX_TOKENS} tokens of "
                           f"{TOKEN_BYTES[0]}-{TOKEN_BYTES[1]} bytes", field)


def nonce_reused() -> StorageError:
    return StorageError(ErrorCode.INVALID, "nonce: already used with this session_id in "
                        "this hoomi (AES-GCM forbids nonce reuse); encrypt again with a "
                        "fresh nonce", "nonce")


def is_nonce_conflict(exc: BaseException) -> bool:
    """The nonce guard's unique index refused a row (its name on a partition is derived
    from idx_messages_nonce's columns: hoomi_id, session_id, nonce)."""
    return isinstance(exc, asyncpg.UniqueViolationError) and "nonce" in (
        getattr(exc, "constraint_name", None) or "")


def _key(r: AppendRequest) -> tuple[UUID, UUID, UUID]:
    """The idempotency key (idx_messages_sender)."""
    return (r.hoomi_id, r.sender_id, r.client_msg_id)


def _fail(batch: Sequence[_Pending], error: StorageError) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)
