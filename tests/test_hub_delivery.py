"""Delivery across two replicas over real sockets: order, density, catch-up on resume."""

from __future__ import annotations

import asyncio

from hoomi_protocol import Ack, MessageBody, Send
from tests.wsclient import Peer, joined, messages, send


async def test_messages_cross_replicas_in_seq_order(cluster):
    alice, alice_tok = await cluster.user()
    bob, bob_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    pa, wa = await joined(cluster.a.ws, alice_tok)
    pb, wb = await joined(cluster.b.ws, bob_tok)
    assert [(s.hoomi_id, s.last_seq, s.role) for s in wa.hoomis] == [(h, 0, "admin")]
    assert [(s.hoomi_id, s.role) for s in wb.hoomis] == [(h, "member")]
    frames = [send(h, ref=i) for i in range(50)]
    for f in frames:
        await pa.send(f)
    got = await messages(pb, 50)
    assert [m.seq for m in got] == list(range(1, 51))
    assert [m.content for m in got] == [f.content for f in frames]
    assert {m.sender_id for m in got} == {alice}
    # Alice gets an ack per send and her own messages as pushes, matched by id.
    acks, own = {}, {}
    while len(acks) < 50 or len(own) < 50:
        frame = await pa.recv()
        if isinstance(frame, Ack):
            acks[frame.ref] = frame
        elif isinstance(frame, MessageBody):
            own[frame.id] = frame
    assert sorted(a.seq for a in acks.values()) == list(range(1, 51))
    assert {a.id for a in acks.values()} == set(own) == {m.id for m in got}
    assert [acks[i].seq for i in range(50)] == list(range(1, 51))  # one sender keeps order
    await pa.close()
    await pb.close()


async def test_concurrent_senders_on_both_replicas_get_dense_seqs(cluster):
    people = [await cluster.user() for _ in range(6)]
    h = await cluster.admin.hoomi([people[0][0]], [u for u, _ in people[1:]])
    peers = [(await joined((cluster.a if i % 2 else cluster.b).ws, tok))[0]
             for i, (_, tok) in enumerate(people)]
    per_sender = 20

    async def burst(peer: Peer) -> None:
        for i in range(per_sender):
            await peer.send(send(h, ref=i))

    await asyncio.gather(*(burst(p) for p in peers))
    total = per_sender * len(peers)
    for peer in peers:
        got = await messages(peer, total)
        assert [m.seq for m in got] == list(range(1, total + 1))
    for peer in peers:
        await peer.close()


async def test_resume_delivers_exactly_what_was_missed(cluster):
    alice, alice_tok = await cluster.user()
    bob, bob_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    other = await cluster.admin.hoomi([alice], [bob])
    pa, _ = await joined(cluster.a.ws, alice_tok)
    for i in range(3):
        await pa.send(send(h, ref=i))
    await messages(pa, 3)
    pb, _ = await joined(cluster.b.ws, bob_tok)
    await pa.send(send(h, ref="seen"))
    (seen,) = await messages(pb, 1)
    await pb.close()
    missed = [send(h, ref=f"m{i}") for i in range(5)] + [send(other, ref="o")]
    for f in missed:
        await pa.send(f)
    await messages(pa, 7)  # all stored and pushed back to alice
    pb, wb = await joined(cluster.a.ws, bob_tok, resume={h: seen.seq, other: 0})
    assert {s.hoomi_id: s.last_seq for s in wb.hoomis} == {h: 9, other: 1}
    got = await messages(pb, 6)
    by_hoomi = {k: [m for m in got if m.hoomi_id == k] for k in (h, other)}
    assert [m.seq for m in by_hoomi[h]] == [5, 6, 7, 8, 9]
    assert [m.content for m in by_hoomi[h]] == [f.content for f in missed[:5]]
    assert [m.seq for m in by_hoomi[other]] == [1]
    # Then live pushes continue after the catch-up, with nothing repeated.
    await pa.send(send(h, ref="live"))
    (live,) = await messages(pb, 1)
    assert live.seq == 10
    await pa.close()
    await pb.close()


async def test_hello_without_resume_starts_at_the_edge(cluster):
    alice, alice_tok = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    pa, _ = await joined(cluster.a.ws, alice_tok)
    for i in range(3):
        await pa.send(send(h, ref=i))
    await messages(pa, 3)
    pb, wb = await joined(cluster.b.ws, alice_tok)
    assert wb.hoomis[0].last_seq == 3
    await pa.send(send(h))
    (m,) = await messages(pb, 1)
    assert m.seq == 4
    await pa.close()
    await pb.close()


async def test_retry_on_the_other_replica_returns_the_original_ack(cluster):
    alice, tok = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    frame = send(h, ref="first")
    pa, _ = await joined(cluster.a.ws, tok)
    await pa.send(frame)
    first, _ = await pa.recv_until(Ack)
    pb, _ = await joined(cluster.b.ws, tok)
    await pb.send(Send(hoomi_id=h, client_msg_id=frame.client_msg_id, content=frame.content,
                       nonce=frame.nonce, session_id="s1", ref="retry"))
    again, _ = await pb.recv_until(Ack)
    assert (again.id, again.seq, again.created_at, again.ref) == (
        first.id, first.seq, first.created_at, "retry")
    r = await cluster.admin.http.get(f"/v1/hoomis/{h}/messages",
                                     headers={"Authorization": f"Bearer {tok}"})
    assert [m["seq"] for m in r.json()["messages"]] == [1]
    await pa.close()
    await pb.close()
