"""`/openapi.json`: the HTTP API described from the code.

Each endpoint carries its own operation (parameters, bodies, responses) in YAML after a
`---` line of its docstring; Starlette's SchemaGenerator walks the routing table and
collects them, so a route cannot exist without being listed (tests/test_openapi.py checks
that each one is described, and that real responses validate against the document).
The shared shapes (the error body, a message, a page) are the components below.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.schemas import SchemaGenerator

UUID = {"type": "string", "format": "uuid"}
MS = {"type": "integer", "description": "milliseconds since the Unix epoch"}
B64 = {"type": "string", "contentEncoding": "base64"}


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        response["headers"] = {"Retry-After": {
            "description": "seconds to wait before trying again",
            "schema": {"type": "integer", "minimum": 0}}}
    return response


COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "user": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                 "description": "a user's token (HS256 JWT, `sub` = user id)"},
        "operator": {"type": "http", "scheme": "bearer",
                     "description": "HOOMI_ADMIN_TOKEN"},
    },
    "schemas": {
        "Error": {
            "type": "object", "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "enum": [
                    "invalid", "unauthorized", "forbidden", "not_found", "too_large",
                    "rate_limited", "unavailable", "internal"]},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the input that was wrong"},
            },
        },
        "Message": {
            "type": "object",
            "required": ["id", "hoomi_id", "seq", "sender_id", "created_at"],
            "properties": {
                "id": UUID, "hoomi_id": UUID, "seq": {"type": "integer", "minimum": 1},
                "sender_id": {"oneOf": [UUID, {"type": "null"}]},
                "created_at": MS,
                "scheme": {"type": "integer", "minimum": 1, "maximum": 255,
                           "description": "the client's encryption scheme (1 for v1)"},
                "updated_at": {**MS, "description": "last edit, reencryption or deletion"},
                "content": B64, "nonce": B64, "session_id": {"type": ["string", "null"]},
                "deleted": {"type": "boolean", "const": True,
                            "description": "a tombstone: content, nonce, session erased"},
            },
        },
        "MessagePage": {
            "type": "object", "required": ["hoomi_id", "messages"],
            "properties": {
                "hoomi_id": UUID,
                "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                "next_before": {"type": ["integer", "null"],
                                "description": "history: the `before` of the next older page"},
                "has_more": {"type": "boolean", "description": "`after`: more to read"},
            },
        },
        "Member": {
            "type": "object", "required": ["user_id", "role"],
            "properties": {"user_id": UUID, "role": {"enum": ["admin", "member"]}},
        },
        "Created": {"type": "object", "required": ["id"], "properties": {"id": UUID}},
        "MyHoomis": {
            "type": "object", "required": ["hoomis"],
            "properties": {"hoomis": {"type": "array", "items": {
                "type": "object", "required": ["hoomi_id", "last_seq", "role"],
                "properties": {"hoomi_id": UUID, "last_seq": {"type": "integer", "minimum": 0},
                               "role": {"enum": ["admin", "member"]}}}}},
        },
        "Roster": {
            "type": "object", "required": ["members"],
            "properties": {"members": {"type": "array",
                                       "items": {"$ref": "#/components/schemas/Member"}}},
        },
        "Edit": {
            "type": "object", "required": ["content", "nonce", "session_id"],
            "properties": {
                "content": B64, "nonce": B64, "session_id": {"type": "string"},
                "scheme": {"type": "integer", "minimum": 1, "maximum": 255, "default": 1},
                "tokens": {"type": "array", "items": B64, "maxItems": 64,
                           "description": "the new version's search tokens (8-32 bytes "
                                          "each); the old ones go"},
            },
        },
        "Edited": {
            "type": "object", "required": ["id", "hoomi_id", "seq", "updated_at"],
            "properties": {"id": UUID, "hoomi_id": UUID,
                           "seq": {"type": "integer", "minimum": 1}, "updated_at": MS},
        },
        "Search": {
            "type": "object", "required": ["tokens"],
            "properties": {
                "tokens": {"type": "array", "items": B64, "minItems": 1, "maxItems": 8,
                           "description": "blind-index tokens, all must match"},
                "before": {"type": "integer", "minimum": 1},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
            },
        },
        "Retention": {
            "type": "object", "required": ["retention_seconds"],
            "properties": {"retention_seconds": {
                "type": ["integer", "null"], "minimum": 1, "maximum": 3_153_600_000,
                "description": "null keeps messages forever"}},
        },
        "Role": {"type": "object",
                 "properties": {"role": {"enum": ["admin", "member"], "default": "member"}}},
        "NewUser": {"type": "object", "properties": {"id": UUID}},
        "NewHoomi": {
            "type": "object",
            "properties": {"id": UUID, "members": {
                "type": "array", "maxItems": 10_000,
                "items": {"$ref": "#/components/schemas/Member"}}},
        },
        "TokenRequest": {
            "type": "object", "required": ["user_id"],
            "properties": {"user_id": UUID, "ttl_seconds": {
                "type": "integer", "minimum": 1, "maximum": 30 * 86400, "default": 86400}},
        },
        "Token": {"type": "object", "required": ["token"],
                  "properties": {"token": {"type": "string"}}},
        "Ready": {"type": "object", "required": ["ready"],
                  "properties": {"ready": {"type": "boolean"}},
                  "additionalProperties": {"type": "string"},
                  "description": "each check (database, broker, replica) and its state"},
        "AuditEntry": {
            "type": "object",
            "required": ["id", "at", "actor_kind", "actor_id", "action", "hoomi_id",
                         "target_id", "details"],
            "properties": {
                "id": {"type": "integer"}, "at": MS,
                "actor_kind": {"enum": ["user", "operator", "system"]},
                "actor_id": {"oneOf": [UUID, {"type": "null"}]},
                "action": {"type": "string"},
                "hoomi_id": {"oneOf": [UUID, {"type": "null"}]},
                "target_id": {"oneOf": [UUID, {"type": "null"}]},
                "details": {"type": "object"},
            },
        },
        "AuditPage": {
            "type": "object", "required": ["entries", "next_before"],
            "properties": {
                "entries": {"type": "array",
                            "items": {"$ref": "#/components/schemas/AuditEntry"}},
                "next_before": {"type": ["integer", "null"]},
            },
        },
        "HoomiOverview": {
            "type": "object",
            "required": ["id", "members", "last_seq", "retention_seconds", "archived_upto",
                         "messages"],
            "properties": {
                "id": UUID,
                "members": {"type": "array", "items": {"$ref": "#/components/schemas/Member"}},
                "last_seq": {"type": "integer", "minimum": 0},
                "retention_seconds": {"type": ["integer", "null"]},
                "archived_upto": {"type": ["integer", "null"]},
                "messages": {"type": "integer", "minimum": 0,
                             "description": "rows stored, tombstones included"},
            },
        },
        "UserOverview": {
            "type": "object", "required": ["id", "hoomis"],
            "properties": {
                "id": UUID,
                "hoomis": {"type": "array", "items": {
                    "type": "object", "required": ["hoomi_id", "role"],
                    "properties": {"hoomi_id": UUID, "role": {"enum": ["admin", "member"]},
                                   "last_seq": {"type": "integer"}}}},
            },
        },
    },
    "parameters": {
        "HoomiId": {"name": "id", "in": "path", "required": True, "schema": UUID,
                    "description": "the Hoomi"},
        "User": {"name": "id", "in": "path", "required": True, "schema": UUID,
                 "description": "the user"},
        "UserId": {"name": "user_id", "in": "path", "required": True, "schema": UUID},
        "MessageId": {"name": "message_id", "in": "path", "required": True, "schema": UUID},
        "Limit": {"name": "limit", "in": "query",
                  "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}},
        "Before": {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1},
                   "description": "history: messages with a lower seq, newest first"},
        "After": {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0},
                  "description": "sync: messages with a higher seq, oldest first (not with "
                                 "`before`)"},
        "SchemeBelow": {"name": "scheme_below", "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 256},
                        "description": "only live messages with a lower scheme: what is left "
                                       "to reencrypt"},
    },
    "responses": {
        "Invalid": _error("a parameter or the body is wrong; `field` names it"),
        "Unauthorized": _error("no token, or a bad, expired or foreign one"),
        "Forbidden": _error("not a member, or not an admin where one is needed"),
        "NotFound": _error("no such Hoomi, user, message or route"),
        "TooLarge": _error("the body is larger than the hub accepts"),
        "RateLimited": _error("too many requests from this user or address", retry=True),
        "Unavailable": _error("the database is down or the replica is full or draining",
                              retry=True),
    },
}

generator = SchemaGenerator({
    "openapi": "3.1.0",
    "info": {
        "title": "Hoomi hub HTTP API",
        "version": "1",
        "description": "The HTTP side of the Hoomi hub (SPEC §5 and §7.3). Message "
                       "content is ciphertext, base64 in JSON; the hub never sees a key. "
                       "The real-time protocol is the WebSocket at /v1/ws (docs/protocol.md).",
    },
    "components": COMPONENTS,
})


def document(routes: list[BaseRoute]) -> dict[str, Any]:
    return generator.get_schema(routes)


async def openapi_json(request: Request) -> Response:
    """---
    summary: This document
    tags: [health]
    responses:
      "200":
        description: the OpenAPI 3.1 description of every HTTP route
        content:
          application/json:
            schema: {type: object}
    """
    cached = getattr(request.app.state, "openapi", None)
    if cached is None:
        cached = request.app.state.openapi = document(request.app.routes)
    return JSONResponse(cached)
