"""The HTTP API (SPEC §5): health, metrics, the user routes and the operator routes.

Every failure is a protocol.HoomiError (a StorageError, an AuthError, or one raised here)
and becomes one JSON body `{"error": code, "message": text, "field": name}` with the status
its code maps to, in server/errors.py, registered as the app's exception handlers.

Abuse bounds (issue 14): at most `http_max_inflight` API requests served at once per
replica (`_Inflight`, 503); per user `http_rate`/`http_burst` requests (429) and
`user_max_reads` pages being read or sent at once (429); per client address, failed
authentications (`auth_failures`): past the budget 429 before the token is even looked
at; pages bounded to `page_max_bytes` of ciphertext.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from hoomi_protocol import Edit, ErrorCode, HoomiError, Search, client_frame
from storage import hoomis as hoomi_store
from storage import users as user_store
from storage.audit import Actor
from storage.records import Member, StoredMessage, WireMessage

from . import actions, auth, errors, events
from .metrics import CONTENT_TYPE_LATEST
from .services import Services

_log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_TOKEN_TTL = 30 * 86400
Handler = Callable[[Request, Services], Awaitable[Response]]


def _route(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint for `fn`: a HoomiError it raises goes to the app's exception handler
    (server/errors.py), and so does a database outage, as `unavailable`."""
    @functools.wraps(fn)  # keeps the docstring: the route's OpenAPI operation
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request, request.app.state.services)
        except HoomiError:
            raise
        except Exception as exc:
            mapped = errors.as_hoomi_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
    return endpoint


class _Inflight:
    """At most `http_max_inflight` API requests served at once on this replica, each
    counted until its response has been handed to the transport (so unread responses
    count too, and the memory they hold is bounded by it); past it 503 + Retry-After."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        services: Services = state.services
        inflight: int = getattr(state, "http_inflight", 0)
        if inflight >= services.settings.http_max_inflight:
            refused = errors.http_response(services, errors.unavailable(
                "replica busy: too many HTTP requests in flight"))
            await refused(scope, receive, send)
            return
        state.http_inflight = inflight + 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.http_inflight -= 1


def _api(path: str, fn: Callable[[Request], Awaitable[Response]],
         methods: list[str] | None = None) -> Route:
    """A /v1 route: counted by `_Inflight` (health and metrics are not)."""
    return Route(path, fn, methods=methods, middleware=[Middleware(_Inflight)])


# -- parsing -------------------------------------------------------------------------------

def _uuid(raw: Any, field: str) -> UUID:
    try:
        value = UUID(raw)
    except (ValueError, TypeError, AttributeError):
        raise HoomiError(ErrorCode.INVALID, f"{field}: not a UUID", field) from None
    if str(value) != str(raw).lower():
        raise HoomiError(ErrorCode.INVALID, f"{field}: not a canonical UUID", field)
    return value


def _path_uuid(request: Request, name: str) -> UUID:
    return _uuid(request.path_params[name], name)


def _int_param(request: Request, name: str, default: int | None, lo: int,
               hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HoomiError(ErrorCode.INVALID, f"{name}: not an integer", name) from None
    if not lo <= value <= hi:
        raise HoomiError(ErrorCode.INVALID, f"{name}: must be between {lo} and {hi}", name)
    return value


async def _json(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > limit:
        raise HoomiError(ErrorCode.TOO_LARGE, f"body: larger than {limit} bytes", "body")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise HoomiError(ErrorCode.INVALID, "body: not valid JSON", "body") from None
    except RecursionError:  # 64 KiB of `[` nests deeper than the parser's stack
        raise HoomiError(ErrorCode.INVALID, "body: nested too deeply", "body") from None
    if not isinstance(body, dict):
        raise HoomiError(ErrorCode.INVALID, "body: must be a JSON object", "body")
    return body


def _b64(body: dict[str, Any], field: str) -> bytes:
    raw = body.get(field)
    if not isinstance(raw, str):
        raise HoomiError(ErrorCode.INVALID, f"{field}: required, base64", field)
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        raise HoomiError(ErrorCode.INVALID, f"{field}: not base64", field) from None


def _frame_fields(body: dict[str, Any], binary: tuple[str, ...], optional: tuple[str, ...],
                  **path: str) -> dict[str, Any]:
    """A JSON body as the map the codec checks (hoomi_protocol.client_frame): the `binary`
    fields (base64 strings, or lists of them for `tokens`) made bytes, the `path` ids
    added. JSON null is not a value of the `optional` fields (the schema says integer or
    list), though a msgpack nil on the socket means "absent": refused here."""
    for field in optional:
        if field in body and body[field] is None:
            raise HoomiError(ErrorCode.INVALID, f"{field}: must not be null", field)
    m = {**body, **path}
    for field in binary:
        raw = body.get(field)
        if isinstance(raw, list):
            m[field] = [_b64({field: t}, field) if isinstance(t, str) else t for t in raw]
        elif raw is not None:
            m[field] = _b64(body, field)
    return m


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HoomiError(ErrorCode.UNAUTHORIZED, "authorization: Bearer token required",
                         "authorization")
    return token.strip()


def _address(request: Request) -> str:
    # uvicorn runs with proxy_headers: behind the shipped nginx this is the real client.
    return request.client.host if request.client else "?"


def _not_blocked(request: Request, services: Services) -> None:
    """An address past its failed-authentication budget is refused before its token is
    even looked at (so guessing tokens costs the guesser, not the hub)."""
    wait = services.auth_failures.blocked(_address(request))
    if wait:
        raise HoomiError(ErrorCode.RATE_LIMITED,
                         "too many failed authentications from this address", None,
                        wait)


def _failed(request: Request, services: Services, err: HoomiError) -> HoomiError:
    """Count a 401 against the client's address; the error to raise."""
    services.auth_failures.take(_address(request))
    return err


async def _user(request: Request, services: Services) -> UUID:
    user_id = await _token_user(request, services)
    await _still_exists(request, services, user_id)
    return user_id


async def _still_exists(request: Request, services: Services, user_id: UUID) -> None:
    """As on the socket: a deleted user's tokens stop working with it (401)."""
    if not await user_store.user_exists(services.pool, user_id):
        raise _failed(request, services,
                      HoomiError(ErrorCode.UNAUTHORIZED, "unknown user", "authorization"))


def _verified(request: Request, services: Services) -> UUID:
    """The user the request's token names (AuthError or HoomiError otherwise)."""
    token = _bearer(request)
    cache = services.verified_tokens
    user_id = cache.get(token, time.time())
    if user_id is None:
        settings = services.settings
        claims = auth.verify_claims(settings.jwt_secret, token, issuer=settings.jwt_issuer,
                                    audience=settings.jwt_audience)
        cache.put(token, claims)
        user_id = claims.user_id
    return user_id


async def _token_user(request: Request, services: Services) -> UUID:
    """The user a valid token names, within their request rate; whether the user still
    exists is the caller's to check (`_user` does, with a query of its own)."""
    _not_blocked(request, services)
    settings = services.settings
    try:
        user_id = _verified(request, services)
    except auth.AuthError as err:
        raise _failed(request, services,
                      HoomiError(err.code, err.message, "authorization")) from None
    except HoomiError as err:
        raise _failed(request, services, err) from None
    # Before any database work: a flood of valid-token requests costs one bucket lookup.
    wait = services.http_requests.take(user_id)
    if wait:
        raise HoomiError(ErrorCode.RATE_LIMITED,
                         f"too many requests: at most {settings.http_rate:g} per second "
                         f"({settings.http_burst} at once) per user", None, wait)
    return user_id


def _operator(request: Request, services: Services) -> None:
    _not_blocked(request, services)
    try:
        presented = _bearer(request)
    except HoomiError as err:
        raise _failed(request, services, err) from None
    if not auth.is_operator(services.settings.admin_token, presented):
        raise _failed(request, services, HoomiError(
            ErrorCode.UNAUTHORIZED, "authorization: operator token required", "authorization"))


def _message_json(m: StoredMessage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(m.id), "hoomi_id": str(m.hoomi_id), "seq": m.seq,
        "sender_id": str(m.sender_id) if m.sender_id else None,
        "created_at": events.ms(m.created_at), "scheme": m.scheme,
        "updated_at": events.ms(m.updated_at or m.created_at),
    }
    if m.deleted_at is not None:
        out["deleted"] = True
    else:
        assert m.content is not None and m.nonce is not None
        out["content"] = base64.b64encode(m.content).decode()
        out["nonce"] = base64.b64encode(m.nonce).decode()
        out["session_id"] = m.session_id
    return out


def _json_str(s: str | None) -> str:
    """A JSON string, or null, as JSONResponse writes it (json.dumps, ensure_ascii=False)."""
    if s is None:
        return "null"
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'  # nothing to escape
    return json.dumps(s, ensure_ascii=False)


def _page_json(hoomi: str, messages: list[WireMessage], end: str) -> bytes:
    """A page's JSON body written in one pass over its rows in wire form (`hoomi`: the
    page's Hoomi id; `end`: its last key and value, already JSON): byte for byte what
    JSONResponse makes of {"hoomi_id", "messages": [`_message_json`, ...], next_before or
    has_more} (tests/test_wire_pages.py), at 40 % of the cost (no dict per row, no
    encoder walking them; bench/RESULTS.md)."""
    rows = []
    for m in messages:
        head = (f'{{"id":"{m.id}","hoomi_id":"{hoomi}","seq":{m.seq},'
                f'"sender_id":{_json_str(m.sender_id)},"created_at":{m.created_at},'
                f'"scheme":{m.scheme},"updated_at":{m.updated_at}')
        if m.deleted:
            rows.append(head + ',"deleted":true}')
            continue
        assert m.content is not None and m.nonce is not None
        rows.append(f'{head},"content":"{base64.b64encode(m.content).decode()}",'
                    f'"nonce":"{base64.b64encode(m.nonce).decode()}",'
                    f'"session_id":{_json_str(m.session_id)}}}')
    return f'{{"hoomi_id":"{hoomi}","messages":[{",".join(rows)}],{end}}}'.encode()


# -- health ----------------------------------------------------------------------------------

async def healthz(request: Request) -> Response:
    """---
    summary: The process is up
    tags: [health]
    responses:
      "200":
        description: always
        content: {application/json: {schema: {type: object}}}
    """
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """---
    summary: Database and broker reachable, replica not draining
    tags: [health]
    responses:
      "200":
        description: "ready"
        content: {application/json: {schema: {$ref: "#/components/schemas/Ready"}}}
      "503":
        description: "not ready (the failing check says why)"
        content: {application/json: {schema: {$ref: "#/components/schemas/Ready"}}}
    """
    services: Services = request.app.state.services
    checks: dict[str, str] = {}
    try:
        await services.pool.fetchval("SELECT 1", timeout=2)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}"
    checks["broker"] = "ok" if await services.broker.ping() else "down"
    if services.draining:
        checks["replica"] = "draining"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """---
    summary: Prometheus metrics (HOOMI_METRICS_TOKEN, when set, as Bearer)
    tags: [health]
    responses:
      "200":
        description: Prometheus text exposition
        content: {text/plain: {schema: {type: string}}}
      "401": {$ref: "#/components/responses/Unauthorized"}
    """
    services: Services = request.app.state.services
    expected = services.settings.metrics_token
    if expected is not None:
        # Counted and refused like any other failed authentication.
        try:
            _not_blocked(request, services)
            header = request.headers.get("authorization", "")
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    presented.strip().encode(), expected.encode()):
                raise _failed(request, services, HoomiError(
                    ErrorCode.UNAUTHORIZED, "authorization: metrics token required",
                    "authorization"))
        except HoomiError as err:
            return errors.http_response(services, err)
    services.metrics.feeds.set(services.hub.feeds)
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- user routes -----------------------------------------------------------------------------

@_route
async def my_hoomis(request: Request, services: Services) -> Response:
    """---
    summary: My Hoomis with their last_seq and my role
    tags: [user]
    security: [{user: []}]
    responses:
      "200":
        description: "the caller's Hoomis"
        content: {application/json: {schema: {$ref: "#/components/schemas/MyHoomis"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    user_id = await _user(request, services)
    mine = await actions.my_hoomis(services, user_id)
    return JSONResponse({"hoomis": [
        {"hoomi_id": str(h.hoomi_id), "last_seq": h.last_seq, "role": h.role} for h in mine]})


class _PageResponse(Response):
    """A page that holds its user's read slot (and its place in flight) until its bytes
    are handed to the kernel: a user who asks for pages and never reads them holds at
    most `user_max_reads` of them. Sent in chunks, because uvicorn waits for the transport
    to drain before each body message but not after the last one."""

    CHUNK = 64 * 1024

    def __init__(self, body: bytes, release: Callable[[], None]) -> None:
        self._release = release
        super().__init__(body, media_type=JSONResponse.media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            body = memoryview(self.body)
            for start in range(0, len(body), self.CHUNK):
                await send({"type": "http.response.body",
                            "body": bytes(body[start:start + self.CHUNK]), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._release()


@_route
async def hoomi_messages(request: Request, services: Services) -> Response:
    """---
    summary: A page of history (before) or of what follows a seq (after)
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
      - {$ref: "#/components/parameters/Limit"}
      - {$ref: "#/components/parameters/Before"}
      - {$ref: "#/components/parameters/After"}
      - {$ref: "#/components/parameters/SchemeBelow"}
    responses:
      "200":
        description: "a page, shorter when messages are large (HOOMI_PAGE_MAX_BYTES);
          go on with next_before or has_more"
        content: {application/json: {schema: {$ref: "#/components/schemas/MessagePage"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    # The page's own query checks membership, and a deleted user is a member of nothing:
    # whether the user still exists is asked only when the page is refused, so a page
    # costs one query, not two (bench/RESULTS.md, "History pages").
    user_id = await _token_user(request, services)
    try:
        return await _messages_page(request, services, user_id)
    except HoomiError as err:
        if err.code in _REFUSED_PAGE:
            await _still_exists(request, services, user_id)
        raise


# What a deleted user's page request ends in (a member of nothing, or a bad parameter),
# answered 401 instead as before; a page refused for its rate is not looked into.
_REFUSED_PAGE = (ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND, ErrorCode.INVALID)


async def _messages_page(request: Request, services: Services, user_id: UUID) -> Response:
    hoomi_id = _path_uuid(request, "id")
    limits = services.limits
    limit = _int_param(request, "limit", limits.default_page_limit, 1, limits.max_page_limit)
    before = _int_param(request, "before", None, 1, 2**63 - 1)
    after = _int_param(request, "after", None, 0, 2**63 - 1)
    scheme_below = _int_param(request, "scheme_below", None, 1, 256)
    assert limit is not None
    if before is not None and after is not None:
        raise HoomiError(ErrorCode.INVALID, "after: cannot be combined with before", "after")
    # One user must not hold the database pool (nor the replica's memory with pages it
    # does not read): at most `user_max_reads` pages of theirs at once, socket and HTTP.
    if not services.user_reads.acquire(user_id):
        raise HoomiError(ErrorCode.RATE_LIMITED,
                         "too many pages at once: at most "
                         f"{services.settings.user_max_reads} per user",
                        None, errors.RETRY_AFTER_MS)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            services.user_reads.release(user_id)

    try:
        if after is not None:
            after_page = await actions.sync(services, user_id, hoomi_id, after, limit, field="id",
                                            scheme_below=scheme_below)
            body = _page_json(str(hoomi_id), after_page.messages,
                              f'"has_more":{"true" if after_page.has_more else "false"}')
        else:
            before_page = await actions.history(services, user_id, hoomi_id, before, limit,
                                                field="id", scheme_below=scheme_below)
            nb = before_page.next_before
            body = _page_json(str(hoomi_id), before_page.messages,
                              f'"next_before":{"null" if nb is None else nb}')
        return _PageResponse(body, release)
    except BaseException:
        release()
        raise


@_route
async def delete_message(request: Request, services: Services) -> Response:
    """---
    summary: Delete a message for everyone (its sender or a Hoomi admin)
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
      - {$ref: "#/components/parameters/MessageId"}
    responses:
      "204":
        description: "erased: content, nonce and session gone, the seq stays"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    user_id = await _user(request, services)
    hoomi_id = _path_uuid(request, "id")
    message_id = _path_uuid(request, "message_id")
    await actions.delete_message(services, user_id, hoomi_id, message_id, field="message_id")
    return Response(status_code=204)


@_route
async def edit_message(request: Request, services: Services) -> Response:
    """---
    summary: Replace one's own message with a new version (its sender only)
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
      - {$ref: "#/components/parameters/MessageId"}
    requestBody:
      required: true
      content: {application/json: {schema: {$ref: "#/components/schemas/Edit"}}}
    responses:
      "200":
        description: "edited: the same seq, a new updated_at; members get an `edited` push"
        content: {application/json: {schema: {$ref: "#/components/schemas/Edited"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    user_id = await _user(request, services)
    hoomi_id = _path_uuid(request, "id")
    message_id = _path_uuid(request, "message_id")
    limits = services.limits
    body = await _json(request, MAX_BODY + limits.max_content_bytes * 4 // 3)
    m = _frame_fields(body, ("content", "nonce", "tokens"), ("scheme", "tokens"),
                      hoomi_id=str(hoomi_id), id=str(message_id))
    frame = client_frame("edit", m, limits)
    assert isinstance(frame, Edit)
    edited = await actions.edit_message(services, user_id, frame, field="message_id")
    return JSONResponse({"id": str(edited.id), "hoomi_id": str(edited.hoomi_id),
                         "seq": edited.seq, "updated_at": events.ms(edited.updated_at)})


@_route
async def search_messages(request: Request, services: Services) -> Response:
    """---
    summary: Messages carrying every given blind-index token, newest first (members)
    description: "A POST, not a GET: tokens stay out of URLs and their logs."
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
    requestBody:
      required: true
      content: {application/json: {schema: {$ref: "#/components/schemas/Search"}}}
    responses:
      "200":
        description: "a page of matches; go on with next_before"
        content: {application/json: {schema: {$ref: "#/components/schemas/MessagePage"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    user_id = await _user(request, services)
    hoomi_id = _path_uuid(request, "id")
    limits = services.limits
    body = await _json(request)
    query = client_frame("search", _frame_fields(body, ("tokens",), ("limit",),
                                                 hoomi_id=str(hoomi_id)), limits)
    assert isinstance(query, Search)
    tokens, before, limit = query.tokens, query.before, query.limit
    if not services.user_reads.acquire(user_id):
        raise HoomiError(ErrorCode.RATE_LIMITED, "too many reads at once: at most "
                         f"{services.settings.user_max_reads} per user", None,
                         errors.RETRY_AFTER_MS)
    try:
        page = await actions.search(services, user_id, hoomi_id, tokens, before, limit,
                                    field="id")
    finally:
        services.user_reads.release(user_id)
    return JSONResponse({"hoomi_id": str(hoomi_id),
                         "messages": [_message_json(m) for m in page.messages],
                         "next_before": page.next_before})


@_route
async def hoomi_members(request: Request, services: Services) -> Response:
    """---
    summary: The members of a Hoomi (members only)
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
    responses:
      "200":
        description: "the roster"
        content: {application/json: {schema: {$ref: "#/components/schemas/Roster"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    user_id = await _user(request, services)
    hoomi_id = _path_uuid(request, "id")
    roster = await actions.members(services, user_id, hoomi_id)
    return JSONResponse({"members": [{"user_id": str(m.user_id), "role": m.role}
                                     for m in roster]})


@_route
async def set_retention(request: Request, services: Services) -> Response:
    """---
    summary: Set how long a Hoomi keeps messages (Hoomi admins)
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
    requestBody:
      required: true
      content: {application/json: {schema: {$ref: "#/components/schemas/Retention"}}}
    responses:
      "204":
        description: "set"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "413": {$ref: "#/components/responses/TooLarge"}
    """
    user_id = await _user(request, services)
    hoomi_id = _path_uuid(request, "id")
    body = await _json(request)
    if "retention_seconds" not in body:
        raise HoomiError(ErrorCode.INVALID, "retention_seconds: required (null keeps forever)",
                         "retention_seconds")
    seconds = body["retention_seconds"]
    if seconds is not None and (type(seconds) is not int or seconds <= 0):
        raise HoomiError(ErrorCode.INVALID, "retention_seconds: a positive integer or null",
                         "retention_seconds")
    await actions.set_retention(services, user_id, hoomi_id, seconds)
    return Response(status_code=204)


def _role(body: dict[str, Any]) -> str:
    role = body.get("role", "member")
    if role not in hoomi_store.ROLES:
        raise HoomiError(ErrorCode.INVALID, "role: must be admin or member", "role")
    return str(role)


@_route
async def hoomi_put_member(request: Request, services: Services) -> Response:
    """---
    summary: Add a member or change a role (Hoomi admins)
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
      - {$ref: "#/components/parameters/UserId"}
    requestBody:
      required: false
      content: {application/json: {schema: {$ref: "#/components/schemas/Role"}}}
    responses:
      "204":
        description: "set"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "413": {$ref: "#/components/responses/TooLarge"}
    """
    actor_id = await _user(request, services)
    hoomi_id = _path_uuid(request, "id")
    user_id = _path_uuid(request, "user_id")
    role = _role(await _json(request))
    await actions.put_member(services, hoomi_id, user_id, role, Actor.user(actor_id))
    return Response(status_code=204)


@_route
async def hoomi_remove_member(request: Request, services: Services) -> Response:
    """---
    summary: Remove a member (Hoomi admins) or leave (anyone)
    tags: [user]
    security: [{user: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
      - {$ref: "#/components/parameters/UserId"}
    responses:
      "204":
        description: "removed: their live sockets stop receiving at once"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    actor_id = await _user(request, services)
    hoomi_id = _path_uuid(request, "id")
    user_id = _path_uuid(request, "user_id")
    # Anyone may leave; removing others takes a Hoomi admin (checked in the use case).
    await actions.remove_member(services, hoomi_id, user_id, Actor.user(actor_id))
    return Response(status_code=204)


# -- operator routes -------------------------------------------------------------------------

@_route
async def operator_create_user(request: Request, services: Services) -> Response:
    """---
    summary: Create a user
    tags: [operator]
    security: [{operator: []}]
    requestBody:
      required: false
      content: {application/json: {schema: {$ref: "#/components/schemas/NewUser"}}}
    responses:
      "201":
        description: "created"
        content: {application/json: {schema: {$ref: "#/components/schemas/Created"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "413": {$ref: "#/components/responses/TooLarge"}
    """
    _operator(request, services)
    body = await _json(request)
    user_id = _uuid(body["id"], "id") if body.get("id") is not None else None
    created = await actions.create_user(services, user_id)
    return JSONResponse({"id": str(created)}, status_code=201)


@_route
async def operator_delete_user(request: Request, services: Services) -> Response:
    """---
    summary: Delete a user (their messages stay, sender_id becomes null)
    tags: [operator]
    security: [{operator: []}]
    parameters:
      - {$ref: "#/components/parameters/User"}
    responses:
      "204":
        description: "deleted"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    _operator(request, services)
    user_id = _path_uuid(request, "id")
    await actions.delete_user(services, user_id)
    return Response(status_code=204)


@_route
async def operator_create_hoomi(request: Request, services: Services) -> Response:
    """---
    summary: Create a Hoomi with its first members
    tags: [operator]
    security: [{operator: []}]
    requestBody:
      required: false
      content: {application/json: {schema: {$ref: "#/components/schemas/NewHoomi"}}}
    responses:
      "201":
        description: "created"
        content: {application/json: {schema: {$ref: "#/components/schemas/Created"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "413": {$ref: "#/components/responses/TooLarge"}
    """
    _operator(request, services)
    body = await _json(request)
    hoomi_id = _uuid(body["id"], "id") if body.get("id") is not None else None
    raw_members = body.get("members", [])
    if not isinstance(raw_members, list) or len(raw_members) > 10_000:
        raise HoomiError(ErrorCode.INVALID, "members: must be a list", "members")
    roster: list[Member] = []
    for i, m in enumerate(raw_members):
        if not isinstance(m, dict):
            raise HoomiError(ErrorCode.INVALID, f"members[{i}]: must be an object",
                             f"members[{i}]")
        role = m.get("role", "member")
        if role not in hoomi_store.ROLES:
            raise HoomiError(ErrorCode.INVALID, f"members[{i}].role: must be admin or member",
                             f"members[{i}].role")
        roster.append(Member(_uuid(m.get("user_id"), f"members[{i}].user_id"), role))
    created = await actions.create_hoomi(services, roster, hoomi_id)
    return JSONResponse({"id": str(created)}, status_code=201)


@_route
async def operator_delete_hoomi(request: Request, services: Services) -> Response:
    """---
    summary: Delete a Hoomi and its messages (audited)
    tags: [operator]
    security: [{operator: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
    responses:
      "204":
        description: "deleted"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    _operator(request, services)
    hoomi_id = _path_uuid(request, "id")
    await actions.delete_hoomi(services, hoomi_id)
    return Response(status_code=204)


@_route
async def operator_put_member(request: Request, services: Services) -> Response:
    """---
    summary: Add a member or change a role
    tags: [operator]
    security: [{operator: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
      - {$ref: "#/components/parameters/UserId"}
    requestBody:
      required: false
      content: {application/json: {schema: {$ref: "#/components/schemas/Role"}}}
    responses:
      "204":
        description: "set"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "413": {$ref: "#/components/responses/TooLarge"}
    """
    _operator(request, services)
    hoomi_id = _path_uuid(request, "id")
    user_id = _path_uuid(request, "user_id")
    role = _role(await _json(request))
    await actions.put_member(services, hoomi_id, user_id, role, Actor.operator())
    return Response(status_code=204)


@_route
async def operator_remove_member(request: Request, services: Services) -> Response:
    """---
    summary: Remove a member
    tags: [operator]
    security: [{operator: []}]
    parameters:
      - {$ref: "#/components/parameters/HoomiId"}
      - {$ref: "#/components/parameters/UserId"}
    responses:
      "204":
        description: "removed: their live sockets stop receiving at once"
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    _operator(request, services)
    await actions.remove_member(services, _path_uuid(request, "id"), _path_uuid(request, "user_id"),
                                Actor.operator())
    return Response(status_code=204)


@_route
async def operator_token(request: Request, services: Services) -> Response:
    """---
    summary: Sign a user token
    tags: [operator]
    security: [{operator: []}]
    requestBody:
      required: true
      content: {application/json: {schema: {$ref: "#/components/schemas/TokenRequest"}}}
    responses:
      "200":
        description: "the token"
        content: {application/json: {schema: {$ref: "#/components/schemas/Token"}}}
      "400": {$ref: "#/components/responses/Invalid"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "429": {$ref: "#/components/responses/RateLimited"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "413": {$ref: "#/components/responses/TooLarge"}
    """
    _operator(request, services)
    body = await _json(request)
    user_id = _uuid(body.get("user_id"), "user_id")
    ttl = body.get("ttl_seconds", 86400)
    if type(ttl) is not int or not 1 <= ttl <= MAX_TOKEN_TTL:
        raise HoomiError(ErrorCode.INVALID, f"ttl_seconds: an integer from 1 to {MAX_TOKEN_TTL}",
                         "ttl_seconds")
    if not await user_store.user_exists(services.pool, user_id):
        raise HoomiError(ErrorCode.NOT_FOUND, "user not found", "user_id")
    settings = services.settings
    return JSONResponse({"token": auth.issue(
        settings.jwt_secret, user_id, ttl, issuer=settings.jwt_issuer,
        audience=settings.jwt_audience)})


routes = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    _api("/v1/hoomis", my_hoomis),
    _api("/v1/hoomis/{id}/messages", hoomi_messages),
    _api("/v1/hoomis/{id}/messages/{message_id}", delete_message, ["DELETE"]),
    _api("/v1/hoomis/{id}/messages/{message_id}", edit_message, ["PUT"]),
    _api("/v1/hoomis/{id}/search", search_messages, ["POST"]),
    _api("/v1/hoomis/{id}/members", hoomi_members),
    _api("/v1/hoomis/{id}/retention", set_retention, ["PUT"]),
    _api("/v1/hoomis/{id}/members/{user_id}", hoomi_put_member, ["PUT"]),
    _api("/v1/hoomis/{id}/members/{user_id}", hoomi_remove_member, ["DELETE"]),
    _api("/v1/admin/users", operator_create_user, ["POST"]),
    _api("/v1/admin/users/{id}", operator_delete_user, ["DELETE"]),
    _api("/v1/admin/hoomis", operator_create_hoomi, ["POST"]),
    _api("/v1/admin/hoomis/{id}", operator_delete_hoomi, ["DELETE"]),
    _api("/v1/admin/hoomis/{id}/members/{user_id}", operator_put_member, ["PUT"]),
    _api("/v1/admin/hoomis/{id}/members/{user_id}", operator_remove_member, ["DELETE"]),
    _api("/v1/admin/tokens", operator_token, ["POST"]),
]
