"""What operators read (SPEC §7.3), at the storage level against real PostgreSQL: the audit
log paged and filtered, a Hoomi's overview. The HTTP routes and CLI are tested with them in
tests/test_http_api.py and tests/test_cli.py."""

from __future__ import annotations

from uuid import uuid4

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import audit, hoomis
from storage.audit import Actor
from storage.records import Member
from storage.writer import BatchWriter
from tests import factories


async def test_audit_pages_newest_first_without_repeat_or_gap(pool):
    alice, bob = await factories.users(pool, 2)
    h1 = await factories.hoomi(pool, [alice])
    h2 = await factories.hoomi(pool, [alice])
    for _ in range(5):
        await hoomis.set_member(pool, h1, bob, "member", Actor.operator())
        await hoomis.remove_member(pool, h1, bob, Actor.user(alice))
    await hoomis.set_member(pool, h2, bob, "member", Actor.operator())

    everything = await audit.page(pool, limit=1000)
    assert everything.next_before is None
    ids = [e["id"] for e in everything.entries]
    assert ids == sorted(ids, reverse=True)

    seen, before = [], None
    while True:
        p = await audit.page(pool, hoomi_id=h1, limit=3, before=before)
        seen += p.entries
        if p.next_before is None:
            break
        before = p.next_before
    assert [e["id"] for e in seen] == [e["id"] for e in everything.entries
                                       if e["hoomi_id"] == h1]
    assert len(seen) == 11  # hoomi.create + 5 × (member.set, member.remove)

    removes = await audit.page(pool, hoomi_id=h1, action="member.remove")
    assert [e["action"] for e in removes.entries] == ["member.remove"] * 5
    assert all(e["actor_kind"] == "user" and e["actor_id"] == alice for e in removes.entries)
    by_alice = await audit.page(pool, actor_id=alice)
    assert {e["action"] for e in by_alice.entries} == {"member.remove"}
    assert (await audit.page(pool, hoomi_id=uuid4())).entries == []


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 12), limit=st.integers(1, 5))
async def test_audit_paging_model(pool, n, limit):
    hoomi_id = uuid4()
    async with pool.acquire() as conn:
        for i in range(n):
            await audit.record(conn, Actor.system(), "test.paging", hoomi_id=hoomi_id,
                               details={"i": i})
    got, before = [], None
    for _ in range(n + 2):
        p = await audit.page(pool, hoomi_id=hoomi_id, limit=limit, before=before)
        assert len(p.entries) <= limit
        got += [e["details"]["i"] for e in p.entries]
        if p.next_before is None:
            break
        before = p.next_before
    assert got == list(reversed(range(n)))


async def test_hoomi_overview_counts_and_members_without_content(pool):
    alice, bob = await factories.users(pool, 2)
    h = await factories.hoomi(pool, [alice], [bob])
    writer = BatchWriter(pool)
    writer.start()
    try:
        for _ in range(3):
            await writer.append(factories.request(h, alice))
    finally:
        await writer.close()
    await hoomis.set_retention(pool, h, 3600, Actor.user(alice))
    view = await hoomis.overview(pool, h)
    assert view is not None
    assert view.last_seq == 3 and view.messages == 3 and view.retention_seconds == 3600
    assert view.archived_upto is None  # nothing archived
    assert sorted(view.members) == sorted([Member(alice, "admin"), Member(bob, "member")])
    assert await hoomis.overview(pool, uuid4()) is None
    empty = await factories.hoomi(pool, [])
    view = await hoomis.overview(pool, empty)
    assert view is not None and view.members == [] and view.messages == 0
