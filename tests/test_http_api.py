"""The HTTP API over real HTTP: user routes, operator routes, JSON errors naming the field."""

from __future__ import annotations

import base64
from uuid import uuid4

import httpx
import pytest

from hoomi_protocol import Ack, Deleted
from tests.wsclient import joined, send


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def http(cluster):
    async with httpx.AsyncClient(base_url=cluster.b.http, timeout=10) as client:
        yield client


async def test_my_hoomis_and_message_pages_match_the_socket(cluster, http):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    peer, _ = await joined(cluster.a.ws, a_tok)
    frames = [send(h, ref=i) for i in range(7)]
    for f in frames:
        await peer.send(f)
    acks = []
    while len(acks) < 7:
        got = await peer.recv()
        if isinstance(got, Ack):
            acks.append(got)
    r = await http.get("/v1/hoomis", headers=bearer(b_tok))
    assert r.json() == {"hoomis": [{"hoomi_id": str(h), "last_seq": 7, "role": "member"}]}
    r = await http.get(f"/v1/hoomis/{h}/messages?limit=3", headers=bearer(b_tok))
    body = r.json()
    assert [m["seq"] for m in body["messages"]] == [7, 6, 5] and body["next_before"] == 5
    newest = body["messages"][0]
    assert base64.b64decode(newest["content"]) == frames[6].content
    assert base64.b64decode(newest["nonce"]) == frames[6].nonce
    assert newest["sender_id"] == str(alice) and newest["session_id"] == "s1"
    r = await http.get(f"/v1/hoomis/{h}/messages?limit=3&before=5", headers=bearer(b_tok))
    assert [m["seq"] for m in r.json()["messages"]] == [4, 3, 2]
    r = await http.get(f"/v1/hoomis/{h}/messages?before=2", headers=bearer(b_tok))
    assert [m["seq"] for m in r.json()["messages"]] == [1] and r.json()["next_before"] is None
    r = await http.get(f"/v1/hoomis/{h}/messages?after=5", headers=bearer(b_tok))
    assert [m["seq"] for m in r.json()["messages"]] == [6, 7] and r.json()["has_more"] is False
    # Delete for everyone over HTTP: a tombstone in pages, a `deleted` push on sockets.
    target = next(a for a in acks if a.seq == 3)
    r = await http.delete(f"/v1/hoomis/{h}/messages/{target.id}", headers=bearer(a_tok))
    assert r.status_code == 204
    while not isinstance(got := await peer.recv(), Deleted):
        pass
    assert (got.id, got.seq) == (target.id, 3)
    r = await http.get(f"/v1/hoomis/{h}/messages?after=2&limit=1", headers=bearer(b_tok))
    (dead,) = r.json()["messages"]
    assert dead["deleted"] is True and "content" not in dead and "nonce" not in dead
    await peer.close()


@pytest.mark.parametrize("path, params, field", [
    ("/v1/hoomis/{h}/messages", "?limit=0", "limit"),
    ("/v1/hoomis/{h}/messages", "?limit=x", "limit"),
    ("/v1/hoomis/{h}/messages", "?before=0", "before"),
    ("/v1/hoomis/{h}/messages", "?before=3&after=1", "after"),
    ("/v1/hoomis/not-a-uuid/messages", "", "id"),
])
async def test_bad_query_gets_400_naming_the_field(cluster, http, path, params, field):
    (alice, tok) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    r = await http.get(path.format(h=h) + params, headers=bearer(tok))
    assert r.status_code == 400
    assert r.json()["error"] == "invalid" and r.json()["field"] == field
    assert r.json()["message"].startswith(field)


async def test_user_routes_authorization_matrix(cluster, http):
    (admin, admin_tok), (member, member_tok) = await cluster.user(), await cluster.user()
    (_, outsider_tok), (removed, removed_tok) = await cluster.user(), await cluster.user()
    (newbie, _) = await cluster.user()
    h = await cluster.admin.hoomi([admin], [member, removed])
    peer, _ = await joined(cluster.a.ws, member_tok)
    await peer.send(send(h, ref="m"))
    while not isinstance(ack := await peer.recv(), Ack):
        pass
    await peer.close()
    r = await http.delete(f"/v1/hoomis/{h}/members/{removed}", headers=bearer(admin_tok))
    assert r.status_code == 204
    messages = f"/v1/hoomis/{h}/messages"
    cases = [
        ("GET", messages, None, {"admin": 200, "member": 200, "outsider": 403, "removed": 403,
                                 "bad": 401}),
        ("GET", f"/v1/hoomis/{h}/members", None, {"admin": 200, "member": 200,
                                                   "outsider": 403, "removed": 403, "bad": 401}),
        ("PUT", f"/v1/hoomis/{h}/retention", {"retention_seconds": 86400},
         {"admin": 204, "member": 403, "outsider": 403, "removed": 403, "bad": 401}),
        ("PUT", f"/v1/hoomis/{h}/members/{newbie}", {"role": "member"},
         {"member": 403, "outsider": 403, "removed": 403, "bad": 401, "admin": 204}),
        ("DELETE", f"{messages}/{ack.id}", None,
         {"outsider": 403, "removed": 403, "bad": 401, "admin": 204}),
        ("GET", "/v1/admin/tokens", None, {"admin": 405}),
        ("POST", "/v1/admin/users", {}, {"admin": 401, "member": 401, "bad": 401}),
        ("DELETE", f"/v1/admin/hoomis/{h}", None, {"admin": 401, "member": 401}),
    ]
    tokens = {"admin": admin_tok, "member": member_tok, "outsider": outsider_tok,
              "removed": removed_tok, "bad": "nonsense"}
    for method, path, body, expected in cases:
        for who, status in expected.items():
            r = await http.request(method, path, headers=bearer(tokens[who]), json=body)
            assert r.status_code == status, (method, path, who, r.text)
            if status >= 400 and status != 405:
                assert set(r.json()) >= {"error", "message"}
    r = await http.get("/v1/hoomis")
    assert r.status_code == 401 and r.json()["field"] == "authorization"


async def test_operator_routes_and_their_errors(cluster, http):
    admin = cluster.admin.http
    r = await admin.post("/v1/admin/users", json={"id": "nope"})
    assert (r.status_code, r.json()["field"]) == (400, "id")
    uid = str(uuid4())
    assert (await admin.post("/v1/admin/users", json={"id": uid})).status_code == 201
    r = await admin.post("/v1/admin/users", json={"id": uid})
    assert (r.status_code, r.json()["field"]) == (400, "id")
    r = await admin.post("/v1/admin/hoomis", json={"members": [{"user_id": uid, "role": "x"}]})
    assert (r.status_code, r.json()["field"]) == (400, "members[0].role")
    r = await admin.post("/v1/admin/hoomis", json={"members": [{"user_id": str(uuid4())}]})
    assert (r.status_code, r.json()["field"]) == (404, "members[0].user_id")
    r = await admin.post("/v1/admin/hoomis", content=b"{not json")
    assert (r.status_code, r.json()["field"]) == (400, "body")
    r = await admin.post("/v1/admin/tokens", json={"user_id": uid, "ttl_seconds": 0})
    assert (r.status_code, r.json()["field"]) == (400, "ttl_seconds")
    r = await admin.post("/v1/admin/tokens", json={"user_id": str(uuid4()), "ttl_seconds": 60})
    assert (r.status_code, r.json()["field"]) == (404, "user_id")
    r = await admin.post("/v1/admin/hoomis", content=b"x" * 70000)
    assert (r.status_code, r.json()["error"]) == (413, "too_large")
    h = (await admin.post("/v1/admin/hoomis", json={"members": [
        {"user_id": uid, "role": "admin"}]})).json()["id"]
    r = await admin.put(f"/v1/admin/hoomis/{h}/members/{uid}", json={"role": "boss"})
    assert (r.status_code, r.json()["field"]) == (400, "role")
    r = await admin.put(f"/v1/admin/hoomis/{uuid4()}/members/{uid}", json={"role": "member"})
    assert (r.status_code, r.json()["field"]) == (404, "id")
    r = await admin.put(f"/v1/admin/hoomis/{h}/members/{uuid4()}", json={"role": "member"})
    assert (r.status_code, r.json()["field"]) == (404, "user_id")
    # A 404 names the path parameter the caller got wrong.
    user_tok = (await admin.post("/v1/admin/tokens", json={"user_id": uid})).json()["token"]
    r = await http.delete(f"/v1/hoomis/{h}/messages/{uuid4()}", headers=bearer(user_tok))
    assert (r.status_code, r.json()["field"]) == (404, "message_id")
    assert (await admin.delete(f"/v1/admin/hoomis/{h}/members/{uid}")).status_code == 204
    r = await admin.delete(f"/v1/admin/hoomis/{h}/members/{uid}")
    assert (r.status_code, r.json()["field"]) == (404, "user_id")
    assert (await admin.delete(f"/v1/admin/hoomis/{h}")).status_code == 204
    r = await admin.delete(f"/v1/admin/hoomis/{h}")
    assert (r.status_code, r.json()["field"]) == (404, "id")
    assert (await admin.delete(f"/v1/admin/users/{uid}")).status_code == 204
    r = await admin.delete(f"/v1/admin/users/{uid}")
    assert (r.status_code, r.json()["field"]) == (404, "id")


async def test_deeply_nested_body_is_400_naming_the_body(cluster, http):
    """60 000 `[` fit under the 64 KiB body limit but overflow json's recursion: a 400
    naming the body, not a 500 with a traceback; the replica serves on."""
    (alice, tok) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    for deep in (b"[" * 60000, b'{"a":' * 10000 + b"1" + b"}" * 10000):
        r = await cluster.admin.http.post("/v1/admin/hoomis", content=deep)
        assert (r.status_code, r.json()["error"], r.json()["field"]) == (400, "invalid", "body")
        r = await http.put(f"/v1/hoomis/{h}/retention", content=deep, headers=bearer(tok))
        assert (r.status_code, r.json()["field"]) == (400, "body")
    assert (await http.get("/v1/hoomis", headers=bearer(tok))).status_code == 200


async def test_health_readiness_and_metrics(cluster, http):
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "database": "ok", "broker": "ok"}
    text = (await http.get("/metrics")).text
    for name in ("hoomi_connections", "hoomi_frames_in_total", "hoomi_frames_out_total",
                 "hoomi_errors_total", "hoomi_writer_batch_size_bucket",
                 "hoomi_ack_seconds_bucket", "hoomi_gap_fill_messages_total",
                 "hoomi_writer_queue", "hoomi_writer_queue_bytes"):
        assert name in text, name


async def test_unknown_route_and_wrong_method_answer_json(http):
    r = await http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "message": "path: no such route", "field": "path"}
    r = await http.post("/v1/hoomis")
    assert r.status_code == 405
    assert r.json() == {"error": "invalid", "message": "method: POST is not allowed here",
                        "field": "method"}
    assert "GET" in r.headers["allow"]


async def test_cors_for_the_configured_browser_origin_only(cluster, http):
    from tests.conftest import CORS_ORIGIN
    (alice, tok) = await cluster.user()
    preflight = await http.options("/v1/hoomis", headers={
        "Origin": CORS_ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "access-control-allow-credentials" not in preflight.headers
    r = await http.get("/v1/hoomis", headers={**bearer(tok), "Origin": CORS_ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == CORS_ORIGIN
    other = await http.get("/v1/hoomis", headers={**bearer(tok),
                                                 "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    refused = await http.options("/v1/hoomis", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert refused.status_code == 400


def test_cors_origins_must_be_origins():
    from server import config
    assert config.load({"HOOMI_CORS_ORIGINS": " https://a.example/, http://b.example:8080 ",
                        "DATABASE_URL": "postgresql://x@h/db", "HOOMI_JWT_SECRET": "s" * 40,
                        "HOOMI_ADMIN_TOKEN": "t"}).cors_origins == (
        "https://a.example", "http://b.example:8080")
    with pytest.raises(config.ConfigError, match="HOOMI_CORS_ORIGINS"):
        config.load({"HOOMI_CORS_ORIGINS": "chat.example.org",
                     "DATABASE_URL": "postgresql://x@h/db", "HOOMI_JWT_SECRET": "s" * 40,
                     "HOOMI_ADMIN_TOKEN": "t"})
