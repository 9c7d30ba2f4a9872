"""Use cases: each operation written once, called by the socket (server/ws.py) and by HTTP
(server/api.py), above the stores (storage/) as Synapse's handlers sit above its stores.

A use case checks who may do it (through the stores' membership checks), does it, and
tells the other replicas what changed: every membership control goes out through
`_tell_replicas`, every deletion through `Hub.publish_deletion`. Failures are
protocol.HoomiError values (server/errors.py maps them for each side). The callers keep
only what is theirs: parsing, rate limits, and the shape of the reply.

`field` arguments name the request field a not-found or forbidden error points at: the
socket's frames say `hoomi_id`, the HTTP paths say `id`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import asyncpg

from hoomi_protocol import Edit, ErrorCode, HoomiError, Reencrypt, Send
from storage import hoomis as hoomi_store
from storage import messages as message_store
from storage import users as user_store
from storage.audit import Actor
from storage.db import stateless
from storage.records import (
    AppendRequest,
    DeletedMessage,
    EditedMessage,
    HistoryPage,
    HoomiSummary,
    Member,
    Reencrypted,
    SearchPage,
    SyncPage,
    WireMessage,
)
from storage.writer import Notify

from . import auth
from .errors import RETRY_AFTER_MS
from .events import Control
from .hub import Socket
from .services import Services

_log = logging.getLogger(__name__)
T = TypeVar("T")
# A read standby that failed is skipped this long (pages go to the primary meanwhile).
STANDBY_RETRY_S = 5.0


class TryAgainLater(HoomiError):
    """A hello refused for now (per-address or per-user bounds): close 1013."""

    def __init__(self, message: str, wait_ms: int, reason: str) -> None:
        super().__init__(ErrorCode.RATE_LIMITED, message, None, wait_ms)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Authenticated:
    user_id: UUID
    expires_at: float  # the token's expiry, seconds since the epoch
    hoomis: list[HoomiSummary]


async def authenticate(services: Services, address: str, token: str) -> Authenticated:
    """A socket's `hello`: the per-address bounds, the token, the user (who must still
    exist) and their Hoomis, the per-user socket bound. AuthError or TryAgainLater."""
    settings = services.settings
    # Per client address: hellos are bounded (each costs a token check and queries),
    # and an address past its failed authentications is refused without a check.
    wait_ms = services.hellos.take(address)
    why = "too many hellos from this address"
    if not wait_ms:
        wait_ms = services.auth_failures.blocked(address)
        why = "too many failed authentications from this address"
    if wait_ms:
        raise TryAgainLater(f"{why}; retry later", wait_ms, why)
    try:
        claims = auth.verify_claims(settings.jwt_secret, token, issuer=settings.jwt_issuer,
                                    audience=settings.jwt_audience)
        # A valid signature is not enough: a deleted user's tokens die with it.
        first = await hoomi_store.user_with_hoomis(services.pool, claims.user_id)
        if first is None:
            raise auth.AuthError(ErrorCode.UNAUTHORIZED, "unknown user")
    except auth.AuthError:
        services.auth_failures.take(address)
        raise
    if services.hub.sockets_of(claims.user_id) >= settings.max_sockets_per_user:
        # One account must not hold a replica's sockets (a leaking client, a stolen
        # token): refuse the newest, keep the ones in use.
        raise TryAgainLater("too many open sockets for this user", RETRY_AFTER_MS,
                            "too many sockets for this user")
    return Authenticated(claims.user_id, claims.expires_at, first)


def submit_send(services: Services, sender_id: UUID, frame: Send, notify: Notify) -> None:
    """Queue a message for the writer: `notify(result, None)` (or `notify(None, error)`)
    once its batch is decided, called right after the commit hook that pushed it to every
    member (server/hub.py `committed`), so the ack leaves with the batch's pushes.
    A refusal at the door (queue full, shutting down) raises StorageError instead."""
    services.writer.submit_notify(AppendRequest(
        frame.hoomi_id, sender_id, frame.client_msg_id, frame.content, frame.nonce,
        frame.session_id, frame.scheme, frame.tokens), notify)


async def history(services: Services, reader: UUID, hoomi_id: UUID, before: int | None,
                  limit: int, *, field: str = "hoomi_id",
                  scheme_below: int | None = None) -> HistoryPage[WireMessage]:
    """A page before `before` (newest first), for a member, within HOOMI_PAGE_MAX_BYTES;
    with `scheme_below`, only the live messages still to reencrypt. In wire form: both
    transports send it as it is."""
    return await _read_page(services, lambda conn: message_store.wire_history(
        conn, hoomi_id, before, limit, reader=reader, hoomi_field=field,
        max_bytes=services.settings.page_max_bytes, scheme_below=scheme_below))


async def sync(services: Services, reader: UUID, hoomi_id: UUID, after: int, limit: int,
               *, field: str = "hoomi_id", scheme_below: int | None = None,
               ) -> SyncPage[WireMessage]:
    """A page after `after` (oldest first), for a member, within HOOMI_PAGE_MAX_BYTES,
    in wire form."""
    return await _read_page(services, lambda conn: message_store.wire_since(
        conn, hoomi_id, after, limit, reader=reader, hoomi_field=field,
        max_bytes=services.settings.page_max_bytes, scheme_below=scheme_below))


async def edit_message(services: Services, actor_id: UUID, frame: Edit, *,
                       field: str = "id") -> EditedMessage:
    """A new version of one's own message; every member's sockets get `edited` after the
    message itself."""
    edited = await message_store.edit(
        services.pool, frame.hoomi_id, frame.id, actor_id, content=frame.content,
        nonce=frame.nonce, session_id=frame.session_id, scheme=frame.scheme,
        tokens=frame.tokens, field=field)
    services.hub.publish_edit(edited)
    return edited


async def reencrypt(services: Services, actor_id: UUID, frame: Reencrypt) -> Reencrypted:
    """A Hoomi admin's device moves a batch of messages to a newer scheme; each one
    applied is pushed as `edited`."""
    done = await message_store.reencrypt(services.pool, frame.hoomi_id, actor_id, [
        message_store.ReencryptItem(it.id, it.old_nonce, it.content, it.nonce, it.session_id,
                                    it.scheme, it.tokens) for it in frame.items])
    for edited in done.updated:
        services.hub.publish_edit(edited)
    return done


async def search(services: Services, reader: UUID, hoomi_id: UUID, tokens: Sequence[bytes],
                 before: int | None, limit: int, *, field: str = "hoomi_id") -> SearchPage:
    """Messages carrying every token, newest first, for a member."""
    return await _read_page(services, lambda conn: message_store.search(
        conn, hoomi_id, list(tokens), before, limit, reader, hoomi_field=field))


async def _read_page(services: Services,
                     read: Callable[[asyncpg.Connection | asyncpg.Pool], Awaitable[T]]) -> T:
    """A page from the read standby (HOOMI_READ_DATABASE_URL) when it has replayed the
    primary's WAL position read after this request began: then it shows every commit
    acknowledged before (messages, deletions, edits, memberships), as the primary would.
    Otherwise, or if the standby fails (down, a query cancelled by a recovery conflict),
    from the primary; after a failure the standby is skipped for STANDBY_RETRY_S.
    docs/scaling.md, "Read standbys"."""
    if (services.read_pool is not None and services.wal_clock is not None
            and time.monotonic() >= services.standby_retry_at):
        lsn = await services.wal_clock.now()
        try:
            async with stateless(services.read_pool) as conn:
                if await message_store.replayed(conn, lsn):
                    page = await read(conn)
                    services.page_reads["standby"] += 1
                    return page
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                TimeoutError) as exc:
            _log.warning("read standby failed, reading from the primary for %g s: %s",
                         STANDBY_RETRY_S, exc)
            services.standby_retry_at = time.monotonic() + STANDBY_RETRY_S
    page = await read(services.pool)
    services.page_reads["primary"] += 1
    return page


async def mark_read(services: Services, origin: Socket | None, user_id: UUID,
                    hoomi_id: UUID, seq: int, *, field: str = "hoomi_id") -> int:
    """A member has read up to `seq`: stored (never back, never past the Hoomi's end);
    when it moved, a `receipt` to the Hoomi's sockets but `origin`. Returns the stored
    read_seq."""
    stored, moved = await hoomi_store.mark_read(services.pool, hoomi_id, user_id, seq,
                                                field=field)
    if moved:
        services.hub.publish_receipt(origin, hoomi_id, user_id, stored)
    return stored


async def presence(services: Services, reader: UUID, hoomi_id: UUID, *,
                   field: str = "hoomi_id") -> list[UUID]:
    """The Hoomi's members with at least one live socket on any replica, for a member
    (one database read for the roster, then server/presence.py)."""
    roster = [m.user_id for m in await hoomi_store.members(services.pool, hoomi_id)]
    if reader not in roster:
        await hoomi_store.require_member(services.pool, hoomi_id, reader, field=field)
        raise HoomiError(ErrorCode.FORBIDDEN, "not a member of this hoomi")
    return sorted(await services.hub.online(roster))


async def my_hoomis(services: Services, user_id: UUID) -> list[HoomiSummary]:
    """The user's Hoomis with their last_seq and the user's role."""
    return await hoomi_store.user_hoomis(services.pool, user_id)


async def members(services: Services, reader: UUID, hoomi_id: UUID) -> list[Member]:
    """A Hoomi's roster, for its members."""
    await hoomi_store.require_member(services.pool, hoomi_id, reader, field="id")
    return await hoomi_store.members(services.pool, hoomi_id)


async def delete_message(services: Services, actor_id: UUID, hoomi_id: UUID,
                         message_id: UUID, *, field: str = "id") -> DeletedMessage:
    """Delete a message for everyone (its sender or a Hoomi admin); members' sockets get
    `deleted` after the message itself (server/session.py)."""
    done = await message_store.delete_for_everyone(services.pool, hoomi_id, message_id,
                                                   actor_id, field=field)
    if done.changed:
        services.hub.publish_deletion(done.hoomi_id, done.id, done.seq)
    return done


async def set_retention(services: Services, actor_id: UUID, hoomi_id: UUID,
                        seconds: int | None) -> None:
    """How long a Hoomi keeps messages (its admins only)."""
    await hoomi_store.require_member(services.pool, hoomi_id, actor_id, admin=True, field="id")
    await hoomi_store.set_retention(services.pool, hoomi_id, seconds, Actor.user(actor_id))


async def put_member(services: Services, hoomi_id: UUID, user_id: UUID, role: str,
                     actor: Actor) -> None:
    """Add a member or change a role; `actor` is a Hoomi admin (checked here) or the
    operator (checked by the caller's token)."""
    if actor.kind == "user" and actor.id is not None:
        await hoomi_store.require_member(services.pool, hoomi_id, actor.id, admin=True,
                                         field="id")
    await hoomi_store.set_member(services.pool, hoomi_id, user_id, role, actor,
                                 hoomi_field="id")
    _tell_replicas(services, Control("joined", user_id, hoomi_id, role))


async def remove_member(services: Services, hoomi_id: UUID, user_id: UUID,
                        actor: Actor) -> None:
    """Remove a member (a Hoomi admin, the operator) or leave (anyone, themselves)."""
    if actor.kind == "user" and actor.id is not None and actor.id != user_id:
        await hoomi_store.require_member(services.pool, hoomi_id, actor.id, admin=True,
                                         field="id")
    await hoomi_store.remove_member(services.pool, hoomi_id, user_id, actor)
    _tell_replicas(services, Control("left", user_id, hoomi_id))


async def create_hoomi(services: Services, roster: Sequence[Member],
                       hoomi_id: UUID | None) -> UUID:
    created = await hoomi_store.create_hoomi(services.pool, roster, hoomi_id)
    for m in roster:
        _tell_replicas(services, Control("joined", m.user_id, created, m.role))
    return created


async def delete_hoomi(services: Services, hoomi_id: UUID) -> None:
    """Delete a Hoomi and its messages; its members' sockets leave it."""
    for user_id in await hoomi_store.delete_hoomi(services.pool, hoomi_id, Actor.operator()):
        _tell_replicas(services, Control("left", user_id, hoomi_id))


async def create_user(services: Services, user_id: UUID | None) -> UUID:
    return await user_store.create_user(services.pool, user_id)


async def delete_user(services: Services, user_id: UUID) -> None:
    """Delete a user (their messages stay, sender_id becomes null); their sockets close."""
    await user_store.delete_user(services.pool, user_id, Actor.operator())
    _tell_replicas(services, Control("user_gone", user_id))


def _tell_replicas(services: Services, change: Control) -> None:
    """The one place membership changes go to this replica's sockets and the others'."""
    services.hub.publish_control(change)
