"""Per-request costs of the HTTP API's pages (server/api.py): GET /v1/hoomis/{id}/messages
asks whether its user still exists only when the page is refused, so a deleted user's
token still gets 401 "unknown user" whatever the request; a token verified once is kept
(VerifiedTokens) and still stops working when it expires."""

from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import httpx
import pytest

from server import auth
from server.auth import VerifiedTokens
from server.testing.replica import JWT_SECRET


@pytest.fixture
async def http(cluster):
    async with httpx.AsyncClient(base_url=cluster.b.http, timeout=10) as client:
        yield client


async def test_a_deleted_users_page_requests_get_401_unknown_user(cluster, http):
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    auth = {"Authorization": f"Bearer {b_tok}"}
    assert (await http.get(f"/v1/hoomis/{h}/messages", headers=auth)).status_code == 200
    assert (await cluster.admin.http.delete(f"/v1/admin/users/{bob}")).status_code == 204
    for path in (f"/v1/hoomis/{h}/messages", f"/v1/hoomis/{h}/messages?after=0",
                 f"/v1/hoomis/{uuid4()}/messages", f"/v1/hoomis/{h}/messages?limit=0",
                 "/v1/hoomis/not-a-uuid/messages"):
        r = await http.get(path, headers=auth)
        assert (r.status_code, r.json()) == (401, {
            "error": "unauthorized", "message": "unknown user", "field": "authorization"}), path
    # A member who exists still gets the errors of their request.
    mine = {"Authorization": f"Bearer {a_tok}"}
    assert (await http.get(f"/v1/hoomis/{uuid4()}/messages", headers=mine)).status_code == 404
    assert (await http.get(f"/v1/hoomis/{h}/messages?limit=0", headers=mine)).status_code == 400


def test_verified_tokens_expire_and_stay_bounded():
    cache = VerifiedTokens(size=3)
    user = uuid4()
    cache.put("t0", auth.Claims(user, expires_at=100.0))
    assert cache.get("t0", 99.9) == user
    assert cache.get("t0", 100.0) is None and cache.get("t0", 50.0) is None  # dropped
    for k in range(5):
        cache.put(f"t{k}", auth.Claims(uuid4(), expires_at=1e9))
    assert [cache.get(f"t{k}", 0) is not None for k in range(5)] == [False, False, True,
                                                                    True, True]


async def test_a_token_verified_once_still_expires(cluster, http):
    (alice, _) = await cluster.user()
    h = await cluster.admin.hoomi([alice])
    # Valid for about one more second (the hub allows auth.LEEWAY_S of clock skew).
    token = auth.issue(JWT_SECRET, alice, ttl_seconds=1 - auth.LEEWAY_S)
    headers = {"Authorization": f"Bearer {token}"}
    r = await http.get(f"/v1/hoomis/{h}/messages", headers=headers)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while (r := await http.get(f"/v1/hoomis/{h}/messages", headers=headers)).status_code \
            == 200:
        assert time.monotonic() < deadline, "a cached token outlived its expiry"
        await asyncio.sleep(0.1)
    assert (r.status_code, r.json()["message"]) == (401, "token expired")
