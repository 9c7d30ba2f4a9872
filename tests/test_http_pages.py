"""GET /v1/hoomis/{id}/messages asks whether its user still exists only when the page
is refused (server/api.py `hoomi_messages`): a deleted user's token still gets 401
"unknown user" whatever the request, and counts as a failed authentication."""

from __future__ import annotations

from uuid import uuid4

import httpx
import pytest


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
