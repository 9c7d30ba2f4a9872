"""Who may do what, frame by frame and route by route, and every error and close code."""

from __future__ import annotations

import asyncio
import json
import os
import time
from uuid import uuid4

import httpx
import msgpack
import pytest
import websockets

from hoomi_protocol import (
    Ack,
    Delete,
    Error,
    ErrorCode,
    Hello,
    History,
    Membership,
    Page,
    Ping,
    Pong,
    Sync,
)
from server.testing.replica import JWT_SECRET
from tests.wsclient import Peer, joined, messages, own_replica, send


async def reply(peer: Peer, frame) -> object:
    await peer.send(frame)
    while True:
        got = await peer.recv()
        if getattr(got, "ref", None) == frame.ref:
            return got


class World:
    """A Hoomi with an admin, a member, a removed member and an outsider, all connected."""

    async def build(self, cluster) -> World:
        self.cluster = cluster
        (self.admin, self.admin_tok), (self.member, self.member_tok) = (
            await cluster.user(), await cluster.user())
        (self.removed, self.removed_tok), (self.outsider, self.outsider_tok) = (
            await cluster.user(), await cluster.user())
        self.h = await cluster.admin.hoomi([self.admin], [self.member, self.removed])
        self.peers = {}
        for name, tok, r in [("admin", self.admin_tok, cluster.a),
                             ("member", self.member_tok, cluster.b),
                             ("removed", self.removed_tok, cluster.a),
                             ("outsider", self.outsider_tok, cluster.b)]:
            self.peers[name], _ = await joined(r.ws, tok)
        r = await cluster.admin.http.delete(f"/v1/admin/hoomis/{self.h}/members/{self.removed}")
        assert r.status_code == 204
        left = await self.peers["removed"].recv()
        assert left == Membership(hoomi_id=self.h, state="left")
        return self

    async def close(self) -> None:
        for p in self.peers.values():
            await p.close()


@pytest.fixture
async def world(cluster):
    w = await World().build(cluster)
    yield w
    await w.close()


async def test_members_and_admins_may_send_read_and_sync(world):
    for name in ("admin", "member"):
        peer = world.peers[name]
        assert isinstance(await reply(peer, send(world.h, ref=f"{name}-send")), Ack)
        page = await reply(peer, History(hoomi_id=world.h, limit=10, ref=f"{name}-h"))
        assert isinstance(page, Page) and page.messages
        page = await reply(peer, Sync(hoomi_id=world.h, after=0, ref=f"{name}-s"))
        assert isinstance(page, Page) and page.has_more is False


@pytest.mark.parametrize("who", ["outsider", "removed"])
async def test_non_members_are_forbidden_every_frame(world, who):
    peer = world.peers[who]
    real = await reply(world.peers["admin"], send(world.h, ref=f"real-{who}"))
    assert isinstance(real, Ack)
    frames = [send(world.h, ref="s"), History(hoomi_id=world.h, ref="h"),
              Sync(hoomi_id=world.h, after=0, ref="y"),
              Delete(hoomi_id=world.h, id=real.id, ref="d"),
              Delete(hoomi_id=world.h, id=uuid4(), ref="d2")]
    for f in frames:
        err = await reply(peer, f)
        assert isinstance(err, Error) and err.code == ErrorCode.FORBIDDEN, (f, err)


async def test_non_members_receive_no_pushes(world):
    ack = await reply(world.peers["admin"], send(world.h, ref="x"))
    assert isinstance(ack, Ack)
    await messages(world.peers["member"], 1)
    for who in ("outsider", "removed"):
        pong = await reply(world.peers[who], Ping(ref="p"))
        assert pong == Pong(ref="p")  # nothing else arrived before it


async def test_delete_is_for_the_sender_and_admins(world):
    admin, member = world.peers["admin"], world.peers["member"]
    mine = await reply(member, send(world.h, ref="m1"))
    theirs = await reply(admin, send(world.h, ref="a1"))
    err = await reply(member, Delete(hoomi_id=world.h, id=theirs.id, ref="d1"))
    assert isinstance(err, Error) and err.code == ErrorCode.FORBIDDEN
    ok = await reply(member, Delete(hoomi_id=world.h, id=mine.id, ref="d2"))
    assert isinstance(ok, Ack) and (ok.id, ok.seq) == (mine.id, mine.seq)
    ok = await reply(admin, Delete(hoomi_id=world.h, id=theirs.id, ref="d3"))
    assert isinstance(ok, Ack)
    # Everyone in the Hoomi hears of both deletions; history shows tombstones.
    page = await reply(member, History(hoomi_id=world.h, ref="h"))
    dead = {m.id for m in page.messages if m.deleted}
    assert dead == {mine.id, theirs.id}
    assert all(m.content is None for m in page.messages if m.deleted)
    err = await reply(member, Delete(hoomi_id=world.h, id=uuid4(), ref="d4"))
    assert isinstance(err, Error) and err.code == ErrorCode.NOT_FOUND


async def test_removed_member_stops_receiving_at_once_and_added_member_starts(cluster):
    (a, a_tok), (b, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([a], [b])
    pa, _ = await joined(cluster.a.ws, a_tok)
    pb, _ = await joined(cluster.b.ws, b_tok)
    r = await cluster.admin.http.delete(f"/v1/admin/hoomis/{h}/members/{b}")
    assert r.status_code == 204
    assert await pb.recv() == Membership(hoomi_id=h, state="left")
    await pa.send(send(h, ref=1))
    await messages(pa, 1)
    assert await reply(pb, Ping(ref="p")) == Pong(ref="p")
    r = await cluster.admin.http.put(f"/v1/admin/hoomis/{h}/members/{b}", json={"role": "member"})
    assert r.status_code == 204
    assert await pb.recv() == Membership(hoomi_id=h, state="joined")
    await pa.send(send(h, ref=2))
    (m,) = await messages(pb, 1)
    assert m.seq == 2
    await pa.close()
    await pb.close()


async def test_deleted_user_is_disconnected(cluster):
    (a, a_tok) = await cluster.user()
    await cluster.admin.hoomi([a])
    pa, _ = await joined(cluster.b.ws, a_tok)
    r = await cluster.admin.http.delete(f"/v1/admin/users/{a}")
    assert r.status_code == 204
    code, _ = await pa.closed()
    assert code == 4401


async def test_deleted_users_token_is_refused_at_hello_and_over_http(cluster):
    (a, a_tok) = await cluster.user()
    r = await cluster.admin.http.delete(f"/v1/admin/users/{a}")
    assert r.status_code == 204
    peer = await Peer.connect(cluster.a.ws)
    await peer.send(Hello(token=a_tok, ref="h"))
    code, frames = await peer.closed()
    assert code == 4401
    assert [(f.code, f.message, f.ref) for f in frames] == [
        (ErrorCode.UNAUTHORIZED, "unknown user", "h")]
    async with httpx.AsyncClient(base_url=cluster.a.http, timeout=10) as http:
        r = await http.get("/v1/hoomis", headers={"Authorization": f"Bearer {a_tok}"})
    assert r.status_code == 401
    assert r.json() == {"error": "unauthorized", "message": "unknown user",
                        "field": "authorization"}


# -- error codes --------------------------------------------------------------------------

async def test_invalid_fields_get_invalid_and_the_socket_stays_usable(cluster):
    (a, tok) = await cluster.user()
    h = await cluster.admin.hoomi([a])
    peer, _ = await joined(cluster.a.ws, tok)
    base = {"type": "send", "hoomi_id": str(h), "client_msg_id": str(uuid4()),
            "content": os.urandom(32), "nonce": os.urandom(12), "session_id": "s", "ref": "r"}
    cases = {
        "nonce": {**base, "nonce": os.urandom(11)},
        "content": {**base, "content": b"short"},
        "hoomi_id": {**base, "hoomi_id": str(h).upper()},
        "session_id": {**base, "session_id": "x" * 129},
        "limit": {"type": "history", "hoomi_id": str(h), "limit": 101, "ref": "r"},
        "type": {"type": "shout", "ref": "r"},
    }
    for field, frame in cases.items():
        await peer.send_map(frame)
        err = await peer.recv()
        assert isinstance(err, Error) and err.code == ErrorCode.INVALID, (field, err)
        assert err.message.startswith(field) and err.ref == "r"
    await peer.send_map({**base, "content": os.urandom(65537)})
    err = await peer.recv()
    assert (err.code, err.ref) == (ErrorCode.TOO_LARGE, "r")
    assert await reply(peer, Ping(ref=7)) == Pong(ref=7)
    await peer.close()


async def test_not_found_for_unknown_hoomi(cluster):
    (_, tok) = await cluster.user()
    peer, _ = await joined(cluster.a.ws, tok)
    for f in (History(hoomi_id=uuid4(), ref=1), send(uuid4(), ref=2)):
        err = await reply(peer, f)
        assert isinstance(err, Error) and err.code == ErrorCode.NOT_FOUND
    await peer.close()


# -- close codes ----------------------------------------------------------------------------

async def test_bad_token_closes_4401(cluster):
    import jwt
    (a, _) = await cluster.user()
    expired = jwt.encode({"sub": str(a), "exp": 1}, JWT_SECRET, algorithm="HS256")
    other_secret = "not-the-secret-but-just-as-long-as-a-real-one"
    forged = jwt.encode({"sub": str(a), "exp": 2**40}, other_secret, algorithm="HS256")
    for token in ("garbage", expired, forged):
        peer = await Peer.connect(cluster.a.ws)
        await peer.send(Hello(token=token, ref="h"))
        code, frames = await peer.closed()
        assert code == 4401
        assert frames[0].code == ErrorCode.UNAUTHORIZED and frames[0].ref == "h"


async def test_token_with_a_non_integer_exp_is_refused_naming_exp(cluster):
    import jwt
    (a, _) = await cluster.user()
    # PyJWT alone accepts both (int("9999999999"), int(1e300)): a socket authenticated
    # for ever. Refused on the socket and over HTTP, the message naming the claim.
    for exp in ("9999999999", 1e300):
        token = jwt.encode({"sub": str(a), "exp": exp}, JWT_SECRET, algorithm="HS256")
        peer = await Peer.connect(cluster.a.ws)
        await peer.send(Hello(token=token, ref="h"))
        code, frames = await peer.closed()
        assert code == 4401
        assert frames[0].code == ErrorCode.UNAUTHORIZED and "exp" in frames[0].message
        async with httpx.AsyncClient(base_url=cluster.a.http) as http:
            r = await http.get("/v1/hoomis", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and "exp must be an integer" in r.json()["message"]


async def test_socket_is_closed_4401_when_its_token_expires(cluster):
    import time

    import jwt
    (a, _) = await cluster.user()
    h = await cluster.admin.hoomi([a])
    # Expired 2 s ago: still inside the hub's 5 s leeway, so hello succeeds and the
    # socket has 2 to 3 s to live.
    exp = int(time.time()) - 2
    token = jwt.encode({"sub": str(a), "exp": exp}, JWT_SECRET, algorithm="HS256")
    peer, welcome = await joined(cluster.a.ws, token)
    assert [s.hoomi_id for s in welcome.hoomis] == [h]
    assert isinstance(await reply(peer, send(h, ref="before")), Ack)
    code, frames = await peer.closed(timeout=6)
    assert time.time() >= exp + 5 - 0.5
    assert code == 4401
    assert [(f.code, f.ref) for f in frames if isinstance(f, Error)] == [
        (ErrorCode.UNAUTHORIZED, None)]


async def test_first_frame_must_be_hello(cluster):
    peer = await Peer.connect(cluster.a.ws)
    await peer.send(Ping(ref=1))
    code, frames = await peer.closed()
    assert code == 4401 and frames[0].code == ErrorCode.UNAUTHORIZED


async def test_silence_after_connect_closes_4401(cluster):
    peer = await Peer.connect(cluster.a.ws)  # this cluster's hello timeout is 1 s
    code, _ = await peer.closed(timeout=5)
    assert code == 4401


@pytest.mark.parametrize("junk", [msgpack.packb([1, 2]), b"\xc1\xff", "text frame"])
async def test_frame_that_is_not_a_msgpack_map_closes_4400(cluster, junk):
    (_, tok) = await cluster.user()
    peer, _ = await joined(cluster.a.ws, tok)
    await peer.send_raw(junk)
    code, _ = await peer.closed()
    assert code == 4400


async def test_rate_limited_with_retry_after(module_dsn, valkey):
    async with own_replica(
            module_dsn, valkey.url, "slow",
            HOOMI_SEND_RATE="1", HOOMI_SEND_BURST="3") as (r, admin):
        a = await admin.user()
        h = await admin.hoomi([a])
        peer, _ = await joined(r.ws, await admin.token(a))
        for i in range(4):
            await peer.send(send(h, ref=i))
        got = [await peer.recv() for _ in range(5)]
        errors = [f for f in got if isinstance(f, Error)]
        assert len(errors) == 1 and errors[0].code == ErrorCode.RATE_LIMITED
        assert errors[0].ref == 3 and 0 < errors[0].retry_after_ms <= 1000
        await peer.close()


async def test_history_requests_are_rate_limited_per_socket(module_dsn, valkey):
    async with own_replica(
            module_dsn, valkey.url, "reads",
            HOOMI_REQUEST_RATE="1", HOOMI_REQUEST_BURST="3") as (r, admin):
        a = await admin.user()
        h = await admin.hoomi([a])
        peer, _ = await joined(r.ws, await admin.token(a))
        got = [await reply(peer, History(hoomi_id=h, ref=i)) for i in range(4)]
        assert [type(g).__name__ for g in got] == ["Page", "Page", "Page", "Error"]
        assert got[3].code == ErrorCode.RATE_LIMITED and 0 < got[3].retry_after_ms <= 1000
        assert isinstance(await reply(peer, Ping(ref="still")), Pong)  # the socket goes on
        await asyncio.sleep(got[3].retry_after_ms / 1000)
        assert isinstance(await reply(peer, History(hoomi_id=h, ref="later")), Page)
        await peer.close()


async def test_slow_reader_is_closed_4408_and_resumes(cluster, module_dsn, valkey):
    import websockets

    from hoomi_protocol import encode_client
    async with own_replica(module_dsn, valkey.url, "q", HOOMI_SEND_QUEUE_FRAMES="8") as (r, admin):
        a, b = await admin.user(), await admin.user()
        h = await admin.hoomi([a], [b])
        # A reader that never reads: small client buffers so TCP backs up fast.
        slow = await websockets.connect(r.ws, max_queue=1, max_size=2**20,
                                        write_limit=2**10)
        await slow.send(encode_client(Hello(token=await admin.token(b))))
        writer, _ = await joined(cluster.a.ws, await admin.token(a))  # a normal queue
        big = os.urandom(60000)
        total = 300  # 18 MB: more than loopback socket buffers can hide
        for i in range(total):
            await writer.send(send(h, ref=i, body=big))
        await messages(writer, total)
        code = None
        for _ in range(total + 10):
            try:
                await asyncio.wait_for(slow.recv(), 5)
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                break
        assert code == 4408
        # It reconnects, resumes, and gets everything.
        again, w = await joined(r.ws, await admin.token(b), resume={h: 0})
        got = await messages(again, total)
        assert [m.seq for m in got] == list(range(1, total + 1))
        await again.close()
        await writer.close()


async def test_frame_over_the_size_limit_closes_1009(cluster):
    (a, tok) = await cluster.user()
    h = await cluster.admin.hoomi([a])
    peer, _ = await joined(cluster.a.ws, tok)
    await peer.send_map({"type": "send", "hoomi_id": str(h), "client_msg_id": str(uuid4()),
                         "content": os.urandom(65536 + 5000), "nonce": os.urandom(12),
                         "session_id": "s"})
    code, _ = await peer.closed()
    assert code == 1009


async def _joined_when_room(url: str, token: str) -> Peer:
    """`joined`, retried while the replica still counts a socket that is closing."""
    for _ in range(50):
        try:
            return (await joined(url, token))[0]
        except websockets.InvalidStatus:
            await asyncio.sleep(0.1)
    raise AssertionError("the replica stayed full after a socket closed")


async def test_full_replica_refuses_upgrades_and_a_users_extra_socket_closes_1013(
        module_dsn, valkey):
    async with own_replica(
            module_dsn, valkey.url, "lim",
            HOOMI_MAX_CONNECTIONS="3", HOOMI_MAX_SOCKETS_PER_USER="2") as (r, admin):
        peers = []
        try:
            a, b = await admin.user(), await admin.user()
            ta, tb = await admin.token(a), await admin.token(b)
            for _ in range(2):
                peers.append((await joined(r.ws, ta))[0])
            third = await Peer.connect(r.ws)
            await third.send(Hello(token=ta, ref="h3"))
            code, frames = await third.closed()
            assert code == 1013
            assert [(f.code, f.ref) for f in frames] == [(ErrorCode.RATE_LIMITED, "h3")]
            assert frames[0].retry_after_ms
            # Another user still gets in: the limit is per user (once the refused socket's
            # transport is gone: it counts against the caps until then)...
            peers.append(await _joined_when_room(r.ws, tb))
            # ...until the replica itself is full: the upgrade is refused with 503 (which a
            # load balancer retries on another replica), a JSON body saying why.
            with pytest.raises(websockets.InvalidStatus) as refused:
                await Peer.connect(r.ws)
            response = refused.value.response
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert json.loads(response.body) == {"error": "unavailable",
                                                 "message": "replica full; try again"}
            metrics = (await admin.http.get("/metrics")).text
            assert 'hoomi_refused_upgrades_total{reason="replica full"} 1.0' in metrics
            await peers.pop().close()
            # Room again once the hub has let go of that socket.
            peers.append(await _joined_when_room(r.ws, tb))
        finally:
            for p in peers:
                await p.close()


async def test_pages_asked_for_and_not_read_are_bounded_in_bytes(cluster, module_dsn, valkey):
    from hoomi_protocol import encode_client
    async with own_replica(module_dsn, valkey.url, "pages", HOOMI_SEND_QUEUE_MB="1") as (r, admin):
        a = await admin.user()
        h = await admin.hoomi([a])
        writer, _ = await joined(cluster.a.ws, await admin.token(a))  # a normal queue
        big = os.urandom(60000)
        for i in range(40):
            await writer.send(send(h, ref=i, body=big))
        await messages(writer, 40)
        await writer.close()
        # Ask for the same 2.4 MB page over and over, and read none of it.
        greedy = await websockets.connect(r.ws, max_queue=1, max_size=None, write_limit=2**10)
        await greedy.send(encode_client(Hello(token=await admin.token(a))))
        for i in range(60):
            try:
                await greedy.send(encode_client(History(hoomi_id=h, limit=40, ref=i)))
            except websockets.ConnectionClosed:
                break
        await asyncio.sleep(3)  # not reading while the hub answers them all
        code = None
        for _ in range(200):
            try:
                await asyncio.wait_for(greedy.recv(), 5)
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                break
        assert code == 4408  # long before 60 pages (144 MB) were held for it
        metrics = (await admin.http.get("/metrics")).text
        assert 'hoomi_closes_total{code="4408"}' in metrics


def test_tokens_checked_for_issuer_and_audience_when_configured():
    from uuid import uuid4 as new_id

    from server import auth
    secret, user = "s" * 40, new_id()
    good = auth.issue(secret, user, 60, issuer="https://id.example", audience="hoomi")
    assert auth.verify(secret, good, issuer="https://id.example", audience="hoomi") == user
    assert auth.verify(secret, good) == user  # nothing configured: not checked
    for token, why in [
        (auth.issue(secret, user, 60), "iss"),  # no iss/aud at all
        (auth.issue(secret, user, 60, issuer="https://other.example", audience="hoomi"),
         "issuer"),
        (auth.issue(secret, user, 60, issuer="https://id.example", audience="mail"),
         "audience"),
    ]:
        with pytest.raises(auth.AuthError) as err:
            auth.verify(secret, token, issuer="https://id.example", audience="hoomi")
        assert err.value.code == ErrorCode.UNAUTHORIZED and why in err.value.message.lower()


async def test_hub_with_an_issuer_and_audience_refuses_other_tokens(module_dsn, valkey):
    import jwt

    async with own_replica(
            module_dsn, valkey.url, "iss",
            HOOMI_JWT_ISSUER="https://id.example", HOOMI_JWT_AUDIENCE="hoomi") as (r, admin):
        a = await admin.user()
        token = await admin.token(a)  # the admin API puts iss and aud in
        claims = jwt.decode(token, options={"verify_signature": False})
        assert (claims["iss"], claims["aud"]) == ("https://id.example", "hoomi")
        peer, _ = await joined(r.ws, token)
        await peer.close()
        plain = jwt.encode({"sub": str(a), "exp": int(time.time()) + 60}, JWT_SECRET,
                           algorithm="HS256")
        peer = await Peer.connect(r.ws)
        await peer.send(Hello(token=plain, ref="h"))
        code, frames = await peer.closed()
        assert code == 4401 and frames[0].code == ErrorCode.UNAUTHORIZED
        async with httpx.AsyncClient(base_url=r.http) as http:
            refused = await http.get("/v1/hoomis", headers={"Authorization": f"Bearer {plain}"})
            assert (refused.status_code, refused.json()["field"]) == (401, "authorization")
            ok = await http.get("/v1/hoomis", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200
