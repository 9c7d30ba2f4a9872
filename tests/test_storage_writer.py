"""The batched writer against a real PostgreSQL: ack after commit, dense seqs, idempotency."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from uuid import uuid4

import asyncpg
import pytest

from hoomi_protocol.errors import ErrorCode
from server.testing.proxy import FaultProxy
from storage.db import create_pool
from storage.errors import StorageError
from storage.writer import PIPELINE, QUIET_AFTER_S, BatchWriter
from tests import factories


@pytest.fixture
async def writer(pool: asyncpg.Pool):
    w = BatchWriter(pool, max_batch=64, max_delay=0.001)
    w.start()
    yield w
    await w.close()


async def test_fifty_appenders_two_writers_store_each_ack_once_with_dense_seqs(dsn, pool):
    pool_b = await create_pool(dsn, min_size=1, max_size=4)
    writers = [BatchWriter(pool, max_batch=32), BatchWriter(pool_b, max_batch=32)]
    for w in writers:
        w.start()
    people = await factories.users(pool, 10)
    hoomis = [await factories.hoomi(pool, people[:1], people[1:]) for _ in range(5)]
    rng = random.Random(7)

    async def appender(k: int) -> list:
        acks = []
        for _ in range(20):
            w = writers[rng.randrange(2)]
            acks.append(await w.append(factories.request(rng.choice(hoomis), people[k % 10])))
        return acks

    done = await asyncio.gather(*(appender(k) for k in range(50)))
    results = [a for batch in done for a in batch]
    for w in writers:
        await w.close()
    await pool_b.close()

    assert len(results) == 1000
    assert all(not r.duplicate for r in results)
    rows = await pool.fetch("SELECT id, hoomi_id, seq FROM messages")
    assert len(rows) == 1000
    assert {r["id"] for r in rows} == {a.id for a in results}
    stored = {r["id"]: (r["hoomi_id"], r["seq"]) for r in rows}
    assert all(stored[a.id] == (a.hoomi_id, a.seq) for a in results)
    by_hoomi: dict = defaultdict(list)
    for r in rows:
        by_hoomi[r["hoomi_id"]].append(r["seq"])
    for h in hoomis:
        seqs = sorted(by_hoomi[h])
        assert seqs == list(range(1, len(seqs) + 1))
        assert await pool.fetchval("SELECT last_seq FROM hoomis WHERE id = $1", h) == len(seqs)


async def test_messages_from_one_sender_keep_their_order(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    reqs = [factories.request(h, alice) for _ in range(40)]
    acks = await asyncio.gather(*(writer.append(r) for r in reqs))
    assert [a.seq for a in acks] == list(range(1, 41))


async def test_retry_with_same_client_msg_id_returns_original_ack(dsn, pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    req = factories.request(h, alice)
    first = await writer.append(req)
    again = await writer.append(req)
    pool_b = await create_pool(dsn, min_size=1, max_size=2)
    other = BatchWriter(pool_b)
    other.start()
    elsewhere = await other.append(req._replace(content=b"x" * 32))
    await other.close()
    await pool_b.close()
    assert not first.duplicate
    assert (again.id, again.seq, again.created_at, again.duplicate) == (
        first.id, first.seq, first.created_at, True)
    assert (elsewhere.id, elsewhere.seq, elsewhere.duplicate) == (first.id, first.seq, True)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1
    assert await pool.fetchval("SELECT content FROM messages") == req.content


async def test_concurrent_retries_in_one_batch_store_one_row(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    req = factories.request(h, alice)
    acks = await asyncio.gather(*(writer.append(req) for _ in range(10)))
    assert len({(a.id, a.seq) for a in acks}) == 1
    assert sorted(a.duplicate for a in acks) == [False] + [True] * 9
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1


async def test_concurrent_retries_on_two_writers_store_one_row(dsn, pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    pool_b = await create_pool(dsn, min_size=1, max_size=2)
    other = BatchWriter(pool_b)
    other.start()
    reqs = [factories.request(h, alice) for _ in range(30)]
    acks = await asyncio.gather(*(w.append(r) for r in reqs for w in (writer, other)))
    await other.close()
    await pool_b.close()
    assert len({a.id for a in acks}) == 30
    assert await pool.fetchval("SELECT count(*) FROM messages") == 30
    seqs = [r["seq"] for r in await pool.fetch("SELECT seq FROM messages ORDER BY seq")]
    assert seqs == list(range(1, 31))


async def test_invalid_rows_fail_alone_and_neighbours_commit(pool, writer):
    alice, bob, carol = await factories.users(pool, 3)
    h = await factories.hoomi(pool, [alice], [bob])
    used = factories.request(h, alice)
    await writer.append(used)
    good = [factories.request(h, bob) for _ in range(3)]
    bad = {
        "forbidden": factories.request(h, carol),
        "not_found": factories.request(uuid4(), alice),
    }
    outcomes = await asyncio.gather(
        *(writer.append(r) for r in [good[0], *bad.values(), *good[1:]]),
        return_exceptions=True,
    )
    assert [o.seq for o in outcomes if not isinstance(o, Exception)] == [2, 3, 4]
    errors = [o for o in outcomes if isinstance(o, StorageError)]
    assert [e.code for e in errors] == [ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND]
    assert await pool.fetchval("SELECT count(*) FROM messages") == 4


async def test_client_msg_id_used_in_another_hoomi_is_a_new_message_there(pool, writer):
    """The idempotency key is (hoomi_id, sender_id, client_msg_id) (SPEC §7.1): a retry
    names the same Hoomi, so the same client_msg_id in another Hoomi is another message;
    in the first Hoomi it is still a retry."""
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    other = await factories.hoomi(pool, [alice])
    first = await writer.append(factories.request(h, alice))
    used = factories.request(h, alice)
    original = await writer.append(used)
    elsewhere, retry = await asyncio.gather(
        writer.append(used._replace(hoomi_id=other)), writer.append(used))
    assert (elsewhere.hoomi_id, elsewhere.seq, elsewhere.duplicate) == (other, 1, False)
    assert elsewhere.id not in (first.id, original.id)
    assert retry == original._replace(duplicate=True)
    assert await pool.fetchval(
        "SELECT count(*) FROM messages WHERE client_msg_id = $1", used.client_msg_id) == 2


async def test_row_refused_by_database_is_isolated_from_its_batch(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    await pool.execute(
        """
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.session_id = 'poison' THEN
                RAISE EXCEPTION 'poison' USING ERRCODE = '22023';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER poison BEFORE INSERT ON messages
        FOR EACH ROW EXECUTE FUNCTION refuse_poison();
        """
    )
    reqs = [factories.request(h, alice, session_id="poison" if i == 5 else "ok") for i in range(12)]
    outcomes = await asyncio.gather(*(writer.append(r) for r in reqs), return_exceptions=True)
    assert isinstance(outcomes[5], StorageError) and outcomes[5].code == ErrorCode.INVALID
    stored = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(stored) == 11
    assert sorted(o.seq for o in stored) == list(range(1, 12))
    assert await pool.fetchval("SELECT last_seq FROM hoomis WHERE id = $1", h) == 11


async def test_a_refused_batch_leaves_no_transaction_open(pool, writer):
    # The writer opens and ends its transactions itself (BEGIN with the locks, COMMIT or
    # ROLLBACK): a failed batch must give its connection back idle, locks released.
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    await pool.execute(
        """
        CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON messages
        FOR EACH ROW WHEN (NEW.session_id = 'refused') EXECUTE FUNCTION refuse_once();
        """
    )
    with pytest.raises(StorageError):
        await writer.append(factories.request(h, alice, session_id="refused"))
    assert await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%'") == 0
    ack = await asyncio.wait_for(writer.append(factories.request(h, alice)), 5)
    assert ack.seq == 1


async def test_failed_batch_fails_every_waiter_and_stores_nothing(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    await pool.execute(
        """
        CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'storage is broken'; END $$;
        CREATE TRIGGER broken BEFORE INSERT ON messages
        FOR EACH ROW EXECUTE FUNCTION refuse_all();
        """
    )
    writer = BatchWriter(pool, max_batch=64, max_delay=0.005)
    writer.start()
    outcomes = await asyncio.gather(
        *(writer.append(factories.request(h, alice)) for _ in range(8)), return_exceptions=True
    )
    await writer.close()
    assert all(isinstance(o, StorageError) and o.code == ErrorCode.UNAVAILABLE for o in outcomes)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 0
    assert await pool.fetchval("SELECT last_seq FROM hoomis WHERE id = $1", h) == 0


async def test_writer_refuses_bad_fields_before_queueing(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    cases = {
        "nonce": factories.request(h, alice)._replace(nonce=b"123"),
        "content": factories.request(h, alice, size=15),
        "session_id": factories.request(h, alice, session_id="a\x00b"),
        # The lock query formats the Hoomi ids into its text: never anything but a UUID.
        "hoomi_id": factories.request(h, alice)._replace(hoomi_id=f"{h}') --"),
    }
    for field, req in cases.items():
        with pytest.raises(StorageError) as err:
            await writer.append(req)
        assert (err.value.code, err.value.field) == (ErrorCode.INVALID, field)


async def test_an_append_after_a_quiet_spell_does_not_wait_for_company(pool):
    # max_delay is for growing batches under load; a message that finds the writer idle
    # since QUIET_AFTER_S goes at once (with a minute's delay it would wait a minute).
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool, max_batch=64, max_delay=60.0)
    writer.start()
    try:
        for seq in (1, 2):
            await asyncio.sleep(QUIET_AFTER_S * 2)  # the quiet spell itself
            ack = await asyncio.wait_for(writer.append(factories.request(h, alice)), 10)
            assert ack.seq == seq
    finally:
        await writer.close()


@contextlib.asynccontextmanager
async def _first_batch_waits(pool, writer, hoomi, sender, wait=0.2):
    """Hold `hoomi`'s row lock and append one message from `sender`: its batch waits for
    the lock until the block ends (given `wait` seconds to get there). Yields the
    request and its future."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM hoomis WHERE id = $1 FOR UPDATE", hoomi)
        first = factories.request(hoomi, sender)
        waiting = asyncio.ensure_future(writer.append(first))
        await asyncio.sleep(wait)  # the first batch waits for the lock
        yield first, waiting


async def test_appends_that_came_during_a_commit_do_not_wait_for_company(pool):
    # They have waited one commit already: the next batch goes as soon as it ends, not
    # max_delay later (with a minute's delay the second append would wait a minute).
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool, max_batch=64, max_delay=60.0)
    writer.start()
    try:
        await asyncio.sleep(QUIET_AFTER_S * 2)
        # The first append goes at once (a quiet spell) and waits for a lock...
        async with _first_batch_waits(pool, writer, h, alice) as (_, first):
            # ...while the second comes, during its commit.
            second = asyncio.ensure_future(writer.append(factories.request(h, alice)))
            await asyncio.sleep(0.05)
        acks = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert [a.seq for a in acks] == [1, 2]
    finally:
        await writer.close()


async def test_under_load_a_second_batch_commits_while_the_first_waits(pool):
    """Invariant 4 with two batches in flight: the second (half a batch queued) goes while
    the first waits for a lock, without the first batch's sender (its next append waits
    for the first to end); hooks and acks follow the order the batches were formed."""
    people = await factories.users(pool, 4)
    h1 = await factories.hoomi(pool, people)
    h2 = await factories.hoomi(pool, people)
    hooked: list[list] = []
    writer = BatchWriter(pool, max_batch=4, max_delay=0.0,
                         on_commit=lambda b: hooked.append([r.client_msg_id for r, _ in b]))
    writer.start()
    try:
        async with _first_batch_waits(pool, writer, h1, people[0]) as (first, waiting):
            # Half a batch (2) queued: a second batch goes, without people[0]'s append.
            later = factories.request(h2, people[0])
            others = [factories.request(h2, people[k]) for k in (1, 2, 3)]
            pending = [asyncio.ensure_future(writer.append(r)) for r in [later, *others]]
            for _ in range(100):
                stored = set(await pool.fetchval(
                    "SELECT array_agg(client_msg_id) FROM messages WHERE hoomi_id = $1", h2)
                    or [])
                if stored:
                    break
                await asyncio.sleep(0.02)
            assert stored == {r.client_msg_id for r in others}  # committed already...
            assert not any(f.done() for f in [waiting, *pending])  # ...acked after the first
            assert hooked == []
        acks = await asyncio.wait_for(asyncio.gather(waiting, *pending), 10)
    finally:
        await writer.close()
    assert hooked == [[first.client_msg_id], [r.client_msg_id for r in others],
                      [later.client_msg_id]]
    assert [a.seq for a in acks] == [1, 4, 1, 2, 3]


async def test_the_next_batch_starts_before_the_last_one_delivers(pool):
    """Invariant 4: once a batch's commit is answered (and none before it is undelivered),
    its senders are free and the next batch, holding that sender's next append, starts
    before the first one's hook runs; it still delivers after it, with the later seq."""
    people = await factories.users(pool, 2)
    h1 = await factories.hoomi(pool, people)
    h2 = await factories.hoomi(pool, people)
    seen_in_hook: list[tuple[list, int]] = []

    def hook(batch: list) -> None:  # the batch, and how many batches are committing
        seen_in_hook.append(([r.client_msg_id for r, _ in batch], writer._committing))

    writer = BatchWriter(pool, max_batch=8, max_delay=0.0, on_commit=hook)
    writer.start()
    try:
        async with _first_batch_waits(pool, writer, h1, people[0]) as (first, waiting):
            # Below half a batch, and people[0] is busy: it waits for the first batch.
            later = factories.request(h2, people[0])
            pending = asyncio.ensure_future(writer.append(later))
            await asyncio.sleep(0.1)
            assert writer._committing == 1 and not pending.done()
        acks = await asyncio.wait_for(asyncio.gather(waiting, pending), 10)
    finally:
        await writer.close()
    # The first batch's hook ran with the next batch already committing...
    assert seen_in_hook[0] == ([first.client_msg_id], 1)
    # ...and the next batch's after it.
    assert seen_in_hook[1] == ([later.client_msg_id], 0)
    assert [a.seq for a in acks] == [1, 1] and acks[0].created_at <= acks[1].created_at


@pytest.mark.parametrize("seed", range(4))
async def test_pipelined_batches_keep_each_senders_order_and_publish_seqs_in_order(
        pool, seed):
    """Bursts of appends from 6 senders over 3 Hoomis with batches of 8: under load two
    batches are in flight. Each sender's appends keep their order in every Hoomi, seqs
    are dense, and the commit hook sees every stored message once, ascending within a
    batch (across two batches in flight a Hoomi's seqs may come out of order: the second
    batch's statement can take a shared Hoomi's lock first; the hub's Sequencer holds
    the higher seqs until the lower ones come)."""
    rng = random.Random(seed)
    people = await factories.users(pool, 6)
    hoomis = [await factories.hoomi(pool, people) for _ in range(3)]
    published: dict = defaultdict(list)

    def hook(batch: list) -> None:
        for h in hoomis:
            mine = [result.seq for _, result in batch if result.hoomi_id == h]
            assert mine == sorted(mine)
            published[h].extend(mine)

    in_flight: list[int] = []
    writer = BatchWriter(pool, max_batch=8, max_delay=0.0005, on_commit=hook,
                         observer=lambda n, _: in_flight.append(len(writer._inflight)))
    writer.start()
    sent: list = []
    futures = []
    try:
        for _ in range(12):
            for _ in range(rng.randrange(1, 25)):
                req = factories.request(rng.choice(hoomis), rng.choice(people))
                sent.append(req)
                futures.append(writer.submit(req))
            await asyncio.sleep(rng.random() * 0.004)
        acks = await asyncio.wait_for(asyncio.gather(*futures), 30)
    finally:
        await writer.close()
    # As a batch ends (the observer), another was in flight at times, never two more.
    # As a batch ends (the observer), others were in flight at times (one formed while
    # it committed, or started at its commit), never more than PIPELINE.
    assert 1 <= max(in_flight) <= PIPELINE
    for h in hoomis:
        seqs = [a.seq for a in acks if a.hoomi_id == h]
        assert sorted(seqs) == list(range(1, len(seqs) + 1))
        assert sorted(published[h]) == sorted(seqs)  # each once
        for who in people:
            mine = [a.seq for a, r in zip(acks, sent, strict=True)
                    if a.hoomi_id == h and r.sender_id == who]
            assert mine == sorted(mine)


async def test_a_batch_of_new_rows_is_one_statement(dsn):
    """The first try decides, inserts and commits a batch in one round trip (outside a
    transaction block: PostgreSQL commits before it answers), tokens included."""
    from server.testing.counting import CountingConnection

    counted = await create_pool(dsn, min_size=1, max_size=2,
                                connection_class=CountingConnection)
    try:
        people = await factories.users(counted, 3)
        hoomis = [await factories.hoomi(counted, people) for _ in range(3)]
        writer = BatchWriter(counted, max_batch=64, max_delay=0.05)
        writer.start()
        reqs = [factories.request(hoomis[k % 3], people[k % 3])._replace(
                    scheme=2, tokens=(bytes([k]) * 8, b"t" * 8)) for k in range(30)]
        CountingConnection.reset_counts()
        acks = await asyncio.gather(*(writer.append(r) for r in reqs))
        assert CountingConnection.statements == 1
        await writer.close()
        for h in hoomis:
            seqs = [a.seq for a in acks if a.hoomi_id == h]
            assert seqs == list(range(1, 11))  # batch order is each sender's order
        stored = await counted.fetch(
            "SELECT m.id, m.hoomi_id, m.seq, m.created_at, m.scheme, "
            "array_agg(t.token ORDER BY t.token) AS tokens FROM messages m "
            "JOIN message_tokens t USING (hoomi_id, seq) GROUP BY 1, 2, 3, 4, 5")
        assert sorted((r["id"], r["hoomi_id"], r["seq"], r["created_at"], r["scheme"],
                       tuple(r["tokens"])) for r in stored) == sorted(
            (a.id, a.hoomi_id, a.seq, a.created_at, 2, tuple(sorted(set(q.tokens))))
            for a, q in zip(acks, reqs, strict=True))
        assert {r["last_seq"] for r in await counted.fetch(
            "SELECT last_seq FROM hoomis WHERE id = ANY($1::uuid[])", hoomis)} == {10}
    finally:
        await counted.close()


async def test_close_flushes_queued_appends(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool, max_batch=4, max_delay=0.05)
    writer.start()
    pending = [asyncio.ensure_future(writer.append(factories.request(h, alice))) for _ in range(10)]
    await asyncio.sleep(0)
    await writer.close()
    acks = await asyncio.gather(*pending)
    assert sorted(a.seq for a in acks) == list(range(1, 11))
    with pytest.raises(StorageError) as err:
        await writer.append(factories.request(h, alice))
    assert err.value.code == ErrorCode.UNAVAILABLE


def test_message_ids_are_time_ordered_uuid7():
    from storage.ids import uuid7, uuid7s

    ids = [uuid7() for _ in range(20000)]
    # Batches (past the 12-bit counter's room within one millisecond) and single ids
    # interleaved stay in one increasing sequence.
    for _ in range(5):
        ids += uuid7s(5000)
        ids.append(uuid7())
    assert uuid7s(0) == []
    assert all(i.version == 7 and i.variant == "specified in RFC 4122" for i in ids)
    assert ids == sorted(ids, key=lambda u: u.bytes) and len(set(ids)) == len(ids)
    assert all(a.int < b.int for a, b in zip(ids, ids[1:], strict=False))


async def test_commit_lost_after_it_applied_acks_stored_rows_and_runs_the_hook(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    hooked: list = []
    writer = BatchWriter(pool, max_batch=64, max_delay=0.02, on_commit=hooked.extend)
    real_commit = writer._commit

    async def commit_then_lose_connection(batch, full):
        await real_commit(batch, full)
        raise ConnectionResetError("connection lost during COMMIT")

    writer._commit = commit_then_lose_connection  # type: ignore[method-assign]
    writer.start()
    reqs = [factories.request(h, alice) for _ in range(3)] + [factories.request(uuid4(), alice)]
    outcomes = await asyncio.gather(*(writer.append(r) for r in reqs), return_exceptions=True)
    await writer.close()

    stored = await pool.fetch("SELECT id, seq, created_at FROM messages ORDER BY seq")
    assert [(o.id, o.hoomi_id, o.seq, o.created_at, o.duplicate) for o in outcomes[:3]] == [
        (r["id"], h, r["seq"], r["created_at"], False) for r in stored
    ]
    assert [r["seq"] for r in stored] == [1, 2, 3]
    assert isinstance(outcomes[3], StorageError) and outcomes[3].code == ErrorCode.UNAVAILABLE
    assert [(req, res) for req, res in hooked] == list(zip(reqs[:3], outcomes[:3], strict=True))


async def test_a_first_try_orphaned_by_a_lost_connection_is_acked_not_stored_behind_an_error(
        dsn, pool):
    """The connection drops while the batch's one statement waits for a Hoomi's lock:
    PostgreSQL still runs it to its commit once the lock is free (a backend waiting for
    a lock does not notice its client left). The read-back waits for that lock too, so
    the waiter gets the real ack (and the hook runs), not `unavailable` for a message
    stored anyway; a retry then gets the same ack, and one row is stored."""
    proxy = await FaultProxy.in_front_of(dsn).start()
    proxied = await create_pool(proxy.url(dsn), min_size=0, max_size=2)
    hooked: list = []
    writer = BatchWriter(proxied, max_batch=8, max_delay=0.0, on_commit=hooked.extend)
    writer.start()
    try:
        alice, = await factories.users(pool, 1)
        h = await factories.hoomi(pool, [alice])
        # The statement waits for the lock...
        async with _first_batch_waits(pool, writer, h, alice, 0.3) as (req, pending):
            await proxy.drop()  # the writer's connection is gone; its backend waits on
            await asyncio.sleep(0.3)  # the read-back waits for the lock as well
            assert not pending.done()
        ack = await asyncio.wait_for(pending, 10)
        retry = await asyncio.wait_for(writer.append(req), 10)
    finally:
        await writer.close()
        await proxied.close()
        await proxy.close()
    rows = await pool.fetch("SELECT id, seq FROM messages WHERE hoomi_id = $1", h)
    assert [(r["id"], r["seq"]) for r in rows] == [(ack.id, 1)]
    assert (ack.seq, ack.duplicate) == (1, False)
    assert (retry.id, retry.seq, retry.duplicate) == (ack.id, 1, True)
    assert hooked == [(req, ack), (req, retry)]  # the hub publishes only the first


async def test_failure_whose_read_back_also_fails_gives_every_waiter_unavailable(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool, max_batch=64, max_delay=0.005)

    async def lose_everything(batch, full):
        await pool.close()
        raise ConnectionResetError("gone")

    writer._commit = lose_everything  # type: ignore[method-assign]
    writer.start()
    outcomes = await asyncio.gather(
        *(writer.append(factories.request(h, alice)) for _ in range(2)), return_exceptions=True
    )
    await writer.close()
    assert [(type(o), o.code) for o in outcomes] == [(StorageError, ErrorCode.UNAVAILABLE)] * 2


async def test_deadlocked_batch_is_retried_and_its_rows_commit(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool, max_batch=64, max_delay=0.005)
    real_commit = writer._commit
    calls: list[int] = []

    async def deadlock_once(batch, full):
        calls.append(len(batch))
        if len(calls) == 1:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return await real_commit(batch, full)

    writer._commit = deadlock_once  # type: ignore[method-assign]
    writer.start()
    ack = await writer.append(factories.request(h, alice))
    await writer.close()
    assert (ack.seq, ack.duplicate, calls) == (1, False, [1, 1])
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1


def test_insert_rows_go_in_unique_index_order():
    from storage.writer import _allocate

    h, sender = uuid4(), uuid4()
    reqs = [factories.request(h, sender) for _ in range(20)]
    args, placed = _allocate(reqs, [(i, uuid4()) for i in range(20)], {h: 0})
    assert [seq for _, _, seq in placed] == list(range(1, 21))
    assert args[4] == sorted(r.client_msg_id for r in reqs)
    by_cmid = {r.client_msg_id: seq for (i, _, seq), r in zip(placed, reqs, strict=True)}
    assert args[2] == [by_cmid[c] for c in args[4]]


async def test_created_at_is_taken_after_the_hoomi_lock_wait(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM hoomis WHERE id = $1 FOR UPDATE", h)
        pending = asyncio.ensure_future(writer.append(factories.request(h, alice)))
        await asyncio.sleep(0.3)
        released_at = await conn.fetchval("SELECT clock_timestamp()")
        await tx.commit()
    ack = await pending
    assert ack.created_at > released_at
    assert await pool.fetchval("SELECT created_at FROM messages WHERE id = $1", ack.id) \
        == ack.created_at


async def test_repeat_in_batch_is_decided_alone_when_its_leader_failed(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool, max_batch=64, max_delay=0.02)
    writer.start()
    cmid = uuid4()
    leader = factories.request(uuid4(), alice, cmid)
    follower = factories.request(h, alice, cmid)
    repeat = factories.request(h, alice, cmid)
    outcomes = await asyncio.gather(
        writer.append(leader), writer.append(follower), writer.append(repeat),
        return_exceptions=True,
    )
    await writer.close()
    lost, stored, again = outcomes
    assert isinstance(lost, StorageError)
    assert (lost.code, lost.field) == (ErrorCode.NOT_FOUND, "hoomi_id")
    assert (stored.hoomi_id, stored.seq, stored.duplicate) == (h, 1, False)
    assert again == stored._replace(duplicate=True)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1


async def test_failing_observer_does_not_stop_the_writer(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    seen: list[int] = []

    def observer(n: int, _seconds: float) -> None:
        seen.append(n)
        raise RuntimeError("metrics broke")

    writer = BatchWriter(pool, max_batch=64, max_delay=0, observer=observer)
    writer.start()
    first = await writer.append(factories.request(h, alice))
    second = await asyncio.wait_for(writer.append(factories.request(h, alice)), 5)
    await writer.close()
    assert (first.seq, second.seq, seen) == (1, 2, [1, 1])


async def test_queue_is_bounded_in_bytes_while_the_database_is_slow(pool):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    req = factories.request(h, alice)
    size = len(req.content)
    writer = BatchWriter(pool, max_batch=4, max_delay=0, max_queued_bytes=10 * size)
    writer.start()
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        # Hold the Hoomi's row lock: the first batch waits on it, the rest queue up.
        await blocker.execute("SELECT 1 FROM hoomis WHERE id = $1 FOR UPDATE", h)
        first = writer.submit(factories.request(h, alice))
        await asyncio.sleep(0.2)  # taken into a batch, now waiting on the lock
        queued = [writer.submit(factories.request(h, alice)) for _ in range(10)]
        assert writer.queued == 10 and writer.queued_bytes == 10 * size
        with pytest.raises(StorageError) as err:
            writer.submit(factories.request(h, alice))
        assert err.value.code == ErrorCode.UNAVAILABLE
        await tx.commit()
    results = await asyncio.gather(first, *queued)
    assert [r.seq for r in results] == list(range(1, 12))
    assert writer.queued == 0 and writer.queued_bytes == 0
    writer.submit(factories.request(h, alice))  # room again
    await writer.close()


async def test_one_sender_holds_at_most_a_quarter_of_the_queue(pool):
    """Invariant 7: while the database is slow, a flooding sender is refused with
    `rate_limited` past its share, and another sender still gets in (before, the flood
    filled the whole bound and every sender got `unavailable`)."""
    flooder, quiet = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [flooder, quiet])
    writer = BatchWriter(pool, max_batch=4, max_delay=0, max_content_bytes=1024,
                         max_queued_bytes=16 * 1024)
    writer.start()
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM hoomis WHERE id = $1 FOR UPDATE", h)
        first = writer.submit(factories.request(h, flooder, size=1024))
        await asyncio.sleep(0.2)  # taken into a batch, now waiting on the lock
        accepted = []
        with pytest.raises(StorageError) as err:
            for _ in range(16):
                accepted.append(writer.submit(factories.request(h, flooder, size=1024)))
        assert err.value.code == ErrorCode.RATE_LIMITED
        assert len(accepted) == 4 and writer.queued_bytes == 4 * 1024  # its quarter
        others = [writer.submit(factories.request(h, quiet, size=1024)) for _ in range(4)]
        await tx.commit()
    results = await asyncio.gather(first, *accepted, *others)
    assert sorted(r.seq for r in results) == list(range(1, 10))
    await writer.append(factories.request(h, flooder, size=1024))  # room again
    await writer.close()


async def test_a_flood_from_one_sender_does_not_hold_back_another_senders_append(pool):
    """With 3000 appends of one sender queued, another sender's single append goes into
    the first batch formed, not behind the flood (batches counted by the observer)."""
    batches = 0

    def observe(size: int, seconds: float) -> None:
        nonlocal batches
        batches += 1

    flooder, quiet = await factories.users(pool, 2)
    flooded = await factories.hoomi(pool, [flooder])
    calm = await factories.hoomi(pool, [quiet])
    writer = BatchWriter(pool, max_batch=64, max_delay=0.001, observer=observe)
    writer.start()
    try:
        flood = [writer.submit(factories.request(flooded, flooder)) for _ in range(3000)]
        one = writer.submit(factories.request(calm, quiet))
        # Counted when the ack resolves: the observer has seen the append's batch, and
        # the next batch cannot have committed yet (that needs the database's answer).
        in_batch: list[int] = []
        one.add_done_callback(lambda _: in_batch.append(batches))
        ack = await one
        assert ack.seq == 1
        await asyncio.gather(*flood)
    finally:
        await writer.close()
    assert in_batch == [1]  # was batch 47: behind 3000 / 64 batches of the flood
    assert batches >= 3000 // 64
    # The flood kept its own order: seqs 1..3000 in submit order (invariant 4).
    assert [f.result().seq for f in flood] == list(range(1, 3001))


async def test_senders_take_turns_and_each_keeps_its_order(pool):
    senders = await factories.users(pool, 3)
    h = await factories.hoomi(pool, senders[:1], senders[1:])
    sizes: list[int] = []
    writer = BatchWriter(pool, max_batch=6, max_delay=0.001,
                         observer=lambda n, _: sizes.append(n))
    writer.start()
    try:
        # 10 from the first sender, then 2 each from the others, all queued at once.
        order = [senders[0]] * 10 + [senders[1]] * 2 + [senders[2]] * 2
        futures = [writer.submit(factories.request(h, s)) for s in order]
        acks = await asyncio.gather(*futures)
    finally:
        await writer.close()
    by_seq = sorted(zip(acks, order, strict=True), key=lambda p: p[0].seq)
    # Batch 1 (6 places): turns 0,1,2,0,1,2; then the first sender's remaining 8.
    assert [s for _, s in by_seq[:6]] == [senders[0], senders[1], senders[2]] * 2
    for s in senders:
        mine = [a.seq for a, who in zip(acks, order, strict=True) if who == s]
        assert mine == sorted(mine)  # each sender's own order (invariant 4)
    assert sorted(a.seq for a in acks) == list(range(1, 15))  # dense
    assert sizes == [6, 6, 2]


# -- invariant 8: the nonce guard ---------------------------------------------------------------

async def test_reused_nonce_is_refused_naming_nonce_and_a_retry_still_gets_its_ack(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    first = factories.request(h, alice, session_id="dev1")
    ack = await writer.append(first)
    retry = await writer.append(first)  # same client_msg_id, same nonce: the original ack
    assert (retry.id, retry.seq, retry.duplicate) == (ack.id, ack.seq, True)
    reuse = first._replace(client_msg_id=uuid4(), content=b"x" * 32)
    with pytest.raises(StorageError) as err:
        await writer.append(reuse)
    assert err.value.code == ErrorCode.INVALID and err.value.field == "nonce"
    # The same nonce under another session, or in another Hoomi, is another pair.
    other = await factories.hoomi(pool, [alice])
    await writer.append(reuse._replace(session_id="dev2"))
    await writer.append(reuse._replace(hoomi_id=other, client_msg_id=uuid4()))
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE hoomi_id = $1", h) == 2


async def test_reused_nonce_within_one_batch_fails_alone(pool):
    w = BatchWriter(pool, max_batch=64, max_delay=0.05)
    w.start()
    try:
        alice, bob = await factories.users(pool, 2)
        h = await factories.hoomi(pool, [alice], [bob])
        reqs = [factories.request(h, alice if i % 2 else bob) for i in range(10)]
        reqs[6] = reqs[6]._replace(nonce=reqs[2].nonce, session_id=reqs[2].session_id)
        outcomes = await asyncio.gather(*(w.append(r) for r in reqs), return_exceptions=True)
    finally:
        await w.close()
    assert isinstance(outcomes[6], StorageError) and outcomes[6].field == "nonce"
    assert sorted(o.seq for i, o in enumerate(outcomes) if i != 6) == list(range(1, 10))
    assert await pool.fetchval("SELECT count(*) FROM messages") == 9


async def test_the_database_refuses_a_reused_nonce_the_writer_did_not_see(pool, writer):
    """The index is the guard: a nonce taken between the writer's check and its insert
    (here: a row written behind its back) still fails that row alone, naming nonce."""
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    reqs = [factories.request(h, alice) for _ in range(8)]
    await pool.execute(
        """
        CREATE FUNCTION take_nonce() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.session_id = 'race' THEN
                INSERT INTO messages (id, hoomi_id, seq, sender_id, client_msg_id, content,
                                      nonce, session_id)
                VALUES (gen_random_uuid(), NEW.hoomi_id, 1000, NEW.sender_id,
                        gen_random_uuid(), NEW.content, NEW.nonce, 'raced');
                UPDATE messages SET session_id = 'race' WHERE seq = 1000;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER take_nonce BEFORE INSERT ON messages
        FOR EACH ROW WHEN (NEW.session_id = 'race') EXECUTE FUNCTION take_nonce();
        """)
    reqs[3] = reqs[3]._replace(session_id="race")
    outcomes = await asyncio.gather(*(writer.append(r) for r in reqs), return_exceptions=True)
    assert isinstance(outcomes[3], StorageError) and outcomes[3].field == "nonce"
    assert sum(not isinstance(o, Exception) for o in outcomes) == 7


async def test_a_retry_in_a_batch_of_new_rows_leaves_dense_seqs_and_one_set_of_tokens(pool):
    # The first try of a batch checks membership only; the retry's row is refused by the
    # unique index, the batch rolls back whole and runs again with the full check.
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    writer = BatchWriter(pool, max_batch=64, max_delay=0.05)
    writer.start()
    try:
        tokens = (b"k" * 16,)
        first = await writer.append(factories.request(h, alice)._replace(tokens=tokens))
        retry = factories.request(h, alice)._replace(client_msg_id=(await pool.fetchval(
            "SELECT client_msg_id FROM messages WHERE id = $1", first.id)))
        reqs = [factories.request(h, alice)._replace(tokens=tokens) for _ in range(5)]
        acks = await asyncio.gather(*(writer.append(r) for r in [reqs[0], retry, *reqs[1:]]))
    finally:
        await writer.close()
    assert acks[1].duplicate and (acks[1].id, acks[1].seq) == (first.id, 1)
    assert sorted(a.seq for a in acks if not a.duplicate) == [2, 3, 4, 5, 6]
    assert await pool.fetchval("SELECT last_seq FROM hoomis WHERE id = $1", h) == 6
    seqs = await pool.fetch("SELECT seq FROM message_tokens WHERE hoomi_id = $1 ORDER BY seq", h)
    assert [r["seq"] for r in seqs] == [1, 2, 3, 4, 5, 6]


async def test_scheme_and_tokens_are_stored_with_the_message(pool, writer):
    alice, = await factories.users(pool, 1)
    h = await factories.hoomi(pool, [alice])
    tokens = (b"t" * 16, b"u" * 16, b"t" * 16)
    ack = await writer.append(factories.request(h, alice)._replace(scheme=3, tokens=tokens))
    plain = await writer.append(factories.request(h, alice))
    assert await pool.fetchval("SELECT scheme FROM messages WHERE id = $1", ack.id) == 3
    assert await pool.fetchval("SELECT scheme FROM messages WHERE id = $1", plain.id) == 1
    rows = await pool.fetch("SELECT token, seq FROM message_tokens WHERE hoomi_id = $1", h)
    assert sorted((r["token"], r["seq"]) for r in rows) == [(b"t" * 16, 1), (b"u" * 16, 1)]
    with pytest.raises(StorageError) as err:
        await writer.append(factories.request(h, alice)._replace(scheme=0))
    assert err.value.field == "scheme"
    with pytest.raises(StorageError) as err:
        await writer.append(factories.request(h, alice)._replace(tokens=(b"short",)))
    assert err.value.field == "tokens"
