"""`/openapi.json` describes every HTTP route, and what the hub really answers fits it.

The document is fetched from a running replica and checked as OpenAPI 3.1
(openapi-spec-validator). Then a tour calls every route for real, successes and errors,
and each response (status and JSON body) is validated against the operation's documented
response with jsonschema: an undocumented status or a body that does not match fails.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from uuid import uuid4

import httpx
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from server import api, openapi, operator_api
from server.testing.replica import ADMIN_TOKEN
from tests.wsclient import joined, send

BASE = "urn:hoomi-openapi"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Checker:
    """Validates real responses against the document."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry = Registry().with_resource(
            BASE, Resource.from_contents({"$id": BASE, **doc}, default_specification=DRAFT202012))
        self.templates = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$"), p)
                          for p in doc["paths"]]
        self.seen: set[tuple[str, str, int]] = set()

    def template(self, path: str) -> str:
        matches = [t for rx, t in self.templates if rx.match(path)]
        assert matches, f"{path}: no path of the document matches"
        # /v1/admin/hoomis/{id} before /v1/admin/hoomis/{id}/members/...: the longest fixed
        # part wins, as in the router.
        return max(matches, key=lambda t: len(re.sub(r"\{[^}]+\}", "", t)))

    def check(self, r: httpx.Response) -> None:
        method = r.request.method.lower()
        path = self.template(r.request.url.path)
        operation = self.doc["paths"][path].get(method)
        assert operation is not None, f"{method.upper()} {path}: not documented"
        responses = operation["responses"]
        assert str(r.status_code) in responses, (
            f"{method.upper()} {path}: status {r.status_code} not documented "
            f"({sorted(responses)}); body {r.text[:200]}")
        response = responses[str(r.status_code)]
        pointer = f"/paths/{_escape(path)}/{method}/responses/{r.status_code}"
        if "$ref" in response:
            pointer = response["$ref"][1:]
            response = self._resolve(response["$ref"])
        self.seen.add((method, path, r.status_code))
        content = response.get("content", {})
        if "application/json" not in content:
            return
        assert r.headers["content-type"].startswith("application/json"), r.headers
        schema = {"$ref": f"{BASE}#{pointer}/content/application~1json/schema"}
        Draft202012Validator(schema, registry=self.registry,
                             format_checker=FormatChecker()).validate(r.json())
        if "headers" in response and "Retry-After" in response["headers"]:
            assert "retry-after" in r.headers

    def _resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node  # type: ignore[no-any-return]


def _escape(path: str) -> str:
    return path.replace("~", "~0").replace("/", "~1")


@pytest.fixture(scope="module")
async def doc(cluster) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=cluster.a.http, timeout=10) as client:
        r = await client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


async def test_document_is_valid_openapi_3_1(doc):
    validate_spec(doc)
    assert doc["openapi"].startswith("3.1")


async def test_every_route_and_method_is_described(doc):
    described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    routes = [*api.routes, *operator_api.routes]
    for route in routes:
        for method in route.methods or ["GET"]:
            if method == "HEAD":
                continue
            assert (route.path, method.lower()) in described, f"{method} {route.path}"
            operation = doc["paths"][route.path][method.lower()]
            assert operation.get("summary") and operation.get("responses")
    assert ("/openapi.json", "get") in described
    assert len(described) == sum(len([m for m in (r.methods or ["GET"]) if m != "HEAD"])
                                 for r in routes) + 1
    assert doc["components"]["schemas"] == openapi.COMPONENTS["schemas"]


async def test_real_responses_validate_against_the_document(cluster, doc):
    check = Checker(doc)
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    peer, _ = await joined(cluster.a.ws, a_tok)
    for i in range(3):
        await peer.send(send(h, ref=i))
    for _ in range(3):
        await peer.recv()
    await peer.close()
    op = bearer(ADMIN_TOKEN)
    async with httpx.AsyncClient(base_url=cluster.b.http, timeout=10) as http:
        calls = [
            http.get("/healthz"), http.get("/readyz"), http.get("/openapi.json"),
            http.get("/v1/hoomis", headers=bearer(a_tok)),
            http.get("/v1/hoomis"),
            http.get("/v1/hoomis", headers=bearer("nope")),
            http.get(f"/v1/hoomis/{h}/messages?limit=2", headers=bearer(b_tok)),
            http.get(f"/v1/hoomis/{h}/messages?after=1", headers=bearer(b_tok)),
            http.get(f"/v1/hoomis/{h}/messages?limit=0", headers=bearer(b_tok)),
            http.get(f"/v1/hoomis/{uuid4()}/messages", headers=bearer(b_tok)),
            http.get(f"/v1/hoomis/{h}/members", headers=bearer(b_tok)),
            http.put(f"/v1/hoomis/{h}/retention", headers=bearer(b_tok),
                     json={"retention_seconds": 60}),
            http.put(f"/v1/hoomis/{h}/retention", headers=bearer(a_tok),
                     json={"retention_seconds": "x"}),
            http.put(f"/v1/hoomis/{h}/retention", headers=bearer(a_tok),
                     json={"retention_seconds": None}),
            http.post("/v1/admin/users", headers=op, json={}),
            http.post("/v1/admin/users", headers=op, json={"id": "nope"}),
            http.post("/v1/admin/hoomis", headers=op,
                      json={"members": [{"user_id": str(alice), "role": "admin"}]}),
            http.post("/v1/admin/tokens", headers=op, json={"user_id": str(bob)}),
            http.post("/v1/admin/tokens", headers=op, json={"user_id": str(uuid4())}),
            http.get("/v1/admin/audit?limit=5", headers=op),
            http.get(f"/v1/admin/audit?hoomi_id={h}", headers=op),
            http.get("/v1/admin/audit?hoomi_id=nope", headers=op),
            http.get("/v1/admin/audit", headers=bearer(a_tok)),
            http.get(f"/v1/admin/hoomis/{h}", headers=op),
            http.get(f"/v1/admin/hoomis/{uuid4()}", headers=op),
            http.get(f"/v1/admin/users/{alice}", headers=op),
            http.get(f"/v1/admin/users/{uuid4()}", headers=op),
        ]
        for call in calls:
            check.check(await call)
        extra = (await http.post("/v1/admin/users", headers=op, json={})).json()["id"]
        sequence = [
            http.put(f"/v1/hoomis/{h}/members/{extra}", headers=bearer(a_tok), json={}),
            http.put(f"/v1/admin/hoomis/{h}/members/{extra}", headers=op,
                     json={"role": "admin"}),
            http.delete(f"/v1/hoomis/{h}/members/{extra}", headers=bearer(a_tok)),
            http.put(f"/v1/admin/hoomis/{h}/members/{extra}", headers=op, json={}),
            http.delete(f"/v1/admin/hoomis/{h}/members/{extra}", headers=op),
            http.delete(f"/v1/admin/users/{extra}", headers=op),
            http.delete(f"/v1/admin/users/{extra}", headers=op),
        ]
        for call in sequence:
            check.check(await call)
        page = (await http.get(f"/v1/hoomis/{h}/messages", headers=bearer(a_tok))).json()
        target = page["messages"][0]["id"]
        edit = {"content": base64.b64encode(bytes(32)).decode(),
                "nonce": base64.b64encode(b"n" * 12).decode(), "session_id": "s2"}
        token = base64.b64encode(b"t" * 16).decode()
        for call in [http.put(f"/v1/hoomis/{h}/messages/{target}", headers=bearer(a_tok),
                              json=edit),
                     http.put(f"/v1/hoomis/{h}/messages/{target}", headers=bearer(a_tok),
                              json={**edit, "nonce": "x"}),
                     http.post(f"/v1/hoomis/{h}/search", headers=bearer(b_tok),
                               json={"tokens": [token]}),
                     http.post(f"/v1/hoomis/{h}/search", headers=bearer(b_tok), json={})]:
            check.check(await call)
        for call in [http.delete(f"/v1/hoomis/{h}/messages/{target}", headers=bearer(b_tok)),
                     http.delete(f"/v1/hoomis/{h}/messages/{target}", headers=bearer(a_tok)),
                     http.delete(f"/v1/admin/hoomis/{h}", headers=op),
                     http.delete(f"/v1/admin/hoomis/{h}", headers=op)]:
            check.check(await call)
    statuses = {s for _, _, s in check.seen}
    assert {200, 201, 204, 400, 401, 403, 404} <= statuses
    assert len({(m, p) for m, p, _ in check.seen}) == sum(
        len([m for m in (r.methods or ["GET"]) if m != "HEAD"])
        for r in [*api.routes, *operator_api.routes])  # all, /metrics excepted, + openapi
