"""What operators read (SPEC §7.3): the audit log, a Hoomi, a user. Never content.

Writes stay in server/api.py; these routes only read, with the operator token, through
the same `_route` wrapper (one error shape, outages as 503).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hoomi_protocol import ErrorCode, HoomiError
from storage import audit as audit_store
from storage import hoomis as hoomi_store
from storage.errors import StorageError

from . import events
from .api import _api, _int_param, _operator, _path_uuid, _route, _uuid
from .services import Services

AUDIT_PAGE_DEFAULT = 100
AUDIT_PAGE_MAX = 1000


def _optional_uuid(request: Request, name: str) -> UUID | None:
    raw = request.query_params.get(name)
    return None if raw is None or raw == "" else _uuid(raw, name)


def _audit_json(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": entry["id"],
        "at": events.ms(entry["at"]),
        "actor_kind": entry["actor_kind"],
        "actor_id": str(entry["actor_id"]) if entry["actor_id"] else None,
        "action": entry["action"],
        "hoomi_id": str(entry["hoomi_id"]) if entry["hoomi_id"] else None,
        "target_id": str(entry["target_id"]) if entry["target_id"] else None,
        "details": entry["details"],
    }


@_route
async def audit_log(request: Request, services: Services) -> Response:
    """---
    summary: The audit log, newest first, in pages (operator)
    tags: [operator]
    security: [{operator: []}]
    parameters:
      - {name: hoomi_id, in: query, schema: {type: string, format: uuid}}
      - {name: actor_id, in: query, schema: {type: string, format: uuid}}
      - {name: action, in: query, schema: {type: string, maxLength: 64},
         description: "e.g. message.delete, member.remove, hoomi.delete, retention.purge"}
      - {name: before, in: query, schema: {type: integer, minimum: 1},
         description: the next_before of the previous page}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000,
         default: 100}}
    responses:
      "200":
        description: a page of audit entries
        content:
          application/json:
            schema: {$ref: "#/components/schemas/AuditPage"}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    _operator(request, services)
    limit = _int_param(request, "limit", AUDIT_PAGE_DEFAULT, 1, AUDIT_PAGE_MAX)
    before = _int_param(request, "before", None, 1, 2**63 - 1)
    action = request.query_params.get("action") or None
    if action is not None and len(action) > 64:
        raise HoomiError(ErrorCode.INVALID, "action: at most 64 characters", "action")
    assert limit is not None
    page = await audit_store.page(
        services.pool, hoomi_id=_optional_uuid(request, "hoomi_id"),
        actor_id=_optional_uuid(request, "actor_id"), action=action, before=before,
        limit=limit)
    return JSONResponse({"entries": [_audit_json(e) for e in page.entries],
                         "next_before": page.next_before})


@_route
async def hoomi_overview(request: Request, services: Services) -> Response:
    """---
    summary: A Hoomi as the operator sees it (members, counters; never content)
    tags: [operator]
    security: [{operator: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
    responses:
      "200":
        description: the Hoomi
        content:
          application/json:
            schema: {$ref: "#/components/schemas/HoomiOverview"}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    _operator(request, services)
    hoomi_id = _path_uuid(request, "id")
    view = await hoomi_store.overview(services.pool, hoomi_id)
    if view is None:
        raise StorageError(ErrorCode.NOT_FOUND, "id: no such hoomi", "id")
    return JSONResponse({
        "id": str(view.hoomi_id),
        "members": [{"user_id": str(m.user_id), "role": m.role} for m in view.members],
        "last_seq": view.last_seq,
        "retention_seconds": view.retention_seconds,
        "archived_upto": view.archived_upto,
        "messages": view.messages,
    })


@_route
async def user_overview(request: Request, services: Services) -> Response:
    """---
    summary: A user and the Hoomis they belong to (operator)
    tags: [operator]
    security: [{operator: []}]
    parameters:
      - {$ref: "#/components/parameters/User"}
    responses:
      "200":
        description: the user
        content:
          application/json:
            schema: {$ref: "#/components/schemas/UserOverview"}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    _operator(request, services)
    user_id = _path_uuid(request, "id")
    hoomis = await hoomi_store.user_with_hoomis(services.pool, user_id)
    if hoomis is None:
        raise StorageError(ErrorCode.NOT_FOUND, "id: no such user", "id")
    return JSONResponse({"id": str(user_id), "hoomis": [
        {"hoomi_id": str(h.hoomi_id), "role": h.role, "last_seq": h.last_seq}
        for h in hoomis]})


routes = [
    _api("/v1/admin/audit", audit_log),
    _api("/v1/admin/hoomis/{id}", hoomi_overview, ["GET"]),
    _api("/v1/admin/users/{id}", user_overview, ["GET"]),
]
